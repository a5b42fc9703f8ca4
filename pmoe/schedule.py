"""The training schedule (spec 6): learning-rate warm-up, data order and batch sharding.

Everything here is a pure function of the config, the epoch and the step, so a resumed run
sees exactly the order and learning rates of an uninterrupted one, and ``W`` processes
under torchrun together see the same global batches as one process.

- ``learning_rate``: linear per-step warm-up over ``warmup_epochs`` epochs, then constant:
  ``lr * min(1, step / (warmup_epochs * steps_per_epoch))`` for the 1-based step.
- ``epoch_order``: a permutation of the samples drawn from a generator seeded by
  ``(seed, epoch)``; consecutive chunks of ``batch_size`` are the global batches (the last one
  may be smaller; no sample is dropped).
- ``shard``: the contiguous part of a global batch that one process computes. Sizes differ by
  at most one; a process whose part is empty (a last batch smaller than the world) gets one
  stand-in sample that it computes with weight zero, so every process runs each step.

Usage::

    order = epoch_order(len(dataset), seed, epoch)
    for step, batch in enumerate(global_batches(order, batch_size)):
        indices = shard(batch, rank, world)   # the first shard_sizes(len(batch), world)[rank] are real
"""

from __future__ import annotations

import numpy as np


def learning_rate(config, step: int, steps_in_epoch: int) -> float:
    """The learning rate of the 1-based global ``step``: linear warm-up, then constant."""
    warmup = config.warmup_epochs * steps_in_epoch
    return config.lr * (min(1.0, step / warmup) if warmup > 0 else 1.0)


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of the 1-based ``epoch``, a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def global_batches(order: np.ndarray, batch_size: int) -> list:
    """Consecutive chunks of ``batch_size`` sample indices (the last may be smaller)."""
    return [order[start:start + batch_size].tolist() for start in range(0, len(order), batch_size)]


def shard_sizes(batch_len: int, world: int) -> list:
    """How many real samples of a global batch each of ``world`` processes computes."""
    return [len(part) for part in np.array_split(np.arange(batch_len), world)]


def shard(batch: list, rank: int, world: int) -> list:
    """The sample indices process ``rank`` loads for a global batch; the first
    ``shard_sizes(len(batch), world)[rank]`` of them are real.

    A process with no real sample loads the batch's first sample as a zero-weight stand-in.
    """
    sizes = shard_sizes(len(batch), world)
    start = sum(sizes[:rank])
    return batch[start:start + sizes[rank]] or batch[:1]
