"""Where a run's files live. Everything a run writes is under one workspace directory.

```
<workspace>/
  cache/images/       content-addressed generated images (<id>.png + <id>.json), shared by runs
  cache/detections/   validator outputs per (image, validator, settings), shared by runs
  cache/detailed/     accepted images with real fine detail added (dataset.detail), per grain
  cache/restyled/     real images recoloured to a condition's colours (dataset.restyle), per colours
  runs/<run>/         each run's tables, labels and dataset before versioning
  registry/           the DVC data registry (its own git repository)
  remote/             the default DVC remote (a local directory)
  mlflow.db, mlartifacts/
  prefect/            PREFECT_HOME for local runs
  config/             tool settings (ultralytics) kept out of the user's home
```
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path
    run_name: str = "default"

    @property
    def images(self) -> Path:
        return self.root / "cache" / "images"

    @property
    def detections(self) -> Path:
        return self.root / "cache" / "detections"

    @property
    def detailed(self) -> Path:
        return self.root / "cache" / "detailed"

    @property
    def restyled(self) -> Path:
        return self.root / "cache" / "restyled"

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.run_name

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def remote(self) -> Path:
        return self.root / "remote"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def config_dir(self) -> Path:
        return self.root / "config"


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it into place only if the block succeeds.

    A crash therefore never leaves a half-written file under the final name.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp")  # what atomic_path's mkstemp names look like


def sweep_temp_files(root: Path, folders: tuple[str, ...] = ("cache", "runs")) -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` that a killed process left behind, and a
    half-built default registry (``.registry.*``, see ``tasks.versioning.open_registry``).

    Call with the workspace lock held (no live writer). Returns what was deleted.
    """
    swept = [build for build in root.glob(".registry.*") if build.is_dir()]  # a registry being created
    for build in swept:
        shutil.rmtree(build)
    for folder in folders:
        for path in (root / folder).rglob(".*.tmp*") if (root / folder).is_dir() else ():
            if path.is_file() and _TEMP.match(path.name):
                path.unlink()
                swept.append(path)
    return swept


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_parquet_atomic(frame, target: Path) -> None:  # frame: pandas.DataFrame
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)


class WorkspaceBusy(RuntimeError):
    """Another run holds the workspace."""


@contextmanager
def workspace_lock(root: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold ``<root>/.lock`` for the duration of a run, so two runs never write one workspace at once.

    The lock is an ``flock`` on an open file: the kernel drops it when the holder exits, even by
    SIGKILL, so a crashed run never leaves a stale lock behind.

    Args:
        root: the workspace.
        wait_s: how long to wait for a holder to finish; 0 fails at once.

    Raises:
        WorkspaceBusy: naming the workspace and the holder's pid, if another process still holds it.
    """
    import fcntl
    import time

    root.mkdir(parents=True, exist_ok=True)
    path = root / ".lock"
    deadline = time.monotonic() + wait_s
    with path.open("a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait_s:.0f} s" if wait_s else ""
                    raise WorkspaceBusy(
                        f"{root}: workspace in use by {holder}{waited}; wait for it to finish or use --workspace DIR"
                    ) from None
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
