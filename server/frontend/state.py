"""What a front-end process holds: settings, keys, the store, a decoder and its engine connection.

It has no backbone weights, no bank and no batcher: predictions, readiness of the device side and
engine metrics go to the engine process over the channel (server/channel.py). Jobs go to the store's
job queue, which is cross-process: the engine's training workers claim them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

from prompt_store.factory import open_store
from server.answers import Outcome
from server.channel import SlotRing
from server.frontend.auth import KeyRing, load_keyring
from server.frontend.engine_client import EngineClient
from server.frontend.images import ImageDecoder
from server.jobs import JobService
from server.metrics import DecodeAccount
from server.settings import Settings
from server.shared import count_unservable, open_job_queue, work_dir

log = logging.getLogger(__name__)


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}  # the dtypes a backbone can load in


class BackboneInfo:
    """The engine's backbone as facts: `GET /backbone`, the OIP input shape and normalisation, bank bytes."""

    def __init__(self, facts: dict[str, Any]) -> None:
        self.facts = facts
        self.name, self.fingerprint = facts["name"], facts["fingerprint"]
        self.element_size = _ITEMSIZE.get(str(facts.get("dtype")), 4)  # bytes per bank value
        self.data_config = {"input_size": tuple(facts["input_size"]), "mean": tuple(facts["mean"]),
                            "std": tuple(facts["std"]), "interpolation": facts["interpolation"],
                            "crop_pct": facts["crop_pct"], "crop_mode": facts["crop_mode"]}

    def describe(self) -> dict[str, Any]:
        return dict(self.facts)


class FrontMetrics:
    """HTTP metrics of this front end, written to the shared multiprocess directory; scrapes merge
    every front end's files with the engine's own registry (batches, queue, bank, jobs, predictions)."""

    def __init__(self) -> None:
        self.directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.requests = Counter("vpt_http_requests_total", "HTTP requests", ["route", "method", "status"],
                                registry=None)
        self.latency = Histogram("vpt_http_request_seconds", "HTTP request latency", ["route", "method"],
                                 registry=None, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.decode = DecodeAccount(None)

    def render_http(self) -> bytes:
        registry = CollectorRegistry()
        if self.directory:
            multiprocess.MultiProcessCollector(registry, path=self.directory)
        else:  # not started by the supervisor: only this process
            for metric in (self.requests, self.latency, self.decode.seconds, self.decode.images):
                registry.register(metric)
        return generate_latest(registry)


class FrontendState:
    def __init__(self, settings: Settings, client: EngineClient) -> None:
        self.settings = settings
        self.keyring: KeyRing = load_keyring(settings.api_keys, settings.api_keys_file)
        self.client = client
        self.store = open_store(settings.store)
        self.metrics = FrontMetrics()
        uploads = settings.uploads_dir.resolve()
        uploads.mkdir(parents=True, exist_ok=True)
        self.queue = open_job_queue(settings, self.store)  # cross-process: the engine's workers claim
        self.jobs = JobService(self.store, self.queue, uploads, work_dir(settings), settings.max_active_jobs_per_tenant,
                               settings.max_pending_bytes_per_tenant)
        self.backbone: BackboneInfo | None = None
        self._unservable: tuple[float, int] | None = None
        self.decoder: ImageDecoder | None = None

    @classmethod
    def from_env(cls, settings: Settings) -> FrontendState:
        from server.channel import ENV_INDEX, ENV_SHM, ENV_SOCKET

        ring = SlotRing.attach(os.environ[ENV_SHM])
        return cls(settings, EngineClient(os.environ[ENV_SOCKET], ring, int(os.environ[ENV_INDEX])))

    async def start(self) -> None:
        hello = await self.client.connect()
        self.backbone = BackboneInfo(hello["backbone"])
        self.decoder = ImageDecoder(self.settings.max_image_pixels, int(hello["min_side"]),
                                    threads=self.settings.decode_threads,
                                    inline_bytes=self.settings.inline_decode_bytes(frontend=True),
                                    account=self.metrics.decode)

    async def predict(self, tenant: str, task: str, images: list[np.ndarray] | np.ndarray, top_k: int) -> Outcome:
        return await self.client.predict(tenant, task, images, top_k)

    async def check_task(self, blob: bytes) -> dict[str, str]:
        """The engine checks the task file against its backbone (server/task_checks.py): its metadata or a 422."""
        return await self.client.call({"op": "check_task"}, [blob])

    async def ready(self, details: bool = False) -> dict[str, str]:
        if not self.client.connected:
            return {"engine": "unreachable"}
        try:
            return await asyncio.wait_for(self.client.call({"op": "ready", "details": details}), timeout=5)
        except Exception as e:  # the engine is gone or stuck: not ready  # noqa: BLE001
            return {"engine": f"unavailable: {type(e).__name__}"}

    async def task_changed(self, tenant: str, task: str) -> None:
        """This front end wrote `task`: the engine forgets its cached version before the write is answered,
        so the caller's next prediction sees it (other processes learn it from the store's events)."""
        await asyncio.wait_for(self.client.call({"op": "changed", "tenant": tenant, "task": task}), timeout=5)

    def unservable_tasks(self, max_age_s: float = 10.0) -> int:
        """As the engine counts it (`AppState.unservable_tasks`), from this process's view of the store."""
        now = time.monotonic()
        if self._unservable is None or now - self._unservable[0] > max_age_s:
            self._unservable = (now, count_unservable(self.store, self.backbone.fingerprint))
        return self._unservable[1]

    async def render_metrics(self) -> bytes:
        engine = await asyncio.wait_for(self.client.call({"op": "metrics"}), timeout=10)
        return self.metrics.render_http() + engine["text"].encode()

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
        self.queue.close()
        self.store.close()
