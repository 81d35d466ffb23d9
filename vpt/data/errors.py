"""Typed errors raised while ingesting a training dataset."""
from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

from vpt.errors import VPTError

MAX_ENTRIES = 20

# Every code a DatasetError can carry; the server answers each with HTTP 400.
ARCHIVE_INVALID = "dataset_archive_invalid"
UNSAFE_PATH = "dataset_unsafe_path"
LINK = "dataset_link"
TOO_LARGE = "dataset_too_large"
BOMB = "dataset_bomb"
IMAGE_TOO_LARGE = "dataset_image_too_large"
CORRUPT_IMAGE = "dataset_corrupt_image"
NOT_IMAGE = "dataset_not_image"
EMPTY_CLASS = "dataset_empty_class"
TOO_FEW_CLASSES = "dataset_too_few_classes"
TOO_FEW_IMAGES = "dataset_too_few_images"
MANIFEST_MISSING_FILE = "dataset_manifest_missing_file"
MANIFEST_INVALID = "dataset_manifest_invalid"
LAYOUT = "dataset_layout"

CODES = frozenset({
    ARCHIVE_INVALID, UNSAFE_PATH, LINK, TOO_LARGE, BOMB, IMAGE_TOO_LARGE, CORRUPT_IMAGE, NOT_IMAGE,
    EMPTY_CLASS, TOO_FEW_CLASSES, TOO_FEW_IMAGES, MANIFEST_MISSING_FILE, MANIFEST_INVALID, LAYOUT,
})


def _text(value: str) -> str:
    """`value` as valid Unicode: an archive name that was no UTF-8 keeps its bytes as `\\udcff` escapes."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


class DatasetError(VPTError):
    """An uploaded dataset was refused.

    `code` is one of `CODES`; `entries` names up to 20 offending archive entries, classes or
    manifest rows (the server returns them as `details`).
    """

    def __init__(self, code: str, message: str, entries: Iterable[str] = ()) -> None:
        assert code in CODES, code
        message = _text(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.entries: list[str] = [_text(str(e)) for e in islice(entries, MAX_ENTRIES)]

    def __str__(self) -> str:
        if not self.entries:
            return f"{self.code}: {self.message}"
        return f"{self.code}: {self.message} ({', '.join(self.entries)})"

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "details": self.entries}


class ImageDecodeError(VPTError):
    """One image (e.g. a prediction upload) cannot be decoded or is too large."""

    code = "image_invalid"
