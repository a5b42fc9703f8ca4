"""Synthetic anomaly datasets in the MVTec AD layout, so the pipeline runs with no download.

Two disjoint sets of classes, registered as ``synthetic-a`` (textures ``weave``, ``grain``;
objects ``disc``, ``plate``) and ``synthetic-b`` (textures ``mesh``, ``marble``; objects
``ring``, ``tablet``), exercise the cross-dataset protocol: train on one, evaluate on the
other. Each class has normal test images and anomalous ones with scratches, holes and stains
(textures) or scratches, stains and missing parts (objects), painted in a colour that
contrasts with the surface; each mask is exactly the set of painted pixels. The output is a
deterministic function of (name, seed, image_size, n_normal, n_anomalous): same bytes for
the same arguments.

Usage::

    from pmoe.data.synthetic import write_dataset
    write_dataset("synthetic-a", "data/synthetic-a", seed=0)   # 4 classes x (8 + 12) images
    # or: pmoe synthesize synthetic-a --root data/synthetic-a
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pmoe.data.registry import SYNTHETIC, dataset_info
from pmoe.errors import DataError

OBJECTS = ("disc", "plate", "ring", "tablet")
TEXTURE_DEFECTS = ("scratch", "hole", "stain")
OBJECT_DEFECTS = ("scratch", "stain", "missing")
STAIN_COLOURS = {
    "weave": (0.10, 0.35, 0.45), "grain": (0.20, 0.65, 0.70), "disc": (0.70, 0.25, 0.08),
    "plate": (0.85, 0.45, 0.05), "mesh": (0.90, 0.45, 0.05), "marble": (0.45, 0.12, 0.08),
    "ring": (0.10, 0.25, 0.75), "tablet": (0.55, 0.25, 0.10),
}


def smooth_noise(rng, size: int, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise of unit standard deviation, (size, size).

    Wide kernels are applied on a coarser grid that is then upsampled (same look, faster).
    """
    factor = max(1, int(sigma // 2))
    coarse = -(-size // factor) + (factor > 1)
    white = rng.standard_normal((coarse, coarse))
    field = ndimage.gaussian_filter(white, sigma / factor, mode="wrap")
    field = ndimage.zoom(field, factor, order=1)[:size, :size] if factor > 1 else field
    return field / (field.std() + 1e-12)


def _grid(size: int):
    return np.mgrid[0:size, 0:size].astype(np.float64)


def _tint(value: np.ndarray, dark, light) -> np.ndarray:
    """Map a [0,1] field to colours between ``dark`` and ``light``: (H, W, 3)."""
    value = np.clip(value, 0.0, 1.0)[..., None]
    return np.asarray(dark) * (1 - value) + np.asarray(light) * value


def weave(rng, size):
    y, x = _grid(size)
    period = size / rng.uniform(10, 14)
    phase = rng.uniform(0, 2 * np.pi, 2)
    across = np.sin(2 * np.pi * x / period + phase[0])
    along = np.sin(2 * np.pi * y / period + phase[1])
    value = 0.5 + 0.25 * across * along + 0.04 * smooth_noise(rng, size, 1.0)
    return _tint(value, (0.55, 0.45, 0.30), (0.90, 0.82, 0.62)), None


def grain(rng, size):
    y, x = _grid(size)
    centre = rng.uniform(-size, 2 * size, 2)
    radius = np.hypot(x - centre[0], (y - centre[1]) * 0.3)
    radius = radius + 4.0 * smooth_noise(rng, size, size / 16)
    value = 0.5 + 0.5 * np.sin(2 * np.pi * radius / rng.uniform(7, 10) * (size / 128))
    return _tint(value, (0.40, 0.24, 0.12), (0.66, 0.45, 0.26)), None


def mesh(rng, size):
    y, x = _grid(size)
    period = size / rng.uniform(7, 9)
    offset = rng.uniform(0, period, 2)
    lines = (np.mod(x + offset[0], period) < 2) | (np.mod(y + offset[1], period) < 2)
    value = 0.8 - 0.5 * lines + 0.03 * smooth_noise(rng, size, 1.0)
    return _tint(value, (0.20, 0.22, 0.25), (0.80, 0.82, 0.84)), None


def marble(rng, size):
    y, x = _grid(size)
    angle = rng.uniform(0, np.pi)
    along = (x * np.cos(angle) + y * np.sin(angle)) / size
    veins = np.abs(np.sin(2 * np.pi * (3 * along + 0.35 * smooth_noise(rng, size, size / 12))))
    return _tint(0.55 + 0.45 * veins ** 0.3, (0.45, 0.47, 0.50), (0.96, 0.95, 0.93)), None


def _dark_background(rng, size):
    value = 0.5 + 0.15 * smooth_noise(rng, size, size / 10)
    return _tint(value, (0.05, 0.06, 0.07), (0.18, 0.18, 0.20))


def _shaded(shape_mask, rng, size, dark, light):
    """Paint an object mask with a soft diagonal light over a dark noisy background."""
    y, x = _grid(size)
    light_field = 0.55 + 0.35 * (x + y) / (2 * size) + 0.03 * smooth_noise(rng, size, 1.5)
    image = _dark_background(rng, size)
    image[shape_mask] = _tint(light_field, dark, light)[shape_mask]
    return image, shape_mask


def _centre(rng, size):
    return size / 2 + rng.uniform(-0.05, 0.05, 2) * size


def disc(rng, size):
    y, x = _grid(size)
    cx, cy = _centre(rng, size)
    shape = np.hypot(x - cx, y - cy) < size * rng.uniform(0.30, 0.36)
    return _shaded(shape, rng, size, (0.45, 0.46, 0.50), (0.85, 0.86, 0.90))


def plate(rng, size):
    y, x = _grid(size)
    cx, cy = _centre(rng, size)
    half = size * rng.uniform(0.28, 0.33)
    shape = (np.abs(x - cx) < half) & (np.abs(y - cy) < half * 0.75)
    for sx in (-1, 1):
        for sy in (-1, 1):
            shape &= np.hypot(x - cx - sx * half * 0.75, y - cy - sy * half * 0.5) > size * 0.035
    return _shaded(shape, rng, size, (0.30, 0.38, 0.48), (0.62, 0.70, 0.80))


def ring(rng, size):
    y, x = _grid(size)
    cx, cy = _centre(rng, size)
    distance = np.hypot(x - cx, y - cy)
    outer = size * rng.uniform(0.33, 0.38)
    shape = (distance < outer) & (distance > outer * 0.55)
    return _shaded(shape, rng, size, (0.55, 0.42, 0.10), (0.95, 0.80, 0.35))


def tablet(rng, size):
    y, x = _grid(size)
    cx, cy = _centre(rng, size)
    rx, ry = size * rng.uniform(0.33, 0.37), size * rng.uniform(0.20, 0.24)
    shape = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
    image, shape = _shaded(shape, rng, size, (0.78, 0.78, 0.74), (0.98, 0.98, 0.95))
    score_line = shape & (np.abs(x - cx) < max(1, size // 100))
    image[score_line] *= 0.8
    return image, shape


SURFACES = {"weave": weave, "grain": grain, "mesh": mesh, "marble": marble,
            "disc": disc, "plate": plate, "ring": ring, "tablet": tablet}


def _stroke_mask(size: int, draw) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _scratch_region(rng, size):
    points = [tuple(rng.uniform(0.2, 0.8, 2) * size)]
    for _ in range(rng.integers(2, 4)):
        step = rng.uniform(0.1, 0.25, 2) * size * rng.choice([-1, 1], 2)
        points.append(tuple(np.clip(np.asarray(points[-1]) + step, 2, size - 3)))
    width = max(2, size // 64)
    return _stroke_mask(size, lambda draw: draw.line(points, fill=255, width=width))


def _hole_region(rng, size):
    centre = rng.uniform(0.25, 0.75, 2) * size
    radii = rng.uniform(0.04, 0.09, 2) * size
    box = [centre[0] - radii[0], centre[1] - radii[1], centre[0] + radii[0], centre[1] + radii[1]]
    return _stroke_mask(size, lambda draw: draw.ellipse(box, fill=255))


def _stain_region(rng, size):
    y, x = _grid(size)
    centre = rng.uniform(0.3, 0.7, 2) * size
    radius = rng.uniform(0.08, 0.15) * size
    blob = np.hypot(x - centre[0], y - centre[1]) / radius
    blob = blob + 0.35 * smooth_noise(rng, size, size / 24)
    return blob < 1.0


def _contrast_colour(image, region):
    """Near-black on a light surface, near-white on a dark one."""
    local = image[region].mean() if region.any() else image.mean()
    return (0.04, 0.04, 0.06) if local > 0.45 else (0.97, 0.97, 0.92)


def _paint(image, region, colour, rng):
    """Paint ``colour`` (with a little noise) on ``region``; return the image."""
    painted = image.copy()
    noise = 0.03 * rng.standard_normal((int(region.sum()), 1))
    painted[region] = np.clip(np.asarray(colour) + noise, 0, 1)
    return painted


def _missing_part(rng, size, image, shape):
    """Replace a bite at the object's edge by background; the mask is the removed object part."""
    y, x = _grid(size)
    ys, xs = np.nonzero(shape & ~ndimage.binary_erosion(shape))
    edge = rng.integers(len(ys))
    radius = rng.uniform(0.10, 0.16) * size
    region = shape & (np.hypot(x - xs[edge], y - ys[edge]) < radius)
    painted = image.copy()
    painted[region] = _dark_background(rng, size)[region]
    return painted, region


REGIONS = {"scratch": _scratch_region, "hole": _hole_region, "stain": _stain_region}


def _defect(rng, size, image, shape, kind, cls):
    """(image with defect, exact mask) for defect ``kind``; objects keep defects on the object."""
    if kind == "missing":
        return _missing_part(rng, size, image, shape)
    region = REGIONS[kind](rng, size)
    if shape is not None:
        region &= shape
    colour = STAIN_COLOURS[cls] if kind == "stain" else _contrast_colour(image, region)
    return _paint(image, region, colour, rng), region


def render(cls: str, size: int, rng, kind: str = "good"):
    """One image of class ``cls`` as uint8 (H, W, 3) and its boolean mask (all False if good)."""
    image, shape = SURFACES[cls](rng, size)
    mask = np.zeros((size, size), dtype=bool)
    if kind != "good":
        minimum = max(12, size * size // 500)
        for _ in range(50):
            candidate, mask = _defect(rng, size, image, shape, kind, cls)
            if mask.sum() >= minimum:
                image = candidate
                break
        else:
            raise RuntimeError(f"could not place a {kind} defect on {cls} at size {size}")
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), mask


def defect_kinds(cls: str) -> tuple:
    """The defect types of a synthetic class (objects lose parts; textures get holes)."""
    return OBJECT_DEFECTS if cls in OBJECTS else TEXTURE_DEFECTS


def _rng(seed: int, cls: str, kind: str, index: int):
    words = [int(seed), zlib.crc32(cls.encode()), zlib.crc32(kind.encode()), int(index)]
    return np.random.default_rng(np.random.SeedSequence(words))


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _write_class(folder: Path, cls: str, seed: int, size: int, n_normal: int,
                 n_anomalous: int) -> None:
    """Normal images, then anomalous ones cycling through the class's defect types."""
    for index in range(n_normal):
        image, _ = render(cls, size, _rng(seed, cls, "good", index))
        _save_png(image, folder / "test" / "good" / f"{index:03d}.png")
    kinds = defect_kinds(cls)
    for index in range(n_anomalous):
        kind = kinds[index % len(kinds)]
        number = index // len(kinds)
        image, mask = render(cls, size, _rng(seed, cls, kind, number), kind)
        _save_png(image, folder / "test" / kind / f"{number:03d}.png")
        mask_path = folder / "ground_truth" / kind / f"{number:03d}_mask.png"
        _save_png(mask.astype(np.uint8) * 255, mask_path)


def write_dataset(name: str, root, seed: int = 0, image_size: int = 128, n_normal: int = 8,
                  n_anomalous: int = 12, overwrite: bool = False) -> Path:
    """Write synthetic dataset ``name`` (``synthetic-a`` or ``synthetic-b``) under ``root``.

    Each of the four classes gets ``n_normal`` normal and ``n_anomalous`` anomalous test
    images of ``image_size`` pixels (defect types in turn). Each class is written to a hidden
    partial folder and renamed into place, so an interrupted run leaves no half class.
    An existing class folder is an error unless ``overwrite``. Returns ``root``.
    """
    info = dataset_info(name)
    if info.name not in SYNTHETIC:
        raise DataError(f"{name!r} is not a synthetic dataset; choose {' or '.join(SYNTHETIC)}")
    if image_size < 32 or n_normal < 0 or n_anomalous < 0:
        raise DataError("image_size must be at least 32 and the image counts non-negative")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    existing = [cls for cls in info.classes if (root / cls).exists()]
    if existing and not overwrite:
        raise DataError(f"{root} already holds {', '.join(existing)}; choose another --root or "
                        "pass overwrite=True (--overwrite) to replace them")
    for cls in info.classes:
        partial = root / f".{cls}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            _write_class(partial, cls, seed, image_size, n_normal, n_anomalous)
            if (root / cls).exists():
                shutil.rmtree(root / cls)
            partial.rename(root / cls)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return root
