"""Whether an uploaded (or re-activated) task file can be served here: the process that holds the
backbone checks it tensor by tensor.

A front-end process has no backbone and no torch: it sends the file to the engine over the channel
(`FrontendState.check_task`); the single process checks it itself (`AppState.check_task`).
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from server.errors import ApiError
from vpt.errors import TaskFileError
from vpt.task import bank_values, load_task_file

if TYPE_CHECKING:
    from server.settings import Settings
    from vpt.backbone import Backbone

log = logging.getLogger(__name__)


def servable_metadata(blob: bytes, backbone: Backbone, settings: Settings) -> dict[str, str]:
    """The file's metadata if `backbone` can serve it and the API can show it; 422 otherwise. The record
    shows what this server computes (trainable parameters, bank values), not what the file claims."""
    try:
        loaded = load_task_file(blob, backbone)
        spec, meta = loaded.spec, dict(loaded.metadata)  # the header load_task_file read
        meta["trainable_parameters"] = str(loaded.params.num_trainable()["total"])
        meta["bank_values"] = str(bank_values(loaded.params, backbone))
    except TaskFileError as e:
        raise ApiError(422, e.code, e.message) from e
    except Exception as e:  # untrusted bytes: whatever else the parsers meet is the file's fault too
        log.warning("task file refused: %r", e)
        raise ApiError(422, "task_file_invalid", f"the task file cannot be read: {type(e).__name__}") from e
    most_classes, most_prompts = settings.max_task_classes, settings.max_task_prompts
    if spec.num_classes > most_classes or spec.num_prompts > most_prompts:
        raise ApiError(422, "task_too_large",
                       f"the task has {spec.num_classes} classes and {spec.num_prompts} prompts; this server "
                       f"serves at most {most_classes} classes and {most_prompts} prompts")
    try:
        for shown in (meta, json.loads(meta["classes"]), json.loads(meta.get("metrics", "null"))):
            json.dumps(shown, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(422, "task_file_invalid", "task file metadata holds text that is not valid Unicode") from e
    except RecursionError as e:
        raise ApiError(422, "task_file_invalid", "task file metadata 'metrics' is nested too deeply") from e
    except ValueError:
        pass  # malformed metrics are shown as null
    return meta
