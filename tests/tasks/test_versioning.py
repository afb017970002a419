"""The DVC data registry, with real git and DVC on tiny datasets in tmp_path (a local directory remote)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tasks.versioning import (
    VersioningError,
    checkout_version,
    list_versions,
    open_registry,
    push_version,
    resolve_version,
    version_dataset,
)

# Not a decodable image, but bytes are all DVC sees; the NUL and high bytes catch any text-mode copy.
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
FILES = {
    "images/train/a.png": PNG,
    "images/val/b.png": PNG[::-1],
    "labels/train/a.txt": b"0 0.5 0.5 0.25 0.25\n",
    "labels/val/b.txt": b"1 0.4 0.4 0.1 0.2\n",
    "data.yaml": b"path: .\ntrain: images/train\nval: images/val\nnames: {0: circle, 1: square}\n",
}


@pytest.fixture(autouse=True)
def _no_analytics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, str]:
    return tmp_path / "registry", str(tmp_path / "remote")


def make_dataset(folder: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def git(registry: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=registry, check=True, capture_output=True, text=True).stdout.strip()


def commits(registry: Path) -> int:
    return int(git(registry, "rev-list", "--count", "HEAD"))


def spy(monkeypatch: pytest.MonkeyPatch, name: str, record: Callable[[tuple], Any]) -> list[Any]:
    """Wrap ``tasks.versioning.<name>`` so each call appends ``record(args)`` to the returned list."""
    import tasks.versioning as versioning

    real, calls = getattr(versioning, name), []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(record(args))
        return real(*args, **kwargs)

    monkeypatch.setattr(versioning, name, wrapper)
    return calls


def test_first_version_is_a_tagged_pushed_commit(tmp_path: Path, paths: tuple[Path, str]) -> None:
    registry, remote = paths
    source = make_dataset(tmp_path / "ds")
    before = snapshot(source)

    v1 = version_dataset(source, "synthetic", registry, remote, message="first")

    assert (v1.name, v1.number, v1.tag) == ("synthetic", 1, "synthetic-v1")
    assert v1.git_rev == git(registry, "rev-parse", "synthetic-v1^{commit}") == git(registry, "rev-parse", "HEAD")
    assert git(registry, "cat-file", "-t", "synthetic-v1") == "tag"  # annotated
    assert v1.dvc_md5.endswith(".dir") and v1.dvc_md5 in (registry / "datasets" / "synthetic.dvc").read_text()
    assert v1.files == len(FILES)
    assert v1.pushed and any(p.is_file() for p in Path(remote).rglob("*"))
    assert datetime.fromisoformat(v1.created).tzinfo is not None
    assert snapshot(registry / "datasets" / "synthetic") == before
    assert snapshot(source) == before  # the source is only read
    assert git(registry, "status", "--porcelain") == ""  # everything of the version is committed
    assert list_versions(registry) == [v1]  # the push state is read back from the registry


def test_identical_content_returns_latest_without_new_commit(tmp_path: Path, paths: tuple[Path, str]) -> None:
    registry, remote = paths
    v1 = version_dataset(make_dataset(tmp_path / "ds"), "synthetic", registry, remote)
    count = commits(registry)

    again = version_dataset(make_dataset(tmp_path / "copy"), "synthetic", registry, remote)

    assert again == v1
    assert commits(registry) == count
    assert git(registry, "tag").split() == ["synthetic-v1"]


def test_an_unchanged_rerun_skips_dvc_unless_the_latest_tag_moved(
    tmp_path: Path, paths: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, remote = paths
    v1 = version_dataset(make_dataset(tmp_path / "ds"), "synthetic", registry, remote)
    calls = spy(monkeypatch, "_dvc", lambda args: args[1:])
    adds = spy(monkeypatch, "_add_changed_files", lambda args: args[1])

    assert version_dataset(make_dataset(tmp_path / "copy"), "synthetic", registry, remote) == v1
    assert calls == [] and adds == []  # the content fingerprint matched the latest version: nothing was added

    git(registry, "commit", "-q", "--allow-empty", "-m", "someone else's commit")
    git(registry, "tag", "-f", "-a", "synthetic-v1", "-m", "moved")  # the tag no longer names that commit
    again = version_dataset(make_dataset(tmp_path / "copy"), "synthetic", registry, remote)
    assert adds == ["synthetic"] and again.dvc_md5 == v1.dvc_md5  # added again (no file had changed)


def test_changed_content_is_v2_and_v1_restores_byte_for_byte(tmp_path: Path, paths: tuple[Path, str]) -> None:
    registry, remote = paths
    source = make_dataset(tmp_path / "ds")
    first = snapshot(source)
    v1 = version_dataset(source, "synthetic", registry, remote)
    (source / "labels/train/a.txt").write_bytes(b"1 0.1 0.1 0.1 0.1\n")
    (source / "images/val/b.png").unlink()
    make_dataset(source, {"images/train/c.png": PNG * 2})
    second = snapshot(source)

    v2 = version_dataset(source, "synthetic", registry, remote)

    assert (v2.tag, v2.files) == ("synthetic-v2", len(FILES)) and v2.dvc_md5 != v1.dvc_md5
    assert snapshot(checkout_version(registry, "synthetic-v1", tmp_path / "out" / "v1")) == first
    (tmp_path / "empty").mkdir()
    assert snapshot(checkout_version(registry, "latest", tmp_path / "empty", name="synthetic")) == second
    shutil.rmtree(registry / ".dvc" / "cache")  # now only the remote has the data
    assert snapshot(checkout_version(registry, "synthetic-v1", tmp_path / "from_remote")) == first
    with pytest.raises(VersioningError, match="not an empty directory"):
        checkout_version(registry, "synthetic-v1", tmp_path / "from_remote")


def test_a_new_version_hashes_only_changed_files_and_writes_what_dvc_add_writes(
    tmp_path: Path, paths: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, remote = paths
    source = make_dataset(tmp_path / "ds")
    version_dataset(source, "synthetic", registry, remote)
    (source / "labels/train/a.txt").write_bytes(b"1 0.1 0.1 0.1 0.1\n")  # changed
    (source / "images/val/b.png").unlink()  # removed
    make_dataset(source, {"images/extra/c.png": PNG * 2, "images/extra/d.png": PNG * 2})  # new, same bytes
    calls = spy(monkeypatch, "_dvc", lambda args: args[1:])
    hashed = spy(monkeypatch, "_md5_file", lambda args: args[0].name)

    v2 = version_dataset(source, "synthetic", registry, remote)

    assert calls == [] and sorted(hashed) == ["a.txt", "c.png", "d.png"]
    assert (v2.tag, v2.files, v2.pushed) == ("synthetic-v2", len(FILES) + 1, True)
    ours = (registry / "datasets" / "synthetic.dvc").read_bytes()
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "datasets/synthetic"], cwd=registry, check=True)
    assert (registry / "datasets" / "synthetic.dvc").read_bytes() == ours  # DVC's own add agrees, byte for byte
    shutil.rmtree(registry / ".dvc" / "cache")  # only the remote has the data now
    assert snapshot(checkout_version(registry, "synthetic-v2", tmp_path / "out")) == snapshot(source)


def test_an_update_that_died_halfway_is_redone_by_dvc_add(
    tmp_path: Path, paths: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, remote = paths
    source = make_dataset(tmp_path / "ds")
    version_dataset(source, "synthetic", registry, remote)
    (source / "images/train/a.png").write_bytes(PNG[::-1])
    # A call that died after rebuilding the tree, before the .dvc file described it, leaves its marker.
    (registry / ".dvc" / "tmp" / "synthdet-adding-synthetic").touch()
    calls = spy(monkeypatch, "_dvc", lambda args: args[1:])

    v2 = version_dataset(source, "synthetic", registry, remote)

    assert ("add", "-q", "datasets/synthetic") in calls
    assert not (registry / ".dvc" / "tmp" / "synthdet-adding-synthetic").exists()
    assert snapshot(checkout_version(registry, v2.tag, tmp_path / "out")) == snapshot(source)


def test_list_and_resolve_versions(tmp_path: Path, paths: tuple[Path, str]) -> None:
    registry, remote = paths
    assert list_versions(open_registry(registry, remote)) == []
    a = make_dataset(tmp_path / "a")
    a1 = version_dataset(a, "alpha", registry, remote, push=False)
    b1 = version_dataset(make_dataset(tmp_path / "b", {"x.txt": b"x"}), "beta", registry, remote, push=False)
    (a / "data.yaml").write_bytes(b"changed")
    a2 = version_dataset(a, "alpha", registry, remote, push=False)

    assert [v.tag for v in list_versions(registry)] == ["alpha-v1", "beta-v1", "alpha-v2"]
    assert list_versions(registry, "alpha") == [a1, a2]
    assert (b1.files, a1.pushed) == (1, False)
    assert resolve_version(registry, "latest", name="alpha") == a2
    assert resolve_version(registry, "beta-v1") == b1
    with pytest.raises(VersioningError, match=r"'alpha-v9'.*alpha-v1, beta-v1, alpha-v2"):
        resolve_version(registry, "alpha-v9")
    with pytest.raises(VersioningError, match="needs a dataset name"):
        resolve_version(registry, "latest")
    with pytest.raises(VersioningError, match="'latest'.*none"):
        resolve_version(registry, "latest", name="gamma")


def test_open_registry_is_idempotent_and_rejects_other_paths(tmp_path: Path, paths: tuple[Path, str]) -> None:
    registry, remote = paths
    assert open_registry(registry, remote) == registry
    count = commits(registry)
    assert open_registry(registry, remote) == registry and commits(registry) == count
    assert (registry / ".dvc" / "tmp" / "site_cache").is_dir()  # not /var/tmp/dvc

    plain_git = tmp_path / "code"
    plain_git.mkdir()
    git(plain_git, "init", "-q")
    with pytest.raises(VersioningError, match=r"code: a git repository without DVC"):
        open_registry(plain_git, remote)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(VersioningError, match=r"file\.txt: is a file"):
        open_registry(a_file, remote)
    with pytest.raises(VersioningError, match=r"ds: not a data registry"):
        open_registry(make_dataset(tmp_path / "ds"), remote)


def test_unreachable_remote_keeps_local_version_then_push_version(
    tmp_path: Path, paths: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    registry, remote = paths
    broken = tmp_path / "not_a_dir"
    broken.write_text("a file where the remote directory should be")

    with caplog.at_level(logging.WARNING, logger="tasks.versioning"):
        v1 = version_dataset(make_dataset(tmp_path / "ds"), "synthetic", registry, str(broken))

    assert v1.tag == "synthetic-v1" and not v1.pushed
    assert not resolve_version(registry, "synthetic-v1").pushed
    assert any("not pushed" in r.message and str(broken) in r.message for r in caplog.records)
    open_registry(registry, remote)  # fix the remote
    pushed = push_version(registry, "latest", name="synthetic")
    assert pushed == resolve_version(registry, "synthetic-v1") and pushed.pushed
    shutil.rmtree(registry / ".dvc" / "cache")  # v1's commit still names the broken remote; the current one wins
    assert snapshot(checkout_version(registry, "synthetic-v1", tmp_path / "out")) == FILES


def test_push_version_refuses_when_the_cache_lacks_the_data(tmp_path: Path, paths: tuple[Path, str]) -> None:
    registry, remote = paths
    version_dataset(make_dataset(tmp_path / "ds"), "synthetic", registry, remote, push=False)
    shutil.rmtree(registry / ".dvc" / "cache")
    with pytest.raises(VersioningError, match="synthetic-v1: the local cache"):
        push_version(registry, "synthetic-v1")
    assert not resolve_version(registry, "synthetic-v1").pushed


def test_recovers_after_dvc_add_without_commit(tmp_path: Path, paths: tuple[Path, str]) -> None:
    registry, remote = paths
    source = make_dataset(tmp_path / "ds")
    open_registry(registry, remote)
    count = commits(registry)
    shutil.copytree(source, registry / "datasets" / "synthetic")  # a call that died after `dvc add`
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "datasets/synthetic"], cwd=registry, check=True)

    v1 = version_dataset(source, "synthetic", registry, remote)

    assert v1.tag == "synthetic-v1" and v1.pushed
    assert commits(registry) == count + 1
    assert git(registry, "tag").split() == ["synthetic-v1"]


def test_recovers_after_commit_without_tag(tmp_path: Path, paths: tuple[Path, str]) -> None:
    registry, remote = paths
    source = make_dataset(tmp_path / "ds")
    version_dataset(source, "synthetic", registry, remote, push=False)  # pushing is tested elsewhere
    (source / "data.yaml").write_bytes(b"v2")
    v2 = version_dataset(source, "synthetic", registry, remote, push=False)
    git(registry, "tag", "-d", "synthetic-v2")  # as if the call died between commit and tag
    count = commits(registry)

    again = version_dataset(source, "synthetic", registry, remote, push=False)

    assert (again.tag, again.git_rev, again.dvc_md5) == ("synthetic-v2", v2.git_rev, v2.dvc_md5)
    assert commits(registry) == count
    assert git(registry, "tag").split() == ["synthetic-v1", "synthetic-v2"]


def test_rejects_bad_name_and_missing_dataset(tmp_path: Path, paths: tuple[Path, str]) -> None:
    registry, remote = paths
    with pytest.raises(VersioningError, match="'../x' is not a valid name"):
        version_dataset(make_dataset(tmp_path / "ds"), "../x", registry, remote)
    with pytest.raises(VersioningError, match="nowhere: dataset directory not found"):
        version_dataset(tmp_path / "nowhere", "synthetic", registry, remote)
    assert not registry.exists()


def test_dvc_import_from_the_registry_like_any_dvc_repo(tmp_path: Path, paths: tuple[Path, str]) -> None:
    registry, remote = paths
    v1 = version_dataset(make_dataset(tmp_path / "v1"), "synthetic", registry, remote)
    version_dataset(make_dataset(tmp_path / "v2", {**FILES, "extra.txt": b"more"}), "synthetic", registry, remote)

    consumer = tmp_path / "consumer"
    consumer.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=consumer, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=consumer, check=True)
    subprocess.run(
        [*dvc, "import", str(registry), "datasets/synthetic", "--rev", v1.tag, "-o", "data"],
        cwd=consumer,
        check=True,
        capture_output=True,
    )
    assert snapshot(consumer / "data") == FILES
    assert (consumer / "data.dvc").is_file()  # the consumer records where its data came from
