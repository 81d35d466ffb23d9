"""The channel's engine side: front ends connect over a Unix socket; their tensors are read from the ring.

Every request gets exactly one answer, so a front end knows when its slots are free again; a
request the front end abandoned (its client timed out) is answered `cancelled` and skipped by the
batcher if it has not run yet. When a front end's connection closes, what it had queued is dropped.
"""
from __future__ import annotations

import asyncio
import logging
import warnings
from typing import Any

import torch
from torch import Tensor

from prompt_store.records import ChangeEvent
from server.channel import DTYPES, Outbox, SlotRing, encode_frame, item_shape, read_frame
from server.errors import ApiError, translate
from server.state import AppState
from server.task_checks import servable_metadata

log = logging.getLogger(__name__)
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # the channel's dtype names, as torch dtypes


def error_dict(exc: BaseException) -> dict[str, Any]:
    err = translate(exc) if isinstance(exc, Exception) else ApiError(500, "internal_error", "cancelled")
    return {"status": err.status, "code": err.code, "message": err.message, "details": err.details,
            "headers": err.headers}


class EngineService:
    def __init__(self, state: AppState, ring: SlotRing) -> None:
        self.state, self.ring = state, ring
        _, self.height, self.width = state.backbone.data_config["input_size"]

    async def serve(self, path: str) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self._connection, path=path, limit=1 << 20)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: dict[int, asyncio.Task] = {}
        frontend = -1
        out = Outbox(writer)
        try:
            while True:
                msg, blobs = await read_frame(reader)
                op, rid = msg.get("op"), msg.get("id")
                if op == "hello":
                    frontend = int(msg["frontend"])
                    self.ring.layout.offset(frontend, 0)  # validates the index
                    self._send(out, {"id": rid, "ok": self._hello()})
                elif op == "abandon":
                    task = tasks.get(msg.get("target"))
                    if task is not None:
                        task.cancel()
                else:
                    task = asyncio.create_task(self._answer(op, msg, blobs, frontend, out))
                    tasks[rid] = task
                    task.add_done_callback(lambda _t, r=rid: tasks.pop(r, None))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # a malformed frame: this connection is broken, the engine is not
            log.exception("front end %d sent a bad frame; closing its connection", frontend)
        finally:
            for task in list(tasks.values()):
                task.cancel()
            writer.close()

    def _hello(self) -> dict[str, Any]:
        s = self.state
        return {"backbone": s.backbone.describe(), "min_side": s.batcher.preprocess.min_side}

    def _send(self, out: Outbox, msg: dict[str, Any]) -> None:
        out.send(encode_frame(msg))

    async def _answer(self, op: str, msg: dict[str, Any], blobs: list[bytes], frontend: int, out: Outbox) -> None:
        rid = msg.get("id")
        try:
            if op == "predict":
                result = await self._predict(msg, blobs, frontend)
            elif op == "check_task":  # a front end's upload: checked against the backbone, off this loop
                if len(blobs) != 1:
                    raise ApiError(400, "bad_request", "check_task carries one task file")
                result = await asyncio.to_thread(servable_metadata, blobs[0], self.state.backbone, self.state.settings)
            elif op == "ready":
                result = await asyncio.to_thread(self.state.ready_checks, bool(msg.get("details")))
            elif op == "metrics":
                result = {"text": self.state.metrics.render_engine().decode()}
            elif op == "changed":  # a front end wrote this task: forget it now, before the event log says so
                self.state.bank.on_change(ChangeEvent(str(msg["tenant"]), str(msg["task"]), None, "changed"))
                result = {}
            else:
                raise ApiError(400, "bad_request", f"unknown channel operation {op!r}")
            self._send(out, {"id": rid, "ok": result})
        except asyncio.CancelledError:
            self._send(out, {"id": rid, "error": error_dict(asyncio.CancelledError())})
        except Exception as e:  # noqa: BLE001
            self._send(out, {"id": rid, "error": error_dict(e)})

    def _inputs(self, items: list[dict[str, Any]], blobs: list[bytes], frontend: int) -> Tensor | list[Tensor]:
        """Tensors aliasing the ring's slots (or the inline frames): uint8 images or float32 (3, H, W)."""
        out = []
        for item in items:
            name, shape = item_shape(item)
            dtype = TORCH_DTYPES[name]
            if "slot" in item:
                t = self.ring.tensor(frontend, int(item["slot"]), dtype, shape)
            else:
                with warnings.catch_warnings():  # read-only bytes: nothing writes to them
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.frombuffer(blobs[int(item["inline"])], dtype=dtype).view(shape)
            if dtype == torch.uint8 and (len(shape) != 3 or shape[2] != 3 or
                                         shape[0] * shape[1] > self.state.settings.max_image_pixels):
                raise ApiError(400, "image_invalid", f"a decoded image must be (H, W, 3) uint8, got {shape}")
            if dtype == torch.float32 and shape != (3, self.height, self.width):
                raise ApiError(400, "invalid_parameter",
                               f"a preprocessed image must be (3, {self.height}, {self.width}), got {shape}")
            out.append(t)
        if not out:
            raise ApiError(400, "bad_request", "no images")
        kinds = {t.dtype for t in out}
        if len(kinds) > 1:
            raise ApiError(400, "bad_request", "one request mixes decoded and preprocessed images")
        return out if torch.uint8 in kinds else torch.stack(out)  # list of (H, W, 3) or (n, 3, H, W)

    async def _predict(self, msg: dict[str, Any], blobs: list[bytes], frontend: int) -> dict[str, Any]:
        tenant, task = str(msg["tenant"]), str(msg["task"])
        inputs = self._inputs(list(msg["items"]), blobs, frontend)
        outcome = await self.state.predict(tenant, task, inputs, int(msg["top_k"]))
        results = [[{"label": t.label, "index": t.index, "score": t.score} for t in row] for row in outcome.results]
        return {"version": outcome.version, "results": results,
                "queue_ms": outcome.queue_ms, "forward_ms": outcome.forward_ms,
                "batch_images": outcome.batch_images}
