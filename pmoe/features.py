"""Frozen-feature cache: the CLIP image encoder runs once per image, every epoch reuses it.

The image encoder is frozen and there is no augmentation, so its outputs (the tap features
and the global token, :class:`pmoe.backbone.VisualFeatures`) depend only on the image and on
the encoder's settings. They are stored as fp16 ``.npy`` files, one per image, under::

    CACHE_DIR/<feature_key>/<ab>/<address>.npy     rows: L*HW patch tokens, then the CLS token
    CACHE_DIR/<feature_key>/key.json               what the key is made of

``feature_key`` hashes everything that determines the features (architecture, weights
identity, image size, layers, V-V attention, position-grid resizing, precision and the cache
format); ``address`` hashes the image file's bytes and its crop, so a renamed or moved file
is still found and an edited one is recomputed. Files are written atomically and read back
memory-mapped.

Usage::

    from pmoe.features import FeatureCache, visual_features
    cached = FeatureCache("~/.cache/pmoe/features", config).features(model, dataset, 16, device)
    loader = torch.utils.data.DataLoader(cached, batch_size=16)
    for batch in loader:
        outputs = model.forward_features(visual_features(model, batch, device))

With ``cache_dir=None`` the same calls compute the features on the fly: ``features`` returns
the image dataset itself and ``visual_features`` runs the encoder on ``batch["image"]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pmoe.backbone import VisualFeatures, looks_like_path
from pmoe.errors import DataError
from pmoe.io import atomic_path, write_text
from pmoe.runtime import autocast, barrier

FORMAT_VERSION = 2  # 2: images resized in their own mode before the RGB conversion
KEY_FIELDS = ("clip_model", "quick_gelu", "image_size", "layers", "vv_attention", "vv_start", "pos_embed_interp")
HASH_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """$PMOE_CACHE, else ~/.cache/pmoe/features."""
    return Path(os.environ.get("PMOE_CACHE") or Path.home() / ".cache" / "pmoe" / "features")


def precision(device) -> str:
    """The arithmetic the encoder runs in on ``device`` (bf16 autocast on CUDA, else fp32)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def weights_identity(config) -> dict:
    """What identifies the frozen CLIP weights: a file by path, size and time; random by seed."""
    weights = config.clip_weights
    if weights == "random":
        return {"weights": "random", "seed": config.seed}
    if looks_like_path(weights):
        path = Path(weights).expanduser().resolve()
        stat = path.stat() if path.is_file() else None
        return {"weights": str(path), "size": stat and stat.st_size, "mtime_ns": stat and stat.st_mtime_ns}
    return {"weights": weights}


def key_fields(config, device="cpu") -> dict:
    """Everything the frozen features depend on, as a JSON-able dict."""
    fields = {name: getattr(config, name) for name in KEY_FIELDS}
    fields["layers"] = list(fields["layers"])
    return {"format": FORMAT_VERSION, **fields, **weights_identity(config), "precision": precision(device)}


def feature_key(config, device="cpu") -> str:
    """Hex digest naming the cache folder of ``config``'s encoder run on ``device``."""
    text = json.dumps(key_fields(config, device), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:24]


def file_digest(path) -> bytes:
    """SHA-1 of a file's bytes, read in chunks."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.digest()


class CachedFeatures(torch.utils.data.Dataset):
    """The items of an AnomalyDataset with the image replaced by its cached features.

    Each item: ``patch_tokens`` (L, HW, Dx) and ``cls_token`` (Dx,) fp16 tensors, and the
    dataset item's ``mask``, ``label``, ``cls``, ``path``, ``crop``.
    """

    def __init__(self, dataset, files, num_layers: int):
        self.dataset = dataset
        self.files = list(files)
        self.num_layers = num_layers

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> np.ndarray:
        return self.dataset.labels

    def __getitem__(self, index: int) -> dict:
        rows = read_entry(self.files[index])
        patches = torch.from_numpy(np.array(rows[:-1])).view(self.num_layers, -1, rows.shape[1])
        item = {"patch_tokens": patches, "cls_token": torch.from_numpy(np.array(rows[-1]))}
        item.update(self.dataset.fields(index))
        return item


def read_entry(path: Path) -> np.ndarray:
    """The memory-mapped rows of one cache entry; an unreadable entry names the fix."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise DataError(f"feature cache entry {path} is unreadable ({error}); delete it (or the whole "
                        "cache folder) and it is recomputed on the next run") from error


def visual_features(model, batch: dict, device) -> VisualFeatures:
    """The encoder outputs of a collated batch: from the cache, or computed from its images."""
    if "patch_tokens" in batch:
        return VisualFeatures(batch["patch_tokens"].to(device), batch["cls_token"].to(device))
    with autocast(torch.device(device)):
        return model.encode_image(batch["image"].to(device))


class FeatureCache:
    """Cached frozen features of ``config``'s encoder under ``cache_dir`` (``None``: no cache)."""

    def __init__(self, cache_dir, config):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.config = config

    def folder(self, device="cpu") -> Path:
        return self.cache_dir / feature_key(self.config, device)

    def features(self, model, dataset, batch_size: int = 16, device="cpu", progress: bool = True,
                 num_workers: int = 0):
        """A dataset aligned with ``dataset`` whose items carry the frozen features.

        Missing entries are computed first (split across processes under torchrun). Without a
        cache folder, ``dataset`` itself is returned and features are computed per batch.
        """
        if self.cache_dir is None:
            return dataset
        if dataset.image_size != self.config.image_size:
            raise DataError(f"the dataset is preprocessed at {dataset.image_size} px but the model "
                            f"takes {self.config.image_size} px; build it with image_size={self.config.image_size}")
        folder = self.folder(device)
        write_text(folder / "key.json", json.dumps(key_fields(self.config, device), indent=2) + "\n")
        files = [self._entry_path(folder, dataset, i) for i in tqdm(
            range(len(dataset)), desc="hashing images", disable=not progress, leave=False)]
        missing = sorted({file: i for i, file in enumerate(files) if not file.is_file()}.items())
        if missing:
            self._compute(model, dataset, missing, batch_size, device, progress, num_workers)
        barrier()
        return CachedFeatures(dataset, files, self.config.num_layers)

    @staticmethod
    def _entry_path(folder: Path, dataset, index: int) -> Path:
        image_path, _, _, _, crop = dataset.records[index]
        address = hashlib.sha1(file_digest(dataset.root / image_path) + crop.encode()).hexdigest()
        return folder / address[:2] / f"{address}.npy"

    def _compute(self, model, dataset, missing, batch_size, device, progress, num_workers):
        """Encode the images of the ``(file, index)`` pairs in ``missing`` and store them."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        share = missing[rank::world]
        subset = torch.utils.data.Subset(dataset, [index for _, index in share])
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
        files = iter(file for file, _ in share)
        bar = tqdm(total=len(missing), desc="caching features", disable=not progress or rank != 0)
        for batch in loader:
            features = visual_features(model, {"image": batch["image"]}, device)
            rows = torch.cat([features.patch_tokens.flatten(1, 2), features.cls_token[:, None]], dim=1)
            for entry in rows.to(torch.float16).cpu().numpy():
                store_entry(next(files), entry)
            bar.update(len(rows) * world)
        bar.close()


def store_entry(path: Path, rows: np.ndarray) -> None:
    """Write one entry atomically (a crash never leaves a truncated .npy)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, rows)
