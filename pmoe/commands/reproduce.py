"""Reproduce the paper: run every numbered notebook in order with papermill.

Examples:
    pmoe reproduce --preset demo                     # tiny CLIP, synthetic data, < 10 min on a CPU
    pmoe reproduce --preset paper --data-root /data/zsad --clip-weights /models/ViT-L-14-336.pt
    pmoe reproduce --preset paper --data-root /data/zsad --datasets mvtec visa --notebooks 04_table1
    pmoe reproduce --preset paper --data-root /data/zsad --seeds 111,112,113   # mean +- sd over 3 seeds

Executed notebooks go to results/executed/<preset>/, tables and figures to results/run-<preset>/.
A failing notebook, dataset or ablation run does not stop the others; at the end the summary
lists every failure with its reason and log, and the exit status is 1. A second run reuses
every finished training run and evaluation whose recorded key still matches.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="demo", choices=["paper", "demo", "tiny"])
    parser.add_argument("--data-root", help="folder with one sub-folder per dataset (required for paper)")
    parser.add_argument("--clip-weights", help="'openai' or a local ViT-L-14-336 weights file (paper preset)")
    parser.add_argument("--datasets", nargs="+", help="datasets of Table 1 to evaluate (default: all fifteen)")
    parser.add_argument("--notebooks", nargs="+", help="run only notebooks whose name contains one of these")
    parser.add_argument("--out-dir", help="results folder (default: results/run-<preset>)")
    parser.add_argument("--executed-dir", help="folder for executed notebooks (default: results/executed/<preset>)")
    parser.add_argument("--seeds", type=seed_list, metavar="S1,S2,...",
                        help="training seeds; every run and evaluation exists once per seed and tables show "
                        "mean +- sd (default: paper 111, demo 0,1, tiny 0); more seeds later reuse the finished ones")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only inject the parameters (papermill --prepare-only), e.g. for nbval")


def seed_list(text: str) -> list:
    """``111,112,113`` as a list of distinct integers."""
    import argparse

    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 111,112,113, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct integer seeds like 111,112,113, got {text!r}")
    return seeds


def run(args) -> int:
    from pmoe.reproduce import reproduce

    report = reproduce(
        args.preset, data_root=args.data_root, clip_weights=args.clip_weights, datasets=args.datasets,
        out_dir=args.out_dir, executed_dir=args.executed_dir, notebooks=args.notebooks, seeds=args.seeds,
        prepare_only=args.prepare_only,
    )
    print(report.summary())
    return 1 if report.failed else 0
