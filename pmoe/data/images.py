"""Decoding images and masks as the protocol does (spec section 6), with PIL and numpy only.

Images are converted to 8-bit RGB: greyscale replicated, alpha dropped, palette expanded,
16-bit (and 32-bit integer) values scaled by 1/257, float values clipped to [0, 255]. Masks
become one boolean channel: the maximum over colour channels, any non-zero pixel anomalous
**[decision: for lossy JPEG masks, such as Kvasir-SEG's, a pixel is anomalous above 127,
since compression noise makes "non-zero" meaningless]**.

A manifest row may carry a ``crop`` ``"i/n"``: the i-th of n equal horizontal bands of the
image, top to bottom (raw KolektorSDD, see ``data_manifests/README.md``).

This module does not import torch, so building manifests stays quick.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pmoe.errors import DataError

INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


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


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16/32-bit integer images are scaled by 1/257, float ones clipped to [0,255]."""
    if image.mode in INT_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def mask_array(image: Image.Image) -> np.ndarray:
    """Boolean anomaly mask (H, W) of a decoded mask image (see the module docstring)."""
    threshold = 127 if image.format == "JPEG" else 0
    if image.mode == "P" or image.mode in ALPHA_MODES:
        image = image.convert("RGB")
    values = np.asarray(image)
    if values.ndim == 3:
        values = values.max(axis=2)
    return values > threshold


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
