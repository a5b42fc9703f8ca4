"""Score images with a trained run or a training-free preset: an overlay per image and scores.csv.

Takes image files and folders (png, jpg, jpeg, bmp, tif, tiff in any letter case; other files
are skipped with a note, hidden files such as .DS_Store and AppleDouble ._* files are ignored).
Photos are turned upright by their EXIF orientation, for the model and for the overlays.
Writes OUT/overlays/<name>.png (the photo's own size and aspect ratio, long side at most
--overlay-max-side px; names made unique when two folders hold the same file name) and
OUT/scores.csv (image, score, overlay; highest score first). All overlays share one colour
scale: map value 0 to 1 (0 to L for runs with layer_reduce = "sum").

--save-maps also writes OUT/maps/<name>.npy: each anomaly map at model resolution (S x S
float32, smoothed as at evaluation), and adds a `map` column. --threshold T adds a boolean
`anomalous` column (score >= T) and the summary names the flagged images.

An image that cannot be decoded or converted does not stop the run: the others are written,
every such file is listed at the end with the reason and the exit status is 1.

Usage:
    pmoe infer --checkpoint runs/mvtec photos/ extra.jpg --out results/photos
    pmoe infer --checkpoint runs/mvtec photos/ --out results/photos --threshold 0.6 --save-maps
    pmoe infer --checkpoint runs/mvtec data/ --recursive --out results/all --device cuda
    pmoe infer --preset clip-zero-shot --clip-weights W photos/ --out results/photos   # training-free
"""

from __future__ import annotations

from pmoe.commands._options import add_device_options, add_model_options, model_source

FLAGGED_SHOWN = 20  # flagged images named in the summary; scores.csv lists all
OVERLAY_MAX_SIDE = 1024  # pmoe.inference.OVERLAY_MAX_SIDE, repeated so that --help does not import torch


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders of images")
    add_model_options(parser)
    parser.add_argument("--out", required=True, help="output folder (overlays/, scores.csv, maps/)")
    parser.add_argument("--recursive", action="store_true", help="also search the sub-folders of folders")
    parser.add_argument("--threshold", type=float, metavar="T",
                        help="flag images with score >= T: an `anomalous` column in scores.csv, named in the summary")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write each anomaly map as OUT/maps/<name>.npy (model resolution, float32)")
    parser.add_argument("--overlay-max-side", type=int, default=OVERLAY_MAX_SIDE, metavar="PX",
                        help=f"long side of the overlays in pixels; smaller photos keep their size "
                             f"(default {OVERLAY_MAX_SIDE})")
    add_device_options(parser, batch_size=8, workers_help="image-decoding worker processes")
    parser.add_argument("--clip-weights",
                        help="where the frozen CLIP weights come from: a local file (OpenAI's .pt, or an open_clip "
                             "state dict .pt/.bin/.safetensors) or 'openai'; default: as the run was trained, "
                             "or the preset's")
    parser.add_argument("--class-name", help="class word for the prompt, for runs trained with class names")


def run(args) -> int:
    import sys
    from pathlib import Path

    from pmoe.inference import infer

    result = infer(model_source(args), args.paths, args.out, recursive=args.recursive,
                   batch_size=args.batch_size, device=args.device, clip_weights=args.clip_weights,
                   class_name=args.class_name, num_workers=args.workers, progress=not args.quiet,
                   overlay_max_side=args.overlay_max_side, save_maps=args.save_maps, threshold=args.threshold)
    out = Path(args.out)
    if result.skipped:
        print(f"skipped {len(result.skipped)} file(s) that are not images: "
              + ", ".join(str(path) for path in result.skipped[:10]) + (" ..." if len(result.skipped) > 10 else ""))
    folders = ", ".join(str(out / name) for name in ("overlays", "maps") if args.save_maps or name == "overlays")
    print(f"scored {len(result.scores)} image(s); wrote {out / 'scores.csv'} and {folders}")
    if len(result.scores):
        print(result.scores.head(10).to_string(index=False))
    if args.threshold is not None:
        print(flagged_summary(result.scores, args.threshold))
    if result.unreadable:
        print(f"pmoe infer: error: {len(result.unreadable)} image(s) could not be read:", file=sys.stderr)
        for path, reason in result.unreadable:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


def flagged_summary(scores, threshold: float) -> str:
    """One line naming the images flagged anomalous (the first FLAGGED_SHOWN of them)."""
    flagged = scores.loc[scores["anomalous"], "image"].tolist()
    head = f"{len(flagged)} of {len(scores)} image(s) flagged anomalous (score >= {threshold:g})"
    if not flagged:
        return head + "."
    more = f" ... and {len(flagged) - FLAGGED_SHOWN} more (see scores.csv)" if len(flagged) > FLAGGED_SHOWN else ""
    return f"{head}: {', '.join(flagged[:FLAGGED_SHOWN])}{more}"
