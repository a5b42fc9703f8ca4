"""The training logs: tidy CSVs per step, per epoch, and of expert usage.

``RUN/log_steps.csv``    epoch, step, lr, loss, loss_cls, loss_seg, loss_focal, loss_dice,
                         loss_balance, loss_decouple   (one row per optimizer step)
``RUN/log_epochs.csv``   epoch, lr, the same loss columns (epoch means of the step values),
                         val_image_auroc (NaN without a validation set); lr at the epoch's end
``RUN/expert_usage.csv`` epoch, layer, state, expert, fraction: the fraction of the epoch's
                         images x top-k selections that chose each expert, per VGMoP instance
                         (named by its tapped layer, or ``all`` for the single-VGMoP variant)
                         and state; empty for the static prompt baselines.

Epochs and steps are 1-based (``step`` = optimizer updates so far).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pmoe.io import write_csv
from pmoe.vgmop import STATES

TERMS = ("loss", "cls", "seg", "focal", "dice", "balance", "decouple")
LOSS_COLUMNS = [term if term == "loss" else f"loss_{term}" for term in TERMS]
COLUMNS = {
    "steps": ["epoch", "step", "lr", *LOSS_COLUMNS],
    "epochs": ["epoch", "lr", *LOSS_COLUMNS, "val_image_auroc"],
    "usage": ["epoch", "layer", "state", "expert", "fraction"],
}
FILES = {"steps": "log_steps.csv", "epochs": "log_epochs.csv", "usage": "expert_usage.csv"}


def layer_names(config, instances: int) -> list:
    """Names of the P VGMoP instances: their tapped layers, or ``all`` when one serves every layer."""
    return list(config.layers) if instances == config.num_layers else ["all"] * instances


class TrainingLog:
    """Rows of the three logs, kept in memory and written whole (atomically) after each epoch."""

    def __init__(self, rows: dict | None = None):
        self.rows = rows or {name: [] for name in COLUMNS}

    def add_step(self, epoch: int, step: int, lr: float, terms: dict) -> None:
        values = {column: terms[term] for column, term in zip(LOSS_COLUMNS, TERMS)}
        self.rows["steps"].append({"epoch": epoch, "step": step, "lr": lr, **values})

    def end_epoch(self, epoch: int, usage_counts, names: list, val_auroc: float = math.nan) -> dict:
        """Close ``epoch``: its mean losses, validation AUROC and expert usage (counts (P, 2, E))."""
        steps = [row for row in self.rows["steps"] if row["epoch"] == epoch]
        means = {column: float(np.mean([row[column] for row in steps])) for column in LOSS_COLUMNS}
        row = {"epoch": epoch, "lr": steps[-1]["lr"], **means, "val_image_auroc": val_auroc}
        self.rows["epochs"].append(row)
        if usage_counts is not None:
            fractions = usage_counts / usage_counts.sum(axis=-1, keepdims=True)
            for (instance, state, expert), fraction in np.ndenumerate(fractions):
                self.rows["usage"].append({"epoch": epoch, "layer": names[instance], "state": STATES[state],
                                           "expert": expert, "fraction": float(fraction)})
        return row

    def frames(self) -> dict:
        return {name: pd.DataFrame(rows, columns=COLUMNS[name]) for name, rows in self.rows.items()}

    def write(self, folder) -> None:
        for name, frame in self.frames().items():
            write_csv(frame, Path(folder) / FILES[name])

    @classmethod
    def read(cls, folder) -> "TrainingLog":
        rows = {}
        for name, file in FILES.items():
            frame = pd.read_csv(Path(folder) / file, dtype={"layer": str})
            rows[name] = frame.to_dict("records")
        return cls(rows)
