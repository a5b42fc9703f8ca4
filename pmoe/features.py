"""Frozen-feature cache: the CLIP image encoder runs once per image, every later read reuses it.

The image encoder is frozen and there is no augmentation, so its outputs (the tap features
and the global token, :class:`pmoe.backbone.VisualFeatures`) depend only on the image and on
the encoder's settings. They are stored as fp16 ``.npy`` files, one per image, under::

    CACHE_DIR/<feature_key>/<ab>/<address>.npy     rows: S*HW patch tokens, then the CLS token
    CACHE_DIR/<feature_key>/key.json               what the key is made of

``feature_key`` hashes everything that determines the features: architecture, weights
(content), image size, V-V attention, position-grid resizing, precision, the cache format and
a fingerprint of the code that computes them (encoder and preprocessing source, open_clip and
torch versions), so a change to any of them is a miss, never a stale hit. ``address`` hashes
the image file's bytes and its crop, so a renamed or moved file is still found and an edited
one is recomputed. Files are written atomically and read back memory-mapped (runs that read them
repeatedly hold them in memory instead, :mod:`pmoe.resident`).

An entry holds the taps of :func:`stored_layers`: the config's layers and the quarter blocks
of the encoder (6, 12, 18, 24 on ViT-L). Every layer set of Table 4 is a subset, so those
variants read their taps from the same entries instead of caching again.

Before writing, the cache estimates the space the missing entries need and refuses to start
when the disk has less free; ``pmoe cache`` lists and clears entries. Under torchrun one
process decides which entries are missing and every process gets the same list.

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

import errno
import functools
import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pmoe.backbone import VisualFeatures, looks_like_path
from pmoe.errors import DataError
from pmoe.io import atomic_path, write_text
from pmoe.runtime import autocast, barrier, data_workers

FORMAT_VERSION = 2  # 2: the taps of stored_layers; the CLS row is the raw final token (before ln_post)
ENCODER_FIELDS = ("clip_model", "quick_gelu", "image_size", "vv_attention", "vv_start", "pos_embed_interp")
FINGERPRINT_MODULES = ("pmoe.backbone", "pmoe.data.images", "pmoe.data.loader", "pmoe.features")
HASH_CHUNK = 1 << 20
NPY_HEADER = 128  # bytes before the data of a 2-D .npy file
KEY_FILE = "key.json"


def default_cache_dir() -> Path:
    """$PMOE_CACHE, else ~/.cache/pmoe/features."""
    return Path(os.environ.get("PMOE_CACHE") or Path.home() / ".cache" / "pmoe" / "features")


def precision(device) -> str:
    """The arithmetic the encoder runs in on ``device`` (bf16 autocast on CUDA, else fp32)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


class Geometry(NamedTuple):
    """The image tower's shape: blocks, token width, patch size."""

    depth: int
    width: int
    patch: int


def encoder_geometry(config) -> Geometry:
    """Depth, width and patch size of ``config.clip_model`` from open_clip's registry."""
    import open_clip

    import pmoe.backbone  # noqa: F401  (registers the pmoe-* test architectures)

    vision = (open_clip.get_model_config(config.clip_model) or {}).get("vision_cfg")
    if not vision:
        raise DataError(f"open_clip has no vision config for {config.clip_model!r}; use a ViT architecture")
    return Geometry(vision["layers"], vision["width"], vision["patch_size"])


def stored_layers(config) -> tuple:
    """The taps a cache entry holds: ``config.layers`` and the encoder's quarter blocks.

    Quarter blocks before the V-V stream starts are left out (they would read another stream).
    """
    depth = encoder_geometry(config).depth
    quarters = {depth * part // 4 for part in range(1, 5)} - {0}
    if config.vv_attention:
        quarters = {block for block in quarters if block >= config.vv_start}
    return tuple(sorted(quarters | set(config.layers)))


@functools.lru_cache(maxsize=None)
def code_fingerprint(modules: tuple) -> str:
    """SHA-1 of the source of ``modules`` (those that compute features) and the library versions."""
    import open_clip

    digest = hashlib.sha1(f"open_clip {open_clip.__version__} torch {torch.__version__}".encode())
    for name in modules:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()


def file_digest(path) -> bytes:
    """SHA-1 of a file's bytes, read in chunks."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.digest()


@functools.lru_cache(maxsize=16)
def _weights_digest(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(path).hex()


def weights_identity(config) -> dict:
    """What identifies the frozen CLIP weights: a file by its content, else the tag (or ``random``)."""
    weights = config.clip_weights
    if looks_like_path(weights):
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            return {"weights": str(path)}
        stat = path.stat()
        return {"weights_sha1": _weights_digest(str(path), stat.st_size, stat.st_mtime_ns)}
    return {"weights": weights}


def key_fields(config, device="cpu") -> dict:
    """Everything the frozen features depend on, as a JSON-able dict."""
    fields = {name: getattr(config, name) for name in ENCODER_FIELDS}
    return {"format": FORMAT_VERSION, **fields, "layers": list(stored_layers(config)),
            **weights_identity(config), "precision": precision(device), "code": code_fingerprint(FINGERPRINT_MODULES)}


def feature_key(config, device="cpu") -> str:
    """Hex digest naming the cache folder of ``config``'s encoder run on ``device``."""
    text = json.dumps(key_fields(config, device), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:24]


def entry_bytes(config) -> int:
    """The size of one cache entry on disk: (S * HW + 1) fp16 rows of the tower's width."""
    geometry = encoder_geometry(config)
    tokens = (config.image_size // geometry.patch) ** 2
    return NPY_HEADER + (len(stored_layers(config)) * tokens + 1) * geometry.width * 2


class CachedFeatures(torch.utils.data.Dataset):
    """The items of an AnomalyDataset with the image replaced by its cached features.

    Each item: ``patch_tokens`` (L, HW, Dx) and ``cls_token`` (Dx,) fp16 tensors, and the
    dataset item's ``mask``, ``label``, ``cls``, ``path``, ``crop``. ``taps`` are the positions
    of the config's layers among the ``stored`` taps of an entry.
    """

    def __init__(self, dataset, files, stored: int, taps):
        self.dataset = dataset
        self.files = list(files)
        self.stored = stored
        self.taps = list(taps)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> np.ndarray:
        return self.dataset.labels

    def with_taps(self, taps) -> "CachedFeatures":
        """The same entries serving other stored taps (e.g. another config's, :func:`tap_positions`)."""
        return CachedFeatures(self.dataset, self.files, self.stored, taps)

    def __getitem__(self, index: int) -> dict:
        rows = read_entry(self.files[index])
        patches = rows[:-1].reshape(self.stored, -1, rows.shape[1])[self.taps]
        item = {"patch_tokens": torch.from_numpy(patches), "cls_token": torch.from_numpy(np.array(rows[-1]))}
        item.update(self.dataset.fields(index))
        return item


def read_entry(path: Path) -> np.ndarray:
    """The memory-mapped rows of one cache entry; an unreadable entry names the fix."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise DataError(f"feature cache entry {path} is unreadable ({error}); delete it (or the whole "
                        "cache folder) and it is recomputed on the next run") from error


def tap_positions(config) -> list:
    """The positions of ``config.layers`` among the taps an entry stores (:func:`stored_layers`)."""
    stored = stored_layers(config)
    return [stored.index(layer) for layer in config.layers]


def visual_features(model, batch: dict, device) -> VisualFeatures:
    """The encoder outputs of a collated batch: from the cache, or computed from its images."""
    if "patch_tokens" in batch:
        return VisualFeatures(batch["patch_tokens"].to(device, non_blocking=True),
                              batch["cls_token"].to(device, non_blocking=True))
    return encode(model, batch["image"], device)


def encode(model, images: torch.Tensor, device, layers=None) -> VisualFeatures:
    """The frozen encoder's features of ``images`` (taps of ``layers``, default the config's)."""
    with torch.no_grad(), autocast(torch.device(device)):
        return model.visual(images.to(device, non_blocking=True), layers=layers)


class Plan(NamedTuple):
    """What one ``features`` call does: every entry's file, and the (file, index) pairs to compute."""

    files: list
    missing: list
    error: str


class FeatureCache:
    """Cached frozen features of ``config``'s encoder under ``cache_dir`` (``None``: no cache)."""

    def __init__(self, cache_dir, config):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.config = config

    def folder(self, device="cpu") -> Path:
        return self.cache_dir / feature_key(self.config, device)

    def features(self, model, dataset, batch_size: int = 16, device="cpu", progress: bool = True,
                 num_workers=None):
        """A dataset aligned with ``dataset`` whose items carry the frozen features.

        Missing entries are computed first (split across processes under torchrun; images
        decoded by ``num_workers`` processes, default :func:`pmoe.runtime.data_workers`).
        Without a cache folder, ``dataset`` itself is returned and features are computed per batch.
        """
        if self.cache_dir is None:
            return dataset
        if dataset.image_size != self.config.image_size:
            raise DataError(f"the dataset is preprocessed at {dataset.image_size} px but the model "
                            f"takes {self.config.image_size} px; build it with image_size={self.config.image_size}")
        folder = self.folder(device)
        plan = self._plan(folder, dataset, device, progress)
        if plan.error:
            raise DataError(plan.error)
        if plan.missing:
            self._compute(model, dataset, plan.missing, batch_size, device, progress, num_workers)
        barrier()  # every entry is written before any process reads
        return CachedFeatures(dataset, plan.files, len(stored_layers(self.config)), tap_positions(self.config))

    def _plan(self, folder: Path, dataset, device, progress: bool) -> Plan:
        """The main process lists the entries and checks the disk; every process gets its plan."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        plan = None
        if rank == 0:
            files = [self._entry_path(folder, dataset, i) for i in tqdm(
                range(len(dataset)), desc="hashing images", disable=not progress, leave=False)]
            missing = sorted({file: i for i, file in enumerate(files) if not file.is_file()}.items())
            error = self._space_error(folder, len(missing)) if missing else ""
            if missing and not error:
                write_text(folder / KEY_FILE, json.dumps(key_fields(self.config, device), indent=2) + "\n")
                if progress:
                    tqdm.write(f"caching the features of {len(missing)} images "
                               f"({_gigabytes(len(missing) * entry_bytes(self.config))}) in {folder}")
            plan = Plan(files, missing, error)
        if dist.is_initialized():
            box = [plan]
            dist.broadcast_object_list(box, src=0)
            plan = box[0]
        return plan

    def _space_error(self, folder: Path, count: int) -> str:
        """A message when the disk holding ``folder`` has less free space than ``count`` entries need."""
        needed, free = count * entry_bytes(self.config), free_bytes(folder)
        if needed <= free:
            return ""
        return (f"the feature cache needs {_gigabytes(needed)} for {count} images but only {_gigabytes(free)} "
                f"are free on the disk of {folder}. Free space (`pmoe cache list`, `pmoe cache clear`), pass "
                "--cache-dir (or set PMOE_CACHE) to a folder on a larger disk, or --no-cache to compute the "
                "features every epoch instead")

    @staticmethod
    def _entry_path(folder: Path, dataset, index: int) -> Path:
        image_path, _, _, _, crop = dataset.records[index]
        address = hashlib.sha1(file_digest(dataset.root / image_path) + crop.encode()).hexdigest()
        return folder / address[:2] / f"{address}.npy"

    def _compute(self, model, dataset, missing, batch_size, device, progress, num_workers):
        """Encode the images of the ``(file, index)`` pairs in ``missing`` and store them."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        share = missing[rank::world]
        images = Images(dataset, [index for _, index in share])
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size,
                                             num_workers=data_workers(num_workers, device),
                                             pin_memory=torch.device(device).type == "cuda")
        files = iter(file for file, _ in share)
        layers = stored_layers(self.config)
        bar = tqdm(total=len(missing), desc="caching features", disable=not progress or rank != 0)
        for batch in loader:
            features = encode(model, batch, device, layers)
            rows = torch.cat([features.patch_tokens.flatten(1, 2), features.cls_token[:, None]], dim=1)
            for entry in rows.to(torch.float16).cpu().numpy():
                store_entry(next(files), entry)
            bar.update(len(rows) * world)
        bar.close()


class Images(torch.utils.data.Dataset):
    """The preprocessed images of ``dataset`` at ``indices``, without their masks (what the
    encoder needs to fill the cache; decoded in the DataLoader's worker processes)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset.image(self.indices[index])


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent)."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def store_entry(path: Path, rows: np.ndarray) -> None:
    """Write one entry atomically (a crash never leaves a truncated .npy); a full disk names the fix."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, rows)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise DataError(f"the disk holding the feature cache {path.parent.parent} is full; free space "
                        "(`pmoe cache clear`), or pass --cache-dir on a larger disk, or --no-cache") from error


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB"


def cache_listing(cache_dir) -> list:
    """One dict per feature folder under ``cache_dir``: key, settings, entries, bytes, whether current."""
    root = Path(cache_dir).expanduser()
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            fields = json.loads((folder / KEY_FILE).read_text())
        except (OSError, ValueError):
            fields = {}
        files = list(folder.glob("*/*.npy"))
        current = fields.get("format") == FORMAT_VERSION and fields.get("code") == code_fingerprint(FINGERPRINT_MODULES)
        rows.append({
            "key": folder.name, "clip_model": fields.get("clip_model"), "image_size": fields.get("image_size"),
            "layers": fields.get("layers"), "precision": fields.get("precision"),
            "entries": len(files), "bytes": sum(file.stat().st_size for file in files), "current": current,
        })
    return rows


def clear_cache(cache_dir, keys=(), stale: bool = False) -> list:
    """Delete the feature folders named in ``keys`` (all when empty) or, with ``stale``, those made
    by other code; returns the deleted keys. An unknown key is a DataError listing the present ones."""
    listing = cache_listing(cache_dir)
    present = {row["key"]: row for row in listing}
    unknown = [key for key in keys if key not in present]
    if unknown:
        raise DataError(f"no cache folder {', '.join(unknown)} in {cache_dir}; present: "
                        f"{', '.join(present) or 'none'} (see `pmoe cache list`)")
    chosen = [row["key"] for row in listing if (not keys or row["key"] in keys) and (not stale or not row["current"])]
    for key in chosen:
        shutil.rmtree(Path(cache_dir).expanduser() / key)
    return chosen
