"""Write a synthetic anomaly dataset (synthetic-a or synthetic-b) in the MVTec AD layout.

Four classes per set (synthetic-a: weave, grain, disc, plate; synthetic-b: mesh, marble,
ring, tablet), normal and anomalous test images with exact masks, deterministic from the
seed. Train on one set and evaluate on the other to exercise the cross-dataset protocol.

Usage:
    pmoe synthesize synthetic-a --root data/synthetic-a
    pmoe synthesize synthetic-b --root data/synthetic-b --seed 1 --image-size 256 \
        --n-normal 40 --n-anomalous 60
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("name", choices=["synthetic-a", "synthetic-b"],
                        help="which class set to write")
    parser.add_argument("--root", required=True, help="output folder (one sub-folder per class)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--image-size", type=int, default=128,
                        help="image side in pixels (default 128)")
    parser.add_argument("--n-normal", type=int, default=8,
                        help="normal test images per class (default 8)")
    parser.add_argument("--n-anomalous", type=int, default=12,
                        help="anomalous test images per class (default 12)")
    parser.add_argument("--overwrite", action="store_true", help="replace class folders that exist")


def run(args) -> int:
    from pmoe.data import dataset_info
    from pmoe.data.synthetic import write_dataset

    root = write_dataset(args.name, args.root, seed=args.seed, image_size=args.image_size,
                         n_normal=args.n_normal, n_anomalous=args.n_anomalous,
                         overwrite=args.overwrite)
    classes = dataset_info(args.name).classes
    print(f"wrote {args.name} to {root}: {len(classes)} classes ({', '.join(classes)}), "
          f"{args.n_normal} normal + {args.n_anomalous} anomalous test images each, "
          f"{args.image_size} px; next: pmoe manifest {args.name} --root {root}")
    return 0
