"""Devices, precision, seeding and torchrun process groups.

CUDA: TF32 matrix multiplies, and bf16 autocast where a caller asks for it (the frozen image
encoder always; the trainable forward with ``train_precision="bf16"``); CPU: plain fp32. Under
``torchrun`` the process group is initialised from the environment (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from pmoe.config import CHOICES
from pmoe.errors import ConfigError


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else this process's GPU under torchrun, else cuda:0, else the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def configure_backend(device: torch.device) -> None:
    """Allow TF32 on CUDA (the CPU path stays exact fp32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(device)


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CUDA for ``precision="bf16"`` (the frozen encoder's); else a no-op (fp32).

    The trainable forward passes its config's ``train_precision`` (fp32 by default). CPUs always
    compute in fp32.
    """
    if precision not in CHOICES["train_precision"]:
        raise ConfigError(f"precision must be one of {CHOICES['train_precision']}, got {precision!r}")
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_distributed(device: torch.device) -> tuple:
    """(rank, world_size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
