"""Visual Prompt Tuning on a frozen timm ViT: backbone, tasks, the mixed-task engine, training."""
from __future__ import annotations

from vpt.backbone import Backbone, load_backbone
from vpt.engine import (
    PromptTable,
    SlotTensors,
    forward_features,
    forward_logits,
    stack_slots,
    task_slot_tensors,
)
from vpt.errors import BackboneError, TaskFileError, TaskSpecError, VPTError
from vpt.task import METHODS, LoadedTask, TaskParams, TaskSpec, load_task_file, save_task_file

__all__ = [
    "METHODS",
    "Backbone",
    "BackboneError",
    "LoadedTask",
    "PromptTable",
    "SlotTensors",
    "TaskFileError",
    "TaskParams",
    "TaskSpec",
    "TaskSpecError",
    "VPTError",
    "forward_features",
    "forward_logits",
    "load_backbone",
    "load_task_file",
    "save_task_file",
    "stack_slots",
    "task_slot_tensors",
]
