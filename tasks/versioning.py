"""Dataset versions in a DVC data registry: the only module that runs DVC.

The registry is its own git + DVC repository, never the user's code repository::

    <registry>/
      datasets/<name>/        the latest content of a dataset (DVC-tracked, git-ignored)
      datasets/<name>.dvc     its md5 and file count, committed once per version
      .dvc/config             default remote 'storage'; .dvc/config.local holds site_cache_dir

A version is one commit plus an annotated tag ``<name>-v<N>``. Whether its data reached the remote
is recorded as a git note on the version's commit under ``refs/notes/synthdet-pushed``: notes live in
the registry's own git database, survive clones that fetch them, and need no file of our own.
One writer at a time: two processes versioning into the same registry at once are not supported.
"""

from __future__ import annotations

import configparser
import filecmp
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from tasks.config import NAME_PATTERN
from tasks.workspace import write_text_atomic

logger = logging.getLogger(__name__)

REMOTE = "storage"
NOTES_REF = "synthdet-pushed"
TAG_PATTERN = re.compile(r"^(?P<name>.+)-v(?P<number>[0-9]+)$")


@dataclass(frozen=True)
class DatasetVersion:
    """One version of one dataset in the registry."""

    name: str
    number: int
    tag: str
    git_rev: str
    dvc_md5: str
    files: int
    pushed: bool
    created: str


class VersioningError(RuntimeError):
    """A registry, version or git/DVC command that failed; the message names which."""


def open_registry(registry: Path, remote: str) -> Path:
    """Create the registry if missing, or check an existing one. Idempotent.

    A new registry is built in a temporary sibling directory and renamed into place, so a crash never
    leaves a git repository without DVC. An existing registry whose remote differs from ``remote`` is
    re-pointed (and the config change committed), which is how an unreachable remote gets fixed.

    Args:
        registry: the registry directory (missing or empty: created).
        remote: any DVC remote URL; a local path is made absolute and created.

    Returns:
        The registry's absolute path.
    """
    registry = Path(registry).absolute()
    if "://" not in remote:
        remote = str(Path(remote).expanduser().resolve())
        try:
            Path(remote).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # push will fail and say so; versioning itself still works
            logger.warning("cannot create the DVC remote directory %s: %s", remote, exc)
    if registry.exists() and not registry.is_dir():
        raise VersioningError(f"{registry}: is a file, not a data registry directory")
    if registry.is_dir() and any(registry.iterdir()):
        if not (registry / ".git").is_dir():
            raise VersioningError(f"{registry}: not a data registry (expected a git repository, found none)")
        if not (registry / ".dvc").is_dir():
            raise VersioningError(f"{registry}: a git repository without DVC (.dvc/ missing); not a data registry")
        # --project: a URL the user overrides in config.local is theirs and must not cause a commit each call.
        current = _project_remote_url(registry)
        if current != remote:
            _dvc(registry, "remote", "add", "--project", "--default", "--force", REMOTE, remote)
            if _git(registry, "status", "--porcelain", "--", ".dvc/config").stdout.strip():
                _git(registry, "add", ".dvc/config")
                _git(registry, "commit", "-q", "-m", f"registry: remote {REMOTE} changed")
            logger.info("registry %s: remote %s is now %s", registry, REMOTE, remote)
    else:
        registry.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{registry.name}.", dir=registry.parent))
        try:
            _git(build, "init", "-q", "-b", "main")
            for key, value in [
                ("user.name", "synthdet"),
                ("user.email", "synthdet"),
                ("commit.gpgsign", "false"),
                ("tag.gpgsign", "false"),
            ]:
                _git(build, "config", key, value)
            _dvc(build, "init", "-q")
            _dvc(build, "config", "core.analytics", "false")
            _dvc(build, "remote", "add", "--default", REMOTE, remote)
            _git(build, "add", ".")
            _git(build, "commit", "-q", "-m", "registry: initialise")
            os.replace(build, registry)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        logger.info("created data registry %s (remote %s)", registry, remote)
    if not (registry / ".dvc" / "config.local").exists():
        # DVC resolves site_cache_dir against the current directory, not the config file: keep it absolute.
        _dvc(registry, "config", "--local", "core.site_cache_dir", str(_site_cache(registry)))
    return registry


def version_dataset(
    dataset_dir: Path, name: str, registry: Path, remote: str, push: bool = True, message: str = ""
) -> DatasetVersion:
    """Record ``dataset_dir`` as the next version of ``name``, unless it equals the latest version.

    Writes ``datasets/<name>/`` (a copy; symlinks are followed), its ``.dvc`` file, a commit and the tag
    ``<name>-v<N>`` in the registry, then pushes to the remote. Safe to call again after a crash at any
    step: work already done is found and finished, never duplicated.

    Args:
        dataset_dir: the dataset folder; it is only read.
        name: the dataset name, also the tag prefix.
        registry: the registry directory (created if missing).
        remote: the DVC remote URL (see :func:`open_registry`).
        push: push the data; a failed push logs a warning and returns ``pushed=False``.
        message: appended to the commit and tag message.

    Returns:
        The new version, or the latest one if the content is identical to it.
    """
    dataset_dir = Path(dataset_dir)
    if not re.fullmatch(NAME_PATTERN, name):
        raise VersioningError(f"dataset name {name!r} is not a valid name (pattern {NAME_PATTERN})")
    if not dataset_dir.is_dir():
        raise VersioningError(f"{dataset_dir}: dataset directory not found")
    registry = open_registry(registry, remote)
    fingerprint = _fingerprint(dataset_dir)
    versions = list_versions(registry, name)
    if versions and _known_fingerprints(registry).get(versions[-1].tag) == [versions[-1].git_rev, fingerprint]:
        # The same bytes as the latest version (an unchanged re-run): no copy, no `dvc add` (seconds).
        logger.info("%s: identical to %s, nothing new to version", dataset_dir, versions[-1].tag)
        return _push_if_asked(registry, versions[-1], remote, push)
    # The marker says "the workspace may not match its .dvc file": set before the tree changes, cleared once
    # the .dvc file describes it. Only a matching pair can be updated file by file.
    marker = registry / ".dvc" / "tmp" / f"synthdet-adding-{name}"
    consistent = not marker.exists() and (registry / "datasets" / f"{name}.dvc").is_file()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    files = _replace_tree(dataset_dir, registry / "datasets" / name, registry / ".dvc" / "tmp" / "synthdet-staging")
    if not (consistent and _add_changed_files(registry, name, files)):
        _dvc(registry, "add", "-q", f"datasets/{name}")
    marker.unlink()
    md5 = _read_dvc_file((registry / "datasets" / f"{name}.dvc").read_text())[0]

    if versions and versions[-1].dvc_md5 == md5:
        version = versions[-1]
        logger.info("%s: identical to %s, nothing new to version", dataset_dir, version.tag)
    else:
        tag = f"{name}-v{max((v.number for v in versions), default=0) + 1}"
        text = f"{tag}: {message}" if message else tag
        paths = [f"datasets/{name}.dvc", "datasets/.gitignore"]
        changed = _git(registry, "status", "--porcelain", "--", *paths).stdout.strip()
        head_tagged = _git(registry, "tag", "--points-at", "HEAD").stdout.strip()
        if changed or head_tagged:
            _git(registry, "add", "--", *paths)
            _git(registry, "commit", "-q", "--allow-empty", "-m", text)
        # else: HEAD is a commit of this very content left untagged by a call that died; tag it.
        _git(registry, "tag", "-a", tag, "-m", text)
        version = resolve_version(registry, tag)
        logger.info("versioned %s as %s (%d files)", dataset_dir, tag, version.files)
    _remember_fingerprint(registry, version, fingerprint)
    return _push_if_asked(registry, version, remote, push)


def _push_if_asked(registry: Path, version: DatasetVersion, remote: str, push: bool) -> DatasetVersion:
    if push and not version.pushed:
        try:
            version = push_version(registry, version.tag)
        except VersioningError as exc:
            logger.warning("%s is saved locally but was not pushed to remote %s: %s", version.tag, remote, exc)
    return version


# tag -> [commit, content fingerprint] of versions this registry made; a local cache inside .git (a
# lost or stale entry only means the next identical dataset is hashed by DVC again).
FINGERPRINTS = "synthdet-fingerprints.json"


def _fingerprint(folder: Path) -> str:
    """md5 over the relative paths and bytes of every file under ``folder`` (symlinks followed, as the
    copy into the registry follows them)."""
    digest = hashlib.md5(usedforsecurity=False)
    top = os.fspath(folder)
    files = []  # relative POSIX paths, built as strings: pathlib costs more than reading the bytes here
    for root, _, names in os.walk(top, followlinks=True):
        prefix = root[len(top) + 1 :].replace(os.sep, "/")
        files += [f"{prefix}/{name}" if prefix else name for name in names]
    for relative in sorted(files):
        digest.update(relative.encode() + b"\0")
        _feed(digest, os.path.join(top, relative))
        digest.update(b"\0")
    return digest.hexdigest()


def _known_fingerprints(registry: Path) -> dict[str, list[str]]:
    try:
        return json.loads((registry / ".git" / FINGERPRINTS).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _remember_fingerprint(registry: Path, version: DatasetVersion, fingerprint: str) -> None:
    """Record that ``version`` (tag and commit, both made) holds the dataset with ``fingerprint``."""
    known = {**_known_fingerprints(registry), version.tag: [version.git_rev, fingerprint]}
    write_text_atomic(registry / ".git" / FINGERPRINTS, json.dumps(known, indent=1))


def list_versions(registry: Path, name: str | None = None) -> list[DatasetVersion]:
    """All versions in the registry (only those of ``name`` if given), oldest first."""
    registry = Path(registry)
    fields = "%(refname:short)%09%(objectname)%09%(*objectname)%09%(*committerdate:iso-strict)"
    refs = _git(registry, "for-each-ref", f"--format={fields}", "refs/tags").stdout.splitlines()
    pushed = {line.split()[1] for line in _git(registry, "notes", f"--ref={NOTES_REF}", "list").stdout.splitlines()}
    versions = []
    for line in refs:
        tag, rev, peeled, created = line.split("\t")
        match = TAG_PATTERN.match(tag)
        if not match or (name is not None and match["name"] != name):
            continue
        rev = peeled or rev  # annotated tags point at a tag object; we want its commit
        dvc_text = _git(registry, "show", f"{rev}:datasets/{match['name']}.dvc").stdout
        md5, files = _read_dvc_file(dvc_text)
        created = created or _git(registry, "show", "-s", "--format=%cI", rev).stdout.strip()
        versions.append(
            DatasetVersion(match["name"], int(match["number"]), tag, rev, md5, files, rev in pushed, created)
        )
    if not versions:
        return []
    order = _git(registry, "rev-list", "--topo-order", "--reverse", "--tags").stdout.split()
    position = {rev: i for i, rev in enumerate(order)}
    return sorted(versions, key=lambda v: (position.get(v.git_rev, -1), v.name, v.number))


def resolve_version(registry: Path, ref: str, name: str | None = None) -> DatasetVersion:
    """The version named by a tag (``synthetic-v2``) or by ``latest`` (which needs ``name``)."""
    versions = list_versions(registry, name)
    if ref == "latest":
        if name is None:
            raise VersioningError("ref 'latest' needs a dataset name")
        if versions:
            return versions[-1]
    else:
        for version in versions:
            if version.tag == ref:
                return version
    available = ", ".join(v.tag for v in versions) or "none"
    raise VersioningError(f"no dataset version {ref!r} in registry {registry}; available tags: {available}")


def checkout_version(registry: Path, ref: str, dest: Path, name: str | None = None) -> Path:
    """Restore a version's files byte for byte into ``dest``, from the local cache or else the remote.

    Args:
        dest: a missing or empty directory; filled atomically (a temporary sibling, then a rename).

    Returns:
        ``dest``.
    """
    registry, dest = Path(registry).absolute(), Path(dest)
    version = resolve_version(registry, ref, name)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise VersioningError(f"{dest}: checkout destination exists and is not an empty directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _dvc(registry, "get", str(registry), f"datasets/{version.name}", "--rev", version.tag, "-o", str(work / "data"))
        os.replace(work / "data", dest)  # replaces an empty dest directory too
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("checked out %s into %s", version.tag, dest)
    return dest


def push_version(registry: Path, ref: str, name: str | None = None) -> DatasetVersion:
    """Push one version's data to the registry's current remote and record it as pushed.

    Raises:
        VersioningError: the push failed, or the local cache lacks some of the version's files.
    """
    registry = Path(registry).absolute()
    version = resolve_version(registry, ref, name)
    _transfer_to_remote(registry, version)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    _git(registry, "notes", f"--ref={NOTES_REF}", "add", "-f", "-m", f"pushed to {REMOTE} {stamp}", version.git_rev)
    logger.info("pushed %s to remote %s", version.tag, REMOTE)
    return replace(version, pushed=True)


def _replace_tree(source: Path, target: Path, staging: Path) -> dict[str, bool]:
    """Make ``target`` a copy of ``source``, swapping it in whole so a crash never leaves a mix.

    A file equal to the file at the same place in the current ``target`` is hard-linked from it instead
    of copied: it keeps its inode and mtime, so DVC's state finds its hash and ``dvc add`` hashes only
    the new and changed files. Equal means the same size and mtime (the copy kept the source's, as
    rsync and DVC's own state assume) or else the same bytes.

    Returns:
        Every file of the new tree (a relative POSIX path) and whether it was copied (new or changed)
        rather than linked (unchanged).
    """
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of a call that died
    files: dict[str, bool] = {}
    new_prefix = os.path.join(staging, "new", "")

    def copy_or_link(src: str, dst: str) -> None:  # called once per file: plain strings, few system calls
        rel = dst[len(new_prefix) :]
        old = os.path.join(target, rel)
        try:
            same = stat.S_ISREG(os.lstat(old).st_mode) and filecmp.cmp(src, old, shallow=True)
        except OSError:  # no such file in the current tree
            same = False
        if same:
            try:
                os.link(old, dst)
                files[rel.replace(os.sep, "/")] = False
                return
            except OSError:  # another file system, or no hard links there: copy
                pass
        files[rel.replace(os.sep, "/")] = True
        shutil.copy2(src, dst)

    shutil.copytree(source, staging / "new", copy_function=copy_or_link)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        os.replace(target, staging / "old")
    os.replace(staging / "new", target)
    shutil.rmtree(staging)
    return files


def _add_changed_files(registry: Path, name: str, files: dict[str, bool]) -> bool:
    """Update ``datasets/<name>.dvc`` for the new and changed files alone; what ``dvc add`` would write.

    ``dvc add`` of a directory stats, looks up and relinks every file in it, and DVC's granular add
    (``dvc add dir/file``) rebuilds the whole tree once per file: both cost in proportion to the whole
    dataset. Here the previous version's tree (the ``.dir`` object in the cache) is edited instead: its
    entries for unchanged files are kept, removed files are dropped, and only the copied files are hashed
    and added to the cache. The resulting ``.dir`` object and ``.dvc`` file are byte for byte what ``dvc
    add`` writes (``tests/tasks/test_versioning.py`` checks it against DVC's own).

    Args:
        registry: the registry; its ``datasets/<name>`` was just rebuilt by :func:`_replace_tree`, and its
            ``.dvc`` file still describes the tree that was replaced.
        files: :func:`_replace_tree`'s answer.

    Returns:
        False, touching nothing, when the previous tree is not in the local cache or does not hold every
        unchanged file: the caller then runs ``dvc add``.
    """
    from dvc.repo import Repo
    from dvc_data.hashfile.db import add_update_tree
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree
    from dvc_objects.fs import LocalFileSystem

    dvc_file = registry / "datasets" / f"{name}.dvc"
    stage = yaml.safe_load(dvc_file.read_text())
    out = stage["outs"][0]
    if not str(out.get("md5", "")).endswith(".dir") or out.get("hash") != "md5":
        return False
    folder = registry / "datasets" / name
    with Repo(str(registry)) as repo:
        cache = repo.cache.local
        try:
            old = Tree.load(cache, HashInfo("md5", out["md5"]))
        except (FileNotFoundError, ValueError):
            return False
        tree = Tree()
        for key, meta, hash_info in old:
            if files.get("/".join(key)) is False:  # linked, so unchanged
                tree.add(key, meta, hash_info)
        if len(tree) != sum(not copied for copied in files.values()):
            return False  # an unchanged file the old tree lacks: the workspace did not match its .dvc file
        changed = sorted(rel for rel, copied in files.items() if copied)
        digests = [_md5_file(folder / rel) for rel in changed]
        for rel, md5 in zip(changed, digests, strict=True):
            tree.add(tuple(rel.split("/")), Meta(size=(folder / rel).stat().st_size), HashInfo("md5", md5))
        new = dict(zip(digests, changed, strict=True))  # one copy per distinct content
        cache.add([str(folder / rel) for rel in new.values()], LocalFileSystem(), list(new))
        tree.digest()
        add_update_tree(cache, tree)
    out["md5"] = tree.hash_info.value
    out["size"] = sum(os.stat(os.path.join(folder, rel)).st_size for rel in files)
    out["nfiles"] = len(tree)
    write_text_atomic(dvc_file, yaml.safe_dump(stage, sort_keys=False))
    logger.info("%s: %d new or changed files added to the previous tree", dvc_file.name, len(changed))
    return True


def _transfer_to_remote(registry: Path, version: DatasetVersion) -> None:
    """Send the version's objects that the remote lacks, in this process (a DVC process costs seconds).

    It is ``dvc push`` without its index of every tracked file: the version's ``.dir`` object names the
    files, DVC's remote index (in the site cache) remembers what earlier pushes sent, and only the rest
    is checked on the remote and sent.

    Raises:
        VersioningError: the local cache lacks some of the version's files, or the transfer failed.
    """
    from dvc.repo import Repo
    from dvc_data.hashfile.db import get_index
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    def refuse_missing(status) -> None:
        if status.missing:
            raise VersioningError(
                f"{version.tag}: the local cache of {registry} lacks {len(status.missing)} of its files "
                "(and the remote does not have them)"
            )

    with Repo(str(registry)) as repo:
        cache = repo.cache.local
        try:
            tree = Tree.load(cache, HashInfo("md5", version.dvc_md5))
        except (FileNotFoundError, ValueError) as exc:
            raise VersioningError(f"{version.tag}: the local cache of {registry} lacks its file list") from exc
        objects = {tree.hash_info, *(hash_info for _, _, hash_info in tree)}
        try:
            remote = repo.cloud.get_remote_odb(REMOTE, "push")
            result = repo.cloud.transfer(
                cache,
                remote,
                objects,
                dest_index=get_index(remote),
                cache_odb=cache,
                validate_status=refuse_missing,
            )
        except VersioningError:
            raise
        except Exception as exc:  # any remote's error (unreachable, no permission, not a directory)
            raise VersioningError(f"{version.tag}: push to remote {REMOTE} failed: {exc}") from exc
    if result.failed:
        raise VersioningError(f"{version.tag}: {len(result.failed)} objects failed to reach remote {REMOTE}")


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    _feed(digest, path)
    return digest.hexdigest()


def _feed(digest: Any, path: str | Path) -> None:
    """Add a file's bytes to ``digest``, a megabyte at a time."""
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)


def _project_remote_url(registry: Path) -> str:
    """The URL of remote ``storage`` in the registry's ``.dvc/config`` ("" if none), read without starting
    DVC: a DVC process costs seconds, and this runs on every version."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(registry / ".dvc" / "config")
        for section in parser.sections():  # DVC writes the section as ['remote "storage"']
            if section.strip("'") == f'remote "{REMOTE}"':
                return parser.get(section, "url", fallback="").strip()
        return ""
    except configparser.Error:  # not what `dvc config` writes: ask DVC
        return _dvc(registry, "config", "--project", f"remote.{REMOTE}.url", check=False).stdout.strip()


def _read_dvc_file(text: str) -> tuple[str, int]:
    """The (md5, nfiles) of the single output in a .dvc file's text."""
    out = yaml.safe_load(text)["outs"][0]
    return out["md5"], int(out.get("nfiles", 1))


def _site_cache(registry: Path) -> Path:
    return registry / ".dvc" / "tmp" / "site_cache"


def _git(registry: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["git", *args], registry, check)


def _dvc(registry: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "dvc", *args], registry, check)


def _run(command: list[str], registry: Path, check: bool) -> subprocess.CompletedProcess[str]:
    if not registry.is_dir():
        raise VersioningError(f"{registry}: data registry not found")
    # DVC_SITE_CACHE_DIR keeps DVC's state out of /var/tmp even for `dvc get` and unfinished registries.
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "DVC_SITE_CACHE_DIR": str(_site_cache(registry)),
    }
    result = subprocess.run(command, cwd=registry, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        shown = " ".join(["dvc", *command[3:]] if command[0] == sys.executable else command)
        tail = (result.stderr.strip() or result.stdout.strip())[-1500:]
        raise VersioningError(f"`{shown}` failed in {registry} (exit {result.returncode}): {tail}")
    return result
