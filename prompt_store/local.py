"""The embedded store: a directory tree on one host.

Layout (see docs/store.md): `tenants/{tenant}/tasks/{task}/head.json` is the current pointer,
`.../v/{n}.ver` are immutable versions (record and blob in one file), `tenants/{tenant}/counters/{task}`
the version counter, `tenants/{tenant}/jobs/{job}.json` job records, `events.log` the change log.

Every file is written to a temp file in its own directory, fsynced, renamed over the target with
`os.replace` and the directory fsynced, so a reader opens the old file or the new one, never half.
A put makes the version file durable before flipping `head.json`, so the pointer only ever names a
complete version. Writers (threads and processes) are serialised by a thread lock plus a file lock.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from prompt_store.base import Store, check_put, new_version, verify_blob
from prompt_store.errors import (
    RecordCorrupt,
    StoreFull,
    StoreUnavailable,
    TaskNotFound,
    VersionNotFound,
    is_disk_full,
)
from prompt_store.events import EventHub, FileEventLog, Subscription
from prompt_store.ids import LocalPaths, validate_id, validate_version
from prompt_store.local_files import (
    _atomic_write,
    _fsync_dir,
    _id_entries,
    _json_bytes,
    _read_json,
    remove_old_temp_files,
)
from prompt_store.local_jobs import LocalJobsMixin
from prompt_store.records import ChangeEvent, TaskInfo, TaskVersion

log = logging.getLogger(__name__)

_LIVE: dict[str, weakref.WeakSet[LocalStore]] = {}  # root -> open stores in this process
_LIVE_LOCK = threading.Lock()
_HEADER = struct.Struct(">I")  # a version file is: JSON length, the TaskVersion JSON, the blob


def _version_bytes(record: TaskVersion, blob: bytes) -> bytes:
    head = _json_bytes(record.to_dict())
    return _HEADER.pack(len(head)) + head + blob


def _read_version_file(path: Path, with_blob: bool) -> tuple[TaskVersion, bytes | None]:
    """Parse a version file (FileNotFoundError propagates); only the header is read without the blob."""
    with open(path, "rb") as f:
        raw = f.read() if with_blob else f.read(_HEADER.size)
        if len(raw) < _HEADER.size:
            raise RecordCorrupt(f"{path.name} is truncated")
        (n,) = _HEADER.unpack_from(raw)
        if not with_blob:
            raw += f.read(n)
    try:
        record = TaskVersion.from_dict(json.loads(raw[_HEADER.size:_HEADER.size + n]))
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise RecordCorrupt(f"{path.name} has an unreadable record: {exc}") from exc
    return record, (raw[_HEADER.size + n:] if with_blob else None)


class LocalStore(LocalJobsMixin, Store):
    """The directory-tree store. Safe across threads and across processes on one host."""

    def __init__(self, root: str | Path, poll_interval: float = 0.05, lock_timeout: float = 30.0,
                 fsync: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self.paths = LocalPaths(self.root)
        self.poll_interval = poll_interval
        self._fsync = fsync
        try:
            for d in (self.root, self.paths.tenants_dir, self.paths.trash):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot use store directory {self.root}: {exc}") from exc
        self._tlock = threading.RLock()
        self._flock = FileLock(str(self.paths.write_lock), timeout=lock_timeout, thread_local=False)
        self._hub = EventHub("local-store-events")
        self._log = FileEventLog(self.paths.events, self._hub, poll_interval)
        with _LIVE_LOCK:
            _LIVE.setdefault(str(self.root), weakref.WeakSet()).add(self)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ---- plumbing
    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            kind = StoreFull if is_disk_full(exc) else StoreUnavailable
            raise kind(f"store directory {self.root}: {exc}") from exc

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        with self._tlock, self._io():
            try:
                self._flock.acquire()
            except Timeout as exc:
                raise StoreUnavailable(f"timed out waiting for the store write lock {self._flock.lock_file}") from exc
            try:
                yield
            finally:
                self._flock.release()

    def _mkdirs(self, path: Path) -> None:
        """Create `path` and missing parents, fsyncing each new entry's parent directory."""
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            if self._fsync:
                _fsync_dir(d.parent)

    def _write(self, path: Path, data: bytes, fsync: bool = True) -> None:
        self._mkdirs(path.parent)
        _atomic_write(path, data, self._fsync and fsync)

    def _sync(self, *dirs: Path) -> None:
        if self._fsync:
            for d in dict.fromkeys(dirs):
                _fsync_dir(d)

    # ---- tasks
    def _head(self, tenant: str, task_id: str) -> dict[str, Any]:
        try:
            return _read_json(self.paths.head(tenant, task_id))
        except FileNotFoundError:
            raise TaskNotFound(f"task {task_id!r} not found") from None

    def _record(self, tenant: str, task_id: str, version: int, with_blob: bool = False
                ) -> tuple[TaskVersion, bytes | None]:
        try:
            return _read_version_file(self.paths.version(tenant, task_id, version), with_blob)
        except FileNotFoundError:
            self._head(tenant, task_id)  # TaskNotFound when the whole task is gone
            raise VersionNotFound(f"task {task_id!r} has no version {version}") from None

    def _version_numbers(self, tenant: str, task_id: str) -> list[int]:
        try:
            names = os.listdir(self.paths.versions_dir(tenant, task_id))
        except FileNotFoundError:
            return []
        return sorted(int(n[:-4]) for n in names if n.endswith(".ver") and n[:-4].isdigit())

    def _next_version(self, tenant: str, task_id: str) -> int:
        try:
            last = int(self.paths.counter(tenant, task_id).read_text())
        except FileNotFoundError:
            last = 0
        except ValueError as exc:
            raise RecordCorrupt(f"version counter of task {task_id!r} is unreadable") from exc
        return max([last, *self._version_numbers(tenant, task_id)]) + 1

    def put_task(self, tenant: str, task_id: str, blob: bytes, metadata: Mapping[str, str]) -> TaskVersion:
        meta = check_put(tenant, task_id, blob, metadata)
        with self._writing():
            return self._put_locked(tenant, task_id, bytes(blob), meta)

    def _put_locked(self, tenant: str, task_id: str, blob: bytes, meta: dict[str, str]) -> TaskVersion:
        """A put, under the write lock (also the first half of a job's publish)."""
        n = self._next_version(tenant, task_id)
        record = new_version(tenant, task_id, n, blob, meta)
        try:
            created_at = self._head(tenant, task_id)["created_at"]
        except TaskNotFound:
            created_at = record.created_at
        # The counter only has to outlive the versions: delete_task makes it durable first.
        self._write(self.paths.counter(tenant, task_id), str(n).encode(), fsync=False)
        self._write(self.paths.version(tenant, task_id, n), _version_bytes(record, blob))
        self._sync(self.paths.versions_dir(tenant, task_id))
        head = {"current": n, "created_at": created_at, "updated_at": record.created_at}
        self._write(self.paths.head(tenant, task_id), _json_bytes(head))  # the flip
        self._sync(self.paths.task(tenant, task_id))
        self._publish(ChangeEvent(tenant, task_id, n, "put"))
        return record

    def get_task(self, tenant: str, task_id: str, version: int | None = None) -> tuple[TaskVersion, bytes]:
        if version is not None:
            return self._read_version(tenant, task_id, validate_version(version))
        for _ in range(2):  # a delete + re-create between the two reads moves `current`: read again
            n = self.current_version(tenant, task_id)
            try:
                return self._read_version(tenant, task_id, n)
            except (TaskNotFound, VersionNotFound):
                if self.current_version(tenant, task_id) == n:
                    raise
        return self._read_version(tenant, task_id, self.current_version(tenant, task_id))

    def _read_version(self, tenant: str, task_id: str, n: int) -> tuple[TaskVersion, bytes]:
        with self._io():
            record, blob = self._record(tenant, task_id, n, with_blob=True)
        assert blob is not None
        verify_blob(record, blob)
        return record, blob

    def current_version(self, tenant: str, task_id: str) -> int:
        with self._io():
            current = self._head(tenant, task_id).get("current")
        if not isinstance(current, int):
            raise RecordCorrupt(f"task {task_id!r}: head has no current version")
        return current

    def get_info(self, tenant: str, task_id: str) -> TaskInfo:
        with self._io():
            head = self._head(tenant, task_id)
            current, _ = self._record(tenant, task_id, head.get("current", 0))
            count = len(self._version_numbers(tenant, task_id))
        return TaskInfo(tenant=tenant, task_id=task_id, current_version=current.version, num_versions=count,
                        created_at=head["created_at"], updated_at=head["updated_at"], current=current)

    def list_tasks(self, tenant: str) -> list[TaskInfo]:
        out = []
        with self._io():
            task_ids = _id_entries(self.paths.tasks_dir(tenant))
        for task_id in task_ids:
            with contextlib.suppress(TaskNotFound, VersionNotFound):
                out.append(self.get_info(tenant, task_id))
        return out

    def list_task_ids(self, tenant: str) -> list[str]:
        with self._io():
            return sorted(_id_entries(self.paths.tasks_dir(tenant)))

    def list_tenants(self) -> list[str]:
        with self._io():
            return sorted(_id_entries(self.paths.tenants_dir))

    def list_versions(self, tenant: str, task_id: str) -> list[TaskVersion]:
        with self._io():
            self._head(tenant, task_id)
            out = []
            for n in self._version_numbers(tenant, task_id):
                with contextlib.suppress(VersionNotFound):
                    out.append(self._record(tenant, task_id, n)[0])
        return out

    def activate(self, tenant: str, task_id: str, version: int) -> TaskVersion:
        validate_id(tenant, "tenant")
        validate_id(task_id)
        validate_version(version)
        with self._writing():
            head = self._head(tenant, task_id)
            record, _ = self._record(tenant, task_id, version)
            head = {**head, "current": version, "updated_at": time.time()}
            self._write(self.paths.head(tenant, task_id), _json_bytes(head))
            self._sync(self.paths.task(tenant, task_id))
            self._publish(ChangeEvent(tenant, task_id, version, "activate"))
        return record

    def delete_task(self, tenant: str, task_id: str) -> None:
        task_dir = self.paths.task(tenant, task_id)
        with self._writing():
            self._head(tenant, task_id)
            self._bump_fence(tenant, task_id)  # in-flight jobs of this task can no longer publish
            counter = self.paths.counter(tenant, task_id)
            if self._fsync and counter.exists():  # the numbers must survive the versions
                with open(counter, "rb") as f:
                    os.fsync(f.fileno())
                _fsync_dir(counter.parent)
            doomed = self.paths.trash / f"~del~{uuid.uuid4().hex}"
            os.replace(task_dir, doomed)  # one rename: readers see the whole task or none of it
            self._sync(task_dir.parent)
            self._publish(ChangeEvent(tenant, task_id, None, "delete"))
        shutil.rmtree(doomed, ignore_errors=True)

    # ---- training locks (a JSON file holding the holder and a wall-clock expiry)
    def _lock_state(self, tenant: str, task_id: str) -> dict[str, Any] | None:
        try:
            data = _read_json(self.paths.train_lock(tenant, task_id))
        except (FileNotFoundError, RecordCorrupt):
            return None
        return data if data.get("expires_at", 0) > time.time() else None

    def try_lock_task(self, tenant: str, task_id: str, holder: str, ttl_s: float) -> bool:
        validate_id(holder, "lock holder")
        with self._writing():
            state = self._lock_state(tenant, task_id)
            if state is not None and state.get("holder") != holder:
                return False
            path = self.paths.train_lock(tenant, task_id)
            self._write(path, _json_bytes({"holder": holder, "expires_at": time.time() + ttl_s}))
        return True

    def release_task_lock(self, tenant: str, task_id: str, holder: str) -> bool:
        with self._writing():
            state = self._lock_state(tenant, task_id)
            if state is None or state.get("holder") != holder:
                return False
            self.paths.train_lock(tenant, task_id).unlink(missing_ok=True)
        return True

    def task_lock_holder(self, tenant: str, task_id: str) -> str | None:
        with self._io():
            state = self._lock_state(tenant, task_id)
        return None if state is None else state.get("holder")

    # ---- events
    def _publish(self, event: ChangeEvent) -> None:
        """Append to the event log (for other processes) and hand to this process's subscribers."""
        self._log.append(event)
        with _LIVE_LOCK:
            peers = list(_LIVE.get(str(self.root), ()))
        for store in peers:
            store._hub.emit(event)

    def subscribe(self, callback: Callable[[ChangeEvent], None]) -> Subscription:
        sub = self._hub.subscribe(callback)
        self._log.follow()
        return sub

    # ---- lifecycle
    def sweep_temp(self, min_age_s: float = 60.0) -> int:
        """Remove temp files older than `min_age_s` and the trash a killed delete left; returns a count."""
        with self._io():
            removed = remove_old_temp_files(self.root, min_age_s)
            for doomed in self.paths.trash.iterdir():
                if time.time() - doomed.stat().st_mtime >= min_age_s:
                    shutil.rmtree(doomed, ignore_errors=True)
                    removed += 1
        return removed

    def ping(self) -> None:
        with self._io():
            os.stat(self.paths.tenants_dir)
            if not os.access(self.root, os.W_OK):
                raise StoreUnavailable(f"store directory {self.root} is not writable")

    def close(self) -> None:
        self._log.close()
        self._hub.close()
        with _LIVE_LOCK:
            peers = _LIVE.get(str(self.root))
            if peers is not None:
                peers.discard(self)
