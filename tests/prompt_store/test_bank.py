"""The device bank: loads, LRU by bytes, pinning, hot-swap under an in-flight batch, events."""
from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load as st_load

from prompt_store.bank import BankFull, PromptBank, TaskUnservable
from prompt_store.local import LocalStore
from prompt_store.records import ChangeEvent
from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from tests.vpt.reference_methods import reference_logits
from tests.vpt.test_methods import TASKS, make_spec, randomised
from vpt.backbone import Backbone, load_backbone
from vpt.blocks import prompt_kv
from vpt.engine import forward_grouped
from vpt.task import TaskParams, TaskSpec, load_task_file, read_metadata, save_task_file

TENANT = "acme"


def task_blob(bb: Backbone, method: str = "vpt-deep", p: int = 4, classes: int = 3, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    spec = TaskSpec(method, p, tuple(f"c{i}" for i in range(classes)))
    return save_task_file(TaskParams.new(spec, bb, generator=g), bb)


def put(store: LocalStore, bb: Backbone, task: str, **kw) -> int:
    blob = task_blob(bb, **kw)
    return store.put_task(TENANT, task, blob, read_metadata(blob)).version


@pytest.fixture
def store(tmp_path) -> LocalStore:
    s = LocalStore(tmp_path / "store")
    yield s
    s.close()


def slot_bytes(bank: PromptBank) -> int:
    return bank.stats().resident_bytes // max(1, bank.stats().resident_tasks)


def test_loaded_kv_equal_the_engines_own_computation(store: LocalStore, tiny_backbone: Backbone) -> None:
    blob = task_blob(tiny_backbone, "vpt-deep", 5, 3, seed=1)
    store.put_task(TENANT, "t", blob, read_metadata(blob))
    bank = PromptBank(tiny_backbone, store, 10_000_000)
    lease = bank.acquire(TENANT, ["t"])
    params = load_task_file(blob, tiny_backbone).params
    kv = [prompt_kv(blk, params.prompts[i][None]) for i, blk in enumerate(tiny_backbone.model.blocks)]
    s = lease.tasks[0].slot
    table = lease.table.tensors                                              # deep_k: (S, L, H, P, hd)
    torch.testing.assert_close(table["deep_k"][s, :, :, :5], torch.stack([k[0] for k, _ in kv]), rtol=0, atol=0)
    torch.testing.assert_close(table["deep_v"][s, :, :, :5], torch.stack([v[0] for _, v in kv]), rtol=0, atol=0)
    assert lease.table.num_classes[s] == 3 and lease.tasks[0].classes == ("c0", "c1", "c2")
    bank.release(lease)
    bank.close()


def test_hits_misses_and_lru_eviction_by_bytes(store: LocalStore, tiny_backbone: Backbone) -> None:
    for name in "abcd":
        put(store, tiny_backbone, name)
    probe = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    probe.release(probe.acquire(TENANT, ["a"]))
    per = slot_bytes(probe)
    bank = PromptBank(tiny_backbone, store, 3 * per, subscribe=False)  # room for three tasks
    for name in "abc":
        bank.release(bank.acquire(TENANT, [name]))
    bank.release(bank.acquire(TENANT, ["a"]))       # a is now most recent: b is the LRU
    bank.release(bank.acquire(TENANT, ["d"]))
    assert [k.task_id for k in bank.resident()] == ["c", "a", "d"]
    st = bank.stats()
    assert (st.hits, st.misses, st.evictions, st.resident_tasks) == (1, 4, 1, 3)
    assert st.resident_bytes <= st.capacity_bytes


def test_pinned_entries_are_never_evicted_and_full_bank_is_typed(store: LocalStore, tiny_backbone: Backbone) -> None:
    for name in "abcde":
        put(store, tiny_backbone, name)
    probe = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    probe.release(probe.acquire(TENANT, ["a"]))
    bank = PromptBank(tiny_backbone, store, 2 * slot_bytes(probe), subscribe=False)
    lease = bank.acquire(TENANT, ["a", "b"])
    # every resident entry is pinned: c and d are served from copies their leases alone hold
    held = [bank.acquire(TENANT, ["c"]), bank.acquire(TENANT, ["d"])]
    assert {k.task_id for k in bank.resident()} == {"a", "b"} and bank.stats().transient == 2
    with pytest.raises(BankFull):  # past another bank's worth held outside it
        bank.acquire(TENANT, ["e"])
    for h in held:
        bank.release(h)
    bank.release(lease)
    bank.release(bank.acquire(TENANT, ["e"]))      # now one of them can go
    assert "e" in {k.task_id for k in bank.resident()}


def test_hot_swap_never_changes_an_in_flight_batch(store: LocalStore, tiny_backbone: Backbone) -> None:
    put(store, tiny_backbone, "t", seed=1)
    bank = PromptBank(tiny_backbone, store, 10_000_000)
    images = torch.randn(2, 3, 32, 32)
    lease = bank.acquire(TENANT, ["t", "t"])
    slot = lease.slot_ids([0, 1])
    with torch.inference_mode():
        before = forward_grouped(tiny_backbone, images, lease.table, lease.slots, slot)[0][1]
    snapshot = lease.table.tensors['deep_k'][lease.tasks[0].slot].clone()
    # a new version, wider (more prompts and classes: the table grows), lands while the batch runs
    v2 = put(store, tiny_backbone, "t", p=9, classes=5, seed=2)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        new = bank.acquire(TENANT, ["t"])
        if new.tasks[0].key.version == v2:
            break
        bank.release(new)
        time.sleep(0.01)
    assert new.tasks[0].key.version == v2 and len(new.tasks[0].classes) == 5
    with torch.inference_mode():
        after = forward_grouped(tiny_backbone, images, lease.table, lease.slots, slot)[0][1]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(lease.table.tensors['deep_k'][lease.tasks[0].slot], snapshot, rtol=0, atol=0)
    bank.release(lease)
    assert [k.version for k in bank.resident()] == [v2]   # the old version is freed once unpinned
    bank.release(new)
    # rollback: activating version 1 serves it again
    store.activate(TENANT, "t", 1)
    deadline = time.monotonic() + 2
    while True:
        lease = bank.acquire(TENANT, ["t"])
        if lease.tasks[0].key.version == 1 or time.monotonic() > deadline:
            break
        bank.release(lease)
        time.sleep(0.01)
    assert lease.tasks[0].key.version == 1 and len(lease.tasks[0].classes) == 3
    bank.release(lease)
    bank.close()


def test_mixed_methods_share_one_batch(store: LocalStore, tiny_backbone: Backbone) -> None:
    put(store, tiny_backbone, "deep", method="vpt-deep", p=6, classes=4)
    put(store, tiny_backbone, "shallow", method="vpt-shallow", p=3, classes=2)
    put(store, tiny_backbone, "lin", method="linear", p=0, classes=7)
    bank = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    lease = bank.acquire(TENANT, ["deep", "shallow", "lin"])
    t = lease.table
    assert [int(t.num_classes[r.slot]) for r in lease.tasks] == [4, 2, 7]
    assert [int(t.tensors['deep_len'][r.slot].max()) for r in lease.tasks] == [6, 0, 0]
    assert [int(t.lengths['shallow'][r.slot]) for r in lease.tasks] == [0, 3, 0]
    with torch.inference_mode():
        groups = forward_grouped(tiny_backbone, torch.randn(3, 3, 32, 32), t, lease.slots, lease.slot_ids([0, 1, 2]))
    assert sorted((rows, tuple(logits.shape)) for rows, logits in groups) == [([0], (1, 4)), ([1], (1, 2)),
                                                                               ([2], (1, 7))]
    assert all(torch.isfinite(logits).all() for _, logits in groups)
    bank.release(lease)


def test_unservable_and_missing_tasks_are_typed(store: LocalStore, tiny_backbone: Backbone) -> None:
    from prompt_store.errors import TaskNotFound

    bank = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    with pytest.raises(TaskNotFound):
        bank.acquire(TENANT, ["nope"])
    blob = task_blob(tiny_backbone)
    meta = read_metadata(blob)
    store.put_task(TENANT, "bad", blob[:-64], meta)  # stored, but truncated
    with pytest.raises(TaskUnservable):
        bank.acquire(TENANT, ["bad"])
    put(store, tiny_backbone, "ok")
    with pytest.raises(TaskNotFound):  # a failure in a batch releases what it pinned
        bank.acquire(TENANT, ["ok", "nope"])
    assert all(e.pins == 0 for e in bank._entries.values())


def test_a_non_store_failure_leaves_nothing_pinned(store: LocalStore, tiny_backbone: Backbone, monkeypatch) -> None:
    put(store, tiny_backbone, "a")
    put(store, tiny_backbone, "b")
    bank = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    bank.release(bank.acquire(TENANT, ["a"]))
    monkeypatch.setattr("prompt_store.loading.task_slot_tensors", lambda *a: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        bank.acquire_each([(TENANT, "a"), (TENANT, "b")])  # a is pinned first, then loading b fails
    assert all(e.pins == 0 for e in bank._entries.values())


def test_reactivating_a_pinned_old_version_reuses_its_tensors(store: LocalStore, tiny_backbone: Backbone) -> None:
    put(store, tiny_backbone, "t", seed=1)
    bank = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    old = bank.acquire(TENANT, ["t"])
    put(store, tiny_backbone, "t", seed=2)
    bank.on_change(ChangeEvent(TENANT, "t", 2, "put"))
    bank.release(bank.acquire(TENANT, ["t"]))
    store.activate(TENANT, "t", 1)
    bank.on_change(ChangeEvent(TENANT, "t", 1, "activate"))
    again = bank.acquire(TENANT, ["t"])
    assert again.tasks[0].key.version == 1 and again.slots[0] is old.slots[0]
    assert bank.stats().misses == 2  # version 1 was not loaded twice
    bank.release(old)
    bank.release(again)


def test_delete_event_retires_entries(store: LocalStore, tiny_backbone: Backbone) -> None:
    put(store, tiny_backbone, "gone")
    bank = PromptBank(tiny_backbone, store, 10_000_000)
    bank.release(bank.acquire(TENANT, ["gone"]))
    store.delete_task(TENANT, "gone")
    deadline = time.monotonic() + 2
    while bank.resident() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bank.resident() == []
    bank.close()


def test_a_publish_reaches_another_replicas_bank_quickly(redis_fresh_url: str, tiny_backbone: Backbone) -> None:
    """Two store clients stand for two replicas; the reader's bank serves each new version soon after."""
    from prompt_store.redis_store import RedisStore

    writer, reader = RedisStore(redis_fresh_url), RedisStore(redis_fresh_url)
    bank = PromptBank(tiny_backbone, reader, 10_000_000, version_ttl_s=3600)  # only events can refresh it
    blobs = [task_blob(tiny_backbone, p=2, classes=2, seed=i) for i in range(2)]
    writer.put_task(TENANT, "hot", blobs[0], read_metadata(blobs[0]))
    bank.release(bank.acquire(TENANT, ["hot"]))
    delays = []
    for i in range(200):
        blob = blobs[i % 2]
        t0 = time.perf_counter()
        version = writer.put_task(TENANT, "hot", blob, read_metadata(blob)).version
        while True:
            lease = bank.acquire(TENANT, ["hot"])
            served = lease.tasks[0].key.version
            bank.release(lease)
            if served == version:
                break
            assert time.perf_counter() - t0 < 5, f"version {version} never reached the bank"
        delays.append(time.perf_counter() - t0)
    delays.sort()
    p99 = delays[int(0.99 * len(delays)) - 1]
    assert p99 < 0.100, f"p99 publish -> other replica's bank: {p99 * 1000:.1f} ms"
    assert len(bank.resident()) <= 2  # old versions were retired as the new ones came in
    bank.close()
    writer.close()
    reader.close()


def test_bank_serves_a_batch_mixing_every_method_exactly(store: LocalStore) -> None:
    """Every method's slot tensors travel through the store and the bank into one mixed batch."""
    torch.manual_seed(0)
    bb = load_backbone(TINY_NAME, pretrained=False, model_kwargs=TINY_KWARGS, dtype=torch.float64)
    names = []
    for i, t in enumerate(TASKS):
        blob = save_task_file(randomised(bb, make_spec(*t), seed=i), bb)
        store.put_task(TENANT, f"t{i}", blob, read_metadata(blob))
        names.append(f"t{i}")
    bank = PromptBank(bb, store, 10**9, subscribe=False)
    lease = bank.acquire(TENANT, names + names[:3])
    order = list(range(len(names) + 3))
    images = torch.randn(len(order), 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        groups = forward_grouped(bb, images, lease.table, lease.slots, lease.slot_ids(order))
        assert sorted(r for rows, _ in groups for r in rows) == order
        for rows, logits in groups:
            for r, row in zip(rows, logits):
                blob = store.get_task(TENANT, names[r % len(names)], 1)[1]
                spec = load_task_file(blob, bb).spec
                files = {k: v.double() for k, v in st_load(blob).items()}
                torch.testing.assert_close(row, reference_logits(bb, images[r], spec, files), rtol=0, atol=1e-10)
    bank.release(lease)
