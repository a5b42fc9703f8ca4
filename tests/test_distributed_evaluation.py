"""Evaluation under torchrun (2 CPU processes, gloo) writes what the single process writes.

One class has 3 images (batches of 2: process 0 scores 2, process 1 scores 1) and one has 2
(process 1 scores none), so uneven and empty shards are both exercised; the feature cache is
filled by the two processes together and then read by the single-process run.
"""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from pmoe.data import build_manifest
from pmoe.data.synthetic import write_dataset
from pmoe.evaluation import evaluate
from test_evaluation import make_run, read_metrics, write_synthetic

BATCH = 2


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    run_dir, root = make_run(tmp_path / "run"), write_synthetic(tmp_path / "data")
    frame = build_manifest("synthetic-b", root)
    frame = pd.concat([frame[frame["cls"] == "ring"], frame[frame["cls"] == "tablet"].iloc[[0, -1]]])
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    common = dict(manifest=tmp_path / "manifest.csv", cache_dir=tmp_path / "cache", overlays=1, batch_size=BATCH)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pmoe.cli", "evaluate", "--checkpoint", str(run_dir), "--dataset", "synthetic-b",
               "--data-root", str(root), "--out", str(tmp_path / "ddp"), "--manifest", str(common["manifest"]),
               "--cache-dir", str(common["cache_dir"]), "--overlays", "1", "--batch-size", str(BATCH),
               "--device", "cpu", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluate(run_dir, "synthetic-b", root, tmp_path / "single", device="cpu", progress=False, **common)
    finally:
        torch.set_num_threads(threads)
    for name in ("metrics.csv", "scores.csv", "routing.csv"):
        ddp, single = (read_metrics(tmp_path / folder / name) for folder in ("ddp", "single"))
        numbers = ddp.select_dtypes("number").columns
        assert len(ddp) > 0 and list(ddp.columns) == list(single.columns)
        pd.testing.assert_frame_equal(ddp.drop(columns=numbers), single.drop(columns=numbers))
        pd.testing.assert_frame_equal(ddp[numbers], single[numbers], check_exact=False, rtol=1e-6, atol=1e-6)
    assert len(pd.read_csv(tmp_path / "ddp" / "scores.csv")) == 5
    listing = [sorted(p.name for p in (tmp_path / folder / "overlays").rglob("*.png"))
               for folder in ("ddp", "single")]
    assert listing[0] == listing[1] and len(listing[0]) == 4


@pytest.mark.slow
def test_two_processes_fill_the_cache_of_every_class_completely(tmp_path):
    """10 images in each of 2 classes: the main process decides which entries are missing and both
    processes get the same list, so no entry is skipped while the other process is still busy with
    the previous class's metrics (each process deciding for itself skipped some)."""
    run_dir = make_run(tmp_path / "run")
    root = write_dataset("synthetic-b", tmp_path / "data", image_size=48, n_normal=4, n_anomalous=6)
    frame = build_manifest("synthetic-b", root)
    frame[frame["cls"].isin(["ring", "tablet"])].to_csv(tmp_path / "manifest.csv", index=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pmoe.cli", "evaluate", "--checkpoint", str(run_dir), "--dataset", "synthetic-b",
               "--data-root", str(root), "--out", str(tmp_path / "ddp"), "--manifest", str(tmp_path / "manifest.csv"),
               "--cache-dir", str(tmp_path / "cache"), "--batch-size", "2", "--overlays", "3", "--device", "cpu",
               "--quiet"]  # the overlays keep the main process busy after each class
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 20
    assert len(pd.read_csv(tmp_path / "ddp" / "scores.csv")) == 20
