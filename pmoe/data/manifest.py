"""Manifests: one row per test sample of a dataset, read from its folder as distributed.

``build_manifest(name, root)`` dispatches to the builder of the dataset's layout
(:mod:`pmoe.data.builders`) and returns a frame with the columns ``image, mask, cls, label,
defect, crop`` (paths relative to ``root`` with forward slashes, ``mask`` empty when there is
none, ``label`` 0 normal / 1 anomalous, ``defect`` the defect folder or ``good``/``anomaly``/
``defect``, ``crop`` empty or ``"i/n"``), sorted by class (registry order), image path and
crop. Masks are paired with images by name; every image or mask that cannot be paired makes
one DataError listing them all. ``read_manifest`` reads such a CSV back, checked.

Usage::

    from pmoe.data import build_manifest
    frame = build_manifest("visa", "/data/VisA")
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pmoe.data.builders import BUILDERS, PROBES
from pmoe.data.layout import Findings, Sample, format_listing, require_directory, subdirectories
from pmoe.data.registry import DatasetInfo, dataset_info
from pmoe.errors import DataError

COLUMNS = Sample._fields


def make_frame(rows, info: DatasetInfo) -> pd.DataFrame:
    """Rows as a manifest frame, sorted by class (registry order), image path and crop."""
    order = {cls: index for index, cls in enumerate(info.classes)}
    rows = sorted(rows, key=lambda r: (order.get(r.cls, len(order)), r.cls, r.image, r.crop))
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype({column: (int if column == "label" else str) for column in COLUMNS})


def read_manifest(source) -> pd.DataFrame:
    """A manifest from a CSV path or a frame, checked: required columns, labels in {0, 1}.

    A missing ``crop`` column (a hand-made five-column manifest) is added empty.
    """
    if isinstance(source, pd.DataFrame):
        frame, where = source.copy(), "manifest frame"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"manifest {path} does not exist; write it with "
                            "'pmoe manifest NAME --root PATH --out FILE'")
        frame, where = pd.read_csv(path, dtype=str, keep_default_na=False), f"manifest {path}"
    missing = [column for column in COLUMNS[:5] if column not in frame.columns]
    if missing:
        raise DataError(f"{where} lacks column(s) {', '.join(missing)}; expected the columns "
                        f"{', '.join(COLUMNS)} (rebuild it with 'pmoe manifest')")
    if "crop" not in frame.columns:
        frame["crop"] = ""
    labels = pd.to_numeric(frame["label"], errors="coerce")
    if labels.isna().any() or not labels.isin([0, 1]).all():
        bad = frame.loc[labels.isna() | ~labels.isin([0, 1]), "image"].tolist()
        raise DataError(f"{where}: label must be 0 or 1, not so for:\n{format_listing(bad)}")
    frame["label"] = labels.astype(int)
    for column in COLUMNS:
        if column != "label":
            frame[column] = frame[column].fillna("").astype(str)
    return frame[list(COLUMNS) + [c for c in frame.columns if c not in COLUMNS]]


def _layout_error(root: Path, info: DatasetInfo) -> DataError:
    """A DataError saying what was expected at ``root``, with a better root if one is near."""
    entries = [p.name + ("/" if p.is_dir() else "") for p in sorted(root.iterdir())]
    message = (f"{info.title}: the folder {root} does not have the {info.title} layout; expected "
               f"{info.layout}.\n  It holds: {', '.join(entries[:15]) or 'nothing'}"
               f"{' ...' if len(entries) > 15 else ''}")
    children = subdirectories(root)
    candidates = children + [inner for child in children for inner in subdirectories(child)]
    near = [folder for folder in candidates if PROBES[info.name](folder, info)]
    if near:
        message += f"\n  Did you mean --root {near[0]}?"
    return DataError(message)


def build_manifest(name: str, root) -> pd.DataFrame:
    """The manifest of dataset ``name`` (see :data:`pmoe.data.registry.DATASETS`) under ``root``.

    Raises a DataError for an unknown name, a root without the dataset's layout (saying what
    was expected, and suggesting a sub-folder that has it), or files that cannot be paired;
    issues :class:`~pmoe.data.layout.DataWarning` for ignored files and missing classes.
    """
    info = dataset_info(name)
    root = require_directory(root, info.title, info.layout)
    if not PROBES[info.name](root, info):
        raise _layout_error(root, info)
    findings = Findings(info.title, root)
    rows = BUILDERS[info.name](root, info, findings)
    findings.finish()
    if not rows:
        raise DataError(f"{info.title}: no test image found under {root}; expected {info.layout}")
    return make_frame(rows, info)
