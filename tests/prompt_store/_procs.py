"""Functions run in spawned child processes by the concurrency tests (importable by module path)."""
from __future__ import annotations

import hashlib
import os
import random
import time

from prompt_store import StoreError, TaskNotFound, open_store


def blob_for(seed: int) -> bytes:
    """Blobs of varied sizes (1 KB .. 300 KB) so a torn read would show as a size or checksum mismatch."""
    size = random.Random(seed).randint(1024, 300 * 1024)
    chunk = hashlib.sha256(str(seed).encode()).digest()
    return (chunk * (size // 32 + 1))[:size]


def write_versions(url: str, options: dict, tenant: str, task_id: str, seeds: list[int]) -> list[int]:
    store = open_store(url, **options)
    try:
        out = []
        for seed in seeds:
            blob = blob_for(seed)
            meta = {"blob_sha": hashlib.sha256(blob).hexdigest(), "seed": str(seed)}
            out.append(store.put_task(tenant, task_id, blob, meta).version)
        return out
    finally:
        store.close()


def read_until(url: str, options: dict, tenant: str, task_id: str, seconds: float) -> tuple[int, list[str]]:
    """Read the current version in a loop; return (reads, problems seen)."""
    store = open_store(url, **options)
    problems: list[str] = []
    reads, last = 0, 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                record, blob = store.get_task(tenant, task_id)
            except TaskNotFound:
                continue
            except StoreError as exc:
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            reads += 1
            digest = hashlib.sha256(blob).hexdigest()
            if not (digest == record.sha256 == record.metadata.get("blob_sha")) or len(blob) != record.size_bytes:
                problems.append(f"mismatch at v{record.version}")
            if record.version < last:
                problems.append(f"current went back from v{last} to v{record.version}")
            last = record.version
        return reads, problems
    finally:
        store.close()


def put_then_change(url: str, options: dict, tenant: str, task_id: str) -> None:
    """Three puts, an activate and a delete, from another process."""
    store = open_store(url, **options)
    try:
        for i in range(3):
            store.put_task(tenant, task_id, blob_for(i), {})
        store.activate(tenant, task_id, 1)
        store.delete_task(tenant, task_id)
    finally:
        store.close()


def claim_and_die(url: str, options: dict, worker: str) -> str:
    """Claim one job and exit without acking it: a worker that crashed mid-job."""
    from prompt_store import open_queue

    store = open_store(url, **options)
    claim = open_queue(store).claim(worker, timeout_s=10)
    if claim is None:
        os._exit(3)
    os._exit(0)


def submit_jobs(url: str, options: dict, tenant: str, job_ids: list[str]) -> list[str]:
    """A front-end process: create queued job records (the local store's records are the queue)."""
    from prompt_store import JobRecord, open_queue

    store = open_store(url, **options)
    try:
        queue = open_queue(store)
        return [queue.submit(JobRecord.new(tenant, "task", job_id=j)).job_id for j in job_ids]
    finally:
        store.close()


def claim_all(url: str, options: dict, worker: str, idle_s: float) -> list[tuple[str, int]]:
    """A worker process: claim jobs until none came for `idle_s`; (job id, token) of each claim."""
    from prompt_store import open_queue

    store = open_store(url, **options)
    try:
        queue = open_queue(store)
        out = []
        while (claim := queue.claim(worker, timeout_s=idle_s)) is not None:
            out.append((claim.job_id, claim.token))
        return out
    finally:
        store.close()
