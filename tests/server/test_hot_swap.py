"""Hot-swap under load: new versions are served without restarts and no request fails."""
from __future__ import annotations

import threading
import time

import httpx

from tests.server.helpers import backbone_for, constant_task, png

CLASSES = ["v1", "v2", "v3", "v4"]


def test_hot_swap_under_load_has_zero_failures(start_server, tiny_vit_file) -> None:
    proc = start_server(env={"VPT_WORKERS": "0", "VPT_MAX_BATCH_SIZE": "8"})
    bb = backbone_for(str(tiny_vit_file))
    blobs = [constant_task(bb, CLASSES, winner=i, p=2 + i, seed=i) for i in range(4)]
    with httpx.Client(base_url=proc.base_url, timeout=60) as c:
        assert c.put("/tasks/hot/import", content=blobs[0]).status_code == 201
    stop = threading.Event()
    seen: list[tuple[int, str]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def hammer(seed: int) -> None:
        with httpx.Client(base_url=proc.base_url, timeout=60) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/predict", params={"task": "hot"}, content=png(seed * 1000 + i),
                           headers={"content-type": "image/png"})
                i += 1
                with lock:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    body = r.json()
                    seen.append((body["version"], body["results"][0]["top_k"][0]["label"]))

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=proc.base_url, timeout=60) as c:
        for v in range(1, 4):
            time.sleep(0.5)
            assert c.put("/tasks/hot/import", content=blobs[v]).status_code == 201
        time.sleep(0.5)
        c.post("/tasks/hot/versions/2/activate").raise_for_status()  # rollback under load too
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert failures == []
    assert len(seen) > 50
    # every answer is internally consistent: the label is the one its version's head picks
    assert all(label == CLASSES[version - 1] for version, label in seen)
    assert {v for v, _ in seen} >= {1, 2, 3, 4}
    assert seen[-1][0] == 2  # after the rollback, version 2 is what gets served
