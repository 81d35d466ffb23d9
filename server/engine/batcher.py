"""Cross-task dynamic batching: requests of any tasks share one forward.

A bounded queue (counted in images) feeds one thread that forms a batch of up to
`max_batch_size` images, pins the batch's tasks in the bank, runs the forward, and answers each
request with its own task's top-k. What queued during a forward forms the next batch at once (the
engine never idles while work waits); an idle engine woken by a request waits at most `max_wait_ms`
for more, so a burst shares one forward. A request whose task cannot be served fails alone; a
request whose client went away is skipped.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from prompt_store.bank import Lease, PromptBank
from server.answers import Outcome, TopK
from server.errors import ApiError, busy
from vpt.backbone import Backbone
from vpt.engine import forward_grouped
from vpt.graphs import GraphedForward
from vpt.preprocess import Preprocessor
from vpt.priority import PriorityGate

log = logging.getLogger(__name__)


Inputs = Tensor | list[Tensor]     # preprocessed float (n, 3, H, W), or decoded uint8 (H, W, 3) images


@dataclass
class _Request:
    tenant: str
    task_id: str
    images: Inputs
    top_k: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    during_forward: bool = False  # queued while the engine was busy with a batch: the next one takes it at once
    enqueued: float = field(default_factory=time.perf_counter)
    n: int = field(init=False)    # images: read many times while batches form

    def __post_init__(self) -> None:
        self.n = len(self.images) if isinstance(self.images, list) else self.images.shape[0]


class Batcher:
    def __init__(self, backbone: Backbone, bank: PromptBank, *, max_batch_size: int, max_wait_ms: float,
                 queue_limit: int, metrics: Any = None, gate: PriorityGate | None = None,
                 pin_memory: bool = False, cuda_graphs: bool = False) -> None:
        self.backbone, self.bank, self.metrics = backbone, bank, metrics
        self.gate = gate or PriorityGate()  # serving first when training shares the device
        self.preprocess = Preprocessor(backbone.data_config)
        self.pin_memory = pin_memory and torch.device(backbone.device).type == "cuda"
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000.0
        self.features = GraphedForward(backbone, max_batch_size, cuda_graphs)  # the plain forward unless CUDA + flag
        self.queue_limit = queue_limit
        self._q: queue.Queue[_Request] = queue.Queue()
        self._carry: deque[_Request] = deque()
        self._queued_images = 0
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._busy = False  # a batch is between collection and its answers (read by `predict`, any thread)
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.batches = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queued_images(self) -> int:
        return self._queued_images

    async def predict(self, tenant: str, task_id: str, images: Inputs, top_k: int) -> Outcome:
        """Queue the images for the next batch and wait for their answer (503 when the queue is full).

        `images`: uint8 (H, W, 3) images of any sizes (preprocessed here, on the device, with the
        backbone's eval transform) or an already preprocessed float (n, 3, H, W) tensor."""
        n = len(images) if isinstance(images, list) else images.shape[0]
        with self._count_lock:
            if self._queued_images + n > self.queue_limit:
                raise busy(f"the prediction queue is full ({self._queued_images} images waiting)")
            self._queued_images += n
        loop = asyncio.get_running_loop()
        req = _Request(tenant, task_id, images, top_k, loop.create_future(), loop, self._busy)
        self.bank.prefetch(tenant, task_id)  # a miss loads while the batch forms
        self._q.put(req)
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queued_images)
        return await req.future

    # -- the batching thread ------------------------------------------------------------------------

    def _next(self, timeout: float) -> _Request | None:
        if self._carry:
            return self._carry.popleft()
        try:
            return self._q.get(timeout=timeout) if timeout > 0 else self._q.get_nowait()
        except queue.Empty:
            return None

    def _collect(self) -> list[_Request]:
        """The next batch, up to the size. A batch whose first request queued during the previous batch
        goes at once with what else is queued: the engine never idles while work waits, and the
        forward's own time gathers the next batch. A request that found the engine idle waits up to
        `max_wait_ms` for company, so a burst shares one forward."""
        first = self._next(0.1)
        if first is None:
            return []
        batch, n = [first], first.n
        deadline = time.perf_counter() + self.max_wait_s if not first.during_forward else 0.0
        while n < self.max_batch_size:
            req = self._next(deadline - time.perf_counter())
            if req is None:
                break
            if n + req.n > self.max_batch_size:
                req.during_forward = True  # it waited through this batch: the next one takes it at once
                self._carry.appendleft(req)
                break
            batch.append(req)
            n += req.n
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                continue
            self._busy = True
            try:
                self._serve(batch)
            finally:
                self._busy = False

    def _serve(self, batch: list[_Request]) -> None:
        """Run one collected batch (its live requests) and answer every request in it."""
        with self._count_lock:
            self._queued_images -= sum(r.n for r in batch)
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queued_images)
        live = [r for r in batch if not r.future.done()]  # skip requests whose client went away
        if live:
            try:
                self._run(live)
            except Exception as e:  # a bug in the forward fails this batch, not the server
                log.exception("batch failed")
                for r in live:
                    self._resolve(r, exc=e)

    def _resolve(self, req: _Request, result: Outcome | None = None, exc: BaseException | None = None) -> None:
        self._deliver([(req, result, exc)])

    def _deliver(self, answers: list[tuple[_Request, Outcome | None, BaseException | None]]) -> None:
        """Answer requests from this thread: one wake-up per event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for answer in answers:
            by_loop.setdefault(answer[0].loop, []).append(answer)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _run(self, batch: list[_Request]) -> None:
        lease, errors = self.bank.acquire_each([(r.tenant, r.task_id) for r in batch])
        try:
            ok = []
            for i, (req, err) in enumerate(zip(batch, errors)):
                if err is not None:
                    self._resolve(req, exc=err)
                else:
                    ok.append(i)
            if ok:
                with self.gate.serving():
                    self._forward(batch, ok, lease)
        finally:
            self.bank.release(lease)

    def _forward(self, batch: list[_Request], ok: list[int], lease: Lease) -> None:
        bb = self.backbone
        t0 = time.perf_counter()
        images = self._inputs([batch[i].images for i in ok])                                            # (B, 3, H, W)
        slot = lease.slot_ids([i for i in ok for _ in range(batch[i].n)])                             # (B,)
        ks = [min(batch[i].top_k, len(lease.tasks[i].classes)) for i in ok for _ in range(batch[i].n)]  # per sample
        top: list[tuple[list[float], list[int]]] = [([], [])] * len(slot)                          # per sample
        with torch.inference_mode():
            for s in range(0, images.shape[0], self.max_batch_size):  # heads grouped: no task padded to another's classes
                for rows, logits in forward_grouped(bb, images[s:s + self.max_batch_size], lease.table, lease.slots,
                                                    slot[s:s + self.max_batch_size], self.features):   # (n, C)
                    _top_k(torch.softmax(logits.float(), dim=-1), [s + r for r in rows], ks, top)
        forward_ms = (time.perf_counter() - t0) * 1000
        self.batches += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(images.shape[0])
        row, answers = 0, []
        for i in ok:
            req, task = batch[i], lease.tasks[i]
            results = [[TopK(task.classes[j], j, sc) for sc, j in zip(*top[b])] for b in range(row, row + req.n)]
            row += req.n
            queue_ms = (t0 - req.enqueued) * 1000
            answers.append((req, Outcome(task.key.version, results, queue_ms, forward_ms, images.shape[0]), None))
        self._deliver(answers)

    def _inputs(self, parts: list[Inputs]) -> Tensor:
        """The batch on the device: decoded images preprocessed together, preprocessed ones as they are."""
        bb = self.backbone
        raw = [img for p in parts if isinstance(p, list) for img in p]
        pre = self.preprocess(raw, bb.device, bb.dtype, pin=self.pin_memory) if raw else None  # (m, 3, H, W)
        out, j = [], 0
        for p in parts:
            if isinstance(p, list):
                out.append(pre[j:j + len(p)])
                j += len(p)
            else:
                out.append(p.to(bb.device, bb.dtype, non_blocking=True))
        return out[0] if len(out) == 1 else torch.cat(out)                                    # (B, 3, H, W)


def _top_k(probs: Tensor, samples: list[int], ks: list[int], out: list) -> None:
    """`out[samples[j]]` = (scores, indices) of row j of `probs` (n, C), its `ks[samples[j]]` best: one
    topk and one read to the host per distinct k (rows are independent: the same as one topk per row)."""
    by_k: dict[int, list[int]] = {}
    for j, b in enumerate(samples):
        by_k.setdefault(ks[b], []).append(j)
    for k, js in by_k.items():
        part = probs if len(js) == len(samples) else probs[torch.tensor(js, device=probs.device)]   # (m, C)
        scores, idx = part.topk(k, dim=-1)                                                        # (m, k)
        for j, sc, ix in zip(js, scores.tolist(), idx.tolist()):
            out[samples[j]] = (sc, ix)


def _settle(answers: list[tuple[_Request, Outcome | None, BaseException | None]]) -> None:
    """On the requests' event loop: each future gets its result or error (unless its waiter left)."""
    for req, result, exc in answers:
        if req.future.done():
            continue
        if exc is not None:
            req.future.set_exception(exc)
        else:
            req.future.set_result(result)


__all__ = ["ApiError", "Batcher", "Outcome", "TopK"]
