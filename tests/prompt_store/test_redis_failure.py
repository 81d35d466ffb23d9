"""Redis dies (SIGKILL) mid-run: typed errors while it is down, every acknowledged version after."""
from __future__ import annotations

import hashlib
import threading
import time

import pytest
import redis

from prompt_store import ChangeEvent, JobRecord, RedisJobQueue, RedisStore, StoreUnavailable
from tests.fixtures.redis_server import RedisServer
from tests.prompt_store._procs import blob_for


def _wait(cond, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_kill_gives_typed_errors_and_keeps_every_acknowledged_version(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url, prefix="crash", socket_timeout=1.0, connect_timeout=0.5, retries=1)
    events: list[ChangeEvent] = []
    store.subscribe(events.append)
    acked: dict[int, str] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            blob = blob_for(i)
            try:
                version = store.put_task("t1", "task", blob, {"seed": str(i)})
                acked[version.version] = hashlib.sha256(blob).hexdigest()
            except Exception as exc:  # noqa: BLE001 - every one must be StoreUnavailable (asserted below)
                errors.append(exc)
                time.sleep(0.02)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert _wait(lambda: len(acked) >= 15)
        private_redis.kill()
        assert _wait(lambda: len(errors) >= 2)
        with pytest.raises(StoreUnavailable) as info:
            store.get_task("t1", "task")
        assert isinstance(info.value.__cause__, redis.RedisError)
        with pytest.raises(StoreUnavailable):
            store.ping()
        before_restart = len(acked)
        private_redis.start()  # same port, same append-only file
        assert _wait(lambda: len(acked) >= before_restart + 5), "writes did not resume after the restart"
    finally:
        stop.set()
        thread.join()
    assert all(isinstance(e, StoreUnavailable) for e in errors), {type(e) for e in errors}
    fresh = RedisStore(private_redis.url, prefix="crash")
    for version, digest in acked.items():
        record, blob = fresh.get_task("t1", "task", version=version)
        assert hashlib.sha256(blob).hexdigest() == digest == record.sha256
    assert fresh.current_version("t1", "task") == max(acked)
    # The listener reconnected, announced that events may have been lost, and follows again.
    assert _wait(lambda: any(e.kind == "resync" for e in events))
    after = fresh.put_task("t1", "task", b"after the restart", {}).version
    assert _wait(lambda: any(e.kind == "put" and e.version == after for e in events))
    fresh.close()
    store.close()


def test_queue_entries_survive_a_crash(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url, prefix="qcrash", socket_timeout=1.0, connect_timeout=0.5, retries=1)
    queue = RedisJobQueue(store)
    queue.submit(JobRecord.new("t1", "task", job_id="job-a", now=1.0))
    queue.submit(JobRecord.new("t1", "task", job_id="job-b", now=2.0))
    held = queue.claim("w1", timeout_s=1)
    private_redis.kill()
    with pytest.raises(StoreUnavailable):
        queue.claim("w1", timeout_s=0.2)
    private_redis.start()
    assert _wait(lambda: _pingable(store))
    waiting = queue.claim("w2", timeout_s=2)
    assert waiting is not None and waiting.job_id == "job-b"
    time.sleep(0.1)
    recovered = queue.recover_stale(idle_ms=50, worker="w2")
    assert held is not None and [c.job_id for c in recovered] == ["job-a"]
    store.close()


def _pingable(store: RedisStore) -> bool:
    try:
        store.ping()
        return True
    except StoreUnavailable:
        return False
