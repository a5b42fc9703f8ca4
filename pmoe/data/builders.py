"""One builder per distributed layout (spec section 8), and a quick probe of each layout.

``BUILDERS[name](root, info, findings)`` returns the :class:`~pmoe.data.layout.Sample` rows
of dataset ``name`` read from ``root`` and records in ``findings`` every file it could not
use; ``PROBES[name](root, info)`` says cheaply whether ``root`` has the layout at all.
:func:`pmoe.data.manifest.build_manifest` is the entry point.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from pmoe.data.images import crop_box, mask_array, open_image
from pmoe.data.layout import Findings, Sample, list_images, pair_masks, relative, subdirectories
from pmoe.data.registry import DatasetInfo
from pmoe.errors import DataError

SDD_CROPS = 3
RAW_SDD_WARNING = ("raw KolektorSDD tree: every band of every part is a sample, nearly all of them "
                   "normal, so metrics computed on this manifest are NOT comparable with Table 1 (nor "
                   "its counts with Table 7). Table 1 and Table 7 use the converted MVTec-style SDD "
                   "tree distributed with AnomalyCLIP (electrical commutators/test/{good,<defect>}, "
                   "ground_truth/<defect>): pass that folder as the root")
KOS_PATTERN = re.compile(r"kos\d+", re.IGNORECASE)


def class_dir(root: Path, cls: str) -> Path:
    """The folder of class ``cls`` under ``root`` (``a_b`` may be distributed as ``a b``)."""
    for name in (cls, cls.replace("_", " ")):
        if (root / name).is_dir():
            return root / name
    return root / cls


def _present_classes(root: Path, info: DatasetInfo, findings: Findings, inner: str) -> list:
    """Classes whose folder ``<cls>/<inner>`` exists; the missing ones are warned about."""
    present = [cls for cls in info.classes if (class_dir(root, cls) / inner).is_dir()]
    missing = [cls for cls in info.classes if cls not in present]
    if missing:
        findings.warn(f"{len(missing)} of {len(info.classes)} classes missing (no <cls>/{inner}/ "
                      "folder); the manifest holds the others only", [", ".join(missing)])
    return present


def _anomalous_rows(images, mask_dir: Path, cls: str, defect: str, findings: Findings,
                    expected: str) -> list:
    """Rows of anomalous images whose masks live in ``mask_dir``, paired by name."""
    root = findings.root
    if not mask_dir.is_dir():
        findings.error(f"anomalous images whose mask folder {relative(mask_dir, root)}/ is "
                       f"missing (expected {expected})", [relative(p, root) for p in images])
        return []
    pairs = pair_masks(images, list_images(mask_dir, findings), findings, expected)
    findings.error(f"anomalous images without a mask (expected {expected})",
                   [relative(p, root) for p in images if p not in pairs])
    return [Sample(relative(p, root), relative(pairs[p], root), cls, 1, defect)
            for p in images if p in pairs]


def _mvtec_class(root: Path, cls_dir: Path, cls: str, normal: str, findings: Findings,
                 layout: str) -> list:
    """Rows of one class in the MVTec layout ``test/{normal,<defect>}`` + ``ground_truth``."""
    test, truth = cls_dir / "test", cls_dir / "ground_truth"
    findings.warn(f"ignored images outside a defect folder (expected {layout})",
                  [relative(p, root) for p in list_images(test, findings)])
    rows, defects = [], subdirectories(test)
    for defect_dir in defects:
        images = list_images(defect_dir, findings)
        if defect_dir.name == normal:
            rows += [Sample(relative(p, root), "", cls, 0, "good") for p in images]
        else:
            rows += _anomalous_rows(images, truth / defect_dir.name, cls, defect_dir.name,
                                    findings, layout)
    if truth.is_dir():
        names = {d.name for d in defects}
        for extra in subdirectories(truth):
            if extra.name == normal:
                findings.warn("ignored masks of normal images",
                              [relative(extra, root) + "/"])
            elif extra.name not in names:
                findings.error(f"masks whose defect folder test/{extra.name}/ is missing",
                               [relative(p, root) for p in list_images(extra, findings)])
    if not rows:
        findings.warn("classes with no test image", [relative(test, root) + "/"])
    return rows


def _mvtec_style(root: Path, info: DatasetInfo, findings: Findings, normal: str = "good") -> list:
    """MVTec AD, MPDD, DTD-Synthetic, BTAD (normal folder ``ok``) and the synthetic sets."""
    rows = []
    for cls in _present_classes(root, info, findings, "test"):
        rows += _mvtec_class(root, class_dir(root, cls), cls, normal, findings, info.layout)
    known = {class_dir(root, cls) for cls in info.classes}
    findings.warn(f"ignored folders that are not {info.title} classes",
                  [d.name for d in subdirectories(root)
                   if d not in known and (d / "test").is_dir()])
    return rows


def _btad(root: Path, info: DatasetInfo, findings: Findings) -> list:
    return _mvtec_style(root, info, findings, normal="ok")


def _visa(root: Path, info: DatasetInfo, findings: Findings) -> list:
    """VisA: the test rows of ``split_csv/1cls.csv``; every listed file must exist."""
    split = root / "split_csv" / "1cls.csv"
    table = pd.read_csv(split, dtype=str, keep_default_na=False)
    missing = {"object", "split", "label", "image", "mask"} - set(table.columns)
    if missing:
        raise DataError(f"{split} lacks column(s) {', '.join(sorted(missing))}; expected the "
                        "official VisA split file (object,split,label,image,mask)")
    test = table[table["split"].str.strip() == "test"]
    findings.error("rows of split_csv/1cls.csv with a class that is not a VisA class",
                   sorted(set(test["object"]) - set(info.classes)))
    rows, absent = [], []
    for cls, label, image, mask in zip(test["object"], test["label"], test["image"], test["mask"]):
        anomalous = _visa_label(label, image, findings)
        if anomalous and not mask:
            findings.error("anomalous rows of split_csv/1cls.csv without a mask", [image])
        mask = mask if anomalous else ""
        absent += [path for path in (image, mask) if path and not (root / path).is_file()]
        rows.append(Sample(image, mask, cls, anomalous, "anomaly" if anomalous else "good"))
    findings.error("files listed in split_csv/1cls.csv but missing (expected <cls>/Data/Images/... "
                   "and <cls>/Data/Masks/Anomaly/...)", absent)
    return rows


def _visa_label(label: str, image: str, findings: Findings) -> int:
    value = label.strip().lower()
    if value not in ("normal", "anomaly"):
        findings.error("rows of split_csv/1cls.csv whose label is not 'normal' or 'anomaly'",
                       [image])
    return int(value == "anomaly")


def _sdd(root: Path, info: DatasetInfo, findings: Findings) -> list:
    """SDD: the converted MVTec-style tree if present, else raw KolektorSDD cut into thirds."""
    kos = [d for d in subdirectories(root) if KOS_PATTERN.fullmatch(d.name)]
    if (class_dir(root, info.classes[0]) / "test").is_dir():
        findings.warn("ignored raw KolektorSDD folders (the converted tree is used)",
                      [d.name for d in kos])
        return _mvtec_style(root, info, findings)
    rows = []
    for folder in kos:
        files = list_images(folder, findings)
        labels = [p for p in files if p.stem.endswith("_label")]
        images = [p for p in files if p not in labels]
        expected = "kosNN/PartN_label.bmp beside kosNN/PartN.jpg"
        pairs = pair_masks(images, labels, findings, expected)
        findings.error(f"images without a label file (expected {expected})",
                       [relative(p, root) for p in images if p not in pairs])
        for image in images:
            if image in pairs:
                rows += _sdd_crops(image, pairs[image], info.classes[0], root)
    anomalous = sum(row.label for row in rows)
    findings.warn(RAW_SDD_WARNING, [f"{len(rows) - anomalous} normal and {anomalous} anomalous bands "
                                    f"here; Table 7: {info.normal} and {info.anomalous}"])
    return rows


def _sdd_crops(image: Path, label: Path, cls: str, root: Path) -> list:
    """One row per horizontal third of a KolektorSDD part, anomalous if its label band is not 0."""
    mask = open_image(label)
    anomaly = mask_array(mask)
    rows = []
    for index in range(SDD_CROPS):
        crop = f"{index}/{SDD_CROPS}"
        _, upper, _, lower = crop_box(mask.size, crop)
        anomalous = bool(anomaly[upper:lower].any())
        rows.append(Sample(relative(image, root), relative(label, root) if anomalous else "", cls,
                         anomalous, "defect" if anomalous else "good", crop))
    return rows


def _dagm(root: Path, info: DatasetInfo, findings: Findings) -> list:
    """DAGM (Kaggle upload): ``ClassN/Test`` only; ``Label/`` cross-checked with Labels.txt."""
    rows = []
    for cls in _present_classes(root, info, findings, "Test"):
        test = class_dir(root, cls) / "Test"
        label_dir = test / "Label"
        images = list_images(test, findings)
        if not label_dir.is_dir():
            findings.error("DAGM test folders without Label/ (expected ClassN/Test/Label/ with "
                           "NNNN_label.PNG and Labels.txt)", [relative(test, root) + "/"])
            continue
        expected = "ClassN/Test/Label/NNNN_label.PNG"
        pairs = pair_masks(images, list_images(label_dir, findings), findings, expected)
        _check_dagm_flags(label_dir / "Labels.txt", images, pairs, findings)
        rows += [Sample(relative(p, root), relative(pairs[p], root) if p in pairs else "", cls,
                      int(p in pairs), "defect" if p in pairs else "good") for p in images]
    return rows


def _read_dagm_flags(path: Path, findings: Findings) -> dict:
    """``{image name: defect flag}`` from a DAGM ``Labels.txt`` (first line: a count or ``1``)."""
    flags = {}
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3 or fields[1] not in ("0", "1"):
            findings.error(f"malformed lines of {relative(path, findings.root)} (expected "
                           "'id<TAB>flag<TAB>image<TAB>0<TAB>mask-or-0')",
                           [f"line {number}: {line!r}"])
            continue
        flags[fields[2]] = int(fields[1])
    return flags


def _check_dagm_flags(path: Path, images, pairs: dict, findings: Findings) -> None:
    """Labels.txt and the Label/ folder must agree image by image."""
    root = findings.root
    if not path.is_file():
        findings.warn("DAGM Label/ folders without Labels.txt (labels taken from the mask files "
                      "alone)", [relative(path.parent, root) + "/"])
        return
    flags = _read_dagm_flags(path, findings)
    names = {p.name: p for p in images}
    findings.error("entries of Labels.txt whose image is missing",
                   [f"{relative(path, root)}: {name}" for name in flags if name not in names])
    findings.error("images not listed in their Labels.txt",
                   [relative(p, root) for p in images if p.name not in flags])
    findings.error("images whose Labels.txt defect flag disagrees with the Label/ folder "
                   "(flag 1 needs NNNN_label.PNG, flag 0 must have none)",
                   [relative(p, root) for p in images
                    if p.name in flags and flags[p.name] != (p in pairs)])


def _headct(root: Path, info: DatasetInfo, findings: Findings) -> list:
    """HeadCT: ``labels.csv`` (``id, hemorrhage``) and ``head_ct/NNN.png`` (maybe nested twice)."""
    labels = _headct_labels(root / "labels.csv")
    image_dir = root / "head_ct"
    if (image_dir / "head_ct").is_dir():
        image_dir = image_dir / "head_ct"
    if not image_dir.is_dir():
        raise DataError(f"HeadCT: folder {image_dir} is missing; expected {info.layout}")
    images = {}
    for path in list_images(image_dir, findings):
        if path.stem.isdigit():
            images[int(path.stem)] = path
        else:
            findings.error("images whose name is not a number (expected head_ct/NNN.png)",
                           [relative(path, root)])
    findings.error("ids of labels.csv without an image",
                   [str(i) for i in labels if i not in images])
    findings.error("images without a row in labels.csv",
                   [relative(p, root) for i, p in images.items() if i not in labels])
    return [Sample(relative(images[i], root), "", info.classes[0], label,
                   "anomaly" if label else "good") for i, label in labels.items() if i in images]


def _headct_labels(path: Path) -> dict:
    """``{id: 0/1}`` from HeadCT's ``labels.csv`` (header ``id, hemorrhage``, note the space)."""
    table = pd.read_csv(path, skipinitialspace=True, dtype=str, keep_default_na=False)
    table.columns = [column.strip() for column in table.columns]
    if not {"id", "hemorrhage"} <= set(table.columns):
        raise DataError(f"{path} has columns {list(table.columns)}; expected 'id, hemorrhage'")
    ids, flags = table["id"].str.strip(), table["hemorrhage"].str.strip()
    bad = ~ids.str.fullmatch(r"\d+") | ~flags.isin(["0", "1"])
    if bad.any():
        raise DataError(f"{path}: rows {(table.index[bad] + 2).tolist()[:20]} are not "
                        "'<integer id>, <0 or 1>'; restore the file from the HeadCT archive")
    return {int(i): int(h) for i, h in zip(ids, flags)}


def _labelled_folders(base: Path, info: DatasetInfo, findings: Findings, ignore=()) -> list:
    """Image-level datasets with a ``no/`` (normal) and a ``yes/`` (anomalous) folder."""
    root = findings.root
    folders = {"no": 0, "yes": 1}
    findings.warn("ignored folders (expected no/ and yes/ only)",
                  [relative(d, root) + "/" for d in subdirectories(base)
                   if d.name not in folders and d.name not in ignore])
    rows = []
    for name, label in folders.items():
        if not (base / name).is_dir():
            findings.error(f"missing folders (expected {info.layout})",
                           [relative(base / name, root) + "/"])
            continue
        defect = "anomaly" if label else "good"
        rows += [Sample(relative(p, root), "", info.classes[0], label, defect)
                 for p in list_images(base / name, findings)]
    return rows


def _brainmri(root: Path, info: DatasetInfo, findings: Findings) -> list:
    base = root / "brain_tumor_dataset"
    if not base.is_dir():
        return _labelled_folders(root, info, findings)
    findings.warn("ignored duplicate copies beside brain_tumor_dataset/ (the archive ships them "
                  "twice)", [d.name + "/" for d in subdirectories(root) if d.name in ("no", "yes")])
    return _labelled_folders(base, info, findings)


def _br35h(root: Path, info: DatasetInfo, findings: Findings) -> list:
    return _labelled_folders(root, info, findings, ignore=("pred",))


SEGMENTATION_FOLDERS = {
    "isic": [("ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth")],
    "colondb": [("images", "masks")],
    "clinicdb": [("images", "masks"), ("Original", "Ground Truth")],
    "kvasir": [("images", "masks")],
    "endo": [("images", "masks"), (None, "masks")],
}


def _segmentation_folders(root: Path, name: str):
    """The (image folder, mask folder) present under ``root``; ``None`` names 'the other folder'."""
    for images, masks in SEGMENTATION_FOLDERS[name]:
        if not (root / masks).is_dir():
            continue
        if images is not None and (root / images).is_dir():
            return root / images, root / masks
        others = [d for d in subdirectories(root) if d.name != masks]
        if images is None and len(others) == 1:
            return others[0], root / masks
    return None


def _segmentation(root: Path, info: DatasetInfo, findings: Findings) -> list:
    """Anomalous-only datasets: an image folder and a mask folder paired by name."""
    image_dir, mask_dir = _segmentation_folders(root, info.name)
    images = list_images(image_dir, findings)
    rows = _anomalous_rows(images, mask_dir, info.classes[0], "anomaly", findings, info.layout)
    if not rows and not images:
        findings.error(f"image folders without images (expected {info.layout})",
                       [relative(image_dir, root) + "/"])
    return rows


def _any_class(inner: str):
    return lambda root, info: any((class_dir(root, cls) / inner).is_dir() for cls in info.classes)


BUILDERS = {
    "mvtec": _mvtec_style, "mpdd": _mvtec_style, "dtd": _mvtec_style, "btad": _btad,
    "visa": _visa, "sdd": _sdd, "dagm": _dagm, "headct": _headct, "brainmri": _brainmri,
    "br35h": _br35h, "isic": _segmentation, "colondb": _segmentation,
    "clinicdb": _segmentation, "kvasir": _segmentation, "endo": _segmentation,
    "synthetic-a": _mvtec_style, "synthetic-b": _mvtec_style,
}

PROBES = {
    "mvtec": _any_class("test"), "mpdd": _any_class("test"), "dtd": _any_class("test"),
    "btad": _any_class("test"), "synthetic-a": _any_class("test"),
    "synthetic-b": _any_class("test"),
    "visa": lambda root, info: (root / "split_csv" / "1cls.csv").is_file(),
    "sdd": lambda root, info: _any_class("test")(root, info) or any(
        KOS_PATTERN.fullmatch(d.name) for d in subdirectories(root)),
    "dagm": _any_class("Test"),
    "headct": lambda root, info: (root / "labels.csv").is_file(),
    "brainmri": lambda root, info: (root / "brain_tumor_dataset").is_dir() or _has_no_yes(root),
    "br35h": lambda root, info: _has_no_yes(root),
    **{name: (lambda root, info: _segmentation_folders(root, info.name) is not None)
       for name in SEGMENTATION_FOLDERS},
}


def _has_no_yes(root: Path) -> bool:
    return (root / "no").is_dir() and (root / "yes").is_dir()


