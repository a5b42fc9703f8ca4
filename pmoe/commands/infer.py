"""Score images with a trained run: a heat-map overlay per image and scores.csv (no manifest).

Takes image files and folders (png, jpg, jpeg, bmp, tif, tiff in any letter case; other files
are skipped with a note). Writes OUT/overlays/<name>.png (names made unique when two folders
hold the same file name) and OUT/scores.csv (image, score, overlay; highest score first). An
unreadable image does not stop the run: the others are written, every unreadable file is
listed at the end and the exit status is 1. All overlays share one colour scale: map value
0 to 1 (0 to L for runs with layer_reduce = "sum").

Usage:
    pmoe infer --checkpoint runs/mvtec photos/ extra.jpg --out results/photos
    pmoe infer --checkpoint runs/mvtec data/ --recursive --out results/all --device cuda
"""

from __future__ import annotations

from pmoe.commands._options import add_device_options


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders of images")
    parser.add_argument("--checkpoint", required=True, help="run directory written by `pmoe train`")
    parser.add_argument("--out", required=True, help="output folder (overlays/ and scores.csv)")
    parser.add_argument("--recursive", action="store_true", help="also search the sub-folders of folders")
    add_device_options(parser, batch_size=8, workers_help="image-decoding worker processes")
    parser.add_argument("--clip-weights", help="where the frozen CLIP weights come from (e.g. a local file)")
    parser.add_argument("--class-name", help="class word for the prompt, for runs trained with class names")


def run(args) -> int:
    import sys
    from pathlib import Path

    from pmoe.inference import infer

    result = infer(args.checkpoint, args.paths, args.out, recursive=args.recursive,
                   batch_size=args.batch_size, device=args.device, clip_weights=args.clip_weights,
                   class_name=args.class_name, num_workers=args.workers, progress=not args.quiet)
    out = Path(args.out)
    if result.skipped:
        print(f"skipped {len(result.skipped)} file(s) that are not images: "
              + ", ".join(str(path) for path in result.skipped[:10]) + (" ..." if len(result.skipped) > 10 else ""))
    print(f"scored {len(result.scores)} image(s); wrote {out / 'scores.csv'} and {out / 'overlays'}")
    if len(result.scores):
        print(result.scores.head(10).to_string(index=False))
    if result.unreadable:
        print(f"pmoe infer: error: {len(result.unreadable)} image(s) could not be read:", file=sys.stderr)
        for path, reason in result.unreadable:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0
