"""Checks of a manifest: consistency, Table 7 counts, and readability of every file.

``validate_manifest(name, frame)`` returns a :class:`ValidationReport` whose ``text()`` shows
the per-class counts and the difference to Table 7. Inconsistencies (an anomalous image of a
pixel-level dataset without a mask, an unknown class, a duplicate row, an unreadable file)
are errors; a count that differs from Table 7 or a missing class is a difference, which
``check(strict=True)`` turns into an error (a user may hold a subset on purpose).

Usage::

    report = validate_manifest("mvtec", frame, unreadable=check_readable(frame, root))
    print(report.text()); report.check(strict=True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pmoe.data.layout import format_listing
from pmoe.data.images import open_image
from pmoe.data.manifest import read_manifest
from pmoe.data.registry import DatasetInfo, dataset_info
from pmoe.errors import DataError


@dataclass
class ValidationReport:
    """Result of :func:`validate_manifest`; ``text()`` renders it, ``check()`` enforces it."""

    info: DatasetInfo
    per_class: pd.DataFrame
    problems: list = field(default_factory=list)
    differences: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def found(self) -> tuple:
        """(normal, anomalous) totals of the manifest."""
        return int(self.per_class["normal"].sum()), int(self.per_class["anomalous"].sum())

    @property
    def ok(self) -> bool:
        """True when nothing at all is wrong or different."""
        return not (self.problems or self.differences or self.unreadable)

    def text(self) -> str:
        """Human-readable report: per-class table, Table 7 comparison, problems."""
        info = self.info
        table = self.per_class
        present = int((table["normal"] + table["anomalous"] > 0).sum())
        width = max([5] + [len(name) for name in table["class"]]) + 2
        lines = [f"{info.title} ({info.name}): {sum(self.found)} test samples in {present} of "
                 f"{len(info.classes)} classes",
                 f"  {'class':<{width}}{'normal':>9}{'anomalous':>11}"]
        lines += [f"  {name:<{width}}{normal:>9}{anomalous:>11}"
                  for name, normal, anomalous in table.itertuples(index=False)]
        lines += [""] + self._table7_lines()
        for title, items in (("problems", self.problems), ("unreadable files", self.unreadable),
                             ("differences", self.differences)):
            if items:
                lines += [f"{title} ({len(items)}):", format_listing(items)]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def _table7_lines(self) -> list:
        if self.info.synthetic:
            return ["Table 7: no reference (synthetic dataset; counts follow the generator "
                    "parameters)"]
        expected = (self.info.normal, self.info.anomalous)
        normal, anomalous = self.found
        verdict = "matches" if (normal, anomalous) == expected else "DIFFERS FROM"
        return [f"Table 7 check: the manifest {verdict} Table 7",
                f"  {'':12}{'normal':>9}{'anomalous':>11}",
                f"  {'Table 7':12}{expected[0]:>9}{expected[1]:>11}",
                f"  {'manifest':12}{normal:>9}{anomalous:>11}",
                f"  {'difference':12}{normal - expected[0]:>+9}{anomalous - expected[1]:>+11}"]

    def check(self, strict: bool = False) -> None:
        """Raise a DataError on problems or unreadable files, and on differences if ``strict``."""
        failures = self.problems + self.unreadable + (self.differences if strict else [])
        if failures:
            hint = (" (differences from Table 7 are errors because of --strict; drop it to accept "
                    "a subset)") if strict and self.differences else ""
            raise DataError(f"{self.info.title}: the manifest failed validation{hint}:\n"
                            f"{format_listing(failures)}")


def per_class_counts(frame: pd.DataFrame, info: DatasetInfo) -> pd.DataFrame:
    """Normal and anomalous counts per class, every registered class listed (zeros included)."""
    classes = list(info.classes) + sorted(set(frame["cls"]) - set(info.classes))
    counts = frame.groupby(["cls", "label"]).size().unstack(fill_value=0)
    counts = counts.reindex(index=classes, columns=[0, 1], fill_value=0)
    return pd.DataFrame({"class": classes, "normal": counts[0].to_numpy(dtype=int),
                         "anomalous": counts[1].to_numpy(dtype=int)})


def _consistency_problems(frame: pd.DataFrame, info: DatasetInfo) -> list:
    """Rows that contradict the dataset's kind, class list or uniqueness."""
    has_mask = frame["mask"] != ""
    anomalous = frame["label"] == 1
    checks = [
        (~frame["cls"].isin(info.classes), f"class not among the {info.title} classes"),
        (frame.duplicated(["image", "crop"], keep="first"), "duplicate row"),
        (~anomalous & has_mask, "normal sample with a mask"),
    ]
    if info.has_masks:
        checks.append((anomalous & ~has_mask, "anomalous sample without a mask"))
    else:
        checks.append((has_mask, f"mask given although {info.title} has image labels only"))
    return [f"{image}: {why}" for rows, why in checks for image in frame.loc[rows, "image"]]


def _differences(frame: pd.DataFrame, info: DatasetInfo) -> list:
    """Differences from the registry: missing classes and, for paper datasets, Table 7 counts."""
    absent = [cls for cls in info.classes if cls not in set(frame["cls"])]
    found = [f"{len(absent)} of {len(info.classes)} classes missing: {', '.join(absent)}"
             ] if absent else []
    if not info.synthetic:
        normal, anomalous = int((frame["label"] == 0).sum()), int((frame["label"] == 1).sum())
        for what, got, want in (("normal", normal, info.normal),
                                ("anomalous", anomalous, info.anomalous)):
            if got != want:
                found.append(f"{got} {what} samples where Table 7 has {want} ({got - want:+d})")
    return found


def validate_manifest(name: str, frame, unreadable=()) -> ValidationReport:
    """Compare a manifest of dataset ``name`` with the registry and Table 7.

    ``unreadable`` are the files :func:`check_readable` could not decode (listed as errors).
    """
    info = dataset_info(name)
    frame = read_manifest(frame)
    notes = []
    if info.name == "sdd" and (frame["crop"] != "").any():
        notes.append("raw KolektorSDD parts are cut into 3 horizontal bands, which does not give "
                     "Table 7's (181, 74), and metrics on it are not comparable with Table 1; the "
                     "converted SDD tree distributed with AnomalyCLIP gives both")
    return ValidationReport(info, per_class_counts(frame, info), _consistency_problems(frame, info),
                            _differences(frame, info), list(unreadable), notes)


def check_readable(frame, root, progress: bool = True) -> list:
    """Decode every image and mask of a manifest; return ``"path: reason"`` for each failure."""
    from tqdm import tqdm

    frame = read_manifest(frame)
    root = Path(root).expanduser()
    files = sorted(set(frame["image"]) | (set(frame["mask"]) - {""}))
    failures = []
    for path in tqdm(files, desc="decoding images", unit="file", disable=not progress):
        try:
            open_image(root / path)
        except DataError as error:
            failures.append(f"{path}: {str(error).split(';')[0]}")
    return failures
