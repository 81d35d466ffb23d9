"""Datasets: safe ingestion of uploaded archives, splits, and a torch Dataset.

The names below load on first use: the HTTP front ends import the ingestion and error modules
without torch (only `ImageDataset` needs it).
"""
from __future__ import annotations

from vpt.lazy import lazy_exports

_WHERE = {
    "ImageDataset": "vpt.data.dataset",
    "CODES": "vpt.data.errors", "DatasetError": "vpt.data.errors", "ImageDecodeError": "vpt.data.errors",
    "IMAGE_FORMATS": "vpt.data.images", "open_rgb": "vpt.data.images",
    "IngestedDataset": "vpt.data.ingest", "Sample": "vpt.data.ingest", "ingest_archive": "vpt.data.ingest",
    "IngestLimits": "vpt.data.limits", "Preflight": "vpt.data.preflight", "preflight_archive": "vpt.data.preflight",
    "DEFAULT_VAL_FRACTION": "vpt.data.split", "split_dataset": "vpt.data.split", "stratified_split": "vpt.data.split",
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
