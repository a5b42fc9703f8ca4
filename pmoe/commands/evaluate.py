"""Evaluate a trained run (or a training-free preset) zero-shot on a dataset: metrics.csv, scores.csv, routing.csv.

Metrics follow the dataset's kind (image, pixel or both), per class and as the unweighted
class mean the paper reports, in percent; an undefined metric is NaN with its reason. Frozen
CLIP features are cached ($PMOE_CACHE, default ~/.cache/pmoe/features) unless --no-cache.

Usage:
    pmoe evaluate --checkpoint runs/mvtec --dataset visa --data-root /data/VisA --out results/visa
    pmoe evaluate --checkpoint runs/mvtec --dataset synthetic-b --data-root data/synthetic-b \
        --out results/synthetic-b --classes ring tablet --overlays 4 --pro-mode exact
    torchrun --nproc_per_node 4 -m pmoe.cli evaluate --checkpoint runs/mvtec --dataset visa ...
    pmoe evaluate --preset clip-zero-shot --clip-weights W --dataset visa --data-root /data/VisA --out results/zs

A training-free preset (clip-zero-shot) needs no run directory: pass --preset instead of
--checkpoint; the run column of metrics.csv is then the preset's name.
"""

from __future__ import annotations

from pathlib import Path

from pmoe.commands._options import add_cache_options, add_device_options, add_model_options, cache_dir, model_source


def add_arguments(parser) -> None:
    add_model_options(parser)
    parser.add_argument("--dataset", required=True, help="dataset name (mvtec, visa, ..., synthetic-b)")
    parser.add_argument("--data-root", required=True, help="folder the dataset was extracted to")
    parser.add_argument("--out", required=True, help="output folder for the CSVs and overlays")
    parser.add_argument("--manifest", help="manifest CSV to use instead of reading --data-root's layout")
    parser.add_argument("--classes", nargs="+", help="evaluate only these classes")
    parser.add_argument("--pro-mode", choices=["anomalyclip", "exact"], default="anomalyclip",
                        help="PRO: the literature's 200 thresholds (default) or the exact MVTec AD curve")
    parser.add_argument("--overlays", type=int, default=0, metavar="N",
                        help="write heat-map overlays of the N highest and N lowest scoring images per class")
    add_cache_options(parser)
    add_device_options(parser, batch_size=16, auto_workers=True)
    parser.add_argument("--clip-weights", help="where the frozen CLIP weights come from (e.g. a local file)")
    parser.add_argument("--run-name", help="the run column of metrics.csv (default: the run folder's name, "
                                           "or the preset's)")


def run(args) -> int:
    import torch.distributed as dist

    from pmoe.evaluation import evaluate
    from pmoe.runtime import is_main_process

    try:
        metrics = evaluate(
            model_source(args), args.dataset, args.data_root, args.out, manifest=args.manifest,
            classes=args.classes, pro_mode=args.pro_mode, overlays=args.overlays, cache_dir=cache_dir(args),
            batch_size=args.batch_size, device=args.device, clip_weights=args.clip_weights,
            run_name=args.run_name or args.preset, num_workers=args.workers, progress=not args.quiet,
        )
        if is_main_process():
            print(summary(metrics, Path(args.out), args.overlays))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def summary(metrics, out: Path, overlays: int) -> str:
    """The class x metric table in percent (one decimal, as the paper) and the files written."""
    import pandas as pd

    table = metrics.pivot_table(index="cls", columns="metric", values="value", sort=False, dropna=False)
    table = table[list(dict.fromkeys(metrics["metric"]))].round(1)
    lines = [table.to_string(na_rep="-"), ""]
    lines += [f"{row.cls} {row.metric}: {row.reason}" for row in metrics.itertuples() if row.reason]
    files = ", ".join(str(out / name) for name in ("metrics.csv", "scores.csv", "routing.csv", "evaluation.json"))
    lines.append(f"wrote {files}")
    if pd.read_csv(out / "routing.csv", nrows=1).empty:
        lines.append("routing.csv holds only its header: this model's prompts are static (no routing)")
    if overlays:
        lines.append(f"overlays of the {overlays} highest and lowest scoring images per class in {out / 'overlays'}")
    return "\n".join(lines)
