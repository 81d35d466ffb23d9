"""The bank's tiers: per-task sizes, the host tier, invalidation, prefetch, loads beside batches, exactness."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from prompt_store.bank import PromptBank, TaskKey
from prompt_store.local import LocalStore
from prompt_store.records import ChangeEvent
from tests.prompt_store.test_bank import TENANT, put, task_blob
from vpt.backbone import Backbone
from vpt.engine import forward_features, forward_grouped, forward_logits, stack_slots, task_slot_tensors
from vpt.task import load_task_file, read_metadata

WIDE = 10_000


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    s = LocalStore(tmp_path / "store")
    yield s
    s.close()


def task_bytes(bb: Backbone, store: LocalStore, task: str) -> int:
    _, blob = store.get_task(TENANT, task, store.current_version(TENANT, task))
    return task_slot_tensors(bb, load_task_file(blob, bb).params).nbytes()


def wait_until(cond, timeout: float = 30.0) -> None:
    """Poll a state (not a duration): loads run in the bank's threads."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the bank never reached the expected state"
        time.sleep(0.005)


def test_a_wide_task_costs_its_own_bytes_and_evicts_no_small_one(store: LocalStore, tiny_backbone: Backbone) -> None:
    for name in "abcd":
        put(store, tiny_backbone, name, p=4, classes=3)
    put(store, tiny_backbone, "wide", p=4, classes=WIDE)
    small, wide = task_bytes(tiny_backbone, store, "a"), task_bytes(tiny_backbone, store, "wide")
    assert wide > 50 * small
    bank = PromptBank(tiny_backbone, store, 4 * small + wide, subscribe=False)
    bank.release(bank.acquire(TENANT, list("abcd")))
    bank.release(bank.acquire(TENANT, ["wide"]))
    st = bank.stats()
    assert {k.task_id for k in bank.resident()} == {"a", "b", "c", "d", "wide"}
    assert (st.evictions, st.resident_bytes) == (0, 4 * small + wide)
    # a batch mixing it with small tasks: the small ones' heads stay 3 wide
    lease = bank.acquire(TENANT, ["a", "wide", "b"])
    with torch.inference_mode():
        groups = forward_grouped(tiny_backbone, torch.randn(3, 3, 32, 32), lease.table, lease.slots,
                                 lease.slot_ids([0, 1, 2]))
    assert sorted((rows, tuple(x.shape)) for rows, x in groups) == [([0, 2], (2, 3)), ([1], (1, WIDE))]
    assert "head_w" not in lease.table.tensors   # no padded head copied
    bank.release(lease)
    bank.close()


def test_host_tier_hits_and_lru_by_bytes(store: LocalStore, tiny_backbone: Backbone) -> None:
    for name in "abc":
        put(store, tiny_backbone, name)
    per = task_bytes(tiny_backbone, store, "a")
    bank = PromptBank(tiny_backbone, store, per, host_capacity_bytes=2 * per, subscribe=False)
    for name in "ab":
        bank.release(bank.acquire(TENANT, [name]))
    assert [k.task_id for k in bank.resident()] == ["b"]            # the device tier holds one
    assert [k.task_id for k in bank.host.keys()] == ["a", "b"]      # the host tier both
    bank.release(bank.acquire(TENANT, ["a"]))                       # device miss, host hit: no store read
    st = bank.stats()
    assert (st.misses, st.host_hits, st.host_misses) == (3, 1, 2)
    bank.release(bank.acquire(TENANT, ["c"]))                       # b is the host tier's LRU now
    st = bank.stats()
    assert [k.task_id for k in bank.host.keys()] == ["a", "c"]
    assert (st.host_evictions, st.host_tasks, st.host_bytes) == (1, 2, 2 * per)
    assert st.host_bytes <= st.host_capacity_bytes and st.resident_bytes <= st.capacity_bytes
    assert bank.resident_tiers() == {"device": [TaskKey(TENANT, "c", 1)],
                                     "host": [TaskKey(TENANT, "a", 1), TaskKey(TENANT, "c", 1)]}
    bank.close()


def test_hot_swap_and_delete_invalidate_both_tiers(store: LocalStore, tiny_backbone: Backbone) -> None:
    put(store, tiny_backbone, "t", seed=1)
    bank = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    lease = bank.acquire(TENANT, ["t"])                    # pinned by an in-flight batch
    old = lease.slots[0]
    v2 = put(store, tiny_backbone, "t", seed=2)
    bank.on_change(ChangeEvent(TENANT, "t", v2, "put"))
    assert bank.host.keys() == []                          # the host tier let version 1 go at once
    assert [k.version for k in bank.resident()] == [1]     # the device keeps it while pinned...
    assert lease.slots[0] is old
    bank.release(lease)
    assert bank.resident() == []                           # ...and retires it once released
    bank.release(bank.acquire(TENANT, ["t"]))
    assert [k.version for k in bank.resident()] == [v2] == [k.version for k in bank.host.keys()]
    store.delete_task(TENANT, "t")
    bank.on_change(ChangeEvent(TENANT, "t", None, "delete"))
    assert bank.resident_tiers() == {"device": [], "host": []}
    bank.close()


def test_change_events_from_redis_reach_both_tiers(redis_fresh_url: str, tiny_backbone: Backbone) -> None:
    from prompt_store.redis_store import RedisStore

    writer, reader = RedisStore(redis_fresh_url), RedisStore(redis_fresh_url)
    bank = PromptBank(tiny_backbone, reader, 10_000_000, version_ttl_s=3600)
    blob = task_blob(tiny_backbone, seed=3)
    writer.put_task(TENANT, "r", blob, read_metadata(blob))
    # the put's own event comes back asynchronously; a load it overtakes is served but not cached
    # (loads begun before a change are never kept), so wait for it on a loaded machine
    wait_until(lambda: bank._loader.generation(TENANT, "r") == 1)
    bank.release(bank.acquire(TENANT, ["r"]))
    assert len(bank.host.keys()) == len(bank.resident()) == 1
    writer.delete_task(TENANT, "r")
    wait_until(lambda: bank.resident_tiers() == {"device": [], "host": []})
    bank.close()
    writer.close()
    reader.close()


class PausedStore(LocalStore):
    """A real local store whose task reads for `paused` tasks wait until `resume` is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.paused: set[str] = set()
        self.resume = threading.Event()
        self.reads: list[str] = []

    def get_task(self, tenant: str, task_id: str, version: int | None = None):
        self.reads.append(task_id)
        if task_id in self.paused:
            self.resume.wait(30)
        return super().get_task(tenant, task_id, version)


def test_prefetch_loads_in_the_background_and_a_batch_never_waits_for_others(tmp_path: Path,
                                                                               tiny_backbone: Backbone) -> None:
    store = PausedStore(tmp_path / "store")
    for name in ("slow", "other"):
        put(store, tiny_backbone, name)
    store.paused.add("slow")
    bank = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    bank.prefetch(TENANT, "slow")                           # returns while the store read is held up
    wait_until(lambda: bank.stats().loading == 1)
    assert bank.resident() == []
    lease = bank.acquire(TENANT, ["other"])                 # a batch of another task goes on meanwhile
    assert lease.tasks[0].key.task_id == "other" and bank.stats().loading == 1
    bank.release(lease)
    joined: list = []
    t = threading.Thread(target=lambda: joined.append(bank.acquire(TENANT, ["slow"])))
    t.start()                                               # a batch that needs it joins the load in flight
    store.resume.set()
    t.join(30)
    assert joined and joined[0].tasks[0].key.task_id == "slow"
    assert store.reads.count("slow") == 1                   # one store read for the prefetch and the batch
    bank.release(joined[0])
    st = bank.stats()
    assert st.misses == 2 and st.loading == 0
    bank.prefetch(TENANT, "slow")                           # resident: nothing to do
    assert bank.stats().prefetches <= 1 and store.reads.count("slow") == 1
    bank.close()


def test_prefetch_fills_the_device_before_the_batch(store: LocalStore, tiny_backbone: Backbone) -> None:
    put(store, tiny_backbone, "p")
    bank = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    bank.prefetch(TENANT, "p")
    wait_until(lambda: bank.resident() != [] and bank.stats().loading == 0)
    bank.release(bank.acquire(TENANT, ["p"]))
    st = bank.stats()
    assert (st.hits, st.misses, st.prefetches, st.host_misses) == (1, 0, 1, 1)
    bank.close()


def test_a_failing_task_fails_alone_while_the_others_load(store: LocalStore, tiny_backbone: Backbone) -> None:
    from prompt_store.errors import TaskNotFound

    for name in "xyz":
        put(store, tiny_backbone, name)
    bank = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    lease, errors = bank.acquire_each([(TENANT, "x"), (TENANT, "missing"), (TENANT, "y"), (TENANT, "z")])
    assert [type(e) for e in errors] == [type(None), TaskNotFound, type(None), type(None)]
    assert [t.key.task_id if t else None for t in lease.tasks] == ["x", None, "y", "z"]
    bank.release(lease)
    bank.close()


def test_outputs_equal_the_padded_table_path(store: LocalStore, tiny_backbone: Backbone) -> None:
    """The bank's packed prompts give the padded table's features bit for bit; grouped heads give its
    logits within 1e-6 of the row's scale (fp32: a lone task's head is one matmul, not a batched one)."""
    specs = {"d1": ("vpt-deep", 4, 3), "d2": ("vpt-deep", 9, 5), "s": ("vpt-shallow", 3, 3),
             "lin": ("linear", 0, 7), "d3": ("vpt-deep", 4, 3)}
    for i, (name, (method, p, c)) in enumerate(specs.items()):
        put(store, tiny_backbone, name, method=method, p=p, classes=c, seed=i)
    names = list(specs)
    per_sample = [names[i % len(names)] for i in range(12)]
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    bank = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    lease = bank.acquire(TENANT, per_sample)
    padded = stack_slots(tiny_backbone, lease.slots)                 # the single padded table of before
    with torch.inference_mode():
        old = forward_logits(tiny_backbone, images, padded, lease.slot_tensor(list(range(12))))   # (12, C_max)
        slot = lease.slot_tensor(list(range(12)))
        torch.testing.assert_close(forward_features(tiny_backbone, images, lease.table, slot),
                                   forward_features(tiny_backbone, images, padded, slot), rtol=0, atol=0)
        groups = forward_grouped(tiny_backbone, images, lease.table, lease.slots, lease.slot_ids(list(range(12))))
    seen = 0
    for rows, logits in groups:
        for r, row in zip(rows, logits):
            c = specs[per_sample[r]][2]
            assert row.shape == (c,)
            scale = float(old[r, :c].abs().max())
            torch.testing.assert_close(row, old[r, :c], rtol=0, atol=1e-6 * max(1.0, scale))
            seen += 1
    assert seen == 12
    bank.release(lease)
    bank.close()
