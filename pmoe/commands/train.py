"""Train PromptMoE on the test split of one dataset (spec 6), resumably, on cached CLIP features.

Writes RUN/config.json, provenance.json, log_steps.csv, log_epochs.csv, expert_usage.csv and,
at the end, model.safetensors and done.json. A killed run continues with --resume. CLIP
features are cached ($PMOE_CACHE, default ~/.cache/pmoe/features) unless --no-cache.
Multi-GPU: launch with torchrun (the global batch is split across the processes).

Examples:
    pmoe train --preset paper --train-set mvtec --data-root /data/mvtec --out runs/paper-mvtec
    pmoe train --preset tiny --train-set synthetic-a --data-root data/synthetic-a --out runs/tiny \\
        --val-set synthetic-b --val-root data/synthetic-b --epochs 3
    pmoe train --preset table3-alpha0 --base tiny --train-set synthetic-a --data-root data/synthetic-a \\
        --out runs/alpha0 --set lr=0.002 --set layers=[1,3]
    pmoe train --preset paper --train-set mvtec --data-root /data/mvtec --out runs/paper-mvtec --compile
    torchrun --nproc_per_node 4 -m pmoe.cli train --preset paper --train-set visa --data-root /data/visa --out runs/visa
"""

from __future__ import annotations

import argparse
import json

from pmoe.commands._options import add_cache_options, add_compile_option, add_device_options, cache_dir


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="paper", help="preset name (default: paper; list: pmoe describe --presets)")
    parser.add_argument("--base", default="paper", help="base preset an ablation is laid over (paper, tiny, demo)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-set", help="dataset name (mvtec, visa, synthetic-a, ...); all its test samples are used")
    data.add_argument("--manifest", help="a manifest CSV (pmoe manifest) instead of --train-set")
    parser.add_argument("--data-root", required=True, help="folder the dataset (or the manifest's paths) lives in")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--epochs", type=int, help="override the preset's number of epochs")
    parser.add_argument("--batch-size", type=int, help="override the preset's global batch size")
    parser.add_argument("--seed", type=int, help="override the preset's seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                        help="override any config field (VALUE is JSON, or a plain string); repeatable")
    run_mode = parser.add_mutually_exclusive_group()
    run_mode.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    run_mode.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    add_cache_options(parser, "compute CLIP features every epoch without caching")
    parser.add_argument("--val-set", help="dataset to report the image AUROC of after every epoch (Figure 7)")
    parser.add_argument("--val-root", help="folder of --val-set")
    add_device_options(parser, batch_size=None, auto_workers=True)
    add_compile_option(parser)


def key_value(text: str) -> tuple:
    """Parse ``KEY=VALUE``; VALUE is read as JSON when it parses, else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run(args) -> int:
    from pmoe.config import Config
    from pmoe.training import train

    config = Config.preset(args.preset, base=args.base).replace(**dict(args.set))
    run_dir = train(config, args.train_set, args.data_root, args.out, manifest=args.manifest, epochs=args.epochs,
                    batch_size=args.batch_size, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                    cache_dir=cache_dir(args), device=args.device, val_set=args.val_set, val_root=args.val_root,
                    num_workers=args.workers, compile_backend=args.compile, progress=not args.quiet)
    from pmoe.runtime import is_main_process

    if is_main_process():
        print(f"trained weights: {run_dir / 'model.safetensors'}; next: pmoe evaluate --checkpoint {run_dir} ...")
    return 0
