"""Devices, precision, seeding, torchrun process groups, data-loading workers and free memory.

CUDA: TF32 matrix multiplies, and bf16 autocast where a caller asks for it (the frozen image
encoder always; the trainable forward with ``train_precision="bf16"``); CPU: plain fp32. Under
``torchrun`` the process group is initialised from the environment (NCCL on GPUs, gloo on CPUs).
Data loading on a GPU uses worker processes (decoding and resizing images off the main
process) sized from the CPUs this process may use; on a CPU the model's own threads take the
cores, so images are read in the main process.
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

MAX_WORKERS = 16  # data-loading processes per training or evaluation process, at most


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


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this launch on this machine (torchrun's LOCAL_WORLD_SIZE, else 1)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def data_workers(num_workers, device) -> int:
    """``num_workers`` if given, else the default for ``device``.

    On CUDA: one worker per usable core of this process's share of the machine, less one for the
    process itself, at most MAX_WORKERS; on the CPU: 0 (the model's threads use the cores).
    """
    if num_workers is not None:
        if num_workers < 0:
            raise ConfigError(f"the number of data-loading workers must be >= 0, got {num_workers}")
        return num_workers
    if torch.device(device).type != "cuda":
        return 0
    return max(0, min(MAX_WORKERS, usable_cpus() // local_processes() - 1))


def host_available_bytes() -> int:
    """Memory the host can give without swapping: MemAvailable of /proc/meminfo, else the free pages."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def free_memory(device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory with the blocks torch has
    cached but not allocated (it frees them for a new tensor that needs them), or this process's
    share of the host's available memory (split between the processes of a torchrun launch)."""
    device = torch.device(device)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    return host_available_bytes() // local_processes()
