"""Visual Prompt Tuning on a frozen timm ViT: backbone, tasks, the mixed-task engine, training."""
from __future__ import annotations

from vpt.backbone import Backbone, load_backbone
from vpt.engine import PromptTable, SlotTensors, forward_features, forward_logits, stack_slots, task_slot_tensors
from vpt.errors import BackboneError, TaskFileError, TaskSpecError, VPTError
from vpt.task import METHODS, LoadedTask, TaskParams, TaskSpec, load_task_file, save_task_file

__all__ = [
    "Backbone", "load_backbone", "PromptTable", "SlotTensors", "forward_features", "forward_logits",
    "stack_slots", "task_slot_tensors", "BackboneError", "TaskFileError", "TaskSpecError", "VPTError",
    "METHODS", "LoadedTask", "TaskParams", "TaskSpec", "load_task_file", "save_task_file",
]
