"""Cached features held in memory: read from the disk cache once, then every batch is an index.

A training run reads its training set every epoch (15 times), Figure 7's runs read their
validation set after every epoch, and the ablation tables evaluate up to twenty variants on
the same classes. Instead of reading the memory-mapped cache entries (and decoding the masks)
each time, :func:`hold` reads them once into tensors: on the device when they fit in its free
memory with HEADROOM left for the computation, else in host memory, else it keeps reading the
disk cache (it returns its input). Batches are equal, value for value, to the collated items
of :class:`pmoe.features.CachedFeatures`, so every result is the same as from the disk.

Usage::

    from pmoe.resident import batches, hold
    data = hold(cached, device)                  # ResidentFeatures, or ``cached`` itself
    for batch in batches(data, [[0, 1], [2, 3]], device=device):   # any dataset
        outputs = model.forward_features(visual_features(model, batch, device))
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from pmoe.features import CachedFeatures, read_entry
from pmoe.runtime import data_workers, free_memory

HEADROOM = 0.25  # fraction of the free memory left to the computation when features are held
FILL_BATCH = 16  # entries read per step while filling


class ResidentFeatures(torch.utils.data.Dataset):
    """The items of a :class:`CachedFeatures` from tensors held on one device.

    ``tokens`` (N, H, HW, Dx) and ``cls_tokens`` (N, Dx) are fp16 (the cache's values), ``masks``
    (N, S, S) bool or None, ``records`` one dict per item (label, cls, path, crop). ``held``
    are the stored-tap positions of the H held taps, ``taps`` those this view serves (as
    ``CachedFeatures.taps``); :meth:`with_taps` gives another view of the same tensors.
    """

    def __init__(self, tokens, cls_tokens, masks, records: list, held, taps):
        self.tokens, self.cls_tokens, self.masks, self.records = tokens, cls_tokens, masks, records
        self.held, self.taps = list(held), list(taps)
        self._taps = torch.tensor([self.held.index(tap) for tap in self.taps], device=tokens.device)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([record["label"] for record in self.records], dtype=np.int64)

    def with_taps(self, taps) -> "ResidentFeatures":
        """The same items serving other stored taps (they must be among the held ones)."""
        return ResidentFeatures(self.tokens, self.cls_tokens, self.masks, self.records, self.held, taps)

    def batch(self, indices) -> dict:
        """Items ``indices`` collated as torch's default_collate does (masks as float32 0/1)."""
        rows = torch.as_tensor(list(indices), dtype=torch.long, device=self.tokens.device)
        if self.taps == self.held:
            tokens = self.tokens.index_select(0, rows)
        else:
            tokens = self.tokens[rows[:, None], self._taps[None, :]]
        chosen = [self.records[index] for index in indices]
        batch = {"patch_tokens": tokens, "cls_token": self.cls_tokens.index_select(0, rows),
                 "label": torch.tensor([record["label"] for record in chosen], dtype=torch.int64)}
        batch.update({key: [record[key] for record in chosen] for key in ("cls", "path", "crop")})
        if self.masks is not None:
            batch["mask"] = self.masks.index_select(0, rows)[:, None].float()
        return batch

    def __getitem__(self, index: int) -> dict:
        item = {key: value[0] for key, value in self.batch([index]).items()}
        item["label"] = int(item["label"])
        return item


def entry_shape(data: CachedFeatures) -> tuple:
    """(patch tokens per tap, token width) of the entries of ``data``, from its first entry."""
    rows = read_entry(data.files[0])
    return (rows.shape[0] - 1) // data.stored, rows.shape[1]


def held_bytes(data: CachedFeatures) -> int:
    """Bytes :func:`hold` needs for ``data``: its taps and CLS tokens in fp16, masks as bool."""
    if not len(data):
        return 0
    tokens, width = entry_shape(data)
    size = data.dataset.image_size
    mask = size * size if data.dataset.return_mask else 0
    return len(data) * ((len(data.taps) * tokens + 1) * width * 2 + mask)


def placement(need: int, device):
    """Where ``need`` bytes of features go: ``device`` when they fit there with HEADROOM to
    spare, else the host when they fit there, else None (keep reading the disk cache)."""
    device = torch.device(device)
    if need <= (1 - HEADROOM) * free_memory(device):
        return device
    host = torch.device("cpu")
    if device.type != "cpu" and need <= (1 - HEADROOM) * free_memory(host):
        return host
    return None


def hold(data, device, num_workers=None, progress: bool = False):
    """``data`` (a :class:`CachedFeatures`) read once into memory as :class:`ResidentFeatures`,
    on the device or the host (see :func:`placement`); any other dataset, or features that fit
    nowhere, are returned as they are. Entries are read by ``num_workers`` processes."""
    if not isinstance(data, CachedFeatures) or not len(data):
        return data
    place = placement(held_bytes(data), device)
    if place is None:
        return data
    tokens, width = entry_shape(data)
    count, size = len(data), data.dataset.image_size
    held = torch.empty((count, len(data.taps), tokens, width), dtype=torch.float16, device=place)
    cls_tokens = torch.empty((count, width), dtype=torch.float16, device=place)
    masks = torch.empty((count, size, size), dtype=torch.bool, device=place) if data.dataset.return_mask else None
    loader = torch.utils.data.DataLoader(data, batch_size=FILL_BATCH, num_workers=data_workers(num_workers, device),
                                         pin_memory=place.type == "cuda")
    records, start = [], 0
    for batch in tqdm(loader, desc="reading features into memory", disable=not progress, leave=False):
        end = start + len(batch["label"])
        held[start:end].copy_(batch["patch_tokens"], non_blocking=True)
        cls_tokens[start:end].copy_(batch["cls_token"], non_blocking=True)
        if masks is not None:
            masks[start:end].copy_(batch["mask"][:, 0] > 0.5, non_blocking=True)
        records += [{"label": int(label), "cls": cls, "path": path, "crop": crop}
                    for label, cls, path, crop in zip(batch["label"], batch["cls"], batch["path"], batch["crop"])]
        start = end
    return ResidentFeatures(held, cls_tokens, masks, records, data.taps, data.taps)


def batches(data, index_batches, num_workers=None, device="cpu"):
    """The collated batches of ``data`` at each list of ``index_batches``, in order: indexed
    directly from held features, else loaded by a DataLoader (workers, pinned memory on CUDA)."""
    if isinstance(data, ResidentFeatures):
        return (data.batch(indices) for indices in index_batches)
    return torch.utils.data.DataLoader(data, batch_sampler=index_batches, num_workers=data_workers(num_workers, device),
                                       pin_memory=torch.device(device).type == "cuda")
