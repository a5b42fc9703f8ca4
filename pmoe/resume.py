"""Resumable training state: one folder per completed epoch, present whole or not at all.

::

    RUN/state/epoch_NNN/
        model.safetensors       the trainable weights
        optimizer.safetensors   Adam's tensors (moments, step counts), keys ``<param>.<name>``
        optimizer.json          Adam's param groups and any non-tensor state
        progress.json           epoch, step and what was trained on
        log_*.csv, expert_usage.csv   the logs up to this epoch

The folder is filled under a temporary name and renamed into place, so a process killed at
any moment (even ``kill -9``) leaves either the previous state or the new one. Only the latest
state is kept. Nothing is pickled: tensors go to safetensors, everything else to JSON or CSV.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from pmoe.checkpoint import WEIGHTS, load_weights, save_weights
from pmoe.errors import CheckpointError
from pmoe.training_log import TrainingLog

STATE_DIR = "state"
PREFIX = "epoch_"


def save_state(run_dir, progress: dict, model, optimizer, log: TrainingLog) -> Path:
    """Write the state after epoch ``progress["epoch"]`` and drop the older ones."""
    from safetensors.torch import save_file

    root = Path(run_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{progress['epoch']:03d}"
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    save_weights(model, scratch / WEIGHTS)
    tensors, rest = split_optimizer_state(optimizer.state_dict())
    save_file(tensors, str(scratch / "optimizer.safetensors"))
    (scratch / "optimizer.json").write_text(json.dumps(rest, indent=1))
    (scratch / "progress.json").write_text(json.dumps(progress, indent=1))
    log.write(scratch)
    if final.exists():
        shutil.rmtree(final)
    scratch.rename(final)
    for old in root.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(run_dir) -> Path | None:
    """The newest complete state folder of a run, or None."""
    root = Path(run_dir) / STATE_DIR
    states = sorted(root.glob(f"{PREFIX}[0-9][0-9][0-9]*")) if root.is_dir() else []
    return states[-1] if states else None


def load_state(folder, model, optimizer) -> tuple:
    """Restore weights and optimizer from a state folder; returns (progress, log)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        progress = json.loads((folder / "progress.json").read_text())
        rest = json.loads((folder / "optimizer.json").read_text())
        tensors = load_file(str(folder / "optimizer.safetensors"))
        log = TrainingLog.read(folder)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"training state {folder} is unreadable ({error}); delete that folder to "
                              "resume from scratch, or pass --overwrite") from error
    load_weights(model, folder / WEIGHTS)
    optimizer.load_state_dict(join_optimizer_state(tensors, rest))
    return progress, log


def split_optimizer_state(state: dict) -> tuple:
    """An optimizer ``state_dict`` as (safetensors-ready tensors, JSON-ready rest)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict, rest: dict) -> dict:
    """The inverse of :func:`split_optimizer_state`."""
    state = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}
