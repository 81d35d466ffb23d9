"""A task of every method trains over HTTP and is served, mixed with the others, exactly as the method says."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load as st_load

from tests.fixtures.digits import digit_png, make_digits_zip
from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from tests.server.helpers import wait_job
from tests.vpt.reference_methods import reference_logits
from vpt.backbone import load_backbone
from vpt.preprocess import ImageTransform
from vpt.task import load_task_file

# task id -> training form fields (besides the common budget)
METHODS = {
    "m-linear": {"method": "linear"},
    "m-shallow": {"method": "vpt-shallow", "num_prompts": "2"},
    "m-deep": {"method": "vpt-deep", "num_prompts": "3", "prompt_layers": "1-3", "pooling": "all_mean"},
    "m-bias": {"method": "bias"},
    "m-adapter": {"method": "adapter", "adapter_reduction": "8"},
    "m-partial": {"method": "partial-1", "base_lr": "0.5"},
    "m-deep-bias-mlp": {"method": "vpt-deep+bias", "num_prompts": "2", "head": "mlp-3"},
}
BUDGET = {"epochs": "2", "batch_size": "8", "seed": "0", "augmentation": "none", "base_lr": "1"}


@pytest.fixture(scope="module")
def api(live_server) -> httpx.Client:
    with httpx.Client(base_url=live_server.base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def trained(api: httpx.Client, tmp_path_factory) -> dict[str, dict]:
    archive = make_digits_zip(tmp_path_factory.mktemp("m") / "d.zip", classes=range(3), per_class=6).read_bytes()
    jobs = {}
    for task, fields in METHODS.items():
        r = api.post(f"/tasks/{task}/train", files={"dataset": ("d.zip", archive, "application/zip")},
                     data={**BUDGET, **fields})
        assert r.status_code == 202, r.text
        jobs[task] = r.json()["job_id"]
    return {task: wait_job(api, job_id) for task, job_id in jobs.items()}


def test_every_method_trains_and_its_record_shows_method_parameters_and_bank_bytes(
        api: httpx.Client, trained: dict[str, dict], tiny_vit_file) -> None:
    bb = load_backbone(TINY_NAME, weights=tiny_vit_file, model_kwargs=TINY_KWARGS)
    for task, fields in METHODS.items():
        assert trained[task]["state"] == "succeeded", trained[task]
        record = api.get(f"/tasks/{task}").json()
        loaded = load_task_file(api.get(f"/tasks/{task}/export").content, bb)
        assert record["method"] == loaded.spec.method == fields["method"]
        assert record["head"] == fields.get("head", "linear")
        assert record["pooling"] == fields.get("pooling", "cls")
        assert record["trainable_parameters"] == loaded.params.num_trainable()["total"] > 0
        with torch.inference_mode():
            values = sum(t.numel() for t in loaded.params.slot_tensors(bb).values())
        assert record["bank_bytes"] == 4 * values
        assert api.get(f"/tasks/{task}/versions").json()["versions"][0]["bank_bytes"] == 4 * values
    partial = api.get("/tasks/m-partial").json()
    assert partial["bank_bytes"] > 4 * sum(p.numel() for p in bb.model.blocks[-1].parameters())


def test_mixed_concurrent_predictions_equal_each_methods_reference(
        api: httpx.Client, trained: dict[str, dict], tiny_vit_file) -> None:
    bb = load_backbone(TINY_NAME, weights=tiny_vit_file, model_kwargs=TINY_KWARGS)
    transform = ImageTransform(bb.data_config)   # the server's own preprocessing arithmetic
    images = [(label, i, digit_png(label, index=40 + i)) for label in range(3) for i in range(2)]
    requests = [(task, label, i, png) for task in METHODS for label, i, png in images]

    def predict(req: tuple) -> dict:
        task, _, _, png = req
        r = api.post("/predict", params={"task": task, "top_k": 3}, files=[("image", ("x.png", png, "image/png"))])
        assert r.status_code == 200, r.text
        return r.json()["results"][0]

    with ThreadPoolExecutor(8) as pool:   # many tasks in flight at once: the batcher mixes them
        answers = list(pool.map(predict, requests))
    for (task, label, i, png), answer in zip(requests, answers):
        blob = api.get(f"/tasks/{task}/export").content
        loaded = load_task_file(blob, bb)
        files = {k: v.float() for k, v in st_load(blob).items()}
        x = transform(Image.open(io.BytesIO(png)).convert("RGB"))
        with torch.inference_mode():
            probs = torch.softmax(reference_logits(bb, x, loaded.spec, files), dim=-1)
        top = torch.topk(probs, 3)
        got = [(t["index"], t["score"]) for t in answer["top_k"]]
        assert [g[0] for g in got] == top.indices.tolist(), (task, label, i)
        assert max(abs(g[1] - s) for g, s in zip(got, top.values.tolist())) < 1e-4, (task, got, top)
