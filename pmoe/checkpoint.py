"""Run directories and checkpoints: safetensors weights + JSON, never pickle.

A run directory holds:
    config.json            the resolved Config
    provenance.json        git revision, package versions, command line, time
    model.safetensors      the trainable parameters only (VGMoP / static prompts and Q_ctx)

``load_run(path)`` rebuilds the model from ``config.json`` and loads the weights; a checkpoint
loaded into a model of another config is a :class:`CheckpointError` naming the difference.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from pmoe.config import Config
from pmoe.errors import CheckpointError
from pmoe.io import atomic_path, write_text

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PROVENANCE = "provenance.json"
PACKAGES = ("pmoe", "torch", "torchvision", "open_clip_torch", "numpy", "scipy", "scikit-learn", "pandas")


def git_revision() -> str:
    """The repository's commit (with ``-dirty`` when modified), or ``unknown`` outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance() -> dict:
    """Where a result came from: code revision, package versions, machine and command."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_revision": git_revision(),
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": sys.argv,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_run_metadata(run_dir, config: Config) -> None:
    """Write config.json and provenance.json into ``run_dir`` (atomically)."""
    run_dir = Path(run_dir)
    write_text(run_dir / CONFIG, config.to_json() + "\n")
    write_text(run_dir / PROVENANCE, json.dumps(provenance(), indent=2) + "\n")


def save_weights(model, path) -> Path:
    """Save the model's trainable tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.trainable_state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return Path(path)


def load_weights(model, path) -> None:
    """Load trainable tensors saved by :func:`save_weights` into ``model`` (no unpickling)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run directory written by `pmoe train`.")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({error}); retrain or re-copy it.") from error
    model.load_trainable_state_dict(state)


def run_config(run_dir, clip_weights: str | None = None) -> Config:
    """The config saved in a run directory; ``clip_weights`` overrides where its frozen CLIP comes from."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {CONFIG}; pass a run directory written by `pmoe train`.")
    config = Config.load(path)
    return config.replace(clip_weights=clip_weights) if clip_weights is not None else config


def load_run(run_dir, clip_weights: str | None = None, weights_file: str = WEIGHTS, clip=None):
    """Rebuild the model of a run directory and load its trained weights.

    ``clip_weights`` overrides where the frozen CLIP comes from (e.g. a local file on a
    machine without network access); the architecture stays the run's. ``clip``: a loaded
    frozen CLIP of that architecture and those weights to share instead of loading another.
    """
    from pmoe.model import build_model

    model = build_model(run_config(run_dir, clip_weights), clip)
    load_weights(model, Path(run_dir) / weights_file)
    return model.eval()
