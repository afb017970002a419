"""MLflow tracking through the run-id API, on a real SQLite store."""

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tasks.tracking import Tracker, flatten


@pytest.fixture
def tracker(tmp_path: Path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "artifacts").as_uri())


def test_flatten_nested_params() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
    assert len(flatten({"long": "x" * 10000})["long"]) == 6000


def test_nested_runs_with_params_metrics_artifacts(tracker: Tracker, tmp_path: Path) -> None:
    with tracker.run("pipeline", tags={"synthdet.flow": "pipeline"}) as parent, tracker.run("prompts", parent) as child:
        tracker.log_params(child, {"seed": 0, "axes": {"colour": {"red": 1}}})
        tracker.log_metrics(child, {"prompts": 12, "bad": float("nan"), "metrics/mAP50(B)": 0.5}, step=3)
        tracker.log_table(child, pd.DataFrame({"prompt": ["a", "b"]}), "prompts.json")
        tracker.log_image(child, Image.new("RGB", (8, 8)), "grid.png")
        tracker.log_image([child, parent], Image.new("RGB", (8, 4), "red"), "grids/both.png")  # encoded once
        (tmp_path / "f.txt").write_text("x")
        tracker.log_artifact(child, tmp_path / "f.txt", "files")
    run = tracker.get_run(child)
    assert run.info.status == "FINISHED" and run.info.run_name == "prompts"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params == {"seed": "0", "axes.colour.red": "1"}
    assert run.data.metrics == {"prompts": 12.0, "metrics/mAP50_B_": 0.5}  # NaN dropped, key made legal
    paths = {a.path for a in tracker.client.list_artifacts(child)}
    assert {"prompts.json", "grid.png", "files"} <= paths
    for run_id in (child, parent):
        local = tracker.client.download_artifacts(run_id, "grids/both.png", str(tmp_path / run_id))
        with Image.open(local) as image:
            assert image.size == (8, 4) and image.getpixel((0, 0)) == (255, 0, 0)
    assert (tmp_path / "artifacts").is_dir()


def test_a_failing_block_marks_the_run_failed(tracker: Tracker) -> None:
    with pytest.raises(RuntimeError), tracker.run("generate") as run_id:
        raise RuntimeError("boom")
    assert tracker.get_run(run_id).info.status == "FAILED"


def test_unreachable_server_fails_fast_naming_the_uri_without_its_password() -> None:
    import socket
    import time

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    began = time.monotonic()
    with pytest.raises(
        RuntimeError, match=rf"MLflow tracking server http://bob:\*\*\*@127.0.0.1:{port} is unreachable"
    ):
        Tracker(f"http://bob:hunter2@127.0.0.1:{port}")
    assert time.monotonic() - began < 10


def test_runs_left_running_by_a_dead_process_are_failed_with_a_reason(tracker: Tracker) -> None:
    mine, other = {"synthdet.workspace": "/work/it's mine"}, {"synthdet.workspace": "/work/other"}
    killed = tracker.start_run("pipeline", tags=mine)  # never ended: its process was killed
    killed_child = tracker.start_run("generate", parent=killed, tags=mine)
    with tracker.run("pipeline", tags=mine) as finished:
        pass
    elsewhere = tracker.start_run("pipeline", tags=other)  # another workspace's run, maybe alive

    closed = tracker.fail_stale_runs(mine, "its process died")
    assert {r.info.run_id for r in closed} == {killed, killed_child}
    for run_id in (killed, killed_child):
        run = tracker.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags["synthdet.crashed"] == "its process died"
    assert tracker.get_run(finished).info.status == "FINISHED"
    assert tracker.get_run(elsewhere).info.status == "RUNNING"
    assert tracker.fail_stale_runs(mine, "again") == []  # nothing left to close


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_download_weights_finds_the_weights_a_run_logged(tracker: Tracker, tmp_path: Path, name: str) -> None:
    weights = tmp_path / name
    weights.write_bytes(b"weights " + name.encode())
    with tracker.run("finetune") as run_id:
        tracker.log_artifact(run_id, weights, "weights")
    assert tracker.download_weights(run_id, tmp_path / "back").read_bytes() == weights.read_bytes()
    with tracker.run("finetune") as empty:
        pass
    with pytest.raises(FileNotFoundError, match=f"{empty}: expected one weights"):
        tracker.download_weights(empty, tmp_path / "none")
