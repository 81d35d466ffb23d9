"""The host tier: parsed task tensors in host memory (page-locked on CUDA), LRU by bytes.

It sits between the store and the device: a device miss that hits here costs one upload, not a
store read, a parse and the prompt K/V computation. Entries are keyed by (tenant, task, version),
so they never go stale by themselves; change events discard the versions that are no longer
current, and deleted tasks.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpt.engine import SlotTensors
from vpt.task import TaskSpec

if TYPE_CHECKING:
    from prompt_store.bank import TaskKey


@dataclass(frozen=True)
class HostEntry:
    spec: TaskSpec
    tensors: SlotTensors     # on the host
    nbytes: int


class HostTier:
    """An LRU of `HostEntry` bounded by `capacity_bytes`; thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._entries: OrderedDict[TaskKey, HostEntry] = OrderedDict()   # LRU order: oldest first
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: TaskKey) -> HostEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry

    def put(self, key: TaskKey, entry: HostEntry) -> bool:
        """Keep `entry`, evicting the least recently used; False when it alone exceeds the tier."""
        if entry.nbytes > self.capacity_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + entry.nbytes > self.capacity_bytes:
                _, victim = self._entries.popitem(last=False)
                self._bytes -= victim.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self._bytes += entry.nbytes
            return True

    def discard(self, match: Callable[[TaskKey], bool]) -> int:
        """Drop every entry whose key matches (not counted as evictions)."""
        with self._lock:
            keys = [k for k in self._entries if match(k)]
            for k in keys:
                self._bytes -= self._entries.pop(k).nbytes
            return len(keys)

    def __contains__(self, key: TaskKey) -> bool:  # a peek: not counted, not reordered
        return key in self._entries

    def keys(self) -> list[TaskKey]:
        """Resident keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
