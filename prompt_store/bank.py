"""The device-resident bank: what a batch gathers, in fixed slots of one PromptTable.

Entries are keyed by (tenant, task, version). A batch pins the slots it uses for as long as it
runs; a hot-swap loads the new version into another slot and frees the old one once unpinned, so
an in-flight batch never sees its tensors change. Growing the table (more slots, more prompt rows,
more classes) builds a new table and copies: batches holding the old table keep reading it.
Eviction is LRU over unpinned entries, bounded by bytes.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from prompt_store.base import Store
from prompt_store.errors import BankFull, StoreError, TaskTooLarge, TaskUnservable
from prompt_store.records import ChangeEvent
from vpt.backbone import Backbone
from vpt.engine import (
    Dims,
    PromptTable,
    SlotTensors,
    allocate_table,
    merge_dims,
    slot_bytes,
    task_slot_tensors,
    write_slot,
)
from vpt.errors import TaskFileError
from vpt.task import TaskSpec, load_task_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskKey:
    tenant: str
    task_id: str
    version: int


@dataclass
class _Entry:
    key: TaskKey
    slot: int
    spec: TaskSpec
    tensors: SlotTensors          # kept to re-write the slot when the table grows
    pins: int = 0
    stale: bool = False           # a newer version is current, or the task was deleted


@dataclass(frozen=True)
class ResolvedTask:
    """What a request needs after acquire: its slot, version and class names."""

    key: TaskKey
    slot: int
    classes: tuple[str, ...]


@dataclass
class Lease:
    """Slots pinned for one batch; `table` is the table those slots live in. Release it (twice is harmless)."""

    table: PromptTable
    tasks: list[ResolvedTask | None]
    _entries: list[_Entry] = field(repr=False, default_factory=list)
    released: bool = False

    def slot_tensor(self, per_request: list[int]) -> Tensor:
        """(B,) slot index per sample, from the index into `tasks` of each sample."""
        return torch.tensor([self.tasks[i].slot for i in per_request], dtype=torch.long,
                            device=self.table.device)


@dataclass(frozen=True)
class BankStats:
    hits: int
    misses: int
    evictions: int
    resident_bytes: int
    resident_tasks: int
    capacity_bytes: int
    slots: int


class PromptBank:
    """LRU-by-bytes slot table on the serving device, fed from a store, invalidated by its events."""

    def __init__(self, backbone: Backbone, store: Store, capacity_bytes: int, *, version_ttl_s: float = 5.0,
                 subscribe: bool = True) -> None:
        self.backbone = backbone
        self.store = store
        self.capacity_bytes = int(capacity_bytes)
        self.version_ttl_s = version_ttl_s
        self._lock = threading.RLock()
        self._entries: OrderedDict[TaskKey, _Entry] = OrderedDict()   # LRU order: oldest first
        self._current: dict[tuple[str, str], tuple[int, float]] = {}   # (tenant, task) -> (version, seen at)
        self._free: list[int] = []
        self._dims: Dims = {}                                         # field -> (widest shape, dtype)
        self._table = allocate_table(backbone, 0, self._dims)
        self.hits = self.misses = self.evictions = 0
        self._subscription = store.subscribe(self.on_change) if subscribe else None

    # -- public -----------------------------------------------------------------------------------------

    def acquire(self, tenant: str, task_ids: list[str]) -> Lease:
        """Pin the current version of each task (loading it on a miss); all or nothing."""
        lease, errors = self.acquire_each([(tenant, t) for t in task_ids])
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            self.release(lease)
            raise error
        return lease

    def acquire_each(self, requests: list[tuple[str, str]]) -> tuple[Lease, list[Exception | None]]:
        """Pin what can be pinned; a request that fails (missing task, bad file) fails alone.

        `lease.tasks[i]` is None where `errors[i]` is set. Anything other than a store error
        (a bug, out of memory) unpins what this call pinned and propagates.
        """
        with self._lock:
            entries: list[_Entry | None] = []
            errors: list[Exception | None] = []
            try:
                for tenant, task_id in requests:
                    try:
                        entry = self._get_or_load(tenant, task_id)
                    except StoreError as e:
                        entries.append(None)
                        errors.append(e)
                        continue
                    entry.pins += 1
                    entries.append(entry)
                    errors.append(None)
            except BaseException:
                for e in entries:
                    if e is not None:
                        self._unpin(e)
                raise
            tasks = [ResolvedTask(e.key, e.slot, e.spec.classes) if e is not None else None for e in entries]
            pinned = [e for e in entries if e is not None]
            return Lease(table=self._table, tasks=tasks, _entries=pinned), errors

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            for e in lease._entries:
                self._unpin(e)

    def on_change(self, event: ChangeEvent) -> None:
        """A store change event: forget the cached current version; retire unused old versions."""
        if event.kind == "resync":  # events may have been missed: re-read every current pointer
            self.invalidate_all()
            return
        with self._lock:
            self._current.pop((event.tenant, event.task_id), None)
            for key, entry in list(self._entries.items()):
                if key.tenant == event.tenant and key.task_id == event.task_id:
                    if event.kind == "delete" or event.version is None or key.version != event.version:
                        entry.stale = True
                        if entry.pins == 0:
                            self._evict(key)

    def invalidate_all(self) -> None:
        """Forget every cached current version (e.g. after the event stream reconnects)."""
        with self._lock:
            self._current.clear()

    def stats(self) -> BankStats:
        with self._lock:
            per = slot_bytes(self._table_dims())
            return BankStats(self.hits, self.misses, self.evictions, per * len(self._entries), len(self._entries),
                             self.capacity_bytes, self._table.slots)

    def resident(self) -> list[TaskKey]:
        """Resident keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()

    # -- internals --------------------------------------------------------------------------------------

    def _current_version(self, tenant: str, task_id: str) -> int:
        cached = self._current.get((tenant, task_id))
        now = time.monotonic()
        if cached is not None and now - cached[1] < self.version_ttl_s:
            return cached[0]
        version = self.store.current_version(tenant, task_id)
        self._current[(tenant, task_id)] = (version, now)
        return version

    def _get_or_load(self, tenant: str, task_id: str) -> _Entry:
        key = TaskKey(tenant, task_id, self._current_version(tenant, task_id))
        entry = self._entries.get(key)
        if entry is not None:  # a key names immutable content: a stale entry made current again is reused
            entry.stale = False
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        _, blob = self.store.get_task(tenant, task_id, key.version)
        try:
            loaded = load_task_file(blob, self.backbone)
        except TaskFileError as e:
            raise TaskUnservable(f"task {task_id!r} version {key.version} cannot be served: {e}", e.code) from e
        tensors = task_slot_tensors(self.backbone, loaded.params)
        return self._insert(key, loaded.spec, tensors)

    def _insert(self, key: TaskKey, spec: TaskSpec, tensors: SlotTensors) -> _Entry:
        dims = merge_dims(self._dims, tensors.dims())
        per = slot_bytes(dims)
        if per > self.capacity_bytes:
            raise TaskTooLarge(f"task {key.task_id!r} needs a {per}-byte slot, more than the whole bank "
                               f"({self.capacity_bytes} bytes, VPT_BANK_BYTES)")
        while per * (len(self._entries) + 1) > self.capacity_bytes:
            victim = next((k for k, e in self._entries.items() if e.pins == 0), None)
            if victim is None:
                raise BankFull(f"bank full: {len(self._entries)} tasks pinned by in-flight batches "
                               f"({self.capacity_bytes} bytes)")
            self._evict(victim)
        if dims != self._dims or not self._free:
            self._grow(dims, per)
        slot = self._free.pop()
        write_slot(self._table, slot, tensors)
        entry = _Entry(key=key, slot=slot, spec=spec, tensors=tensors)
        self._entries[key] = entry
        log.debug("bank: loaded %s into slot %d", key, slot)
        return entry

    def _table_dims(self) -> Dims:
        return {name: (tuple(t.shape[1:]), t.dtype) for name, t in self._table.tensors.items()}

    def _grow(self, dims: Dims, per: int) -> None:
        """A new table with room for one more entry; live entries are compacted into it.

        Leases taken before keep the old table and their old slot numbers, so they read unchanged
        tensors.
        """
        needed = len(self._entries) + 1
        grown = self._table.slots * 2 if not self._free else self._table.slots
        slots = min(max(4, grown, needed), max(needed, self.capacity_bytes // per))
        table = allocate_table(self.backbone, slots, dims)
        for i, entry in enumerate(self._entries.values()):
            entry.slot = i
            write_slot(table, i, entry.tensors)
        self._free = list(range(slots - 1, len(self._entries) - 1, -1))
        self._table, self._dims = table, dims

    def _unpin(self, entry: _Entry) -> None:
        entry.pins -= 1
        if entry.pins == 0 and entry.stale and self._entries.get(entry.key) is entry:
            self._evict(entry.key)

    def _evict(self, key: TaskKey) -> None:
        entry = self._entries.pop(key)
        self._free.append(entry.slot)
        self.evictions += 1
        log.debug("bank: evicted %s from slot %d", key, entry.slot)
