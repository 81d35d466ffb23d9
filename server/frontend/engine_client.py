"""The channel's front-end side: images into this front end's ring slots, requests and answers over the socket."""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import numpy as np

from server.answers import Outcome, TopK
from server.channel import Outbox, SlotPool, SlotRing, array_item, encode_frame, read_frame
from server.errors import ApiError, busy

log = logging.getLogger(__name__)


def _api_error(err: dict[str, Any]) -> ApiError:
    return ApiError(int(err.get("status", 500)), str(err.get("code", "internal_error")), str(err.get("message", "")),
                    details=err.get("details"), headers=err.get("headers"))


def unavailable() -> ApiError:
    return ApiError(503, "engine_unavailable", "the inference engine is not reachable; retry shortly",
                    headers={"Retry-After": "2"})


class EngineClient:
    """One connection to the engine, shared by every request of this front end (one event loop)."""

    def __init__(self, socket_path: str, ring: SlotRing, frontend: int) -> None:
        self.socket_path, self.ring, self.frontend = socket_path, ring, frontend
        self.pool = SlotPool(ring.layout.slots)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, list[int]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._out: Outbox | None = None
        self._reader_task: asyncio.Task | None = None
        self.hello: dict[str, Any] = {}

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> dict[str, Any]:
        reader, self._writer = await asyncio.open_unix_connection(self.socket_path, limit=1 << 20)
        self._out = Outbox(self._writer)
        self._reader_task = asyncio.create_task(self._read(reader))
        self.hello = await self.call({"op": "hello", "frontend": self.frontend})
        return self.hello

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg, _ = await read_frame(reader)
                fut, slots = self._pending.pop(msg.get("id"), (None, []))
                self.pool.give(slots)  # the engine is done with them
                if fut is None or fut.done():
                    continue
                if "error" in msg:
                    fut.set_exception(_api_error(msg["error"]))
                else:
                    fut.set_result(msg.get("ok"))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            log.warning("the engine connection closed")
            if self._writer is not None:
                self._writer.close()
            for fut, slots in self._pending.values():
                self.pool.give(slots)
                if not fut.done():
                    fut.set_exception(unavailable())
            self._pending.clear()

    async def call(self, msg: dict[str, Any], blobs: list = (), slots: list[int] = ()) -> Any:
        """Send `msg`, wait for its answer; abandoned (and its slots kept) until the engine answers."""
        if not self.connected:
            self.pool.give(list(slots))
            raise unavailable()
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, list(slots))
        self._out.send(encode_frame({**msg, "id": rid}, list(blobs)))
        try:
            return await fut  # cancelling this wait cancels `fut`; its slots stay pending until the answer
        except asyncio.CancelledError:  # timed out or the client left: the engine skips it if it can
            if self.connected and rid in self._pending:
                self._out.send(encode_frame({"op": "abandon", "id": 0, "target": rid}))
            raise

    async def predict(self, tenant: str, task: str, images: list[np.ndarray] | np.ndarray, top_k: int) -> Outcome:
        """uint8 (H, W, 3) arrays or a float32 (n, 3, H, W) array -> the engine's answer."""
        arrays = list(images)  # a batch: one (3, H, W) item per image
        slots = self.pool.take(len(arrays))
        if slots is None:
            raise busy(f"this front end's {self.pool.size} shared-memory slots are all in use")
        items, blobs, used = [], [], []
        for arr, slot in zip(arrays, slots):
            desc, data = array_item(arr)
            if len(data) <= self.ring.layout.slot_bytes:
                self.ring.write(self.frontend, slot, data)
                items.append({**desc, "slot": slot})
                used.append(slot)
            else:  # larger than a slot: one copy over the socket instead
                items.append({**desc, "inline": len(blobs)})
                blobs.append(data)
        self.pool.give([s for s in slots if s not in used])
        ok = await self.call({"op": "predict", "tenant": tenant, "task": task, "top_k": top_k, "items": items},
                             blobs, used)
        results = [[TopK(**t) for t in row] for row in ok["results"]]
        return Outcome(ok["version"], results, ok["queue_ms"], ok["forward_ms"], ok["batch_images"])

