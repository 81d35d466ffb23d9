"""Open Inference Protocol v2 tensors: request parsing and validation, response encoding.

A JSON tensor carries `data` (row-major, flat or nested). With the binary tensor extension the
body is a JSON header of `Inference-Header-Content-Length` bytes followed by raw tensors: an input
with `parameters.binary_data_size` takes that many little-endian bytes, in input order. A BYTES
element is a 4-byte little-endian length followed by its bytes; in JSON, image files are base64.
Every malformed request is a 400 (413 past a size limit) naming what is wrong: never a 500.
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.errors import ApiError
from server.frontend.schemas import safe_text

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGES = "images"                     # preprocessed (N, 3, H, W): FP32/FP16 normalised, or UINT8 pixels
IMAGE_BYTES = "image_bytes"           # encoded image files (N,) or (N, 1), decoded like /predict
SCORES, INDICES, LABELS, PROBABILITIES = "scores", "indices", "labels", "probabilities"
OUTPUT_TYPES = {SCORES: "FP32", INDICES: "INT64", LABELS: "BYTES", PROBABILITIES: "FP32"}
DEFAULT_OUTPUTS = (SCORES, INDICES, LABELS)
IMAGE_TYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "UINT8": np.dtype("u1")}
NUMPY_TYPES = {**IMAGE_TYPES, "INT64": np.dtype("<i8")}
DEFAULT_TOP_K = 5
MAX_COUNT = 2**31 - 1                 # any `classification` count beyond this is refused
_LEN = struct.Struct("<I")


def bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


@dataclass(frozen=True)
class Limits:
    input_size: tuple[int, int]       # (H, W) of the backbone
    max_images: int
    max_image_bytes: int
    max_top_k: int


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool
    classification: int = 0           # > 0: BYTES "score:index:label" of the top `classification` classes


@dataclass
class InferRequest:
    id: str | None
    pixels: np.ndarray | None         # (N, 3, H, W) float32, float16 or uint8, as sent
    encoded: list[bytes] | None       # N image files
    top_k: int
    outputs: list[OutputRequest]

    def classes_needed(self) -> int | None:
        """How many top classes the outputs need per image; None for all of them."""
        needed = 0
        for out in self.outputs:
            if out.classification:
                needed = max(needed, out.classification)
            elif out.name == PROBABILITIES:
                return None
            else:
                needed = max(needed, self.top_k)
        return needed


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[str]      # numeric array, or BYTES elements as text (flat, row-major)


# -- requests ---------------------------------------------------------------------------------------

class _Binary:
    """The bytes after the JSON header, handed out to inputs in order."""

    def __init__(self, data: bytes) -> None:
        self.data, self.offset = memoryview(data), 0

    def take(self, size: int, name: str) -> memoryview:
        left = len(self.data) - self.offset
        if size > left:
            raise bad(f"input {name!r} declares binary_data_size {size} but only {left} bytes of binary data "
                      f"remain after the JSON header")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def finish(self) -> None:
        left = len(self.data) - self.offset
        if left:
            raise bad(f"{left} bytes of binary data after the JSON header belong to no input "
                      f"(each binary input needs parameters.binary_data_size)")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) per the `Inference-Header-Content-Length` header."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length.strip())
    except ValueError:
        raise bad(f"{HEADER_LENGTH} must be a number of bytes, got {header_length[:32]!r}") from None
    if n < 0 or n > len(body):
        raise bad(f"{HEADER_LENGTH} is {n} but the request body has {len(body)} bytes")
    return body[:n], body[n:]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{where} must be a JSON object")
    return value


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad(f"{where} must be an integer from {lo} to {hi}, got {str(value)[:32]}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise bad(f"{where} must be true or false, got {str(value)[:32]}")
    return value


def parse_request(body: bytes, header_length: str | None, limits: Limits) -> InferRequest:
    """A validated inference request from the raw body (JSON, or JSON + binary tensors)."""
    head, binary = split_body(body, header_length)
    try:
        doc = json.loads(head, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"the inference request is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise bad("the inference request must be a JSON object")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad("'id' must be a string")
    params = _object(doc.get("parameters"), "'parameters'")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad(f"'inputs' must be a non-empty list: send {IMAGES!r} or {IMAGE_BYTES!r}")
    reader, tensors = _Binary(binary), {}
    for i, raw in enumerate(inputs):
        name, value = _input(raw, i, reader, limits)
        if name in tensors:
            raise bad(f"input {name!r} is given twice")
        tensors[name] = value
    reader.finish()
    if len(tensors) != 1:
        raise bad(f"send either {IMAGES!r} or {IMAGE_BYTES!r} in one request, not both")
    top_k = _int(params.get("top_k", DEFAULT_TOP_K), "parameter 'top_k'", 1, limits.max_top_k)
    default_binary = _bool(params.get("binary_data_output", False), "parameter 'binary_data_output'")
    return InferRequest(rid, tensors.get(IMAGES), tensors.get(IMAGE_BYTES), top_k,
                        _outputs(doc.get("outputs"), default_binary))


def _input(raw: Any, i: int, reader: _Binary, limits: Limits) -> tuple[str, Any]:
    if not isinstance(raw, dict):
        raise bad(f"inputs[{i}] must be a JSON object")
    name = raw.get("name")
    if name not in (IMAGES, IMAGE_BYTES):
        raise bad(f"unexpected input {str(name)[:64]!r}: this model takes {IMAGES!r} (FP32, FP16 or UINT8 "
                  f"[N,3,H,W]) or {IMAGE_BYTES!r} (BYTES [N])")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise bad(f"input {name!r} needs a string 'datatype'")
    shape = _shape(raw.get("shape"), name)
    params = _object(raw.get("parameters"), f"'parameters' of input {name!r}")
    if any(k.startswith("shared_memory") for k in params):
        raise bad("shared-memory tensors are not supported: send the data in the request")
    if "binary_data_size" in params:
        if "data" in raw:
            raise bad(f"input {name!r} has both 'data' and binary_data_size")
        size = _int(params["binary_data_size"], f"binary_data_size of input {name!r}", 0, 2**62)
        payload: Any = reader.take(size, name)
    elif "data" in raw:
        payload = raw["data"]
    else:
        raise bad(f"input {name!r} has no 'data' and no binary_data_size")
    if name == IMAGES:
        return name, _pixels(datatype, shape, payload, limits)
    return name, _encoded(datatype, shape, payload, limits)


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or len(value) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise bad(f"input {name!r} needs a 'shape': a list of non-negative integers")
    return value


def _too_many(n: int, limits: Limits) -> ApiError:
    return ApiError(413, "payload_too_large", f"{n} images; at most {limits.max_images} per request")


def _count(n: int, limits: Limits) -> int:
    if n < 1:
        raise bad("send at least one image")
    if n > limits.max_images:
        raise _too_many(n, limits)
    return n


def _pixels(datatype: str, shape: list[int], payload: Any, limits: Limits) -> np.ndarray:
    if datatype not in IMAGE_TYPES:
        raise bad(f"input {IMAGES!r} has datatype {datatype[:16]!r}; expected FP32, FP16 or UINT8")
    h, w = limits.input_size
    if len(shape) != 4 or shape[1:] != [3, h, w]:
        raise bad(f"input {IMAGES!r} has shape {shape}; expected [N,3,{h},{w}] (the backbone's input size)")
    count = _count(shape[0], limits) * 3 * h * w
    dtype = IMAGE_TYPES[datatype]
    if isinstance(payload, memoryview):
        if len(payload) != count * dtype.itemsize:
            raise bad(f"input {IMAGES!r} has {len(payload)} bytes of binary data; {datatype} {shape} "
                      f"takes {count * dtype.itemsize}")
        arr = np.frombuffer(payload, dtype=dtype)
    else:
        arr = _json_numbers(payload, datatype, count)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise bad(f"input {IMAGES!r} holds NaN or infinite values")
    return arr.reshape(shape)                                                   # (N, 3, H, W)


def _json_numbers(data: Any, datatype: str, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise bad(f"'data' of input {IMAGES!r} must be a list of numbers")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise bad(f"'data' of input {IMAGES!r} is not a regular (non-ragged) list of numbers") from None
    if arr.size != count:
        raise bad(f"'data' of input {IMAGES!r} has {arr.size} elements; its shape needs {count}")
    if arr.dtype.kind not in ("iu" if datatype == "UINT8" else "iuf"):
        raise bad(f"'data' of input {IMAGES!r} must hold {datatype} numbers")
    if datatype == "UINT8" and (arr.min() < 0 or arr.max() > 255):
        raise bad(f"UINT8 'data' of input {IMAGES!r} must lie in 0..255")
    return arr.ravel().astype(IMAGE_TYPES[datatype])


def _encoded(datatype: str, shape: list[int], payload: Any, limits: Limits) -> list[bytes]:
    if datatype != "BYTES":
        raise bad(f"input {IMAGE_BYTES!r} has datatype {datatype[:16]!r}; expected BYTES")
    if len(shape) not in (1, 2) or shape[1:] not in ([], [1]):
        raise bad(f"input {IMAGE_BYTES!r} has shape {shape}; expected [N] or [N,1]")
    n = _count(shape[0], limits)
    binary = isinstance(payload, memoryview)
    items = _unpack_bytes(payload, limits) if binary else _base64_items(payload, limits)
    if len(items) != n:
        raise bad(f"input {IMAGE_BYTES!r} holds {len(items)} elements; its shape {shape} says {n}")
    return items


def _too_large(i: int, limits: Limits) -> ApiError:
    return ApiError(413, "payload_too_large", f"image #{i} exceeds {limits.max_image_bytes} bytes")


def _unpack_bytes(raw: memoryview, limits: Limits) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad(f"BYTES data of input {IMAGE_BYTES!r} ends inside an element's 4-byte length")
        (size,) = _LEN.unpack_from(raw, offset)
        if size > limits.max_image_bytes:
            raise _too_large(len(items), limits)
        if offset + 4 + size > len(raw):
            raise bad(f"element {len(items)} of input {IMAGE_BYTES!r} declares {size} bytes; "
                      f"{len(raw) - offset - 4} remain")
        items.append(bytes(raw[offset + 4:offset + 4 + size]))
        offset += 4 + size
        if len(items) > limits.max_images:
            raise _too_many(len(items), limits)
    return items


def _base64_items(data: Any, limits: Limits) -> list[bytes]:
    if not isinstance(data, list):
        raise bad(f"'data' of input {IMAGE_BYTES!r} must be a list of base64 strings")
    flat = [x for item in data for x in (item if isinstance(item, list) else [item])]
    if len(flat) > limits.max_images:
        raise _too_many(len(flat), limits)
    out = []
    for i, text in enumerate(flat):
        if not isinstance(text, str):
            raise bad(f"element {i} of input {IMAGE_BYTES!r} must be a base64 string")
        if len(text) > 4 * (limits.max_image_bytes // 3 + 1):
            raise _too_large(i, limits)
        try:
            blob = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"element {i} of input {IMAGE_BYTES!r} is not valid base64") from None
        if len(blob) > limits.max_image_bytes:
            raise _too_large(i, limits)
        out.append(blob)
    return out


def _outputs(value: Any, default_binary: bool) -> list[OutputRequest]:
    if value is None or value == []:
        return [OutputRequest(name, default_binary) for name in DEFAULT_OUTPUTS]
    if not isinstance(value, list):
        raise bad("'outputs' must be a list")
    out: list[OutputRequest] = []
    for i, raw in enumerate(value):
        if not isinstance(raw, dict) or raw.get("name") not in OUTPUT_TYPES:
            name = raw.get("name") if isinstance(raw, dict) else raw
            raise bad(f"unknown output {str(name)[:64]!r} (outputs[{i}]): this model produces "
                      f"{', '.join(OUTPUT_TYPES)}")
        name = raw["name"]
        if any(o.name == name for o in out):
            raise bad(f"output {name!r} is requested twice")
        params = _object(raw.get("parameters"), f"'parameters' of output {name!r}")
        if any(k.startswith("shared_memory") for k in params):
            raise bad("shared-memory tensors are not supported: outputs come back in the response")
        binary = _bool(params.get("binary_data", default_binary), f"binary_data of output {name!r}")
        count = _int(params.get("classification", 0), f"classification of output {name!r}", 0, MAX_COUNT)
        if count and name not in (SCORES, PROBABILITIES):
            raise bad(f"classification applies to {SCORES!r} or {PROBABILITIES!r}, not {name!r}")
        out.append(OutputRequest(name, binary, count))
    return out


# -- responses --------------------------------------------------------------------------------------

def build_outputs(req: InferRequest, top: list[list[Any]]) -> list[tuple[OutputRequest, OutputTensor]]:
    """The requested outputs from per-image top classes (`.label`, `.index`, `.score`, best first)."""
    n = len(top)
    have = len(top[0])
    result = []
    for out in req.outputs:
        if out.classification:
            k = min(out.classification, have)
            text = [f"{t.score:.6g}:{t.index}:{safe_text(t.label)}" for row in top for t in row[:k]]
            result.append((out, OutputTensor(out.name, "BYTES", (n, k), text)))
        elif out.name == PROBABILITIES:                                         # `have` is every class
            probs = np.zeros((n, have), dtype=np.float32)                       # (N, C)
            for r, row in enumerate(top):
                probs[r, [t.index for t in row]] = [t.score for t in row]
            result.append((out, OutputTensor(out.name, "FP32", (n, have), probs)))
        else:
            k = min(req.top_k, have)
            result.append((out, _top_tensor(out.name, [row[:k] for row in top], (n, k))))
    return result


def _top_tensor(name: str, rows: list[list[Any]], shape: tuple[int, int]) -> OutputTensor:
    if name == SCORES:
        return OutputTensor(name, "FP32", shape, np.array([[t.score for t in r] for r in rows], np.float32))
    if name == INDICES:
        return OutputTensor(name, "INT64", shape, np.array([[t.index for t in r] for r in rows], np.int64))
    return OutputTensor(name, "BYTES", shape, [safe_text(t.label) for r in rows for t in r])


def _raw(t: OutputTensor) -> bytes:
    if isinstance(t.data, np.ndarray):
        return np.ascontiguousarray(t.data, dtype=NUMPY_TYPES[t.datatype]).tobytes()
    parts = []
    for text in t.data:
        b = text.encode("utf-8", "replace")
        parts += [_LEN.pack(len(b)), b]
    return b"".join(parts)


def encode_response(model: str, version: int, rid: str | None,
                    tensors: list[tuple[OutputRequest, OutputTensor]]) -> tuple[bytes, int | None]:
    """(body, JSON header length): the length is None for a pure JSON body (no binary outputs)."""
    outputs, blobs = [], []
    for req, t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if req.binary:
            blob = _raw(t)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = t.data.ravel().tolist() if isinstance(t.data, np.ndarray) else list(t.data)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": outputs}
    if rid is not None:
        doc["id"] = rid
    head = json.dumps(doc).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
