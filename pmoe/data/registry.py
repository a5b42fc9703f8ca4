"""The datasets pmoe knows: the paper's fifteen (Table 7) and two synthetic ones.

``DATASETS`` holds exactly the fifteen evaluation datasets of the paper, each with its class
list, its Table 7 test counts (normal, anomalous), the metric kind it supports and its
layout as distributed (spec section 8). ``SYNTHETIC`` holds ``synthetic-a`` and
``synthetic-b``, written by :mod:`pmoe.data.synthetic`; their counts come from the generator
parameters, so they carry ``normal = anomalous = None`` and no Table 7 check applies.
:func:`dataset_info` looks a name up in both.

Usage::

    from pmoe.data import DATASETS, dataset_info
    dataset_info("mvtec").classes      # ('carpet', 'grid', ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pmoe.errors import DataError

MVTEC_LAYOUT = ("<cls>/test/{good,<defect>}/NNN.png with masks "
                "<cls>/ground_truth/<defect>/NNN_mask.png")


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: display title, classes, Table 7 counts, metric kind and layout.

    ``kind`` is ``"image"`` (image metrics only: no masks), ``"pixel"`` (pixel metrics only:
    every test image is anomalous) or ``"both"``. ``normal``/``anomalous`` are the Table 7
    test counts, ``None`` for the synthetic datasets.
    """

    name: str
    title: str
    classes: tuple
    normal: Optional[int]
    anomalous: Optional[int]
    kind: str
    domain: str
    layout: str

    @property
    def has_masks(self) -> bool:
        """Whether anomalous samples come with pixel masks."""
        return self.kind in ("pixel", "both")

    @property
    def synthetic(self) -> bool:
        """Whether the dataset is written by :mod:`pmoe.data.synthetic` (no Table 7 entry)."""
        return self.normal is None


def _info(name, title, classes, counts, kind, domain, layout) -> DatasetInfo:
    normal, anomalous = counts
    return DatasetInfo(name, title, tuple(classes), normal, anomalous, kind, domain, layout)


MVTEC_CLASSES = (
    "carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut",
    "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
)
VISA_CLASSES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
DTD_CLASSES = (
    "Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068",
    "Woven_125", "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069",
)
MPDD_CLASSES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate",
                "tubes")

DATASETS = {info.name: info for info in (
    _info("mvtec", "MVTec AD", MVTEC_CLASSES, (467, 1258), "both", "industrial", MVTEC_LAYOUT),
    _info("visa", "VisA", VISA_CLASSES, (962, 1200), "both", "industrial",
          "split_csv/1cls.csv listing <cls>/Data/Images/{Normal,Anomaly}/*.JPG and "
          "<cls>/Data/Masks/Anomaly/*.png"),
    _info("mpdd", "MPDD", MPDD_CLASSES, (176, 282), "both", "industrial", MVTEC_LAYOUT),
    _info("btad", "BTAD", ("01", "02", "03"), (451, 290), "both", "industrial",
          "{01,02,03}/test/{ok,ko}/* with masks <cls>/ground_truth/ko/*.png"),
    _info("sdd", "SDD", ("electrical_commutators",), (181, 74), "both", "industrial",
          "KolektorSDD kosNN/PartN.jpg + PartN_label.bmp, or the converted tree "
          "'electrical commutators'/test/{good,<defect>} + ground_truth/<defect>"),
    _info("dagm", "DAGM", tuple(f"Class{i}" for i in range(1, 11)), (6996, 1054), "both",
          "industrial", "ClassN/Test/NNNN.PNG with masks ClassN/Test/Label/NNNN_label.PNG "
          "and ClassN/Test/Label/Labels.txt"),
    _info("dtd", "DTD-Synthetic", DTD_CLASSES, (357, 947), "both", "industrial", MVTEC_LAYOUT),
    _info("headct", "HeadCT", ("brain",), (100, 100), "image", "medical",
          "labels.csv (id, hemorrhage) + head_ct/NNN.png"),
    _info("brainmri", "BrainMRI", ("brain",), (98, 155), "image", "medical",
          "brain_tumor_dataset/{no,yes}/*"),
    _info("br35h", "Br35H", ("brain",), (1500, 1500), "image", "medical",
          "{no,yes}/*.jpg (an unlabelled pred/ folder is ignored)"),
    _info("isic", "ISIC", ("skin",), (0, 379), "pixel", "medical",
          "ISBI2016_ISIC_Part1_Test_Data/ISIC_N.jpg with masks "
          "ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_N_Segmentation.png"),
    _info("colondb", "CVC-ColonDB", ("colon",), (0, 380), "pixel", "medical", "images/*, masks/*"),
    _info("clinicdb", "CVC-ClinicDB", ("colon",), (0, 612), "pixel", "medical",
          "images/*, masks/* (or Original/*.tif, 'Ground Truth'/*.tif)"),
    _info("kvasir", "Kvasir", ("colon",), (0, 1000), "pixel", "medical",
          "images/<id>.jpg, masks/<id>.jpg"),
    _info("endo", "Endo", ("colon",), (0, 200), "pixel", "medical", "one image folder + masks/*"),
)}

SYNTHETIC_A_CLASSES = ("weave", "grain", "disc", "plate")
SYNTHETIC_B_CLASSES = ("mesh", "marble", "ring", "tablet")

SYNTHETIC = {info.name: info for info in (
    _info("synthetic-a", "Synthetic A", SYNTHETIC_A_CLASSES, (None, None), "both", "industrial",
          MVTEC_LAYOUT),
    _info("synthetic-b", "Synthetic B", SYNTHETIC_B_CLASSES, (None, None), "both", "industrial",
          MVTEC_LAYOUT),
)}


def dataset_names(include_synthetic: bool = True) -> list:
    """The registered dataset names, paper datasets first (in Table 7 order)."""
    return list(DATASETS) + (list(SYNTHETIC) if include_synthetic else [])


def dataset_info(name: str) -> DatasetInfo:
    """Look a dataset up by name (case-insensitive); an unknown name lists the valid ones."""
    key = str(name).strip().lower()
    info = DATASETS.get(key) or SYNTHETIC.get(key)
    if info is None:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")
    return info
