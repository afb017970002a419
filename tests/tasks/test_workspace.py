"""Atomic writes and the workspace lock."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.workspace import WorkspaceBusy, atomic_path, workspace_lock

ROOT = Path(__file__).resolve().parents[2]


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def hold_lock(root: Path) -> subprocess.Popen:
    code = f"import time; from tasks.workspace import workspace_lock\nwith workspace_lock(__import__('pathlib').Path({str(root)!r})):\n    print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path)
    try:
        with (
            pytest.raises(WorkspaceBusy, match=rf"{tmp_path}: workspace in use by pid {holder.pid}"),
            workspace_lock(tmp_path),
        ):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    began = time.monotonic()
    with workspace_lock(tmp_path):  # the kernel released the dead holder's lock
        assert time.monotonic() - began < 1
