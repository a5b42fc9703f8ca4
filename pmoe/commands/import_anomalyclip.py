"""Import one of AnomalyCLIP's released checkpoints (epoch_15.pth) as a pmoe run directory.

Reads their file with weights-only loading (tensors only; a file holding other pickled objects
is refused), checks every key and shape against the preset's prompt learner and its frozen
token embeddings against the CLIP weights, and writes RUN_DIR: config.json, provenance.json,
model.safetensors and identity.json (the training set, the source file and its SHA-1).
`pmoe evaluate --checkpoint RUN_DIR` and `pmoe infer --checkpoint RUN_DIR` take it. A failed
import leaves no RUN_DIR.

Their checkpoints: 9_12_4_multiscale/epoch_15.pth was trained on VisA (evaluate it on MVTec
AD), 9_12_4_multiscale_visa/epoch_15.pth on MVTec AD (evaluate it on VisA); --train-set is
read from those folder names when not given.

Examples:
    pmoe import-anomalyclip checkpoints/9_12_4_multiscale/epoch_15.pth --out runs/anomalyclip__visa \
        --clip-weights /models/ViT-L-14-336px.pt
    pmoe import-anomalyclip checkpoints/9_12_4_multiscale_visa/epoch_15.pth --out runs/anomalyclip4__mvtec \
        --preset anomalyclip-4layers --clip-weights /models/ViT-L-14-336px.pt
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT.pth", help="their epoch_15.pth")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--preset", default="anomalyclip", choices=["anomalyclip", "anomalyclip-4layers"],
                        help="their maps of layer 24 alone (default) or of layers 6, 12, 18, 24 summed")
    parser.add_argument("--base", default="paper", help="base preset the preset is laid over (paper, tiny, demo)")
    parser.add_argument("--clip-model", help="open_clip architecture (default: the preset's, ViT-L-14-336)")
    parser.add_argument("--clip-weights", help="CLIP weights: 'openai' or a local file (default: the preset's, openai)")
    parser.add_argument("--train-set", choices=["visa", "mvtec"],
                        help="what the checkpoint was trained on (default: from their folder name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    from pmoe.anomalyclip import import_run
    from pmoe.config import Config

    config = Config.preset(args.preset, base=args.base)
    changes = {"clip_model": args.clip_model, "clip_weights": args.clip_weights}
    config = config.replace(**{key: value for key, value in changes.items() if value is not None})
    run_dir = import_run(args.checkpoint, args.out, config, train_set=args.train_set, overwrite=args.overwrite)
    print(f"imported {args.checkpoint} as {run_dir}; next: pmoe evaluate --checkpoint {run_dir} ...")
    return 0
