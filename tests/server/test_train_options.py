"""One options schema, every surface: OpenAPI, form parsing, `vpt-serve train` flags, the SDK's copy,
and `vpt train` flags. Each test fails when a surface drifts from vpt/options.py."""
from __future__ import annotations

import argparse
import json

import httpx
import pytest

from server.cli_train import _options, add_train_commands
from tests.fixtures.digits import make_digits_zip
from tests.fixtures.live_server import ServerProcess
from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from tests.server.helpers import finished, wait_job
from vpt.options import TrainOptions, form_schema, from_form


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> httpx.Client:
    """A server on a seeded random tiny ViT: these tests check options, not accuracy."""
    root = tmp_path_factory.mktemp("options")
    server = ServerProcess({"VPT_STORE": str(root / "store"), "VPT_BACKBONE": TINY_NAME,
                            "VPT_BACKBONE_PRETRAINED": "false", "VPT_BACKBONE_KWARGS": json.dumps(TINY_KWARGS)},
                           root / "server.log").start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as c:
            yield c
    finally:
        server.stop()


def non_defaults() -> dict[str, str]:
    """A valid value for every option that differs from its default, as form text."""
    values = {}
    for name, prop in form_schema().items():
        if "enum" in prop:
            values[name] = next(v for v in prop["enum"] if v != prop.get("default"))
        elif prop["type"] == "integer":
            values[name] = str(prop.get("default", 0) + 1)
        elif prop["type"] == "number":
            values[name] = str(prop.get("default", 0.0) / 2 if prop.get("default") else 0.25)
    values.update(epochs="2", warmup_epochs="1", num_workers="1", method="vpt-deep+bias", head="mlp-2",
                  prompt_layers="1-2", auto_methods="linear,bias")
    missing = set(form_schema()) - set(values)
    assert not missing, f"no test value for {missing}: teach non_defaults() the new field type"
    return values


def train_body(api: httpx.Client) -> dict:
    spec = api.get("/openapi.json").json()["paths"]["/tasks/{task_id}/train"]["post"]["requestBody"]
    return spec["content"]["multipart/form-data"]["schema"]


def test_openapi_describes_every_option_as_the_schema_does(api: httpx.Client) -> None:
    props = dict(train_body(api)["properties"])
    assert props.pop("dataset")["format"] == "binary"
    assert props == form_schema()
    assert len(props) == len(TrainOptions.model_fields) >= 15


def test_the_sdk_copy_matches_the_servers_openapi(api: httpx.Client) -> None:
    from vpt_client import TrainOptions as SdkOptions
    from vpt_client._train_options import FIELDS

    props = dict(train_body(api)["properties"])
    props.pop("dataset")
    assert FIELDS == props
    assert list(SdkOptions.__annotations__) == list(props)


def test_every_option_sent_as_a_form_field_is_recorded_on_the_job(api: httpx.Client, tmp_path) -> None:
    values = non_defaults()
    archive = make_digits_zip(tmp_path / "d.zip", classes=range(2), per_class=4)
    r = api.post("/tasks/all-options/train", files={"dataset": ("d.zip", archive.read_bytes())}, data=values)
    assert r.status_code == 202, r.text
    job = r.json()
    expected = from_form(values.items()).to_dict()
    assert job["options"] == expected
    assert all(expected[name] != default for name, default in TrainOptions().to_dict().items())
    api.post(f"/jobs/{job['job_id']}/cancel")
    wait_job(api, job["job_id"], finished)


@pytest.mark.parametrize("fields", [{"epochs": ["5", "6"]}, {"num_prompts": "5", "prompts": "6"}])
def test_repeated_form_fields_are_refused_not_last_wins(api: httpx.Client, fields: dict) -> None:
    r = api.post("/tasks/repeated/train", files=[("dataset", ("d.zip", b"PK\x05\x06" + b"\0" * 18))], data=fields)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_parameter" and "more than once" in err["message"]
    assert err["details"]["field"] == next(iter(fields))


def test_vpt_serve_train_has_a_flag_for_every_option() -> None:
    parser = argparse.ArgumentParser(prog="vpt-serve")
    add_train_commands(parser.add_subparsers(dest="command"))
    values = non_defaults()
    argv = ["train", "data.zip", "--out", "x.safetensors"]
    for name, value in values.items():
        argv += [f"--{form_schema()[name]['x-flag'].replace('_', '-')}", value]
    options = _options(parser.parse_args(argv))
    for name, value in values.items():
        got = getattr(options, name)
        got = ",".join(got) if isinstance(got, list) else got
        assert str(got) == value or got == float(value), name


def test_a_sweep_records_its_winning_values_on_the_job(api: httpx.Client, tmp_path) -> None:
    archive = make_digits_zip(tmp_path / "s.zip", classes=range(2), per_class=5)
    r = api.post("/tasks/swept/train", files={"dataset": ("s.zip", archive.read_bytes())},
                 data={"sweep": "small", "epochs": "1", "batch_size": "4", "base_lr": "0.5", "num_prompts": "2",
                       "val_fraction": "0.4", "augmentation": "none"})
    assert r.status_code == 202, r.text
    assert r.json()["options"]["base_lr"] == 0.5  # as asked, until the sweep decides
    done = wait_job(api, r.json()["job_id"])
    assert done["state"] == "succeeded", done
    winner = done["metrics"]["sweep"]["winner"]
    assert (done["options"]["base_lr"], done["options"]["weight_decay"]) == (winner["base_lr"], winner["weight_decay"])
    assert done["options"]["base_lr"] in (25.0, 5.0, 1.0) and done["options"]["sweep"] == "small"
