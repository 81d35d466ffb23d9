"""Visual Prompt Tuning on a frozen timm ViT: backbone, tasks, the mixed-task engine, training.

The names below load on first use: a process that needs only the light modules (task metadata,
errors, options: the HTTP front ends) never imports torch or timm through this package.
"""
from __future__ import annotations

from vpt.lazy import lazy_exports

_WHERE = {
    "Backbone": "vpt.backbone", "load_backbone": "vpt.backbone",
    "PromptTable": "vpt.engine", "SlotTensors": "vpt.engine", "forward_features": "vpt.engine",
    "forward_logits": "vpt.engine", "stack_slots": "vpt.engine", "task_slot_tensors": "vpt.engine",
    "BackboneError": "vpt.errors", "TaskFileError": "vpt.errors", "TaskSpecError": "vpt.errors", "VPTError": "vpt.errors",
    "METHODS": "vpt.task", "LoadedTask": "vpt.task", "TaskParams": "vpt.task", "TaskSpec": "vpt.task",
    "load_task_file": "vpt.task", "save_task_file": "vpt.task",
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
