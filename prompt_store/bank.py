"""The bank: tasks' tensors on the serving device, a host tier behind it, prefetch, per-batch packing.

Tiers: device (LRU by bytes, `capacity_bytes`) <- host (LRU by bytes, page-locked on CUDA,
`host_capacity_bytes`) <- store. Each resident task costs exactly its own bytes
(`SlotTensors.nbytes()`): a 10,000-class task never widens or evicts anyone else for its width.
Per batch, `vpt.engine.pack_slots` stacks the prompt tensors of the batch's distinct tasks (padded
only to that batch's widest prompt count) and heads run grouped by class count. What a task holds
is `vpt.engine`'s business: the bank moves, measures and packs `SlotTensors` through its methods
and functions only.

Entries are keyed by (tenant, task, version) and never change: a batch pins what it uses, a
hot-swap loads the new version beside the old one and the old one goes once unpinned, so an
in-flight batch never sees its tensors change. Change events invalidate both tiers. When all that
is resident is pinned, a batch's miss is served from a transient device copy held by its lease
alone, so a batch's own working set is always served; copies held by other in-flight batches
count against another `capacity_bytes` (past that, `BankFull`). `prefetch` starts loads when a request is queued, so a miss
overlaps the batching wait.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from prompt_store.base import Store
from prompt_store.errors import BankFull, StoreError, TaskTooLarge, TaskUnservable
from prompt_store.host_tier import HostTier
from prompt_store.loading import Loaded, TaskLoader
from prompt_store.records import ChangeEvent
from vpt.backbone import Backbone
from vpt.engine import PromptTable, SlotTensors, pack_slots
from vpt.task import TaskSpec

log = logging.getLogger(__name__)

__all__ = ["BankFull", "BankStats", "Lease", "PromptBank", "ResolvedTask", "TaskKey", "TaskTooLarge",
           "TaskUnservable"]


@dataclass(frozen=True)
class TaskKey:
    tenant: str
    task_id: str
    version: int


@dataclass
class _Entry:
    key: TaskKey
    spec: TaskSpec
    tensors: SlotTensors          # on the device
    nbytes: int
    pins: int = 0
    stale: bool = False           # a newer version is current, or the task was deleted


@dataclass(frozen=True)
class ResolvedTask:
    """What a request needs after acquire: its slot in the lease's table, version and class names."""

    key: TaskKey
    slot: int
    classes: tuple[str, ...]


@dataclass
class Lease:
    """One batch's tasks: `slots[j]` are task j's device tensors, `table` their packed prompts.

    Release it (twice is harmless). `table` is None when no request could be served.
    """

    table: PromptTable | None
    slots: list[SlotTensors]
    tasks: list[ResolvedTask | None]
    device: torch.device
    _entries: list[_Entry] = field(repr=False, default_factory=list)
    _transient_bytes: int = 0
    released: bool = False

    def slot_ids(self, per_request: list[int]) -> list[int]:
        """Per sample its slot, from the index into `tasks` of each sample."""
        return [self.tasks[i].slot for i in per_request]

    def slot_tensor(self, per_request: list[int]) -> Tensor:
        """(B,) slot index per sample, on the device."""
        return torch.tensor(self.slot_ids(per_request), dtype=torch.long).to(self.device)


@dataclass(frozen=True)
class BankStats:
    hits: int                     # device tier, counted per request
    misses: int
    evictions: int
    resident_bytes: int
    resident_tasks: int
    capacity_bytes: int
    host_hits: int                # host tier, counted per load
    host_misses: int
    host_evictions: int
    host_bytes: int
    host_tasks: int
    host_capacity_bytes: int
    prefetches: int               # prefetches that started a load
    transient: int                # misses served outside the device tier (it was pinned full)
    loading: int                  # loads in flight now


class PromptBank:
    """Device tier + host tier fed from a store, invalidated by its events."""

    def __init__(self, backbone: Backbone, store: Store, capacity_bytes: int, *,
                 host_capacity_bytes: int | None = None, version_ttl_s: float = 5.0, subscribe: bool = True,
                 loader_threads: int = 2) -> None:
        self.backbone, self.store = backbone, store
        self.capacity_bytes = int(capacity_bytes)
        self.version_ttl_s = version_ttl_s
        self.host = HostTier(self.capacity_bytes if host_capacity_bytes is None else host_capacity_bytes)
        self._loader = TaskLoader(backbone, store, self.host, threads=loader_threads)
        self._lock = threading.RLock()
        self._entries: OrderedDict[TaskKey, _Entry] = OrderedDict()   # LRU order: oldest first
        self._bytes = 0
        self._transient = 0                                            # bytes held by leases outside the tier
        self._current: dict[tuple[str, str], tuple[int, float]] = {}   # (tenant, task) -> (version, seen at)
        self._prefetching: set[tuple[str, str]] = set()
        self.hits = self.misses = self.evictions = self.prefetches = self.transient = 0
        self._subscription = store.subscribe(self.on_change) if subscribe else None

    # -- public -----------------------------------------------------------------------------------

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

        Misses load in parallel (joining prefetches in flight). `lease.tasks[i]` is None where
        `errors[i]` is set. Anything other than a store error (a bug, out of memory) unpins what
        this call pinned and propagates.
        """
        keys: list[TaskKey | None] = []
        failed: dict[int, Exception] = {}
        for i, (tenant, task_id) in enumerate(requests):
            try:
                keys.append(self._resolve(tenant, task_id))
            except StoreError as e:
                keys.append(None)
                failed[i] = e
        lease = Lease(None, [], [None] * len(requests), self.backbone.device)
        try:
            held = self._hold_all(Counter(k for k in keys if k is not None), lease)
            for i, key in enumerate(keys):
                if key is not None and isinstance(held[key], Exception):
                    failed[i] = held[key]
                elif key is not None:
                    slot, spec = held[key]
                    lease.tasks[i] = ResolvedTask(key, slot, spec.classes)
            if lease.slots:
                lease.table = pack_slots(self.backbone, lease.slots)
        except BaseException:
            self.release(lease)
            raise
        return lease, [failed.get(i) for i in range(len(requests))]

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            self._transient -= lease._transient_bytes
            for e in lease._entries:
                self._unpin(e)

    def prefetch(self, tenant: str, task_id: str) -> None:
        """Start loading the task's current version (store -> host -> device) in the background.

        Returns at once; does nothing when it is resident or already being prefetched. Errors are
        left for the request's own acquire to report.
        """
        with self._lock:
            cached = self._current.get((tenant, task_id))
            if cached is not None and time.monotonic() - cached[1] < self.version_ttl_s \
                    and TaskKey(tenant, task_id, cached[0]) in self._entries:
                return
            if (tenant, task_id) in self._prefetching:
                return
            self._prefetching.add((tenant, task_id))
        self._loader.in_background(self._prefetch, tenant, task_id)

    def on_change(self, event: ChangeEvent) -> None:
        """A store change event: forget the cached current version; retire other versions in both tiers."""
        if event.kind == "resync":  # events may have been missed: re-read every current pointer
            self.invalidate_all()
            return
        keep = None if event.kind == "delete" else event.version
        self._loader.invalidate(event.tenant, event.task_id, keep)
        with self._lock:
            self._current.pop((event.tenant, event.task_id), None)
            for key, entry in list(self._entries.items()):
                if key.tenant == event.tenant and key.task_id == event.task_id and key.version != keep:
                    entry.stale = True
                    if entry.pins == 0:
                        self._evict(key)

    def invalidate_all(self) -> None:
        """Forget every cached current version (e.g. after the event stream reconnects)."""
        with self._lock:
            self._current.clear()

    def stats(self) -> BankStats:
        h = self.host
        with self._lock:
            return BankStats(self.hits, self.misses, self.evictions, self._bytes, len(self._entries),
                             self.capacity_bytes, h.hits, h.misses, h.evictions, h.nbytes, len(h),
                             h.capacity_bytes, self.prefetches, self.transient, self._loader.in_flight())

    def resident(self) -> list[TaskKey]:
        """Keys in the device tier, least recently used first."""
        with self._lock:
            return list(self._entries)

    def resident_tiers(self) -> dict[str, list[TaskKey]]:
        """What each tier holds, least recently used first (for operators)."""
        return {"device": self.resident(), "host": self.host.keys()}

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
        self._loader.close()

    # -- internals --------------------------------------------------------------------------------

    def _resolve(self, tenant: str, task_id: str) -> TaskKey:
        """The current version's key, cached for `version_ttl_s` (events clear it sooner)."""
        with self._lock:
            cached = self._current.get((tenant, task_id))
            now = time.monotonic()
            if cached is not None and now - cached[1] < self.version_ttl_s:
                return TaskKey(tenant, task_id, cached[0])
            generation = self._loader.generation(tenant, task_id)
        version = self.store.current_version(tenant, task_id)         # off the lock: other batches go on
        with self._lock:
            if generation == self._loader.generation(tenant, task_id):  # no change event since the read
                self._current[(tenant, task_id)] = (version, now)
        return TaskKey(tenant, task_id, version)

    def _hold_all(self, counts: Counter[TaskKey], lease: Lease) -> dict[TaskKey, tuple[int, TaskSpec] | Exception]:
        """Pin each key into `lease` (slot order = first appearance), loading the misses in parallel."""
        held: dict[TaskKey, tuple[int, TaskSpec] | Exception] = {}
        missing: list[TaskKey] = []
        with self._lock:
            for key, n in counts.items():
                entry = self._entries.get(key)
                if entry is None:
                    self.misses += 1
                    self.hits += n - 1
                    missing.append(key)
                    continue
                self.hits += n
                held[key] = self._pin(entry, lease)
        # store reads start on the pool first (in parallel), then host-tier hits (one upload each) and
        # a lone miss load right here, without a thread hand-off
        missing.sort(key=lambda k: k in self.host)
        loads = {k: self._loader.load(k, here=len(missing) == 1 or k in self.host) for k in missing}
        for key, fut in loads.items():
            try:
                loaded = fut.result()
                with self._lock:
                    held[key] = self._hold_loaded(key, loaded, lease)
            except StoreError as e:
                held[key] = e
        return {key: held[key] for key in counts}

    def _pin(self, entry: _Entry, lease: Lease) -> tuple[int, TaskSpec]:
        entry.pins += 1
        entry.stale = False  # a key names immutable content: a stale entry made current again is reused
        self._entries.move_to_end(entry.key)
        lease._entries.append(entry)
        lease.slots.append(entry.tensors)
        return len(lease.slots) - 1, entry.spec

    def _hold_loaded(self, key: TaskKey, loaded: Loaded, lease: Lease) -> tuple[int, TaskSpec]:
        entry = self._entries.get(key) or self._admit(key, loaded)
        if entry is not None:
            return self._pin(entry, lease)
        if self._transient - lease._transient_bytes + loaded.nbytes > self.capacity_bytes:
            raise BankFull(f"bank full: {len(self._entries)} resident tasks pinned by in-flight batches and "
                           f"{self._transient} bytes held outside the bank ({self.capacity_bytes} bytes)")
        self._transient += loaded.nbytes
        self.transient += 1
        lease._transient_bytes += loaded.nbytes
        lease.slots.append(loaded.tensors)
        return len(lease.slots) - 1, loaded.spec

    def _admit(self, key: TaskKey, loaded: Loaded) -> _Entry | None:
        """Make `loaded` resident, evicting unpinned LRU entries; None if pins leave no room or the task changed."""
        if loaded.nbytes > self.capacity_bytes:
            raise TaskTooLarge(f"task {key.task_id!r} needs {loaded.nbytes} bytes, more than the whole bank "
                               f"({self.capacity_bytes} bytes, VPT_BANK_BYTES)")
        if loaded.generation != self._loader.generation(key.tenant, key.task_id):
            return None
        while self._bytes + loaded.nbytes > self.capacity_bytes:
            victim = next((k for k, e in self._entries.items() if e.pins == 0), None)
            if victim is None:
                return None
            self._evict(victim)
        entry = _Entry(key=key, spec=loaded.spec, tensors=loaded.tensors, nbytes=loaded.nbytes)
        self._entries[key] = entry
        self._bytes += entry.nbytes
        log.debug("bank: loaded %s (%d bytes)", key, entry.nbytes)
        return entry

    def _prefetch(self, tenant: str, task_id: str) -> None:
        try:
            key = self._resolve(tenant, task_id)
            with self._lock:
                if key in self._entries:
                    return
            loaded = self._loader.load_here(key)
            if loaded is None:  # a batch is loading it already
                return
            with self._lock:
                self.prefetches += 1
                if key not in self._entries:
                    self._admit(key, loaded)  # None (pinned full): it stays in the host tier
        except StoreError as e:
            log.debug("prefetch of %s/%s: %s", tenant, task_id, e)
        except Exception:
            log.exception("prefetch of %s/%s failed", tenant, task_id)
        finally:
            with self._lock:
                self._prefetching.discard((tenant, task_id))

    def _unpin(self, entry: _Entry) -> None:
        entry.pins -= 1
        if entry.pins == 0 and entry.stale and self._entries.get(entry.key) is entry:
            self._evict(entry.key)

    def _evict(self, key: TaskKey) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        self.evictions += 1
        log.debug("bank: evicted %s", key)
