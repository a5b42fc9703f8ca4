"""Benchmark pmoe.metrics against the slow references on one VisA-class-sized class.

Usage: python benchmarks/metrics.py [--small] [--images 200] [--size 518] [--seed 0]

Builds a synthetic class (200 maps of 518x518, half the images with 1-3 elliptic defects),
then times each reference of tests/reference_metrics.py (the literature's threshold loop,
the MVTec AD sort, scikit-learn's AUROC and AP) and the fast path side by side, and prints
both times, the speed-up and the absolute difference of the results; the last row times
``class_metrics``, which computes the pixel metrics and PRO from one sort. The PRO target is
a speed-up of at least 30x with results equal to 1e-6. F1-max is checked against
scikit-learn by the tests only, which keeps the full run near four minutes on two idle CPU
cores; ``--small`` (24 maps of 128x128) takes seconds. Exits 1 if a result differs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from pmoe.metrics import aupro, class_metrics, pixel_ap, pixel_auroc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_metrics import (aupro_anomalyclip_loop, aupro_exact_sorted,  # noqa: E402
                               synthetic_class)

TOLERANCE = 1e-6
SPEED_UP_TARGET = 30
FAST_REPEATS = 3  # the fast path's time is the best of 3 calls; the slow references run once
# The rows that class_metrics(kind="pixel") computes together, and its names for them.
ONE_SORT_METRICS = {"PRO anomalyclip": "pro", "pixel AUROC": "pixel_auroc", "pixel AP": "pixel_ap"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="24 maps of 128x128 (smoke run)")
    parser.add_argument("--images", type=int, default=200, help="maps in the class")
    parser.add_argument("--size", type=int, default=518, help="map height and width")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.small:
        args.images, args.size = 24, 128
    return args


def timed(function, *args, repeats=1, **kwargs):
    """(result, seconds) of a call; with ``repeats`` the fastest of that many calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return result, best


def comparisons(masks, maps):
    """(name, reference name, reference call, fast call) of every timed pixel metric."""
    truth, scores = masks.ravel().astype(np.uint8), maps.ravel().astype(np.float64)  # faster
    return [
        ("PRO anomalyclip", "threshold loop",
         lambda: aupro_anomalyclip_loop(masks, maps, progress=True), lambda: aupro(masks, maps)),
        ("PRO exact", "MVTec sort", lambda: aupro_exact_sorted(masks, maps),
         lambda: aupro(masks, maps, mode="exact")),
        ("pixel AUROC", "scikit-learn", lambda: roc_auc_score(truth, scores),
         lambda: pixel_auroc(masks, maps)),
        ("pixel AP", "scikit-learn", lambda: average_precision_score(truth, scores),
         lambda: pixel_ap(masks, maps)),
    ]


def row(name, reference, reference_s, fast_s, difference) -> str:
    """One line of the results table."""
    verdict = "equal" if difference <= TOLERANCE else "DIFFERENT"
    return (f"{name:<26} {reference:<16} {reference_s:>9.2f} {fast_s:>8.2f} "
            f"{reference_s / fast_s:>8.1f}x {difference:>10.2e}  {verdict}")


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    (_, _, masks, maps), build_s = timed(synthetic_class, rng, args.images, args.size, args.size,
                                         radius=(args.size / 100, args.size / 8))
    print(f"class: {args.images} maps of {args.size}x{args.size} ({maps.size / 1e6:.1f}M pixels, "
          f"{masks.mean():.2%} anomalous), built in {build_s:.1f} s")
    print(f"{'metric':<26} {'reference':<16} {'ref s':>9} {'fast s':>8} {'ratio':>9} "
          f"{'|diff|':>10}   (fast s: best of {FAST_REPEATS})")
    expected, reference_s, differences = {}, {}, []
    for name, reference, reference_call, fast_call in comparisons(masks, maps):
        expected[name], reference_s[name] = timed(reference_call)
        value, fast_s = timed(fast_call, repeats=FAST_REPEATS)
        differences.append(abs(value - expected[name]))
        print(row(name, reference, reference_s[name], fast_s, differences[-1]), flush=True)
        if name == "PRO anomalyclip":
            pro_ratio = reference_s[name] / fast_s
    results, all_s = timed(class_metrics, masks=masks, maps=maps, kind="pixel",
                           repeats=FAST_REPEATS)
    differences.append(max(abs(results[key].value - expected[name])
                           for name, key in ONE_SORT_METRICS.items()))
    print(row("class_metrics (one sort)", "3 references",
              sum(reference_s[name] for name in ONE_SORT_METRICS), all_s, differences[-1]))
    worst = max(differences)
    verdict = "met" if pro_ratio >= SPEED_UP_TARGET and worst <= TOLERANCE else "NOT met"
    print(f"PRO anomalyclip speed-up {pro_ratio:.1f}x, largest |diff| {worst:.1e} "
          f"(target >= {SPEED_UP_TARGET}x and <= {TOLERANCE:g}): {verdict}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
