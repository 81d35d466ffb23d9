"""Backbone loading, fingerprints, data config, and refusal of unsupported architectures."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import timm
import torch

from tests.fixtures.vit import TINY_KWARGS, TINY_NAME, save_tiny_vit
from vpt.backbone import Backbone, fingerprint_state_dict, load_backbone
from vpt.errors import BackboneError

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_backbone_facts(tiny_backbone: Backbone) -> None:
    bb = tiny_backbone
    assert (bb.embed_dim, bb.depth, bb.num_heads, bb.head_dim) == (64, 4, 2, 32)
    assert bb.patch_size == (8, 8) and bb.num_patches == 16 and bb.num_tokens == 17
    assert bb.data_config["input_size"] == (3, 32, 32)  # the model's own size, not its pretrained cfg's 224
    assert len(bb.data_config["mean"]) == 3 and bb.data_config["interpolation"]
    assert not any(p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    desc = bb.describe()
    assert desc["input_size"] == [3, 32, 32] and desc["fingerprint"] == bb.fingerprint


def test_fingerprint_is_stable_across_processes(tiny_vit_file, tiny_backbone: Backbone) -> None:
    code = (
        "import json,sys; from vpt.backbone import load_backbone; "
        f"print(load_backbone({TINY_NAME!r}, weights=sys.argv[1], model_kwargs=json.loads(sys.argv[2])).fingerprint)"
    )
    import json

    out = subprocess.run([sys.executable, "-c", code, str(tiny_vit_file), json.dumps(TINY_KWARGS)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == tiny_backbone.fingerprint
    other = load_backbone(TINY_NAME, pretrained=False, model_kwargs=TINY_KWARGS)
    assert other.fingerprint != tiny_backbone.fingerprint


def test_pth_checkpoint_and_dtype(tmp_path, tiny_backbone: Backbone) -> None:
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": tiny_backbone.model.state_dict()}, path)
    bb = load_backbone(TINY_NAME, weights=path, model_kwargs=TINY_KWARGS, dtype="bf16")
    assert bb.fingerprint == tiny_backbone.fingerprint  # computed before the cast
    assert bb.dtype == torch.bfloat16


def test_bad_checkpoints_are_typed_errors(tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(BackboneError, match="not found"):
        load_backbone(TINY_NAME, weights=missing, model_kwargs=TINY_KWARGS)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read"):
        load_backbone(TINY_NAME, weights=junk, model_kwargs=TINY_KWARGS)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model(TINY_NAME, pretrained=False, **{**TINY_KWARGS, "depth": 2}).state_dict(), other)
    with pytest.raises(BackboneError, match="does not fit"):
        load_backbone(TINY_NAME, weights=other, model_kwargs=TINY_KWARGS)


def test_unreadable_weights_say_permission_denied_and_uid() -> None:
    """A checkpoint this process may not read (file mode, or a closed directory above it) is not "not found".

    Root reads everything, so as root the check runs without the capabilities that bypass file modes."""
    shared = Path(tempfile.mkdtemp(prefix="vpt-perm-"))
    try:
        shared.chmod(0o755)
        unreadable = save_tiny_vit(shared / "w.safetensors")
        unreadable.chmod(0o000)
        closed = shared / "closed"
        closed.mkdir()
        shutil.copy(unreadable, closed / "w.safetensors")
        closed.chmod(0o000)
        code = ("import os, sys; from vpt.backbone import load_backbone; from vpt.errors import BackboneError\n"
                "for path in sys.argv[1:]:\n"
                "    try:\n"
                f"        load_backbone({TINY_NAME!r}, weights=path, model_kwargs={TINY_KWARGS!r})\n"
                "        print('loaded')\n"
                "    except BackboneError as e:\n"
                "        print(e)\n"
                "print(os.geteuid())\n")
        unprivileged = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
        done = subprocess.run([*unprivileged, sys.executable, "-c", code, str(unreadable), str(closed / "w.safetensors")],
                              capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
        assert done.returncode == 0, done.stderr
        file_msg, dir_msg, uid = done.stdout.strip().splitlines()[-3:]
        assert f"permission denied: uid {uid} cannot read it" in file_msg and "mode ----------" in file_msg
        assert f"permission denied: uid {uid} cannot reach it" in dir_msg
        assert "not found" not in file_msg + dir_msg
    finally:
        (shared / "closed").chmod(0o755)
        shutil.rmtree(shared)


@pytest.mark.parametrize("name,kwargs,match", [
    ("resnet18", {}, "VisionTransformer"),
    (TINY_NAME, {**TINY_KWARGS, "class_token": False, "global_pool": "avg"}, "class token"),
    ("no_such_model_xyz", {}, "cannot create"),
])
def test_unsupported_architectures_are_refused(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(BackboneError, match=match):
        load_backbone(name, pretrained=False, model_kwargs=kwargs)


def test_fingerprint_covers_names_shapes_and_bytes() -> None:
    a = {"w": torch.zeros(2, 2)}
    assert fingerprint_state_dict(a) != fingerprint_state_dict({"v": torch.zeros(2, 2)})
    assert fingerprint_state_dict(a) != fingerprint_state_dict({"w": torch.zeros(4)})
    assert fingerprint_state_dict(a) != fingerprint_state_dict({"w": torch.eye(2)})
    assert fingerprint_state_dict(a) == fingerprint_state_dict({"w": torch.zeros(2, 2)})
