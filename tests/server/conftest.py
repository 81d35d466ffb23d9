"""A keyed server for the Open Inference Protocol tests, shared by their modules."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.fixtures.live_server import ServerProcess
from tests.server.helpers import backbone_for, constant_task, random_task

OIP_KEY_A, OIP_KEY_B = "alpha-oip-secret", "bravo-oip-secret"
OIP_QUEUE_LIMIT, OIP_MAX_IMAGES = 40, 48  # one request of 41..48 images is refused busy, past 48 too large
OIP_MAX_IMAGE_BYTES = 1 << 16             # inference bodies up to 48 * 64 KiB + 1 MiB


@dataclass
class OipServer:
    proc: ServerProcess
    alpha: httpx.Client         # tenant alpha (Bearer key)
    bravo: httpx.Client         # tenant bravo (x-api-key)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.proc.port}"


@pytest.fixture(scope="session")
def oip_server(tmp_path_factory: pytest.TempPathFactory, tiny_vit_env: dict[str, str],
               tiny_vit_file) -> Iterator[OipServer]:
    """Tasks of alpha: `rand` (random head, 5 classes), `const` (always 'dog'); bravo: `theirs`."""
    root = tmp_path_factory.mktemp("oip")
    env = {**tiny_vit_env, "VPT_STORE": str(root / "store"), "VPT_WORKERS": "0", "VPT_MAX_WAIT_MS": "50",
           "VPT_QUEUE_LIMIT": str(OIP_QUEUE_LIMIT), "VPT_MAX_IMAGES_PER_REQUEST": str(OIP_MAX_IMAGES),
           "VPT_MAX_IMAGE_BYTES": str(OIP_MAX_IMAGE_BYTES),
           "VPT_API_KEYS": f"alpha:{OIP_KEY_A},bravo:{OIP_KEY_B}"}
    proc = ServerProcess(env, root / "server.log").start()
    bb = backbone_for(str(tiny_vit_file))
    alpha = httpx.Client(base_url=proc.base_url, headers={"Authorization": f"Bearer {OIP_KEY_A}"}, timeout=60)
    bravo = httpx.Client(base_url=proc.base_url, headers={"x-api-key": OIP_KEY_B}, timeout=60)
    for client, task, blob in ((alpha, "rand", random_task(bb, ["a", "b", "c", "d", "e"], seed=3)),
                               (alpha, "const", constant_task(bb, ["cat", "dog", "owl"], winner=1)),
                               (bravo, "theirs", constant_task(bb, ["x", "y"], winner=0))):
        r = client.put(f"/tasks/{task}/import", content=blob)
        assert r.status_code == 201, r.text
    yield OipServer(proc, alpha, bravo)
    alpha.close()
    bravo.close()
    proc.stop()
