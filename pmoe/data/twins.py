"""Tiny "twins" of the fifteen datasets' distributed layouts, for tests.

``write_twin(name, root)`` writes a few small images in exactly the folder layout, naming
and file formats the dataset is distributed with, including its awkward details: upper-case
extensions (DAGM ``.PNG``, VisA ``.JPG``), ``Thumbs.db``, ``Labels.txt``, the VisA split CSV
with train rows and masks of value 1, BTAD's mixed ``.bmp``/``.png``, raw KolektorSDD
``kosNN/PartN_label.bmp``, HeadCT's nested ``head_ct/head_ct`` and ``id, hemorrhage`` header,
BrainMRI names with spaces and its duplicated folders, Br35H's unlabelled ``pred/``,
ClinicDB's ``.tif`` layout, Kvasir's JPEG masks. It returns a :class:`Twin` with the counts a
correct builder must find and the warnings it must give.

Usage::

    from pmoe.data.twins import write_twin
    twin = write_twin("dagm", tmp_path / "dagm")
    frame = build_manifest("dagm", twin.root)    # twin.normal, twin.anomalous rows
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pmoe.data.registry import DATASETS, VISA_CLASSES

SIZE = 12


@dataclass(frozen=True)
class Twin:
    """A written twin: where it is and what a builder must report for it."""

    name: str
    root: Path
    normal: int
    anomalous: int
    warnings: tuple = ()


def _pixels(seed: int, size, channels: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((channels,) if channels > 1 else ())
    return rng.integers(40, 216, shape, dtype=np.uint8)


def _save(image: Image.Image, path: Path) -> Path:
    """Save in the format the extension names, whatever its case (``.PNG``, ``.JPG``, ``.tif``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=Image.registered_extensions()[path.suffix.lower()])
    return path


def write_image(path: Path, seed: int = 0, size=(SIZE, SIZE), mode: str = "RGB") -> Path:
    """A small noise image at ``path``."""
    pixels = _pixels(seed, size, 3 if mode == "RGB" else 1)
    return _save(Image.fromarray(pixels).convert(mode), path)


def write_mask(path: Path, rows=(2, 6), value: int = 255, size=(SIZE, SIZE),
               mode: str = "L") -> Path:
    """A mask with ``value`` on rows ``rows`` (top, bottom) and columns 3-8, 0 elsewhere."""
    values = np.zeros((size[1], size[0]), dtype=np.uint8)
    values[rows[0]:rows[1], 3:9] = value
    return _save(Image.fromarray(values).convert(mode), path)


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _mvtec_tree(root: Path, classes, normal="good", defects=("crack", "scratch"), image_ext=".png",
                mask_name="{stem}_mask.png", folder=str) -> tuple:
    """Per class: 2 normal images, one per defect with its mask, one train image; the counts."""
    for index, cls in enumerate(classes):
        base = root / folder(cls)
        write_image(base / "train" / normal / f"000{image_ext}", seed=index)
        for number in range(2):
            write_image(base / "test" / normal / f"{number:03d}{image_ext}", seed=100 + number)
        for defect in defects:
            write_image(base / "test" / defect / f"000{image_ext}", seed=200 + index)
            write_mask(base / "ground_truth" / defect / mask_name.format(stem="000"))
    return 2 * len(classes), len(defects) * len(classes)


def _mvtec(root: Path, info) -> Twin:
    normal, anomalous = _mvtec_tree(root, info.classes)
    _touch(root / "license.txt", "CC BY-NC-SA 4.0")
    _touch(root / info.classes[0] / "test" / "good" / "Thumbs.db", "junk")
    return Twin(info.name, root, normal, anomalous)


def _btad(root: Path, info) -> Twin:
    formats = {"01": (".bmp", "{stem}.png"), "02": (".png", "{stem}.png"),
               "03": (".bmp", "{stem}.bmp")}
    counts = [_mvtec_tree(root, [cls], normal="ok", defects=("ko",), image_ext=image_ext,
                          mask_name=mask) for cls, (image_ext, mask) in formats.items()]
    return Twin(info.name, root, sum(c[0] for c in counts), sum(c[1] for c in counts))


def _visa(root: Path, info) -> Twin:
    lines = ["object,split,label,image,mask"]
    for index, cls in enumerate(VISA_CLASSES):
        train = f"{cls}/Data/Images/Normal/0000.JPG"
        normal = f"{cls}/Data/Images/Normal/0001.JPG"
        anomaly, mask = f"{cls}/Data/Images/Anomaly/000.JPG", f"{cls}/Data/Masks/Anomaly/000.png"
        for path in (train, normal, anomaly):
            write_image(root / path, seed=index)
        write_mask(root / mask, value=1)
        _touch(root / cls / "image_anno.csv", "image,label,mask\n")
        lines += [f"{cls},train,normal,{train},", f"{cls},test,normal,{normal},",
                  f"{cls},test,anomaly,{anomaly},{mask}"]
    _touch(root / "split_csv" / "1cls.csv", "\n".join(lines) + "\n")
    return Twin(info.name, root, len(VISA_CLASSES), len(VISA_CLASSES))


def _sdd(root: Path, info) -> Twin:
    """Raw KolektorSDD: 3 folders x 3 parts of 12x30 px, cut by the builder into thirds."""
    size = (SIZE, 30)
    defects = {("kos01", 1): (2, 8), ("kos02", 0): (8, 14)}  # band 0 only; bands 0 and 1
    for folder in ("kos01", "kos02", "kos03"):
        for part in range(3):
            write_image(root / folder / f"Part{part}.jpg", seed=part, size=size, mode="L")
            rows = defects.get((folder, part), (0, 0))
            write_mask(root / folder / f"Part{part}_label.bmp", rows=rows, size=size)
    _touch(root / "kos03" / "Thumbs.db", "junk")
    return Twin(info.name, root, 27 - 3, 3, warnings=("NOT comparable with Table 1",))


def _sdd_converted(root: Path, info) -> Twin:
    normal, anomalous = _mvtec_tree(root, info.classes, defects=("bad",),
                                    folder=lambda cls: cls.replace("_", " "))
    return Twin(info.name, root, normal, anomalous)


def _dagm(root: Path, info) -> Twin:
    for index, cls in enumerate(info.classes):
        test = root / cls / "Test"
        write_image(root / cls / "Train" / "0001.PNG", seed=index, mode="L")
        write_image(test / "0001.PNG", seed=index, mode="L")
        write_image(test / "0002.PNG", seed=index + 50, mode="L")
        write_mask(test / "Label" / "0002_label.PNG")
        _touch(test / "Label" / "Labels.txt",
               "1\n0001\t0\t0001.PNG\t0\t0\t\n0002\t1\t0002.PNG\t0\t0002_label.PNG\n")
    _touch(root / "Class1" / "Test" / "Thumbs.db", "junk")
    return Twin(info.name, root, len(info.classes), len(info.classes))


def _headct(root: Path, info) -> Twin:
    labels = [0, 0, 1, 1, 1]
    for index in range(len(labels)):
        write_image(root / "head_ct" / "head_ct" / f"{index:03d}.png", seed=index, mode="L")
    rows = "".join(f"{index}, {flag}\n" for index, flag in enumerate(labels))
    _touch(root / "labels.csv", "id, hemorrhage\n" + rows)
    return Twin(info.name, root, 2, 3)


def _brainmri(root: Path, info) -> Twin:
    names = {"no": ["1 no.jpeg", "No12.jpg", "N1.JPG"],
             "yes": ["Y1.jpg", "Y 2.png", "y3.JPG", "Y4.jpg"]}
    for base in (root / "brain_tumor_dataset", root):
        for folder, files in names.items():
            for index, name in enumerate(files):
                write_image(base / folder / name, seed=index, mode="L" if index % 2 else "RGB")
    return Twin(info.name, root, 3, 4, warnings=("ignored duplicate copies",))


def _br35h(root: Path, info) -> Twin:
    for index in range(2):
        write_image(root / "no" / f"no{index}.jpg", seed=index)
    for index in range(3):
        write_image(root / "yes" / f"y{index}.jpg", seed=10 + index)
    write_image(root / "pred" / "pred0.jpg", seed=99)
    return Twin(info.name, root, 2, 3)


def _pairs(root: Path, info, image_dir: str, mask_dir: str, image_name: str, mask_name: str,
           stems=("1", "10", "2"), mask_mode: str = "L") -> Twin:
    """Anomalous-only twin: images and masks paired by name (numeric names sort differently)."""
    for index, stem in enumerate(stems):
        write_image(root / image_dir / image_name.format(stem=stem), seed=index)
        write_mask(root / mask_dir / mask_name.format(stem=stem), mode=mask_mode)
    return Twin(info.name, root, 0, len(stems))


def _isic(root: Path, info) -> Twin:
    twin = _pairs(root, info, "ISBI2016_ISIC_Part1_Test_Data",
                  "ISBI2016_ISIC_Part1_Test_GroundTruth", "ISIC_{stem}.jpg",
                  "ISIC_{stem}_Segmentation.png", stems=("0000000", "0000001", "0000003"))
    _touch(root / "ISBI2016_ISIC_Part1_Test_Data" / "ATTRIBUTION.txt", "credits")
    return twin


def _clinicdb(root: Path, info) -> Twin:
    return _pairs(root, info, "Original", "Ground Truth", "{stem}.tif", "{stem}.tif")


def _kvasir(root: Path, info) -> Twin:
    return _pairs(root, info, "images", "masks", "{stem}.jpg", "{stem}.jpg", mask_mode="RGB")


def _polyp(root: Path, info) -> Twin:
    return _pairs(root, info, "images", "masks", "{stem}.png", "{stem}.png")


WRITERS = {
    "mvtec": _mvtec, "mpdd": _mvtec, "dtd": _mvtec, "btad": _btad, "visa": _visa, "sdd": _sdd,
    "dagm": _dagm, "headct": _headct, "brainmri": _brainmri, "br35h": _br35h, "isic": _isic,
    "colondb": _polyp, "clinicdb": _clinicdb, "kvasir": _kvasir, "endo": _polyp,
}
VARIANTS = {("sdd", "converted"): _sdd_converted, ("clinicdb", "images"): _polyp}


def write_twin(name: str, root, variant: str = "") -> Twin:
    """Write the tiny twin of dataset ``name`` under ``root``; ``variant`` selects an alternative
    distributed layout (``sdd``: ``converted``; ``clinicdb``: ``images``)."""
    info = DATASETS[name]
    writer = VARIANTS[(name, variant)] if variant else WRITERS[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return writer(root, info)


ALL_TWINS = [(name, "") for name in WRITERS] + list(VARIANTS)
