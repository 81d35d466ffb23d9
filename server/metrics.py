"""Prometheus metrics, one registry per app."""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_registry = CollectorRegistry()  # apart: with front-end processes, they count HTTP
        r, h = self.registry, self.http_registry
        self.requests = Counter("vpt_http_requests_total", "HTTP requests", ["route", "method", "status"], registry=h)
        self.latency = Histogram("vpt_http_request_seconds", "HTTP request latency", ["route", "method"],
                                 registry=h, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.decode = DecodeAccount(h)
        self.batch_size = Histogram("vpt_batch_images", "Images per forward batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.queue_depth = Gauge("vpt_queue_images", "Images waiting for a batch", registry=r)
        self.predictions = Counter("vpt_predictions_total", "Images classified", ["tenant", "task"], registry=r)
        self._bank = None
        self._jobs = None
        r.register(self)  # custom collector for bank and job gauges

    def attach(self, bank: object, job_counts: object) -> None:
        """`bank.stats()` and `job_counts()` -> {state: n} are read at scrape time."""
        self._bank, self._jobs = bank, job_counts

    def describe(self) -> list:
        return []

    def collect(self):
        if self._bank is not None:
            yield from _bank_families(self._bank.stats())
        if self._jobs is not None:
            fam = GaugeMetricFamily("vpt_jobs", "Training jobs by state", labels=["state"])
            try:
                for state, n in self._jobs().items():
                    fam.add_metric([state], n)
            except Exception as e:  # noqa: BLE001 (a store outage must not break the scrape)
                log.debug("job counts unavailable for /metrics: %s", e)
            yield fam

    def render(self) -> bytes:
        """Everything this process counts (single-process mode)."""
        return generate_latest(self.http_registry) + generate_latest(self.registry)

    def render_engine(self) -> bytes:
        """Batches, queue, bank, jobs and predictions: the engine process's share of a scrape."""
        return generate_latest(self.registry)


class DecodeAccount:
    """CPU seconds spent decoding request images, and the images: what decoding costs per image
    (`ImageDecoder`'s `account`)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.seconds = Counter("vpt_decode_cpu_seconds", "CPU seconds spent decoding request images",
                               registry=registry)
        self.images = Counter("vpt_decoded_images", "Request images decoded (or refused by the decoder)",
                              registry=registry)

    def __call__(self, cpu_seconds: float, images: int) -> None:
        self.seconds.inc(cpu_seconds)
        self.images.inc(images)


def _bank_families(st: object) -> list[GaugeMetricFamily]:
    """The bank's counters, per tier (`tier` = device or host)."""
    per_tier = (("hits", "Bank lookups that found the task in the tier", "hits", "host_hits"),
                ("misses", "Bank lookups that did not", "misses", "host_misses"),
                ("evictions", "Tasks evicted from the tier for room", "evictions", "host_evictions"),
                ("resident_bytes", "Bytes of task tensors held in the tier", "resident_bytes", "host_bytes"),
                ("resident_tasks", "Task versions held in the tier", "resident_tasks", "host_tasks"),
                ("capacity_bytes", "The tier's capacity", "capacity_bytes", "host_capacity_bytes"))
    out = []
    for name, help_, device, host in per_tier:
        fam = GaugeMetricFamily(f"vpt_bank_{name}", help_, labels=["tier"])
        fam.add_metric(["device"], getattr(st, device))
        fam.add_metric(["host"], getattr(st, host))
        out.append(fam)
    for name, help_ in (("prefetches", "Prefetches that started a load"),
                        ("transient", "Misses served outside the device tier (it was pinned full)"),
                        ("loading", "Task loads in flight")):
        out.append(GaugeMetricFamily(f"vpt_bank_{name}", help_, value=getattr(st, name)))
    return out
