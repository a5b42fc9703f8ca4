"""Synthetic anomaly datasets: layout, determinism, exact and visible defects, disjoint sets."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pmoe.data import build_manifest, dataset_info, validate_manifest
from pmoe.data.synthetic import defect_kinds, render, write_dataset
from pmoe.errors import DataError

SMALL = dict(image_size=64, n_normal=2, n_anomalous=3)


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_written_dataset_has_the_mvtec_layout_and_counts(tmp_path):
    root = write_dataset("synthetic-a", tmp_path / "a", seed=3, **SMALL)
    frame = build_manifest("synthetic-a", root)
    classes = dataset_info("synthetic-a").classes
    assert frame["cls"].drop_duplicates().tolist() == list(classes)
    counts = frame.groupby("cls")["label"].agg(["count", "sum"])
    assert (counts["count"] == 5).all() and (counts["sum"] == 3).all()
    assert set(frame.loc[frame["cls"] == "disc", "defect"]) == {"good", "scratch", "stain", "missing"}
    assert set(frame.loc[frame["cls"] == "weave", "defect"]) == {"good", "scratch", "hole", "stain"}
    report = validate_manifest("synthetic-a", frame)
    assert report.ok and "no reference (synthetic" in report.text()
    image = Image.open(root / frame["image"].iloc[0])
    assert image.size == (64, 64) and image.mode == "RGB"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = tree_bytes(write_dataset("synthetic-b", tmp_path / "one", seed=7, **SMALL))
    second = tree_bytes(write_dataset("synthetic-b", tmp_path / "two", seed=7, **SMALL))
    third = tree_bytes(write_dataset("synthetic-b", tmp_path / "three", seed=8, **SMALL))
    assert first == second
    assert first.keys() == third.keys() and first != third


def test_sets_are_disjoint_for_the_cross_dataset_protocol(tmp_path):
    a = build_manifest("synthetic-a", write_dataset("synthetic-a", tmp_path / "a", **SMALL))
    b = build_manifest("synthetic-b", write_dataset("synthetic-b", tmp_path / "b", **SMALL))
    assert not set(a["cls"]) & set(b["cls"])


@pytest.mark.parametrize("cls", ["weave", "grain", "disc", "plate", "mesh", "marble", "ring", "tablet"])
def test_defects_are_exactly_masked_and_contrast_with_the_surface(cls):
    for number, kind in enumerate(defect_kinds(cls)):
        image, mask = render(cls, 96, np.random.default_rng(number), kind)
        assert mask.sum() >= 18, (cls, kind)
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
        inside = image[mask].astype(float).mean(axis=0)
        outside = image[ring].astype(float).mean(axis=0)
        assert np.abs(inside - outside).max() > 40, (cls, kind, inside, outside)
        clean, empty = render(cls, 96, np.random.default_rng(number))  # same surface, no defect
        assert not empty.any() and clean.shape == (96, 96, 3)
        changed = (image != clean).any(axis=2)
        assert not (changed & ~mask).any(), "pixels outside the mask were changed"
        assert changed.sum() >= 0.95 * mask.sum(), "the mask claims pixels that were not painted"


def test_refuses_to_overwrite_unless_asked(tmp_path):
    write_dataset("synthetic-a", tmp_path, **SMALL)
    with pytest.raises(DataError, match="already holds weave.*overwrite"):
        write_dataset("synthetic-a", tmp_path, **SMALL)
    write_dataset("synthetic-a", tmp_path, overwrite=True, image_size=64, n_normal=1, n_anomalous=0)
    assert len(list((tmp_path / "weave" / "test").rglob("*.png"))) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(DataError, match="not a synthetic dataset"):
        write_dataset("mvtec", tmp_path / "x")
