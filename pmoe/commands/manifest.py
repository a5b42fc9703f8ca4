"""Build and validate the test manifest of a dataset as distributed (checked against Table 7).

Reads the dataset folder in its original layout, pairs masks with images by name, decodes
every file, prints per-class counts and the comparison with the paper's Table 7, and writes
the manifest CSV atomically (default data_manifests/NAME.csv). Nothing is written when a
file cannot be paired or read, or, with --strict, when the counts differ from Table 7.

Usage:
    pmoe manifest mvtec --root /data/mvtec_anomaly_detection
    pmoe manifest visa --root /data/VisA --out manifests/visa.csv --strict
    pmoe manifest synthetic-a --root data/synthetic-a --no-verify
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("name", help="dataset name: mvtec, visa, mpdd, btad, sdd, dagm, dtd, "
                        "headct, brainmri, br35h, isic, colondb, clinicdb, kvasir, endo, "
                        "synthetic-a, synthetic-b")
    parser.add_argument("--root", required=True, help="folder the dataset archive was extracted to")
    parser.add_argument("--out", help="output CSV (default data_manifests/NAME.csv)")
    parser.add_argument("--strict", action="store_true",
                        help="fail when the counts or classes differ from Table 7")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip decoding every image and mask (faster, checks names only)")


def run(args) -> int:
    import warnings

    from pmoe.data import build_manifest, check_readable, dataset_info, validate_manifest
    from pmoe.io import write_csv

    info = dataset_info(args.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = build_manifest(info.name, args.root)
    unreadable = [] if args.no_verify else check_readable(frame, args.root)
    report = validate_manifest(info.name, frame, unreadable=unreadable)
    print(report.text())
    for warning in caught:
        print(f"warning: {warning.message}")
    report.check(strict=args.strict)
    if report.differences:
        print("note: the manifest differs from Table 7 and is written anyway (a subset?); "
              "pass --strict to refuse it")
    out = Path(args.out) if args.out else Path("data_manifests") / f"{info.name}.csv"
    write_csv(frame, out)
    print(f"wrote {out} ({len(frame)} rows)")
    return 0
