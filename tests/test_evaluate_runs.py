"""Several runs evaluated on one dataset in one pass (the ablation tables): the same folders, files
and reuse keys as separate evaluations, each class's cached features read once for all runs, and
only the evaluations that are not current computed."""

import json
import shutil

import pandas as pd
import pytest

from pmoe import experiments
from pmoe.data.synthetic import write_dataset
from pmoe.evaluation import OUTPUTS, SETTINGS
from pmoe.features import CachedFeatures

VARIANTS = ["paper", "table4-l24", "table2-static"]  # four taps, one tap, no routing
TARGET, SOURCE, SEED = "synthetic-b", "synthetic-a", 0
IMAGES = 12  # synthetic-b: 4 classes x (1 normal + 2 anomalous)


@pytest.fixture()
def reads(monkeypatch):
    """The indices of every cache entry read from the disk."""
    found, read = [], CachedFeatures.__getitem__
    monkeypatch.setattr(CachedFeatures, "__getitem__", lambda self, index: found.append(index) or read(self, index))
    return found


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """Three trained tiny variants and their evaluation on synthetic-b in one pass."""
    base = tmp_path_factory.mktemp("together")
    data = base / "data"
    for name in (SOURCE, TARGET):
        write_dataset(name, data / name, image_size=48, n_normal=1, n_anomalous=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PMOE_CACHE", str(base / "cache"))
        for variant in VARIANTS:
            experiments.train("tiny", variant, SOURCE, data, base / "out", seed=SEED, progress=False)
        found, read = [], CachedFeatures.__getitem__
        patch.setattr(CachedFeatures, "__getitem__", lambda self, index: found.append(index) or read(self, index))
        metrics, failures = experiments.run_ablations("tiny", VARIANTS, [TARGET], data, base / "out", seeds=[SEED])
        patch.setattr(CachedFeatures, "__getitem__", read)
        yield {"data": data, "out": base / "out", "base": base, "metrics": metrics, "failures": failures,
               "reads": list(found)}


def folder(out, variant):
    return experiments.eval_dir(out, variant, SOURCE, TARGET, SEED)


def modified(out):
    return {variant: (folder(out, variant) / SETTINGS).stat().st_mtime_ns for variant in VARIANTS}


def test_one_pass_reads_each_cached_image_once_and_writes_what_separate_evaluations_write(plan, reads):
    assert plan["failures"].empty
    assert sorted(plan["reads"]) == sorted(list(range(3)) * 4)  # each class's 3 entries, once for 3 runs
    separate = plan["base"] / "separate"
    shutil.copytree(plan["out"] / "runs", separate / "runs")  # the same trained weights
    frames = [experiments.evaluate("tiny", variant, TARGET, plan["data"], separate, seed=SEED, progress=False)
              for variant in VARIANTS]
    assert len(reads) == len(VARIANTS) * IMAGES  # separately, every run reads every entry
    pd.testing.assert_frame_equal(plan["metrics"], pd.concat(frames, ignore_index=True))
    for variant in VARIANTS:
        ours, theirs = folder(plan["out"], variant), folder(separate, variant)
        for name in OUTPUTS:
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), (variant, name)
        ours, theirs = (json.loads((path / SETTINGS).read_text()) for path in (ours, theirs))
        assert ours.pop("provenance")["packages"] == theirs.pop("provenance")["packages"]
        assert ours == theirs
    assert set(plan["metrics"]["run"]) == set(VARIANTS) and set(plan["metrics"]["train_set"]) == {SOURCE}


def test_current_evaluations_are_read_back_and_a_failing_target_records_its_jobs(plan, reads, monkeypatch):
    monkeypatch.setenv("PMOE_CACHE", str(plan["base"] / "cache"))
    before = modified(plan["out"])
    metrics, failures = experiments.run_ablations("tiny", VARIANTS, [TARGET, "btad"], plan["data"], plan["out"],
                                                  seeds=[SEED])
    assert not reads and modified(plan["out"]) == before
    pd.testing.assert_frame_equal(metrics, plan["metrics"])
    assert failures["variant"].tolist() == VARIANTS and set(failures["target"]) == {"btad"}
    assert failures["error"].str.contains("dataset 'btad' not found").all()


def test_only_the_evaluation_that_is_not_current_is_computed(plan, reads, monkeypatch):
    monkeypatch.setenv("PMOE_CACHE", str(plan["base"] / "cache"))
    (folder(plan["out"], "table4-l24") / SETTINGS).unlink()  # as an interrupted evaluation leaves it
    kept = {variant: (folder(plan["out"], variant) / "metrics.csv").stat().st_mtime_ns for variant in VARIANTS}
    metrics, failures = experiments.run_ablations("tiny", VARIANTS, [TARGET], plan["data"], plan["out"], seeds=[SEED])
    assert failures.empty
    assert len(reads) == IMAGES  # the one run read every entry once
    now = {variant: (folder(plan["out"], variant) / "metrics.csv").stat().st_mtime_ns for variant in VARIANTS}
    assert [variant for variant in VARIANTS if now[variant] != kept[variant]] == ["table4-l24"]
    pd.testing.assert_frame_equal(metrics, plan["metrics"])
