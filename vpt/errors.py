"""Errors raised by the `vpt` package."""
from __future__ import annotations


class VPTError(Exception):
    """Root of every error raised by vpt."""


class BackboneError(VPTError):
    """The backbone cannot be loaded or is not a supported ViT."""


class TaskFileError(VPTError):
    """A task file is malformed, truncated, or does not fit the running backbone.

    `code` names what is wrong (e.g. `task_file_invalid`, `backbone_mismatch`).
    """

    def __init__(self, message: str, code: str = "task_file_invalid") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TaskSpecError(VPTError, ValueError):
    """A task specification is invalid (unknown method, bad prompt count, no classes...)."""
