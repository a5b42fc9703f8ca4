"""One process's share of a training step: the forward pass and every loss term (spec 5).

:class:`TrainStep` is the module DistributedDataParallel wraps under torchrun; with one
process it is simply the forward pass plus ``pmoe.losses.total_loss``. Its ``objective`` is
what each process back-propagates; see the class docstring for why W processes with shards
of a global batch then get the gradient of one process with the whole batch. The forward runs
in ``config.train_precision`` (fp32 by default; bf16 autocast on CUDA on request).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pmoe.losses import total_loss
from pmoe.runtime import autocast


class TrainStep(nn.Module):
    """One process's share of a training step: the forward pass and every loss term.

    This is the module DistributedDataParallel wraps. With W processes, DDP averages the W
    gradients. The per-sample terms (cls, focal, dice) are means over the local shard, so each
    process scales them by ``W * n_local / n_global``: the average is then the gradient of the
    global-batch mean, for shards of any size. L_balance depends on the batch mean of the
    router probabilities, so the probabilities of all shards are gathered (differentiably,
    :class:`AllGather`) and every process computes the same global-batch L_balance; the
    backward of the gather sums the W processes' (identical) gradients into each shard, W
    times the true gradient, which DDP's averaging divides back. L_decouple depends on the
    parameters only, so its W identical gradients average to itself.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features, masks, labels, class_names, sizes: list, rank: int):
        model, world, real = self.model, len(sizes), sizes[rank]
        with autocast(masks.device, model.config.train_precision):
            outputs = model.forward_features(features, class_names)
        outputs = to_float(outputs)
        routing = outputs["routing"]
        if routing is not None and world > 1:
            routing = {**routing, "probs": gather_rows(routing["probs"][:real], sizes)}
        terms = total_loss({**outputs, "routing": routing}, masks, labels,
                           expert_pools=model.expert_pools(), config=model.config)
        weight = world * real / sum(sizes)
        terms["objective"] = weight * (terms["cls"] + terms["seg"]) + terms["balance"] + terms["decouple"]
        return terms, outputs["routing"]


def to_float(outputs: dict) -> dict:
    """Model outputs in fp32 (the losses are computed outside autocast, under bf16 too)."""
    def cast(value):
        if isinstance(value, dict):
            return {key: cast(item) for key, item in value.items()}
        return value.float() if torch.is_tensor(value) and value.is_floating_point() else value
    return cast(outputs)


class AllGather(torch.autograd.Function):
    """Stack every process's tensor (W, ...); the backward sums the W processes' gradients.

    Each process gets, for its own block, the sum over processes of the gradient each one
    computed for that block (an all-reduce, which every backend supports).
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rank = dist.get_rank()
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank]


def gather_rows(local: torch.Tensor, sizes: list) -> torch.Tensor:
    """Concatenate every process's rows (``sizes[r]`` rows on process r), with gradients."""
    padded = F.pad(local, (0, 0) * (local.ndim - 1) + (0, max(sizes) - local.shape[0]))
    return torch.cat([rows[:size] for rows, size in zip(AllGather.apply(padded), sizes)])
