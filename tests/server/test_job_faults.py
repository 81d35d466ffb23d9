"""A training worker against store faults at publish: real stores (a directory, a real redis-server),
real training on the tiny ViT; only the publish call is made to fail, as a full disk or a Redis blip
would make it fail."""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from prompt_store import JobRecord, LocalStore, RedisStore, StoreUnavailable, open_queue
from prompt_store.errors import StoreFull
from server.jobs import JobService, TrainingWorker
from tests.fixtures.digits import make_digits_zip
from vpt.train import TrainOptions

STALE_S = 3.0  # generous next to the 0.2 s heartbeat, even on a loaded machine


class FailingPublish:
    """The real store, except that its first `fail` publishes raise `error` (after doing nothing)."""

    def __init__(self, store: Any, error: Exception, fail: int = 1) -> None:
        self._store, self._error, self._left = store, error, fail
        self.publishes = 0

    def publish_job(self, *args: Any, **kwargs: Any) -> Any:
        self.publishes += 1
        if self._left > 0:
            self._left -= 1
            raise self._error
        return self._store.publish_job(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _run_job(store: Any, wrapped: Any, tiny_backbone, tmp_path: Path) -> tuple[JobRecord, TrainingWorker]:
    queue = open_queue(store, stale_s=STALE_S)
    uploads, work = tmp_path / "uploads", tmp_path / "work"
    service = JobService(store, queue, uploads, work)
    archive = make_digits_zip(tmp_path / "d.zip", classes=range(2), per_class=6)
    spool = tmp_path / "spool.zip"
    spool.write_bytes(archive.read_bytes())
    options = TrainOptions(method="linear", epochs=1, batch_size=4)
    job = service.submit("t1", "task", spool, ".zip", options)
    worker = TrainingWorker(wrapped, queue, tiny_backbone, work_dir=work, heartbeat_s=0.2, stale_s=STALE_S,
                            uploads_dir=uploads)
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not _terminal(store, job.job_id):
        time.sleep(0.1)
    worker.stop()
    thread.join(30)
    return store.get_job("t1", job.job_id), worker


def _terminal(store: Any, job_id: str) -> bool:
    try:
        return store.get_job("t1", job_id).terminal
    except StoreUnavailable:  # the test's own poll, while redis-server is down
        return False


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_a_store_error_at_publish_leaves_the_job_recoverable(kind: str, tmp_path: Path, tiny_backbone,
                                                              request: pytest.FixtureRequest) -> None:
    """Before: the delivery was acked anyway and the job stayed `running` forever. Now the claim stays
    pending, the heartbeat goes stale, the job is recovered and published exactly once."""
    if kind == "local":
        store: Any = LocalStore(tmp_path / "store")
        error: Exception = StoreFull("store directory: [Errno 28] No space left on device")
    else:
        store = RedisStore(request.getfixturevalue("redis_url"), prefix="f" + uuid.uuid4().hex[:10])
        error = StoreUnavailable("redis unavailable: ConnectionError: connection reset")
    wrapped = FailingPublish(store, error)
    try:
        job, _ = _run_job(store, wrapped, tiny_backbone, tmp_path)
        assert wrapped.publishes >= 2  # the failed attempt, then the recovered delivery's
        assert job.state == "succeeded" and job.claim_token >= 2, job
        assert [v.version for v in store.list_versions("t1", "task")] == [job.version] == [1]
        assert not (tmp_path / "uploads" / "t1" / job.job_id).exists()  # the dataset went with the job
        assert not (tmp_path / "work" / "t1" / job.job_id).exists()
    finally:
        store.close()


class KillRedisAtPublish:
    """The real Redis store; its first publish first SIGKILLs the real redis-server (restarted from its
    append-only file `down_s` later), so the publish meets a genuine connection failure."""

    def __init__(self, store: Any, redis_server: Any, down_s: float) -> None:
        self._store, self._server, self._down_s = store, redis_server, down_s
        self.failures: list[Exception] = []
        self.publishes = 0
        self.restarter: threading.Thread | None = None

    def publish_job(self, *args: Any, **kwargs: Any) -> Any:
        self.publishes += 1
        if self.restarter is None:
            self._server.kill()
            self.restarter = threading.Thread(target=self._restart_later, daemon=True)
            self.restarter.start()
        try:
            return self._store.publish_job(*args, **kwargs)
        except Exception as exc:
            self.failures.append(exc)
            raise

    def _restart_later(self) -> None:
        time.sleep(self._down_s)
        self._server.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_killed_redis_server_at_publish_leaves_the_job_recoverable(private_redis, tmp_path: Path,
                                                                     tiny_backbone) -> None:
    """redis-server dies (SIGKILL) as the worker publishes and comes back 3 s later from its append-only
    file: the publish fails for real, the job is recovered and ends with exactly one version."""
    store = RedisStore(private_redis.url, prefix="k" + uuid.uuid4().hex[:10])
    wrapped = KillRedisAtPublish(store, private_redis, down_s=3.0)
    try:
        job, _ = _run_job(store, wrapped, tiny_backbone, tmp_path)
        assert wrapped.failures and all(isinstance(e, StoreUnavailable) for e in wrapped.failures), wrapped.failures
        assert wrapped.publishes >= 2  # the failed attempt, then the recovered delivery's
        assert job.state == "succeeded", job
        assert [v.version for v in store.list_versions("t1", "task")] == [job.version] == [1]
        assert not (tmp_path / "uploads" / "t1" / job.job_id).exists()
        assert not (tmp_path / "work" / "t1" / job.job_id).exists()
    finally:
        if wrapped.restarter is not None:
            wrapped.restarter.join(30)
        store.close()
