"""Open Inference Protocol request parsing: any body gives a request or a 4xx, never another error."""
from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import ApiError
from server.frontend.routes.oip_tensors import Limits, parse_request

LIMITS = Limits(input_size=(2, 2), max_images=4, max_image_bytes=64, max_top_k=10)
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
           | st.text(max_size=8))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)
NAMES = st.sampled_from(["images", "image_bytes", "x"])
TYPES = st.sampled_from(["FP32", "FP16", "UINT8", "BYTES", "INT64", "BOOL"])
SHAPES = st.lists(st.integers(-1, 5), max_size=5) | st.just([1, 3, 2, 2]) | st.just([2])
INPUT = st.fixed_dictionaries({"name": NAMES, "datatype": TYPES, "shape": SHAPES},
                              optional={"data": JSON | st.lists(st.floats(-1, 1), min_size=12, max_size=12),
                                        "parameters": st.fixed_dictionaries({}, optional={
                                            "binary_data_size": st.integers(-2, 40)})})
REQUEST = st.fixed_dictionaries({"inputs": st.lists(INPUT, max_size=3)},
                                optional={"outputs": JSON, "parameters": JSON, "id": JSON})


def outcome(body: bytes, header: str | None) -> str:
    try:
        parse_request(body, header, LIMITS)
    except ApiError as e:
        assert e.status in (400, 413), e.status
        assert isinstance(e.message, str) and e.message
        return "refused"
    return "ok"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(REQUEST, st.binary(max_size=64), st.none() | st.integers(-5, 2000).map(str) | st.text(max_size=4))
def test_any_request_is_parsed_or_refused(doc: dict, tail: bytes, header: str | None) -> None:
    head = json.dumps(doc).encode()
    outcome(head + tail if header is not None else head, header)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_parsed_or_refused(body: bytes) -> None:
    outcome(body, None)
    outcome(body, str(len(body) // 2))


def test_a_good_binary_request() -> None:
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 2, 2],
                                   "parameters": {"binary_data_size": 48}}],
                       "outputs": [{"name": "labels", "parameters": {"binary_data": True}}],
                       "parameters": {"top_k": 2}}).encode()
    req = parse_request(head + x.tobytes(), str(len(head)), LIMITS)
    assert np.array_equal(req.pixels, x) and req.top_k == 2 and req.classes_needed() == 2
    assert [(o.name, o.binary) for o in req.outputs] == [("labels", True)]
