"""Datasets: safe ingestion of uploaded archives, splits, and a torch Dataset."""
from __future__ import annotations

from vpt.data.dataset import ImageDataset
from vpt.data.errors import CODES, DatasetError, ImageDecodeError
from vpt.data.images import IMAGE_FORMATS, open_rgb
from vpt.data.ingest import IngestedDataset, Sample, ingest_archive
from vpt.data.limits import IngestLimits
from vpt.data.preflight import Preflight, preflight_archive
from vpt.data.split import DEFAULT_VAL_FRACTION, split_dataset, stratified_split

__all__ = [
    "CODES", "DEFAULT_VAL_FRACTION", "IMAGE_FORMATS", "DatasetError", "ImageDataset", "ImageDecodeError",
    "IngestLimits", "IngestedDataset", "Preflight", "Sample", "ingest_archive", "open_rgb",
    "preflight_archive", "split_dataset", "stratified_split",
]
