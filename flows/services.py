"""Local services for the dashboard: a Prefect server, a worker for the ``synthdet`` process pool
(with the deployments of ``prefect.yaml``) and an MLflow tracking server.

Each runs in its own process group, logs to ``<workspace>/services/<name>.log`` and is recorded in
``<workspace>/services/<name>.pid`` with its start time, so ``down`` stops exactly the processes ``up``
started (never a later process that reused the pid) and a second ``up`` starts nothing twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from tasks.workspace import Workspace

log = logging.getLogger(__name__)

POOL = "synthdet"
ORDER = ("mlflow", "prefect", "worker")  # start order; stopped in reverse


@dataclass(frozen=True)
class Ports:
    prefect: int = 4200
    mlflow: int = 5000
    host: str = "127.0.0.1"

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.prefect}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow}"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _commands(ws: Workspace, ports: Ports) -> dict[str, list[str]]:
    return {
        # The stores come from the environment (see _env), so a database password never shows in `ps`.
        "mlflow": [_bin("mlflow"), "server", "--host", ports.host, "--port", str(ports.mlflow), "--workers", "1"],
        "prefect": [_bin("prefect"), "server", "start", "--host", ports.host, "--port", str(ports.prefect)],
        "worker": [_bin("prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--name", "synthdet-local"],
    }  # fmt: skip


def _health(name: str, ports: Ports) -> str | None:
    return {"mlflow": f"{ports.mlflow_uri}/health", "prefect": f"{ports.prefect_api}/health"}.get(name)


def _env(ws: Workspace, ports: Ports, root: Path) -> dict[str, str]:
    """The services' environment: the user's, with the workspace's stores where the user set none.

    Production back ends are chosen by the variables each server already reads (docs/scale-out.md):
    ``MLFLOW_BACKEND_STORE_URI`` (e.g. PostgreSQL), ``MLFLOW_ARTIFACTS_DESTINATION`` (e.g. ``s3://...``,
    with ``AWS_*`` credentials and endpoint) and ``PREFECT_SERVER_DATABASE_CONNECTION_URL``.
    """
    env = dict(os.environ)
    env.update(PREFECT_API_URL=ports.prefect_api, MLFLOW_TRACKING_URI=ports.mlflow_uri, PWD=str(root))
    env["PREFECT_HOME"] = str(ws.prefect_home.resolve())
    env.setdefault("MLFLOW_BACKEND_STORE_URI", ws.mlflow_uri)
    env.setdefault("MLFLOW_ARTIFACTS_DESTINATION", str(ws.mlflow_artifacts.resolve()))
    return env


# -- pid records ------------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot), or None if it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def _pid_file(ws: Workspace, name: str) -> Path:
    return ws.root / "services" / f"{name}.pid"


def running_pid(ws: Workspace, name: str) -> int | None:
    """The pid ``up`` recorded for a service, if that very process is still alive."""
    try:
        pid, started = _pid_file(ws, name).read_text().split()
    except (OSError, ValueError):
        return None
    return int(pid) if _start_time(int(pid)) == started else None


def _healthy(url: str | None) -> bool:
    if url is None:
        return True
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


# -- commands ---------------------------------------------------------------------------------
def up(ws: Workspace, ports: Ports, root: Path, timeout: float = 180.0) -> dict[str, int]:
    """Start what is not running, wait until healthy, create the pool and deploy ``prefect.yaml``.

    Returns:
        service name -> pid.
    """
    folder = ws.root / "services"
    folder.mkdir(parents=True, exist_ok=True)
    env = _env(ws, ports, root)
    pids = {}
    for name, command in _commands(ws, ports).items():
        if name == "worker":
            _deploy(env, root)
        pid = running_pid(ws, name)
        if pid is None:
            with (folder / f"{name}.log").open("ab") as out:
                process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            pid = process.pid
            _pid_file(ws, name).write_text(f"{pid} {_start_time(pid)}")
            log.info("started %s (pid %d), log %s", name, pid, folder / f"{name}.log")
        pids[name] = pid
        _wait(name, _health(name, ports), pid, timeout, folder / f"{name}.log")
    return pids


def _wait(name: str, url: str | None, pid: int, timeout: float, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        if _start_time(pid) is None:
            tail = logfile.read_text(errors="replace")[-800:] if logfile.is_file() else ""
            raise RuntimeError(f"{name} exited during start-up; see {logfile}:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not healthy at {url} after {timeout:.0f} s; see {logfile}")
        time.sleep(1)


def _deploy(env: dict[str, str], root: Path) -> None:
    """Create the process work pool if missing and (re)deploy every deployment of prefect.yaml."""
    prefect = _bin("prefect")
    if subprocess.run([prefect, "work-pool", "inspect", POOL], env=env, cwd=root, capture_output=True).returncode:
        _check([prefect, "work-pool", "create", POOL, "--type", "process"], env, root)
    _check([prefect, "--no-prompt", "deploy", "--all"], env, root)


def _check(command: list[str], env: dict[str, str], root: Path) -> None:
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[1:])} failed: {(result.stdout + result.stderr)[-1500:]}")


def status(ws: Workspace, ports: Ports) -> dict[str, dict[str, object]]:
    """Each service: its recorded pid, whether that process lives, and whether it answers."""
    report = {}
    for name in ORDER:
        pid = running_pid(ws, name)
        report[name] = {"pid": pid, "running": pid is not None,
                        "healthy": pid is not None and _healthy(_health(name, ports)),
                        "url": {"mlflow": ports.mlflow_uri, "prefect": ports.prefect_api.removesuffix("/api")}.get(name)}  # fmt: skip
    return report


def down(ws: Workspace, grace: float = 20.0) -> list[str]:
    """Stop the process groups ``up`` started (SIGTERM, then SIGKILL after ``grace`` seconds)."""
    stopped = []
    for name in reversed(ORDER):
        pid = running_pid(ws, name)
        if pid is not None:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _start_time(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            # Whatever is left of the group: workers the leader did not take down with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(name)
        _pid_file(ws, name).unlink(missing_ok=True)
    return stopped
