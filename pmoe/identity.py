"""What makes two results the same: recorded keys that a reused run or evaluation must match.

A finished training run is reused only when its resolved config and :func:`run_identity`
(training data manifest, validation data, package version) equal the request; an evaluation
only when its :func:`evaluation key <pmoe.evaluation.evaluation_key>` (config, checkpoint
content, evaluation options, manifest, package version) does. Nothing is compared by file
modification time. :func:`differences` names what differs, for the error or the log.
"""

from __future__ import annotations

import hashlib
import json


def package_version() -> str:
    """The installed pmoe version (part of every key: results of another version are recomputed)."""
    import pmoe

    return pmoe.__version__


def manifest_digest(frame) -> str:
    """SHA-1 of a manifest's rows (its standard columns, in order)."""
    from pmoe.data import COLUMNS

    return hashlib.sha1(frame[list(COLUMNS)].to_csv(index=False).encode()).hexdigest()


def file_sha1(path) -> str:
    """SHA-1 of a file's content, hex."""
    from pmoe.features import file_digest

    return file_digest(path).hex()


def tensors_sha1(tensors: dict) -> str:
    """SHA-1 of named tensors (names, shapes, dtypes and values), independent of their device."""
    import torch

    digest = hashlib.sha1()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_identity(train_set, manifest, frame, validation=None) -> dict:
    """What a training run was trained on, besides its config: the data and the package version.

    ``validation`` is ``(name, frame)`` of the per-epoch validation set (Figure 7), or None.
    """
    return {
        "train_set": train_set,
        "manifest": str(manifest) if manifest is not None else None,
        "manifest_sha1": manifest_digest(frame),
        "num_samples": len(frame),
        "validation": None if validation is None else {"set": validation[0],
                                                       "manifest_sha1": manifest_digest(validation[1])},
        "pmoe_version": package_version(),
    }


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested dicts as one dict with dotted keys (lists and scalars are leaves)."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def differences(saved: dict, wanted: dict) -> list:
    """``"key: saved -> wanted"`` for every (dotted) key whose JSON value differs, sorted."""
    saved, wanted = flatten(_json(saved)), flatten(_json(wanted))
    return [f"{key}: {saved.get(key, '(absent)')!r} -> {wanted.get(key, '(absent)')!r}"
            for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key)]


def _json(values: dict) -> dict:
    """The value as JSON would store it (tuples as lists), so saved and fresh keys compare equal."""
    return json.loads(json.dumps(values, default=str))
