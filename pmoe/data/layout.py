"""Reading dataset folders as distributed: listing images, skipping junk, pairing masks by name.

The builders of :mod:`pmoe.data.manifest` share these helpers. Problems are collected in a
:class:`Findings` object while a layout is read, so that the user gets one error listing every
unpaired or missing file (never the first one only, never a silently smaller dataset), and one
warning per kind of ignored file.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

from pmoe.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
JUNK_NAMES = frozenset({"thumbs.db", ".ds_store", "desktop.ini"})
DOC_EXTENSIONS = frozenset({".txt", ".md", ".csv", ".json", ".pdf", ".xlsx", ".xls"})
MASK_SUFFIXES = ("_mask", "_label", "_Segmentation", "_segmentation")
LISTING_CAP = 20


class Sample(NamedTuple):
    """One manifest row: the fields are the manifest columns, in order."""

    image: str
    mask: str
    cls: str
    label: int
    defect: str
    crop: str = ""


class DataWarning(UserWarning):
    """Something in a dataset folder was ignored or is incomplete; the message names it."""


def is_image(path: Path) -> bool:
    """Whether ``path`` has an image extension (any case: ``.PNG``, ``.JPG`` ...)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_junk(path: Path) -> bool:
    """Operating-system clutter skipped without a word (``Thumbs.db``, ``.DS_Store``, ``._*``)."""
    return path.name.lower() in JUNK_NAMES or path.name.startswith("._")


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with forward slashes, as stored in a manifest."""
    return path.relative_to(root).as_posix()


def format_listing(items, cap: int = LISTING_CAP) -> str:
    """Indented listing of ``items``, capped at ``cap`` lines plus a count of the rest."""
    items = list(items)
    lines = [f"    {item}" for item in items[:cap]]
    if len(items) > cap:
        lines.append(f"    ... and {len(items) - cap} more")
    return "\n".join(lines)


class Findings:
    """Problems met while reading one dataset folder.

    ``error(what, items)`` and ``warn(what, items)`` group file names under a sentence that
    says what was expected; :meth:`finish` issues the warnings and raises one
    :class:`DataError` listing every error.
    """

    def __init__(self, title: str, root: Path):
        self.title = title
        self.root = root
        self.errors: dict = {}
        self.warnings: dict = {}

    def error(self, what: str, items) -> None:
        """Record files that make the dataset unusable as it is."""
        if items:
            self.errors.setdefault(what, []).extend(items)

    def warn(self, what: str, items) -> None:
        """Record files that were ignored or are missing without invalidating the rest."""
        if items:
            self.warnings.setdefault(what, []).extend(items)

    def finish(self) -> None:
        """Issue the warnings, then raise one :class:`DataError` if any error was recorded."""
        for what, items in self.warnings.items():
            message = f"{self.title} at {self.root}: {what}:\n{format_listing(items)}"
            warnings.warn(DataWarning(message), stacklevel=3)
        if self.errors:
            count = sum(len(items) for items in self.errors.values())
            parts = [f"{len(items)} {what}:\n{format_listing(items)}"
                     for what, items in self.errors.items()]
            raise DataError(f"{self.title} at {self.root}: {count} problem(s) with its files; "
                            "fix or remove them (a manifest is never built from part of a dataset "
                            "silently):\n" + "\n".join(parts))


def list_images(directory: Path, findings: Findings) -> list:
    """The image files directly inside ``directory``, sorted; other files are reported.

    Junk (``Thumbs.db`` ...) is skipped silently, documentation files (``.txt``, ``.csv``...)
    are skipped as expected companions, and anything else is named in a warning.
    Sub-directories are left to the caller.
    """
    images, extra = [], []
    for path in sorted(directory.iterdir()):
        if path.is_dir() or is_junk(path) or path.suffix.lower() in DOC_EXTENSIONS:
            continue
        (images if is_image(path) else extra).append(path)
    findings.warn(f"ignored non-image files in {relative(directory, findings.root) or '.'}",
                  [relative(path, findings.root) for path in extra])
    return images


def subdirectories(directory: Path) -> list:
    """The sub-directories of ``directory``, sorted by name, hidden ones excluded."""
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def mask_key_candidates(stem: str) -> list:
    """Image stems a mask named ``stem`` may belong to: with a known suffix removed, then as is."""
    stripped = [stem[: -len(suffix)] for suffix in MASK_SUFFIXES if stem.endswith(suffix)]
    return stripped + [stem]


def pair_masks(images: list, masks: list, findings: Findings, expected: str) -> dict:
    """Pair images with masks by file name (never by position); return ``{image: mask}``.

    A mask ``X_mask.png``, ``X_label.PNG``, ``X_Segmentation.png`` or ``X.<any ext>`` pairs
    with the image of stem ``X``. Masks matching no image, or a second mask for an image,
    are recorded as errors; images left without a mask are the caller's business (they may
    be normal). ``expected`` describes the mask naming for the error message.
    """
    by_stem = {}
    for image in images:
        if image.stem in by_stem:
            findings.error("images sharing one name (which one does the mask belong to?)",
                           [relative(image, findings.root)])
        by_stem[image.stem] = image
    pairs, orphans = {}, []
    for mask in masks:
        keys = [key for key in mask_key_candidates(mask.stem) if key in by_stem]
        image = by_stem[keys[0]] if keys else None
        if image is None:
            orphans.append(relative(mask, findings.root))
        elif image in pairs:
            findings.error("images with two masks", [relative(mask, findings.root)])
        else:
            pairs[image] = mask
    findings.error(f"masks without an image (expected {expected})", orphans)
    return pairs


def require_directory(root: Path, title: str, layout: str) -> Path:
    """Return ``root`` as a Path, or raise a DataError saying what folder was expected."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise DataError(f"{title}: root {root} {what}; expected the dataset folder holding "
                        f"{layout}. Pass --root with the folder the archive was extracted to.")
    return root
