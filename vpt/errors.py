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


class TrainingError(VPTError):
    """Training could not produce a task. `code` names why."""

    code = "training_failed"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class TrainingCancelled(TrainingError):
    """`should_cancel()` answered True; nothing was kept."""

    code = "cancelled"


class TrainOptionsError(TrainingError, ValueError):
    """A training option is out of range or of the wrong type; `field` names it."""

    code = "invalid_parameter"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
