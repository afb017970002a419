"""Atomic writes and the workspace lock."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.workspace import WorkspaceBusy, atomic_path, sweep_temp_files, workspace_lock

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


def test_a_waiting_run_gets_the_lock_when_the_holder_ends_or_gives_up_naming_it(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path)
    try:
        began = time.monotonic()
        with (
            pytest.raises(WorkspaceBusy, match=rf"in use by pid {holder.pid} after waiting 1 s"),
            workspace_lock(tmp_path, wait_s=1.0),
        ):
            pass
        assert 1.0 <= time.monotonic() - began < 5
        threading.Timer(1.0, holder.kill).start()  # the holder ends while the next run waits
        with workspace_lock(tmp_path, wait_s=30.0):
            assert holder.wait(timeout=5) is not None
    finally:
        holder.kill()
        holder.wait()


def test_temporary_files_of_a_killed_writer_are_swept_and_nothing_else(tmp_path: Path) -> None:
    images = tmp_path / "cache" / "images"
    images.mkdir(parents=True)
    code = (f"import os; from pathlib import Path; from tasks.workspace import atomic_path\n"
            f"with atomic_path(Path({str(images / 'abc.png')!r})) as tmp:\n"
            f"    tmp.write_bytes(b'half'); print(tmp, flush=True); os.kill(os.getpid(), 9)")  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    left = Path(killed.stdout.strip())
    assert left.is_file()  # SIGKILL skips atomic_path's clean-up
    keep = [images / "abc.json", images / ".hidden", tmp_path / "runs" / "r" / "notes.tmp.txt"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    assert sweep_temp_files(tmp_path) == [left]
    assert not left.exists() and all(path.is_file() for path in keep)
