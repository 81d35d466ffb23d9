"""The batcher: one shared forward, each request its own task's top-k (its own k, its own classes); work
that queued during a forward goes at once, an idle engine waits for company."""
from __future__ import annotations

import asyncio

import torch

from prompt_store.bank import PromptBank
from prompt_store.local import LocalStore
from server.engine.batcher import Batcher
from vpt.backbone import Backbone
from vpt.engine import forward_logits, stack_slots, task_slot_tensors
from vpt.priority import PriorityGate
from vpt.task import TaskParams, TaskSpec, load_task_file, read_metadata, save_task_file

TENANT = "acme"


def _store(tmp_path, bb: Backbone) -> tuple[LocalStore, dict[str, bytes]]:
    store = LocalStore(tmp_path / "store")
    blobs = {}
    for name, classes, seed in (("three-a", 3, 1), ("three-b", 3, 2), ("five", 5, 3)):  # two share a head group
        g = torch.Generator().manual_seed(seed)
        spec = TaskSpec("vpt-deep", 4, tuple(f"{name}-c{i}" for i in range(classes)))
        blobs[name] = save_task_file(TaskParams.new(spec, bb, generator=g), bb)
        store.put_task(TENANT, name, blobs[name], read_metadata(blobs[name]))
    return store, blobs


def _image(seed: int) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))]


def test_an_idle_engine_waits_for_company_and_work_queued_meanwhile_goes_at_once(tmp_path,
                                                                                  tiny_backbone: Backbone) -> None:
    store, _ = _store(tmp_path, tiny_backbone)
    bank = PromptBank(tiny_backbone, store, 10_000_000, subscribe=False)
    gate = PriorityGate(training_share=0.5)
    # a minute's wait for company: the guards below would cut a test that hung on it
    batcher = Batcher(tiny_backbone, bank, max_batch_size=3, max_wait_ms=60_000, queue_limit=1000, gate=gate)
    step = gate.training()  # a training step holds the device: the first batch waits for it

    async def go() -> tuple[list, list]:
        batcher.start()
        burst = [asyncio.create_task(batcher.predict(TENANT, "three-a", _image(0), 1))]
        await asyncio.sleep(0.3)
        assert not burst[0].done()  # the engine was idle: it waits for company
        step.__enter__()
        burst += [asyncio.create_task(batcher.predict(TENANT, t, _image(1 + i), 1))
                  for i, t in enumerate(("three-b", "five"))]  # the batch is full: collected, waits for the step
        while not batcher._busy:
            await asyncio.sleep(0.01)
        meanwhile = [asyncio.create_task(batcher.predict(TENANT, "five", _image(5 + i), 1)) for i in range(2)]
        await asyncio.sleep(0.1)
        step.__exit__(None, None, None)  # the full batch runs; the two that queued meanwhile go right after it,
        return (await asyncio.wait_for(asyncio.gather(*burst), timeout=30),  # with room for a third but no wait
                await asyncio.wait_for(asyncio.gather(*meanwhile), timeout=30))

    try:
        burst, meanwhile = asyncio.run(go())
    finally:
        batcher.stop()
        bank.close()
        store.close()
    assert [o.batch_images for o in burst] == [3, 3, 3] and [o.batch_images for o in meanwhile] == [2, 2]
    assert batcher.batches == 2


def test_requests_of_one_batch_get_their_own_top_k(tmp_path, tiny_backbone: Backbone) -> None:
    bb = tiny_backbone
    store, blobs = _store(tmp_path, bb)
    g = torch.Generator().manual_seed(0)
    requests = [(task, k, [torch.randint(0, 256, (int(h), int(w), 3), dtype=torch.uint8, generator=g)
                           for h, w in torch.randint(20, 90, (n, 2), generator=g)])
                for task, k, n in (("three-a", 1, 2), ("three-a", 2, 1), ("three-b", 3, 3), ("three-b", 100, 1),
                                   ("five", 2, 2), ("five", 5, 1), ("three-a", 2, 2))]
    bank = PromptBank(bb, store, 10_000_000, subscribe=False)
    batcher = Batcher(bb, bank, max_batch_size=64, max_wait_ms=10_000, queue_limit=1000)

    async def go() -> list:
        calls = [asyncio.create_task(batcher.predict(TENANT, task, images, k)) for task, k, images in requests]
        await asyncio.sleep(0)  # every request queued before the batching thread looks
        batcher.start()
        return await asyncio.gather(*calls)

    try:
        outcomes = asyncio.run(go())
    finally:
        batcher.stop()
        bank.close()
        store.close()
    assert batcher.batches == 1 and {o.batch_images for o in outcomes} == {12}
    for (task, k, images), outcome in zip(requests, outcomes):
        params = load_task_file(blobs[task], bb).params
        table = stack_slots(bb, [task_slot_tensors(bb, params)])
        with torch.inference_mode():
            x = batcher.preprocess(images, bb.device, bb.dtype)                                # (n, 3, H, W)
            probs = forward_logits(bb, x, table, torch.zeros(len(images), dtype=torch.long)).softmax(-1)  # (n, C)
        scores, idx = probs.topk(min(k, len(params.spec.classes)), dim=-1)
        assert len(outcome.results) == len(images)
        for got, srow, irow in zip(outcome.results, scores.tolist(), idx.tolist()):
            assert [t.index for t in got] == irow
            assert [t.label for t in got] == [params.spec.classes[i] for i in irow]
            assert max(abs(t.score - s) for t, s in zip(got, srow)) < 1e-5  # float32: batch mates may round apart
