"""Reproduce the paper: run every numbered notebook in order with papermill.

Examples:
    pmoe reproduce --preset demo                     # tiny CLIP, synthetic data, < 10 min on a CPU
    pmoe reproduce --preset paper --data-root /data/zsad --clip-weights /models/ViT-L-14-336.pt
    pmoe reproduce --preset paper --data-root /data/zsad --datasets mvtec visa --notebooks 04_table1

Executed notebooks go to results/executed/<preset>/, tables and figures to results/run-<preset>/.
A failing notebook does not stop the others; the summary lists every failure (exit status 1).
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
    parser.add_argument("--prepare-only", action="store_true",
                        help="only inject the parameters (papermill --prepare-only), e.g. for nbval")


def run(args) -> int:
    from pmoe.reproduce import reproduce

    report = reproduce(
        args.preset, data_root=args.data_root, clip_weights=args.clip_weights, datasets=args.datasets,
        out_dir=args.out_dir, executed_dir=args.executed_dir, notebooks=args.notebooks,
        prepare_only=args.prepare_only,
    )
    print(report.summary())
    return 1 if report.failed else 0
