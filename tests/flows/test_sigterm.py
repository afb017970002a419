"""`synthdet run` stopped with SIGTERM (`kill`, a scheduler, a container stopping) leaves nothing running.

Without a Prefect server set, a run starts a temporary API server (a uvicorn child process) and stops it
at exit. SIGTERM's default action skips that exit hook, so the server was left running after the run
had gone. The CLI now turns SIGTERM into an orderly exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def servers_of(process: psutil.Process) -> list[psutil.Process]:
    return [c for c in process.children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]


def test_sigterm_stops_the_run_and_its_temporary_prefect_server(tmp_path: Path, smoke_params: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # a temporary server per run
    command = [sys.executable, "-m", "flows.cli", "run", "--params", str(smoke_params), "--workspace",
               str(tmp_path / "workspace")]  # fmt: skip
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not servers:
            assert run.poll() is None, "the run ended before its temporary server started"
            assert time.monotonic() < deadline, "no temporary Prefect server appeared"
            time.sleep(0.5)
            servers = servers_of(psutil.Process(run.pid))
        time.sleep(2)  # into the run
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=180) != 0  # stopped, not finished
        gone, alive = psutil.wait_procs(servers, timeout=60)
        assert not alive, f"left running: {[' '.join(p.cmdline()) for p in alive]}"
    finally:
        for process in [run, *servers]:  # never leave one behind, even when the test fails
            if process.poll() is None if process is run else process.is_running():
                process.kill()
