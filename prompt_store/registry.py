"""The prompt registry: versioned prompt files in a folder that several replicas may share.

Layout: <directory>/<name>/v<N>.safetensors; the highest N is the current version. <directory>/<name>/traffic.json,
when there, splits the name's requests between versions (prompt_store/traffic.py); the versions it names are
never pruned. Files are only ever written whole (temp file + fsync + hard link or rename under the final name),
so a reader never sees a partial file, and a replica picks up another replica's changes by polling the folder
(refresh / start_watching).
A version is identified by its number and its content digest: a prompt deleted and re-created as v1 by
another replica is a change, even though its number is the same.

Concurrency: writers (add, delete) of every process sharing the folder take turns on an exclusive lock
(flock on <directory>/.lock), so an add never meets a half-done delete of its name (its folder renamed away
between two of its steps) and versions are numbered in order. Readers take no lock: they see a version file
whole or not at all, and a name's folder there or gone. As a second guard, where the filesystem does not share
locks between hosts, the final name is created exclusively (os.link fails if it exists): when two replicas
store the same name at the same instant and pick the same version number, one wins and the other gets
VersionConflict (HTTP 409: retry); no upload is silently lost. Files follow the process umask
(umask 027: mode 0640, readable by the group of a replica running as another user).

The index in memory changes only whole: a name is in it with at least one version, or not at all.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from app.engine.request import PromptNotFound
from prompt_store.format import (
    MAX_VIRTUAL_TOKENS,
    BaseIdentity,
    PromptFile,
    PromptFormatError,
    PromptMeta,
    dump_prompt,
    file_digest,
    load_prompt_file,
    validate_name,
    validate_prompt,
)
from prompt_store.traffic import TRAFFIC_FILE, TrafficSplit, TrafficSplitError

log = logging.getLogger(__name__)

VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.safetensors")
TEMP_PREFIX = "."  # temp files and folders being deleted are hidden, so scans skip them
LOCK_FILE = ".lock"  # the writers' lock; hidden, and a file, so scans skip it
STALE_TEMP_S = 300  # a hidden temp file or doomed folder this old was left by a killed writer

# fn(event, name, version): "added" means `version` is now the name's current version (new or replaced);
# "removed" means the name is gone, `version` being the one that was current.
Subscriber = Callable[[str, str, int], None]


class PromptExists(ValueError):
    pass


class VersionConflict(PromptExists):
    """Another writer stored the same version of this name first; the upload was not stored (retry)."""


@dataclass(frozen=True)
class VersionInfo:
    version: int
    created_at: str
    size_bytes: int
    digest: str


@dataclass(frozen=True)
class PromptInfo(PromptMeta):
    """What listing a prompt shows: its current (newest) version's fields, and its stored versions; no tensors."""

    versions: list[int]
    size_bytes: int  # of the current version's file
    history: list[VersionInfo]  # every stored version, oldest first


@dataclass(frozen=True)
class _StoredVersion:
    path: Path
    stat: tuple[int, ...]  # (inode, size, mtime_ns, ctime_ns): a changed or replaced file is re-read
    meta: PromptMeta  # no tensors: a store of thousands of prompts is indexed, not held in memory


class PromptRegistry:
    """Versioned prompts on disk, indexed in memory (fields and digests, no tensors: get() reads the file).

    base=None opens the store read-only: files are checked for format but not against a base, and add()
    is refused. keep_versions is how many versions besides the current one are kept per name.
    """

    def __init__(
        self,
        directory: str | Path,
        base: BaseIdentity | None,
        max_virtual_tokens: int = MAX_VIRTUAL_TOKENS,
        keep_versions: int = 3,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.max_virtual_tokens = max_virtual_tokens
        self.keep_versions = keep_versions
        self._lock = threading.RLock()
        self._index: dict[str, dict[int, _StoredVersion]] = {}
        self._rejected: dict[Path, tuple[int, int]] = {}  # invalid files already warned about
        # name -> (its traffic file's stat, its split: None when the file is invalid)
        self._splits: dict[str, tuple[tuple[int, ...], TrafficSplit | None]] = {}
        self._subscribers: list[Subscriber] = []
        self._watch_thread: threading.Thread | None = None
        self._watch_stop = threading.Event()
        if base is not None:  # a writer; a read-only registry (e.g. `softserve prompts list`) changes nothing
            remove_stale_temp_files(self.directory)
        self.refresh()

    # --- reading -----------------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> PromptFile:
        """The prompt file, read from disk (validated when it was indexed)."""
        with self._lock:
            stored = self._stored(name, version)
        try:
            pf = load_prompt_file(stored.path)
        except FileNotFoundError:  # deleted or pruned by another replica since the last scan
            raise PromptNotFound(f"prompt {name!r} v{stored.meta.version} is no longer stored") from None
        if pf.digest != stored.meta.digest:  # replaced on disk since the last scan: rescan, then read that
            self.refresh()
            return self.get(name, version)
        return pf

    def meta(self, name: str, version: int | None = None) -> PromptMeta:
        with self._lock:
            return self._stored(name, version).meta

    def path(self, name: str, version: int | None = None) -> Path:
        with self._lock:
            return self._stored(name, version).path

    def read_bytes(self, name: str, version: int | None = None) -> bytes:
        return self.path(name, version).read_bytes()

    def versions(self, name: str) -> list[int]:
        with self._lock:
            return sorted(self._versions_of(name))

    def list(self) -> list[PromptInfo]:
        with self._lock:
            return [self._info(self._index[name]) for name in sorted(self._index)]

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._index

    def _versions_of(self, name: str) -> dict[int, _StoredVersion]:
        versions = self._index.get(name)
        if not versions:
            raise PromptNotFound(f"no prompt named {name!r}")
        return versions

    def _stored(self, name: str, version: int | None) -> _StoredVersion:
        versions = self._versions_of(name)
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            available = ", ".join(map(str, sorted(versions)))
            raise PromptNotFound(f"prompt {name!r} has no version {version} (versions: {available})")
        return versions[version]

    def current(self, name: str) -> tuple[int, str] | None:
        """(version, digest) of the name's current version, None when it is not stored."""
        with self._lock:
            versions = self._index.get(name)
            return None if versions is None else self._current(versions)

    def info(self, name: str) -> PromptInfo:
        """One prompt as list() shows it (PromptNotFound if it is not stored)."""
        with self._lock:
            return self._info(self._versions_of(name))

    @staticmethod
    def _info(versions: dict[int, _StoredVersion]) -> PromptInfo:
        current = versions[max(versions)]
        history = [VersionInfo(v, stored.meta.created_at, stored.stat[1], stored.meta.digest)
                   for v, stored in sorted(versions.items())]
        return PromptInfo(**vars(current.meta), versions=sorted(versions), size_bytes=current.stat[1], history=history)

    def traffic(self, name: str) -> TrafficSplit | None:
        """The name's traffic split; None when it has none, or when a version it names is no longer stored
        (removed by hand: the split no longer holds, so the current version serves)."""
        with self._lock:
            split = self._splits.get(name, (None, None))[1]
            stored = self._index.get(name, {})
        return split if split is not None and set(split.weights) <= set(stored) else None

    # --- writing -----------------------------------------------------------------------------------

    def validate(self, pf: PromptFile) -> None:
        """Refuse (PromptFormatError) a prompt this store would not take: format, limits, fit to the base."""
        if self.base is None:
            raise RuntimeError("this registry was opened without a base identity; adding prompts needs one")
        validate_prompt(pf, self.base, self.max_virtual_tokens)

    def add(self, pf: PromptFile, replace: bool = True) -> PromptFile:
        """Validate, store as the next version, prune old versions; returns the stored PromptFile."""
        return self._store(pf, replace)[0]

    def add_and_describe(self, pf: PromptFile) -> PromptInfo:
        """add(), answered with the prompt as this add left it (its versions then): what an uploader is told,
        even if another replica replaces or deletes the name right after."""
        return self._store(pf, replace=True)[1]

    def _store(self, pf: PromptFile, replace: bool) -> tuple[PromptFile, PromptInfo]:
        self.validate(pf)
        with self._writing():
            folder = self.directory / pf.name
            on_disk = _version_files(folder)
            if on_disk and not replace:
                raise PromptExists(f"a prompt named {pf.name!r} already exists")
            stored = dataclasses.replace(
                pf,
                version=max(on_disk, default=0) + 1,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            data = dump_prompt(stored)
            stored = dataclasses.replace(stored, digest=file_digest(data))
            path = folder / f"v{stored.version}.safetensors"
            if not _create_exclusively(path, data):
                raise VersionConflict(
                    f"another writer stored version {stored.version} of prompt {pf.name!r} at the same moment; "
                    "this upload was not stored: retry it"
                )
            new = _StoredVersion(path, _stat(path), stored.meta)
            kept = self._prune(folder)
            with self._lock:
                versions = {v: known for v, known in self._index.get(pf.name, {}).items() if v in kept}
                versions[stored.version] = new
                self._index[pf.name] = versions
                info = self._info(versions)
        self._notify("added", pf.name, stored.version)
        return stored, info

    def set_traffic(self, name: str, split: TrafficSplit) -> TrafficSplit:
        """Split the name's requests between its stored versions (every replica follows within a poll);
        PromptNotFound naming the name or the first version not stored."""
        validate_name(name)  # the name becomes a path below
        with self._writing():
            folder = self.directory / name
            on_disk = _version_files(folder)
            if not on_disk:
                raise PromptNotFound(f"no prompt named {name!r}")
            missing = sorted(set(split.weights) - set(on_disk))
            if missing:
                available = ", ".join(map(str, sorted(on_disk)))
                raise PromptNotFound(f"prompt {name!r} has no version {missing[0]} (versions: {available})")
            path = folder / TRAFFIC_FILE
            _replace_atomically(path, split.to_json())
            with self._lock:
                self._splits[name] = (_stat(path), split)
        return split

    def clear_traffic(self, name: str) -> bool:
        """Remove the name's traffic split: its current version serves every request again. False when it
        had none; PromptNotFound when the name is not stored."""
        validate_name(name)
        with self._writing():
            folder = self.directory / name
            if not _version_files(folder):
                raise PromptNotFound(f"no prompt named {name!r}")
            try:
                (folder / TRAFFIC_FILE).unlink()
            except FileNotFoundError:
                return False
            _fsync_dir(folder)
            with self._lock:
                self._splits.pop(name, None)
        return True

    def delete(self, name: str) -> None:
        validate_name(name)  # the name becomes a path below
        with self._writing():
            folder = self.directory / name
            # One rename makes the whole name vanish at once for every reader; the slow rmtree follows.
            doomed = self.directory / f"{TEMP_PREFIX}deleting-{name}-{uuid.uuid4().hex}"
            if not folder.is_dir():  # never stored, or deleted by another writer before this one got the lock
                raise PromptNotFound(f"no prompt named {name!r}")
            os.replace(folder, doomed)
            _fsync_dir(self.directory)
            with self._lock:
                current = max(self._index.pop(name, {}), default=0)
                self._splits.pop(name, None)  # its file went with the folder
        shutil.rmtree(doomed, ignore_errors=True)
        self._notify("removed", name, current)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One writer at a time on this store, across threads and processes: an exclusive flock on LOCK_FILE
        (released when its file is closed, also when a process dies). Each call opens its own file, so two
        threads of one process exclude each other too. The index lock is taken only inside, briefly: readers
        (list, refresh) never wait for another replica's write."""
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _prune(self, folder: Path) -> set[int]:
        """Delete the versions beyond keep_versions + 1, except those a traffic split names; the versions kept
        on disk."""
        on_disk = _version_files(folder)
        split = _read_split(folder / TRAFFIC_FILE)
        keep = set(sorted(on_disk)[-(self.keep_versions + 1) :]) | set(split.weights if split else ())
        for version, path in on_disk.items():
            if version not in keep:
                path.unlink(missing_ok=True)
        return keep

    # --- watching other writers --------------------------------------------------------------------

    def subscribe(self, fn: Subscriber) -> None:
        self._subscribers.append(fn)

    def refresh(self) -> tuple[set[str], set[str]]:
        """Rescan the folder. Returns (names whose current version is new or changed, names removed)."""
        with self._lock:
            before = {name: self._current(versions) for name, versions in self._index.items()}
            self._index = self._scan()
            self._splits = {name: self._split_of(name) for name in self._index}
            after = {name: self._current(versions) for name, versions in self._index.items()}
            changed = {name for name, stat in after.items() if before.get(name) != stat}
            removed = set(before) - set(after)
            events = [("added", name, max(self._index[name])) for name in sorted(changed)]
            events += [("removed", name, before[name][0]) for name in sorted(removed)]
        for event in events:
            self._notify(*event)
        return changed, removed

    @staticmethod
    def _current(versions: dict[int, _StoredVersion]) -> tuple[int, str]:
        """(version, digest) of the current version: a re-created v1 with other content is a change."""
        current = max(versions)
        return current, versions[current].meta.digest

    def _scan(self) -> dict[str, dict[int, _StoredVersion]]:
        index: dict[str, dict[int, _StoredVersion]] = {}
        for folder in sorted(self.directory.iterdir()):
            if folder.name.startswith(TEMP_PREFIX) or not folder.is_dir():
                continue
            for version, path in _version_files(folder).items():
                stored = self._load_or_reuse(folder.name, version, path)
                if stored is not None:
                    index.setdefault(folder.name, {})[version] = stored
        self._rejected = {path: stat for path, stat in self._rejected.items() if path.exists()}
        return index

    def _load_or_reuse(self, name: str, version: int, path: Path) -> _StoredVersion | None:
        try:
            stat = _stat(path)
        except FileNotFoundError:  # removed by another replica while we scanned
            return None
        known = self._index.get(name, {}).get(version)
        if known is not None and known.stat == stat:
            return known
        if self._rejected.get(path) == stat:
            return None
        try:
            validate_name(name)
            pf = load_prompt_file(path)
        except FileNotFoundError:  # removed by another replica while we scanned
            return None
        except (PromptFormatError, OSError) as exc:
            return self._reject(path, stat, exc)
        try:
            if (pf.name, pf.version) != (name, version):
                raise PromptFormatError(f"file says it is {pf.name!r} v{pf.version}")
            validate_prompt(pf, self.base, self.max_virtual_tokens)
        except PromptFormatError as exc:
            return self._reject(path, stat, exc)
        self._rejected.pop(path, None)
        return _StoredVersion(path, stat, pf.meta)

    def _split_of(self, name: str) -> tuple[tuple[int, ...], TrafficSplit | None]:
        """(stat, split) of the name's traffic file, read again only when it changed; (), None without one."""
        path = self.directory / name / TRAFFIC_FILE
        try:
            stat = _stat(path)
        except FileNotFoundError:
            return (), None
        known = self._splits.get(name)
        if known is not None and known[0] == stat:
            return known
        return stat, _read_split(path)

    def _reject(self, path: Path, stat: tuple[int, ...], problem: Exception) -> None:
        """Skip an invalid file, warning once (until it changes)."""
        log.warning("ignoring prompt file %s: %s", path, problem)
        self._rejected[path] = stat

    def start_watching(self, interval_s: float = 2.0) -> None:
        """Poll the folder in a daemon thread; subscribers hear of every change a refresh finds."""
        if self._watch_thread is not None:
            raise RuntimeError("already watching")
        self._watch_stop.clear()

        def watch() -> None:
            while not self._watch_stop.wait(interval_s):
                try:
                    self.refresh()
                except Exception:  # a bad poll must not kill the watcher; the next one retries
                    log.exception("prompt store refresh failed")

        self._watch_thread = threading.Thread(target=watch, name="prompt-store-watch", daemon=True)
        self._watch_thread.start()

    def stop_watching(self) -> None:
        if self._watch_thread is None:
            return
        self._watch_stop.set()
        self._watch_thread.join()
        self._watch_thread = None

    def _notify(self, event: str, name: str, version: int) -> None:
        for fn in list(self._subscribers):
            try:
                fn(event, name, version)
            except Exception:  # one failing subscriber must not stop the others or the store
                log.exception("prompt store subscriber failed on %s %s v%s", event, name, version)


def _version_files(folder: Path) -> dict[int, Path]:
    """v<N>.safetensors files of one prompt folder by version (hidden temp files do not match); none when the
    folder is not there (never created, or deleted by another replica meanwhile)."""
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found = {}
    for entry in entries:
        match = VERSION_FILE.fullmatch(entry.name)
        if match:
            found[int(match.group(1))] = entry
    return found


def _read_split(path: Path) -> TrafficSplit | None:
    """The traffic split stored at `path`; None when there is none, or (with a warning) when it is invalid."""
    try:
        return TrafficSplit.from_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (TrafficSplitError, OSError) as exc:
        log.warning("ignoring traffic split %s: %s", path, exc)
        return None


def _stat(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _create_exclusively(path: Path, data: bytes) -> bool:
    """Write `path` whole or not at all; False (nothing written) if it already exists.

    The bytes go to a hidden temp file first (fsynced), which is then hard-linked under the final name:
    os.link fails when the name exists, so of two writers racing for one version only one succeeds, and
    a reader never sees a partial file. The temp file is created with mode 0666 minus the umask.
    """
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    linked = False
    try:
        temp = _write_temp(path, data)
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        finally:
            temp.unlink(missing_ok=True)
        linked = True
        _fsync_dir(folder)  # makes the new name itself durable
        return True
    finally:
        if not linked:
            _remove_if_empty(folder)  # a failed first write leaves no empty prompt folder behind


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole, replacing what it held: readers see the old bytes or the new, never a mix."""
    temp = _write_temp(path, data)
    try:
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _write_temp(path: Path, data: bytes) -> Path:
    """`data` in a new hidden temp file beside `path` (fsynced; mode 0666 minus the umask)."""
    temp = path.parent / f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (the usual case), or gone
        pass


def remove_stale_temp_files(directory: Path, older_than_s: float = STALE_TEMP_S) -> None:
    """Remove what killed writers left: hidden temp files in prompt folders, half-deleted folders."""
    cutoff = time.time() - older_than_s
    for entry in directory.iterdir():
        if not entry.is_dir():
            continue
        stale = [entry] if entry.name.startswith(TEMP_PREFIX) else list(entry.glob(f"{TEMP_PREFIX}*.tmp"))
        for path in stale:
            try:
                if path.stat().st_mtime >= cutoff:
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()
            except FileNotFoundError:  # another replica cleaned it meanwhile
                pass


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
