"""torchrun with 2 gloo processes trains the same model as 1 process (global batch split in two).

15 samples in batches of 7 make global batches of 7, 7 and 1: shards of 4 and 3 samples, which
must be weighted by their sizes, and a last batch that leaves the second process only a
zero-weight stand-in sample. The runs differ only by
floating-point summation order: weights agree to 2e-5 absolute (Adam divides tiny gradient
differences by tiny second moments), logged losses to 5e-6 relative. A local instead of
global balance loss, or unweighted shards, moves weights by ~8e-3.
"""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import pmoe
from pmoe.data import build_manifest
from pmoe.data.synthetic import write_dataset
from pmoe.io import write_csv
from pmoe.training import train
from pmoe.training_log import FILES

SAMPLES = 15
BATCH = 7


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    root = write_dataset("synthetic-a", base / "synthetic-a", n_normal=2, n_anomalous=3)
    manifest = write_csv(build_manifest("synthetic-a", root).head(SAMPLES), base / "manifest.csv")
    return {"root": root, "manifest": manifest, "cache": base / "cache", "base": base}


def torchrun(data, out, processes: int):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "pmoe.cli", "train", "--preset", "tiny", "--manifest", str(data["manifest"]),
               "--data-root", str(data["root"]), "--out", str(out), "--epochs", "2", "--batch-size", str(BATCH),
               "--cache-dir", str(data["cache"]), "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(data):
    single = train(pmoe.Config.preset("tiny"), None, data["root"], data["base"] / "single", manifest=data["manifest"],
                   epochs=2, batch_size=BATCH, cache_dir=data["cache"], device="cpu", progress=False)
    torchrun(data, data["base"] / "ddp", processes=2)
    ddp = data["base"] / "ddp"
    one, two = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-4)
    steps = [pd.read_csv(run / FILES["steps"]) for run in (single, ddp)]
    assert len(steps[0]) == 6
    np.testing.assert_allclose(steps[1].to_numpy(), steps[0].to_numpy(), rtol=1e-4)
    usage = [pd.read_csv(run / FILES["usage"]) for run in (single, ddp)]
    pd.testing.assert_frame_equal(usage[1], usage[0])
