"""The data layer: dataset registry, manifests, loaders, synthetic data (spec sections 6 and 8).

Public API::

    DATASETS, SYNTHETIC, DatasetInfo, dataset_info, dataset_names  # registry
    build_manifest, read_manifest, COLUMNS                          # manifests
    validate_manifest, check_readable, ValidationReport             # Table 7, file checks
    AnomalyDataset, load_image, load_mask, CLIP_MEAN, CLIP_STD      # preprocessing
    DataWarning                                                     # ignored files

``pmoe.data.synthetic.write_dataset`` writes ``synthetic-a``/``synthetic-b``;
``pmoe.data.twins.write_twin`` writes tiny copies of the fifteen layouts for tests.
The names of :mod:`pmoe.data.loader` are imported on first use, so that building manifests
does not pay for importing torch.
"""

import importlib

from pmoe.data.layout import DataWarning
from pmoe.data.manifest import COLUMNS, build_manifest, read_manifest
from pmoe.data.registry import DATASETS, SYNTHETIC, DatasetInfo, dataset_info, dataset_names
from pmoe.data.validate import ValidationReport, check_readable, validate_manifest

__all__ = [
    "AnomalyDataset", "CLIP_MEAN", "CLIP_STD", "COLUMNS", "DATASETS", "DataWarning", "DatasetInfo",
    "SYNTHETIC", "ValidationReport", "build_manifest", "check_readable", "dataset_info",
    "dataset_names", "load_image", "load_mask", "read_manifest", "validate_manifest",
]

LOADER_NAMES = ("AnomalyDataset", "CLIP_MEAN", "CLIP_STD", "load_image", "load_mask")


def __getattr__(name):
    if name in LOADER_NAMES:
        return getattr(importlib.import_module("pmoe.data.loader"), name)
    if name in ("synthetic", "twins"):
        return importlib.import_module(f"pmoe.data.{name}")
    raise AttributeError(f"module 'pmoe.data' has no attribute {name!r}")
