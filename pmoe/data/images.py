"""Decoding images and masks as the protocol does (spec section 6), with PIL and numpy only.

Images are resized in their own mode, then converted to 8-bit RGB, in the reference's order
(bicubic resize, then ``convert("RGB")``): PIL resizes palette and 1-bit images by nearest
neighbour and RGBA/LA images with premultiplied alpha, and the conversion expands palettes,
replicates greyscale and drops alpha. **[decision]** Where the reference's result is
meaningless we depart from it: 16-bit images are resized as 32-bit integers (PIL's own 16-bit
resampling is off by up to 4% of the range, and swaps the bytes of big-endian ones), PA
images as RGBA (PIL would interpolate palette indices), and 16/32-bit integer values are then
scaled to 8 bit by 1/257 (the reference saturates them at 255); float values are clipped to
[0, 255].

Masks become one boolean channel: 8-bit grey (``convert("L")``), then a rule
(``MASK_RULES``): ``"nonzero"`` (the reference) makes any non-zero pixel anomalous;
**[decision, option]** ``"jpeg_above_127"`` makes pixels of every JPEG mask (Kvasir-SEG's, or
any other) anomalous only above 127, so that the compression noise around a defect is not
counted; other masks keep the reference's rule.

A manifest row may carry a ``crop`` ``"i/n"``: the i-th of n equal horizontal bands of the
image, top to bottom (raw KolektorSDD, see ``data_manifests/README.md``).

This module does not import torch, so building manifests stays quick.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pmoe.config import CHOICES
from pmoe.errors import ConfigError, DataError

MASK_RULES = CHOICES["mask_rule"]
INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
RESIZE_AS = {**{mode: "I" for mode in INT_MODES[1:]}, "PA": "RGBA"}


def open_image(path) -> Image.Image:
    """Open and fully decode an image; a missing or corrupt file raises a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} is missing; rebuild the manifest (pmoe manifest) "
                        "or restore the file from the dataset archive")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path} ({error}); the file is corrupt or truncated: "
                        "re-download it, or remove it and rebuild the manifest") from error
    return image


def resize(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to ``size`` x ``size`` in the image's own mode (see the module docstring)."""
    if image.mode in RESIZE_AS:
        image = image.convert(RESIZE_AS[image.mode])
    return image.resize((size, size), Image.BICUBIC)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16/32-bit integer images are scaled by 1/257, float ones clipped to [0,255]."""
    if image.mode in INT_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def check_mask_rule(rule: str) -> None:
    """Raise a ConfigError unless ``rule`` is one of :data:`MASK_RULES`."""
    if rule not in MASK_RULES:
        raise ConfigError(f"unknown mask rule {rule!r}; use one of {MASK_RULES} "
                          "(config key mask_rule)")


def mask_array(image: Image.Image, rule: str = "nonzero") -> np.ndarray:
    """Boolean anomaly mask (H, W) of a decoded mask image under ``rule`` (module docstring)."""
    check_mask_rule(rule)
    threshold = 127 if rule == "jpeg_above_127" and image.format == "JPEG" else 0
    return np.asarray(image.convert("L")) > threshold


def crop_box(size, crop: str):
    """PIL box (left, upper, right, lower) of band ``"i/n"`` for an image of ``size`` (w, h).

    An empty ``crop`` is the whole image. Band i spans rows ``i*h//n`` to ``(i+1)*h//n``.
    """
    width, height = size
    if not crop:
        return (0, 0, width, height)
    try:
        index, count = (int(part) for part in crop.split("/"))
    except ValueError:
        raise DataError(f"invalid crop {crop!r} in manifest; expected 'i/n' like '0/3'") from None
    if not 0 <= index < count:
        raise DataError(f"invalid crop {crop!r} in manifest; expected 0 <= i < n")
    return (0, index * height // count, width, (index + 1) * height // count)
