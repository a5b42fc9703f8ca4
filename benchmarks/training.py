"""Benchmark training epochs without and with the frozen-feature cache, and throughput.

Usage:
    python benchmarks/training.py                          # tiny CLIP on the CPU (seconds)
    python benchmarks/training.py --preset paper --set clip_model=ViT-B-16 --set image_size=224 \\
        --set layers=[3,6,9,12] --set vv_start=3 --images 8 --repeats 2   # mid-size CLIP, CPU (minutes)
    python benchmarks/training.py --preset paper --device cuda --images 20   # ViT-L-14-336 at 518 px

Writes a synthetic-a dataset (4 classes x --images images) to a temporary folder, then times
one training epoch computing the CLIP features of every batch (no cache), one reading them from
the warm disk cache (memory-mapped entries, masks decoded per item) and one from the features
held in memory as ``pmoe train`` reads them (each the best of --repeats epochs), side by side,
and prints the speed-up of the held epoch (every epoch after the first), the time to fill the
cache and to read it into memory, and images/s for evaluation (images through the whole model,
eval mode). The CLIP weights are always random: timings do not depend on them and nothing is
downloaded. ``benchmarks/gpu_check.py`` is the fuller check for a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from pmoe.commands.train import key_value
from pmoe.config import Config
from pmoe.data import AnomalyDataset, build_manifest
from pmoe.data.synthetic import write_dataset
from pmoe.features import FeatureCache, visual_features
from pmoe.model import build_model
from pmoe.resident import hold
from pmoe.runtime import autocast, configure_backend, pick_device, seed_everything
from pmoe.training import Trainer
from pmoe.training_log import TrainingLog


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="preset (default tiny)")
    parser.add_argument("--base", default="paper", help="base preset an ablation is laid over")
    parser.add_argument("--set", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--device", help="cpu or cuda (default: the GPU if there is one)")
    parser.add_argument("--images", type=int, default=10, help="images per class, 4 classes (default 10)")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch size")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per variant; the best counts")
    return parser.parse_args(argv)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, function, *args):
    """(seconds, result) of one call, with the GPU's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    result = function(*args)
    synchronize(device)
    return time.perf_counter() - start, result


def epoch_seconds(model, config, device, data, workers: int, repeats: int) -> float:
    """Wall time of one training epoch on ``data``: the best of ``repeats`` epochs."""
    trainer = Trainer(model, config, device, rank=0, world=1)
    return min(timed(device, trainer.epoch, 1, 0, data, TrainingLog(), workers, False)[0] for _ in range(repeats))


@torch.no_grad()
def evaluation_seconds(model, device, dataset, batch_size: int, workers: int) -> float:
    """Wall time of the eval-mode forward pass from images (encoder included) over ``dataset``."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)

    def run():
        for batch in loader:
            with autocast(device):
                model.forward_features(visual_features(model, batch, device))["anomaly_map"].float().cpu()

    seconds, _ = timed(device, run)
    model.train()
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    config = Config.preset(args.preset, base=args.base).replace(clip_weights="random", **dict(args.set))
    if args.batch_size:
        config = config.replace(batch_size=args.batch_size)
    device = pick_device(args.device)
    configure_backend(device)
    seed_everything(config.seed)
    model = build_model(config).to(device)
    with tempfile.TemporaryDirectory(prefix="pmoe-bench-") as scratch:
        scratch = Path(scratch)
        root = write_dataset("synthetic-a", scratch / "data", n_normal=args.images // 2,
                             n_anomalous=args.images - args.images // 2, image_size=256)
        dataset = AnomalyDataset(build_manifest("synthetic-a", root), root, config.image_size,
                                 mask_rule=config.mask_rule)
        cache = FeatureCache(scratch / "cache", config)
        print(f"{config.clip_model} at {config.image_size} px on {device}: {len(dataset)} images, "
              f"batch {config.batch_size}, {-(-len(dataset) // config.batch_size)} steps per epoch")
        uncached = epoch_seconds(model, config, device, dataset, args.workers, args.repeats)
        fill, cached_data = timed(device, cache.features, model, dataset, config.batch_size, device, False,
                                  args.workers)
        cached = epoch_seconds(model, config, device, cached_data, args.workers, args.repeats)
        reading, held_data = timed(device, hold, cached_data, device, args.workers)
        held = epoch_seconds(model, config, device, held_data, args.workers, args.repeats)
        evaluation = evaluation_seconds(model, device, dataset, config.batch_size, args.workers)
    images = len(dataset)
    print(f"{'':<36}{'seconds':>10}{'images/s':>12}")
    for label, seconds in (("epoch without cache", uncached), ("epoch from the disk cache", cached),
                           ("epoch from features held in memory", held), ("filling the cache (once)", fill),
                           ("reading it into memory (per run)", reading), ("evaluation from images", evaluation)):
        print(f"{label:<36}{seconds:>10.2f}{images / seconds:>12.1f}")
    print(f"speed-up of a cached epoch: {uncached / held:.1f}x held in memory ({uncached / cached:.1f}x from disk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
