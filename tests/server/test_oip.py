"""Open Inference Protocol v2 round trips with NVIDIA's tritonclient against a real server process."""
from __future__ import annotations

import base64
import concurrent.futures as cf

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.server.conftest import OIP_KEY_A, OIP_KEY_B, OipServer
from tests.server.helpers import backbone_for, constant_task, png


def alpha() -> dict[str, str]:  # a fresh dict per call: tritonclient writes its own headers into it
    return {"Authorization": f"Bearer {OIP_KEY_A}"}


def bravo() -> dict[str, str]:
    return {"x-api-key": OIP_KEY_B}


@pytest.fixture(scope="module")
def client(oip_server: OipServer) -> triton.InferenceServerClient:
    c = triton.InferenceServerClient(url=oip_server.url, network_timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def bb(tiny_vit_file):
    return backbone_for(str(tiny_vit_file))


def photos(n: int, seed: int = 0) -> list[bytes]:
    return [png(seed + i, size=40 + 8 * i) for i in range(n)]  # various sizes: resize and crop matter


def preprocessed(bb, files: list[bytes]) -> np.ndarray:
    """(N, 3, H, W) float32 exactly as the server would preprocess the files."""
    from server.frontend.images import ImageDecoder
    from vpt.preprocess import Preprocessor

    pre = Preprocessor(bb.data_config)
    decoder = ImageDecoder(max_pixels=10**8, min_side=pre.min_side)
    try:
        decoded = decoder.decode_all([(f, f"#{i}") for i, f in enumerate(files)])
        return pre([torch.from_numpy(a.copy()) for a in decoded]).numpy()
    finally:
        decoder.close()


def texts(arr: np.ndarray) -> list[list[str]]:
    """A BYTES output as text (binary outputs come back as bytes, JSON ones as str)."""
    return [[v.decode() if isinstance(v, bytes) else v for v in row] for row in arr]


def fp32_input(x: np.ndarray, binary: bool) -> triton.InferInput:
    inp = triton.InferInput("images", list(x.shape), "FP32")
    return inp.set_data_from_numpy(x, binary_data=binary)


def predict_http(oip_server: OipServer, task: str, files: list[bytes], top_k: int) -> list[list[dict]]:
    r = oip_server.alpha.post("/predict", params={"task": task, "top_k": top_k},
                              files=[("image", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)])
    assert r.status_code == 200, r.text
    return [res["top_k"] for res in r.json()["results"]]


def test_server_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "vpt-serve" and {"binary_tensor_data", "classification"} <= set(meta["extensions"])


def test_model_metadata_and_readiness(client: triton.InferenceServerClient, bb) -> None:
    meta = client.get_model_metadata("rand", headers=alpha())
    h, w = bb.data_config["input_size"][1:]
    assert meta["name"] == "rand" and meta["versions"] == ["1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "images": ("FP32", [-1, 3, h, w]), "image_bytes": ("BYTES", [-1])}
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs == {"scores": ("FP32", [-1, -1]), "indices": ("INT64", [-1, -1]),
                       "labels": ("BYTES", [-1, -1]), "probabilities": ("FP32", [-1, 5])}
    assert client.get_model_metadata("rand", model_version="1", headers=alpha())["name"] == "rand"
    assert client.is_model_ready("rand", headers=alpha())
    assert client.is_model_ready("rand", "1", headers=alpha())
    assert not client.is_model_ready("missing", headers=alpha())
    assert not client.is_model_ready("rand", "2", headers=alpha())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_inputs_score_as_predict_does(oip_server: OipServer, client: triton.InferenceServerClient, bb,
                                           binary: bool) -> None:
    files = photos(4, seed=10 if binary else 20)
    x = preprocessed(bb, files)                                                   # (4, 3, H, W)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("scores", "indices", "labels")]
    res = client.infer("rand", [fp32_input(x, binary)], outputs=outputs, headers=alpha(),
                       parameters={"top_k": 3}, request_id="req-1")
    reference = predict_http(oip_server, "rand", files, top_k=3)
    scores, indices, labels = res.as_numpy("scores"), res.as_numpy("indices"), res.as_numpy("labels")
    assert scores.shape == indices.shape == labels.shape == (4, 3)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    want = np.array([[t["score"] for t in row] for row in reference], dtype=np.float32)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
    assert indices.tolist() == [[t["index"] for t in row] for row in reference]
    assert texts(labels) == [[t["label"] for t in row] for row in reference]
    assert len({float(r[0]) for r in scores}) > 1  # the images get different answers
    resp = res.get_response()
    assert resp["model_name"] == "rand" and resp["model_version"] == "1" and resp["id"] == "req-1"


def test_default_outputs_are_binary_and_full_probabilities(client: triton.InferenceServerClient, bb) -> None:
    x = preprocessed(bb, photos(3, seed=30))
    res = client.infer("rand", [fp32_input(x, True)], headers=alpha())  # no outputs named: top-k ones, binary
    assert {o["name"] for o in res.get_response()["outputs"]} == {"scores", "indices", "labels"}
    assert all("binary_data_size" in o["parameters"] for o in res.get_response()["outputs"])
    assert res.as_numpy("scores").shape == (3, 5)  # default top_k 5, all of the task's 5 classes
    res2 = client.infer("rand", [fp32_input(x, True)], headers=alpha(),
                        outputs=[triton.InferRequestedOutput("probabilities"),
                                 triton.InferRequestedOutput("scores", binary_data=False, class_count=2)])
    probs = res2.as_numpy("probabilities")
    assert probs.shape == (3, 5) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    top = res.as_numpy("scores")
    np.testing.assert_allclose(np.sort(probs, axis=1)[:, ::-1], top, rtol=1e-4, atol=1e-6)
    cls = res2.as_numpy("scores")  # classification: "score:index:label", best first
    assert cls.shape == (3, 2)
    first = texts(cls)[0][0].split(":")
    assert int(first[1]) == int(np.argmax(probs[0])) and first[2] == "abcde"[int(first[1])]
    assert abs(float(first[0]) - probs[0].max()) < 1e-5


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-base64"])
def test_encoded_images_as_bytes(oip_server: OipServer, client: triton.InferenceServerClient,
                                 binary: bool) -> None:
    files = photos(3, seed=40)
    data = np.array(files if binary else [base64.b64encode(f).decode() for f in files], dtype=np.object_)
    inp = triton.InferInput("image_bytes", [3], "BYTES").set_data_from_numpy(data, binary_data=binary)
    res = client.infer("rand", [inp], headers=alpha(), parameters={"top_k": 2},
                       outputs=[triton.InferRequestedOutput("scores", binary_data=binary),
                                triton.InferRequestedOutput("labels", binary_data=binary)])
    reference = predict_http(oip_server, "rand", files, top_k=2)
    np.testing.assert_allclose(res.as_numpy("scores"), [[t["score"] for t in row] for row in reference],
                               rtol=1e-4, atol=1e-5)
    assert texts(res.as_numpy("labels")) == [
        [t["label"] for t in row] for row in reference]


def test_uint8_pixels_are_normalised_by_the_server(client: triton.InferenceServerClient, bb) -> None:
    x = preprocessed(bb, photos(2, seed=50))
    mean = np.array(bb.data_config["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(bb.data_config["std"], np.float32).reshape(1, 3, 1, 1)
    pixels = np.clip(np.rint((x * std + mean) * 255), 0, 255).astype(np.uint8)  # (2, 3, H, W)
    back = (pixels.astype(np.float32) / 255 - mean) / std
    inp = triton.InferInput("images", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=True)
    got = client.infer("rand", [inp], headers=alpha(), outputs=[triton.InferRequestedOutput("probabilities")])
    want = client.infer("rand", [fp32_input(back, True)], headers=alpha(),
                        outputs=[triton.InferRequestedOutput("probabilities")])
    np.testing.assert_allclose(got.as_numpy("probabilities"), want.as_numpy("probabilities"),
                               rtol=1e-4, atol=1e-6)


def test_fp16_inputs_and_compressed_requests(client: triton.InferenceServerClient, bb) -> None:
    x = preprocessed(bb, photos(3, seed=55))
    probs = [triton.InferRequestedOutput("probabilities")]
    res = client.infer("rand", [fp32_input(x, True)], headers=alpha(), outputs=probs)
    want = res.as_numpy("probabilities")
    half = triton.InferInput("images", list(x.shape), "FP16").set_data_from_numpy(x.astype(np.float16), True)
    got = client.infer("rand", [half], headers=alpha(), outputs=probs).as_numpy("probabilities")
    np.testing.assert_allclose(got, want, atol=2e-2)  # fp16 rounding of the inputs only
    for algorithm in ("gzip", "deflate"):
        res = client.infer("rand", [fp32_input(x, True)], headers=alpha(), outputs=probs,
                           request_compression_algorithm=algorithm)
        np.testing.assert_allclose(res.as_numpy("probabilities"), want, rtol=1e-4, atol=1e-6)


def test_errors_reach_tritonclient_as_messages(client: triton.InferenceServerClient, bb) -> None:
    x = preprocessed(bb, photos(1, seed=60))
    cases = [
        ({"model_name": "missing", "inputs": [fp32_input(x, True)], "headers": alpha()}, "404", "not found"),
        ({"model_name": "theirs", "inputs": [fp32_input(x, True)], "headers": alpha()}, "404", "not found"),
        ({"model_name": "rand", "inputs": [fp32_input(x, True)]}, "401", "API key"),
        ({"model_name": "rand", "inputs": [fp32_input(x, True)], "headers": {"x-api-key": "wrong-key-1"}},
         "401", "key"),
        ({"model_name": "rand", "inputs": [fp32_input(x[:, :, :8], True)], "headers": alpha()}, "400",
         "shape"),
        ({"model_name": "rand", "inputs": [fp32_input(x, False)], "headers": alpha(),
              "outputs": [triton.InferRequestedOutput("logits")]}, "400", "unknown output"),
        ({"model_name": "rand", "inputs": [fp32_input(x, True)], "headers": alpha(), "model_version": "7"},
         "404", "no version 7"),
    ]
    for kwargs, status, text in cases:
        with pytest.raises(InferenceServerException) as info:
            client.infer(**kwargs)
        assert info.value.status() == status, (kwargs, info.value)
        assert text in info.value.message(), info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("theirs", headers=alpha())
    assert info.value.status() == "404" and "theirs" in info.value.message()


def test_tenancy(client: triton.InferenceServerClient, bb) -> None:
    x = preprocessed(bb, photos(1, seed=70))
    labels = [triton.InferRequestedOutput("labels")]
    res = client.infer("theirs", [fp32_input(x, True)], headers=bravo(), outputs=labels)
    assert res.as_numpy("labels")[0, 0] == b"x"
    assert client.is_model_ready("theirs", headers=bravo())
    assert not client.is_model_ready("theirs", headers=alpha())
    assert not client.is_model_ready("rand", headers=bravo())


def test_concurrent_oip_and_predict_share_batches(oip_server: OipServer, bb) -> None:
    """Requests of several tasks, half through /v2 and half through /predict, at once: each gets its task's
    answer, and batches mix them (the server waits 50 ms for a batch to fill)."""
    names = {f"mixed{i}": [f"m{i}-{c}" for c in "abc"] for i in range(4)}
    for i, (task, classes) in enumerate(names.items()):
        blob = constant_task(bb, classes, winner=i % 3, seed=i)
        assert oip_server.alpha.put(f"/tasks/{task}/import", content=blob).status_code == 201
    files = photos(2, seed=80)
    x = preprocessed(bb, files)

    def oip(task: str) -> tuple[str, list[str], None]:
        c = triton.InferenceServerClient(url=oip_server.url, network_timeout=120)
        try:
            res = c.infer(task, [fp32_input(x, True)], headers=alpha(),
                          outputs=[triton.InferRequestedOutput("labels")])
            return task, [row[0].decode() for row in res.as_numpy("labels")], None
        finally:
            c.close()

    def rest(task: str) -> tuple[str, list[str], float]:
        with httpx.Client(base_url=oip_server.proc.base_url, headers=alpha(), timeout=120) as c:
            r = c.post("/predict", params={"task": task},
                       files=[("image", ("a.png", f, "image/png")) for f in files])
            assert r.status_code == 200, r.text
            body = r.json()
            labels = [res["top_k"][0]["label"] for res in body["results"]]
            return task, labels, body["timings_ms"]["batch_images"]

    jobs = [(fn, task) for task in names for fn in (oip, rest)] * 3
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: job[0](job[1]), jobs))
    for task, labels, _ in results:
        i = int(task.removeprefix("mixed"))
        assert labels == [names[task][i % 3]] * 2, (task, labels)
    assert max(b for *_, b in results if b is not None) > 2  # some /predict batch carried others' images too


def test_versions_and_busy(oip_server: OipServer, client: triton.InferenceServerClient, bb) -> None:
    blob = constant_task(bb, ["cat", "dog", "owl"], winner=2)
    r = oip_server.alpha.put("/tasks/const/import", content=blob)
    assert r.status_code == 201
    x = preprocessed(bb, photos(1, seed=90))
    out = [triton.InferRequestedOutput("labels")]
    res = client.infer("const", [fp32_input(x, True)], headers=alpha(), outputs=out)
    assert res.as_numpy("labels")[0, 0] == b"owl"
    res = client.infer("const", [fp32_input(x, True)], headers=alpha(), outputs=out, model_version="2")
    assert res.get_response()["model_version"] == "2"
    with pytest.raises(InferenceServerException) as info:
        client.infer("const", [fp32_input(x, True)], headers=alpha(), outputs=out, model_version="1")
    assert info.value.status() == "400" and "current version (2)" in info.value.message()
    assert client.get_model_metadata("const", headers=alpha())["versions"] == ["1", "2"]
    many = torch.zeros(41, *x.shape[1:]).numpy()  # more images than the queue holds: 503, retry later
    with pytest.raises(InferenceServerException) as info:
        client.infer("const", [fp32_input(many, True)], headers=alpha(), outputs=out)
    assert info.value.status() == "503" and "queue is full" in info.value.message()
