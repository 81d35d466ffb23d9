"""Loading tasks for the bank: store -> host tier -> device, once per key, in background threads.

A load of a key already in flight is joined, never repeated. Prefetches run on their own pool so
that a batch's own misses never queue behind them. Every (tenant, task) has a generation, bumped
by change events: a load that started before a change does not refill the host tier with what
the change retired.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from prompt_store.base import Store
from prompt_store.errors import TaskUnservable
from prompt_store.host_tier import HostEntry, HostTier
from vpt.backbone import Backbone
from vpt.engine import SlotTensors, task_slot_tensors
from vpt.errors import TaskFileError
from vpt.task import TaskSpec, load_task_file

if TYPE_CHECKING:
    from prompt_store.bank import TaskKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A task ready on the device, and the generation of its (tenant, task) when the load began."""

    spec: TaskSpec
    tensors: SlotTensors
    nbytes: int
    generation: int


class TaskLoader:
    def __init__(self, backbone: Backbone, store: Store, host: HostTier, *, threads: int = 2) -> None:
        self.backbone, self.store, self.host = backbone, store, host
        self._lock = threading.Lock()
        self._inflight: dict[TaskKey, Future[Loaded]] = {}
        self._generation: dict[tuple[str, str], int] = {}
        self._urgent = ThreadPoolExecutor(max(1, threads), thread_name_prefix="bank-load")
        self._background = ThreadPoolExecutor(max(1, threads), thread_name_prefix="bank-prefetch")
        self._cuda = backbone.device.type == "cuda"
        self._stream: Any = torch.cuda.Stream(backbone.device) if self._cuda else None

    # -- generations ------------------------------------------------------------------------------

    def generation(self, tenant: str, task_id: str) -> int:
        return self._generation.get((tenant, task_id), 0)

    def invalidate(self, tenant: str, task_id: str, keep_version: int | None) -> None:
        """A change: loads begun before it are not cached; host entries of other versions go."""
        with self._lock:
            self._generation[(tenant, task_id)] = self.generation(tenant, task_id) + 1
        self.host.discard(lambda k: k.tenant == tenant and k.task_id == task_id and k.version != keep_version)

    # -- loads ------------------------------------------------------------------------------------

    def load(self, key: TaskKey, *, here: bool = False) -> Future[Loaded]:
        """The future of `key`'s load (joining one already in flight): on the urgent pool, or done
        in this thread when `here` (a host-tier hit is one upload: no thread hand-off for it)."""
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None:
                return fut
            fut = Future()
            self._inflight[key] = fut
            generation = self.generation(key.tenant, key.task_id)
        if here:
            self._run(key, generation, fut)
        else:
            self._urgent.submit(self._run, key, generation, fut)
        return fut

    def load_here(self, key: TaskKey) -> Loaded | None:
        """Load `key` in this thread (for background work); None when a load of it is already in flight."""
        with self._lock:
            if key in self._inflight:
                return None
            fut: Future[Loaded] = Future()
            self._inflight[key] = fut
            generation = self.generation(key.tenant, key.task_id)
        self._run(key, generation, fut)
        return fut.result()

    def in_background(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` on the background pool (prefetches), never ahead of a batch's own loads."""
        self._background.submit(fn, *args)

    def in_flight(self) -> int:
        return len(self._inflight)

    def close(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)
        self._urgent.shutdown(wait=False, cancel_futures=True)

    def _run(self, key: TaskKey, generation: int, fut: Future[Loaded]) -> None:
        try:
            result = self._load(key, generation)
        except BaseException as e:  # noqa: BLE001 - the waiters get it (a store error fails only their requests)
            with self._lock:
                self._inflight.pop(key, None)
            fut.set_exception(e)
            return
        with self._lock:
            self._inflight.pop(key, None)
        fut.set_result(result)

    def _load(self, key: TaskKey, generation: int) -> Loaded:
        entry = self.host.get(key)
        if entry is not None:
            tensors = self._upload(entry.tensors)
            return Loaded(entry.spec, tensors, entry.nbytes, generation)
        _, blob = self.store.get_task(key.tenant, key.task_id, key.version)
        try:
            loaded = load_task_file(blob, self.backbone)
        except TaskFileError as e:
            raise TaskUnservable(f"task {key.task_id!r} version {key.version} cannot be served: {e}", e.code) from e
        with self._on_stream():
            tensors = task_slot_tensors(self.backbone, loaded.params)     # on the device
            host = tensors.to("cpu")                                        # the same tensors on a CPU device
            if self._cuda:
                host = host.pin_memory()
            self._sync()
        nbytes = tensors.nbytes()
        if generation == self.generation(key.tenant, key.task_id):
            self.host.put(key, HostEntry(loaded.spec, host, nbytes))
        return Loaded(loaded.spec, tensors, nbytes, generation)

    def _upload(self, host: SlotTensors) -> SlotTensors:
        if not self._cuda:
            return host.to(self.backbone.device)
        with self._on_stream():
            tensors = host.to(self.backbone.device, non_blocking=True)      # from page-locked memory
            self._sync()
        return tensors

    def _on_stream(self) -> Any:
        return torch.cuda.stream(self._stream) if self._cuda else nullcontext()

    def _sync(self) -> None:
        if self._cuda:
            self._stream.synchronize()  # a batch on another stream may read these tensors next

