"""Model inputs preprocessed as the protocol does (spec section 6), and the test dataset.

Images: cropped if the manifest says so, bicubic resize to S x S (aspect not kept) in the
image's own mode, then 8-bit RGB (:mod:`pmoe.data.images`), CLIP mean/std normalisation.
Masks: decoded to a boolean channel under a mask rule (:mod:`pmoe.data.images`; a model's
data uses ``model.config.mask_rule``), cropped like their image, bilinear resize to S x S,
then ``> 0.5``.

Usage::

    from pmoe.data import AnomalyDataset, build_manifest
    dataset = AnomalyDataset(build_manifest("mvtec", "/data/mvtec"), "/data/mvtec")
    item = dataset[0]          # {"image": (3,518,518), "mask": (1,518,518), "label", ...}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pmoe.data.images import check_mask_rule, crop_box, mask_array, open_image, resize, to_rgb
from pmoe.data.manifest import read_manifest
from pmoe.errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _cropped(image: Image.Image, crop: str) -> Image.Image:
    return image.crop(crop_box(image.size, crop)) if crop else image


def image_tensor(image: Image.Image, image_size: int, crop: str = "") -> torch.Tensor:
    """(3, S, S) float32 CLIP-normalised tensor of a decoded image (resized, then RGB)."""
    rgb = to_rgb(resize(_cropped(image, crop), image_size))
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def mask_tensor(image: Image.Image, image_size: int, crop: str = "",
                mask_rule: str = "nonzero") -> torch.Tensor:
    """(1, S, S) float32 {0,1} tensor of a decoded mask (bilinear resize, then > 0.5)."""
    binary = Image.fromarray(mask_array(image, mask_rule).astype(np.uint8) * 255)
    resized = _cropped(binary, crop).resize((image_size, image_size), Image.BILINEAR)
    values = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy((values > 0.5).astype(np.float32))[None]


def load_image(path, image_size: int = 518, crop: str = "") -> torch.Tensor:
    """Read any image file and preprocess it as the protocol does: (3, S, S) float32."""
    return image_tensor(open_image(path), image_size, crop)


def load_mask(path, image_size: int = 518, crop: str = "", image_shape=None,
              allow_mask_resize: bool = False, mask_rule: str = "nonzero") -> torch.Tensor:
    """Read a mask file: (1, S, S) float32 in {0,1}, binarised by ``mask_rule``.

    With ``image_shape`` (w, h) the mask must have the image's size, unless
    ``allow_mask_resize`` is true.
    """
    mask = open_image(path)
    if image_shape is not None and tuple(mask.size) != tuple(image_shape) and not allow_mask_resize:
        raise DataError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is "
                        f"{image_shape[0]}x{image_shape[1]}; fix the pair, or pass "
                        "allow_mask_resize=True to resize masks to their image")
    return mask_tensor(mask, image_size, crop, mask_rule)


class AnomalyDataset(torch.utils.data.Dataset):
    """Test samples of one manifest, preprocessed for the model.

    Each item is a dict: ``image`` (3,S,S) float32 CLIP-normalised, ``mask`` (1,S,S) float32
    in {0,1} (all zeros for a sample without a mask; absent when ``return_mask=False``, which
    skips reading masks), ``label`` int, ``cls`` str, ``path`` str (the manifest's relative
    image path) and ``crop`` str (usually empty; a sample is identified by path and crop).
    Masks are binarised by ``mask_rule`` (pass a model's ``config.mask_rule``).
    """

    def __init__(self, manifest, root, image_size: int = 518, return_mask: bool = True,
                 allow_mask_resize: bool = False, mask_rule: str = "nonzero"):
        check_mask_rule(mask_rule)
        frame = read_manifest(manifest)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"dataset root {self.root} is not a folder; pass the folder the "
                            "manifest's relative paths start from")
        self.image_size = int(image_size)
        self.return_mask = return_mask
        self.allow_mask_resize = allow_mask_resize
        self.mask_rule = mask_rule
        self.records = list(zip(frame["image"], frame["mask"], frame["cls"],
                                frame["label"].astype(int), frame["crop"]))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        """The 0/1 labels of all samples, in order."""
        return np.array([record[3] for record in self.records], dtype=np.int64)

    def __getitem__(self, index: int) -> dict:
        image = open_image(self.root / self.records[index][0])
        item = self.fields(index, image.size)
        item["image"] = image_tensor(image, self.image_size, self.records[index][4])
        return item

    def image(self, index: int) -> torch.Tensor:
        """The preprocessed image of item ``index`` (3, S, S), without reading its mask."""
        image_path, _, _, _, crop = self.records[index]
        return image_tensor(open_image(self.root / image_path), self.image_size, crop)

    def fields(self, index: int, image_shape=None) -> dict:
        """Item ``index`` without its image: label, cls, path, crop and (with ``return_mask``) mask.

        ``image_shape`` (w, h) is the image's size for the mask check; when not given only the
        image file's header is read, never its pixels (the feature cache uses this).
        """
        image_path, mask_path, cls, label, crop = self.records[index]
        item = {"label": int(label), "cls": cls, "path": image_path, "crop": crop}
        if self.return_mask:
            if image_shape is None and mask_path:
                with Image.open(self.root / image_path) as header:
                    image_shape = header.size
            item["mask"] = self._mask(mask_path, image_shape, crop)
        return item

    def _mask(self, mask_path: str, image_shape, crop: str) -> torch.Tensor:
        if not mask_path:
            return torch.zeros(1, self.image_size, self.image_size)
        return load_mask(self.root / mask_path, self.image_size, crop, image_shape,
                         self.allow_mask_resize, self.mask_rule)
