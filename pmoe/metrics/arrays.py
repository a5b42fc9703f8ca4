"""Metric inputs: validation, and the few array operations that run on NumPy or on torch.

Every metric accepts NumPy arrays or torch tensors. The scores decide the backend: when they
are a tensor on a GPU, the heavy work (splitting, sorting, searching) runs with torch on that
device and only small per-threshold arrays come back to NumPy; otherwise it runs with NumPy
(a CPU tensor is viewed as a NumPy array without a copy: NumPy's sort and boolean indexing are
several times faster than torch's on the CPU). Both backends return the same numbers. torch
is never imported here: a tensor can only exist if its caller imported torch already.
"""

from __future__ import annotations

import sys

import numpy as np

from pmoe.errors import DataError


def is_tensor(x) -> bool:
    """True when ``x`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def to_numpy(x) -> np.ndarray:
    """``x`` as a NumPy array (a tensor is detached and copied to the CPU)."""
    return x.detach().cpu().numpy() if is_tensor(x) else np.asarray(x)


def like(array: np.ndarray, reference):
    """The NumPy ``array`` on the backend (and device) of ``reference``."""
    if not is_tensor(reference):
        return array
    writable = np.require(array, requirements=["C_CONTIGUOUS", "WRITEABLE"])  # copies only when needed
    return sys.modules["torch"].from_numpy(writable).to(reference.device)


def scores_array(scores, name: str, ndim: int):
    """Validate anomaly scores: ``ndim`` dimensions, floating point, every value finite.

    Returns a NumPy array, or a torch tensor when ``scores`` is one on a GPU. Integer and
    boolean scores become float64 and half-precision ones float32 (both exact).
    """
    if is_tensor(scores):
        scores = scores.detach()
        if not scores.is_floating_point():
            scores = scores.double()
        elif scores.element_size() < 4:
            scores = scores.float()
        if scores.device.type == "cpu":
            scores = scores.numpy()
    else:
        scores = np.asarray(scores)
        if scores.dtype.kind != "f":
            scores = scores.astype(np.float64)
        elif scores.dtype.itemsize < 4:
            scores = scores.astype(np.float32)
    if scores.ndim != ndim:
        fix = "stack the maps as (N, H, W)" if ndim == 3 else "pass one score per image"
        raise DataError(f"{name} must have {ndim} dimension(s), got shape "
                        f"{tuple(scores.shape)}; {fix}")
    finite = scores.isfinite() if is_tensor(scores) else np.isfinite(scores)
    if not bool(finite.all()):
        first = int(to_numpy(finite).reshape(len(finite), -1).all(1).argmin())
        raise DataError(f"{name} contain NaN or infinite values (first at index {first}); "
                        "fix the model output before evaluating")
    return scores


def binary_array(labels, name: str, scores):
    """Validate ground truth against ``scores``: same shape, only 0/1 or booleans.

    Returned as booleans on the backend and device of ``scores``.
    """
    if is_tensor(scores):
        labels = labels.to(scores.device) if is_tensor(labels) else like(np.asarray(labels), scores)
        is_bool = labels.dtype == sys.modules["torch"].bool
    else:
        labels = to_numpy(labels)
        is_bool = labels.dtype == bool
    if tuple(labels.shape) != tuple(scores.shape):
        raise DataError(f"{name} have shape {tuple(labels.shape)} but the scores have shape "
                        f"{tuple(scores.shape)}; pass one ground truth per score")
    if is_bool:
        return labels
    binary = (labels == 0) | (labels == 1)
    if not bool(binary.all()):
        bad = to_numpy(labels)[~to_numpy(binary)][0]
        raise DataError(f"{name} must hold only 0 and 1 (or booleans), found {bad!r}; "
                        f"binarise them first (e.g. `{name} > 0` for 0/255 masks)")
    return labels == 1


def sort(x, with_order: bool = False):
    """``x`` flattened and sorted ascending; with ``with_order`` also the permutation used."""
    if is_tensor(x):
        values, order = sys.modules["torch"].sort(x.reshape(-1))
        return (values, order) if with_order else values
    if with_order:
        order = np.argsort(x, axis=None)
        return x.reshape(-1)[order], order
    return np.sort(x, axis=None)


def searchsorted(sorted_values, queries, side: str) -> np.ndarray:
    """NumPy ``searchsorted`` on either backend; the indices come back as NumPy int64."""
    if is_tensor(sorted_values):
        torch = sys.modules["torch"]
        return to_numpy(torch.searchsorted(sorted_values, queries, side=side)).astype(np.int64)
    return np.searchsorted(sorted_values, queries, side=side).astype(np.int64)


def run_lengths(sorted_values):
    """The distinct values of a sorted array (on its backend) and their counts (NumPy int64)."""
    if is_tensor(sorted_values):
        torch = sys.modules["torch"]
        values, counts = torch.unique_consecutive(sorted_values, return_counts=True)
        return values, to_numpy(counts).astype(np.int64)
    starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))
    return sorted_values[starts], np.diff(np.append(starts, len(sorted_values)))


def cumulative(weights):
    """Float64 running sums of ``weights`` with a leading zero, on their backend."""
    if is_tensor(weights):
        torch = sys.modules["torch"]
        return torch.cat([weights.new_zeros(1, dtype=torch.float64),
                          torch.cumsum(weights.double(), 0)])
    return np.concatenate([[0.0], np.cumsum(weights, dtype=np.float64)])
