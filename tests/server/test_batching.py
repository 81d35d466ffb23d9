"""The batcher over HTTP: shared batches, a bad request failing alone, a full queue, timeouts."""
from __future__ import annotations

import concurrent.futures as cf

import httpx

from tests.server.helpers import backbone_for, constant_task, png


def post_image(base_url: str, task: str, seed: int = 0) -> httpx.Response:
    return httpx.post(base_url + "/predict", params={"task": task}, content=png(seed),
                      headers={"content-type": "image/png"}, timeout=60)


def test_batch_mates_fail_alone_and_share_a_forward(start_server, tiny_vit_file) -> None:
    proc = start_server(env={"VPT_WORKERS": "0", "VPT_MAX_WAIT_MS": "400", "VPT_MAX_BATCH_SIZE": "64"})
    bb = backbone_for(str(tiny_vit_file))
    httpx.put(proc.base_url + "/tasks/good/import", content=constant_task(bb, ["g0", "g1"], winner=1)).raise_for_status()
    tasks = ["good", "missing", "good", "good", "missing", "good"]
    with cf.ThreadPoolExecutor(len(tasks)) as pool:
        responses = list(pool.map(lambda t: post_image(proc.base_url, t[1], t[0]), enumerate(tasks)))
    for task, r in zip(tasks, responses):
        if task == "good":
            assert r.status_code == 200 and r.json()["results"][0]["top_k"][0]["label"] == "g1"
        else:
            assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
    sizes = [r.json()["timings_ms"]["batch_images"] for r in responses if r.status_code == 200]
    assert max(sizes) >= 2  # requests of the 400 ms window shared a forward
    assert httpx.get(proc.base_url + "/healthz").status_code == 200


def test_full_queue_answers_503_with_retry_after(start_server, tiny_vit_file) -> None:
    proc = start_server(env={"VPT_WORKERS": "0", "VPT_QUEUE_LIMIT": "2", "VPT_MAX_WAIT_MS": "500",
                             "VPT_MAX_BATCH_SIZE": "64"})
    bb = backbone_for(str(tiny_vit_file))
    httpx.put(proc.base_url + "/tasks/t/import", content=constant_task(bb, ["a", "b"], winner=0)).raise_for_status()
    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: post_image(proc.base_url, "t", i), range(8)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.json()["error"]["code"] == "busy" and int(busy.headers["retry-after"]) >= 1


def test_request_timeout_is_504(start_server, tiny_vit_file) -> None:
    proc = start_server(env={"VPT_WORKERS": "0", "VPT_MAX_WAIT_MS": "2000", "VPT_MAX_BATCH_SIZE": "64",
                             "VPT_REQUEST_TIMEOUT_S": "0.2"})
    bb = backbone_for(str(tiny_vit_file))
    httpx.put(proc.base_url + "/tasks/t/import", content=constant_task(bb, ["a", "b"], winner=0)).raise_for_status()
    r = post_image(proc.base_url, "t")
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert httpx.get(proc.base_url + "/healthz").status_code == 200
