"""Results are reused only when their recorded key matches: an evaluation by config, checkpoint
content, options, manifest and package version; a finished training run by config, data and
version (a finished run that differs is an error naming the differences, never overwritten)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import pmoe
from pmoe import evaluation, experiments
from pmoe.errors import ConfigError
from pmoe.evaluation import evaluate, reusable_metrics
from pmoe.data import build_manifest
from pmoe.data.synthetic import write_dataset
from pmoe.identity import differences, manifest_digest, tensors_sha1
from pmoe.training import train
from test_evaluation import make_run, write_synthetic

TINY = pmoe.Config.preset("tiny")


@pytest.fixture()
def evaluated(tmp_path):
    """A run (copied per test), a copy of synthetic-b and one finished evaluation of the run on it."""
    space = {"run": make_run(tmp_path / "run"), "data": write_synthetic(tmp_path / "data"), "out": tmp_path / "out"}
    evaluate(space["run"], "synthetic-b", space["data"], space["out"], progress=False)
    return space


def reusable(space, **options):
    return reusable_metrics(space["run"], "synthetic-b", space["data"], space["out"], **options)


def test_a_matching_evaluation_is_reused(evaluated):
    reused = reusable(evaluated, batch_size=3, device="cpu", cache_dir=None, progress=False)
    assert reused is not None and set(reused["metric"]) >= {"image_auroc", "pro"}


@pytest.mark.parametrize("options", [{"pro_mode": "exact"}, {"overlays": 1}, {"classes": ["ring"]}])
def test_other_evaluation_options_recompute(evaluated, options):
    assert reusable(evaluated, **options) is None


def test_other_checkpoint_content_recomputes(evaluated):
    path = evaluated["run"] / "model.safetensors"
    tensors = load_file(str(path))
    tensors["context"] = tensors["context"] + 1e-3
    save_file(tensors, str(path))
    assert reusable(evaluated) is None


def test_another_config_recomputes(evaluated):
    config = pmoe.Config.load(evaluated["run"] / "config.json").replace(sigma=2.0)  # other smoothing
    (evaluated["run"] / "config.json").write_text(config.to_json())
    assert reusable(evaluated) is None


def test_another_manifest_recomputes(evaluated):
    frame = build_manifest("synthetic-b", evaluated["data"])
    (evaluated["data"] / frame["image"].iloc[0]).unlink()  # one normal image fewer
    assert reusable(evaluated) is None


def test_another_package_version_recomputes(evaluated, monkeypatch):
    monkeypatch.setattr(pmoe, "__version__", "0.0.0-other")
    assert reusable(evaluated) is None


def test_an_unfinished_evaluation_is_not_reused(evaluated):
    (evaluated["out"] / "routing.csv").unlink()
    assert reusable(evaluated) is None
    evaluate(evaluated["run"], "synthetic-b", evaluated["data"], evaluated["out"], progress=False)
    assert reusable(evaluated) is not None
    (evaluated["out"] / evaluation.SETTINGS).unlink()  # a folder an interrupted evaluation left
    assert reusable(evaluated) is None


def test_the_plan_reuses_a_matching_evaluation_and_recomputes_otherwise(tmp_path, monkeypatch):
    """experiments.evaluate: the second call reads back; another pro_mode computes again."""
    data = tmp_path / "data"
    write_dataset("synthetic-a", data / "synthetic-a", image_size=48, n_normal=1, n_anomalous=2)
    write_dataset("synthetic-b", data / "synthetic-b", image_size=48, n_normal=1, n_anomalous=2)
    calls, original = [], evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: calls.append(k.get("pro_mode")) or original(*a, **k))
    options = {"progress": False, "cache_dir": tmp_path / "cache"}
    first = experiments.evaluate("tiny", "paper", "synthetic-b", data, tmp_path / "out", **options)
    again = experiments.evaluate("tiny", "paper", "synthetic-b", data, tmp_path / "out", **options)
    assert len(calls) == 1 and first.equals(again)
    assert set(first["train_set"]) == {"synthetic-a"} and set(first["seed"]) == {TINY.seed}
    experiments.evaluate("tiny", "paper", "synthetic-b", data, tmp_path / "out", pro_mode="exact", **options)
    assert calls == [None, "exact"]


@pytest.fixture()
def finished(tmp_path):
    root = write_dataset("synthetic-a", tmp_path / "data", image_size=48, n_normal=1, n_anomalous=2)
    run = train(TINY, "synthetic-a", root, tmp_path / "run", epochs=1, cache_dir=tmp_path / "cache", progress=False)
    return {"root": root, "run": run, "cache": tmp_path / "cache", "weights": load_file(str(run / "model.safetensors"))}


def retrain(finished, config=TINY, root=None, **options):
    return train(config, "synthetic-a", root or finished["root"], finished["run"], epochs=1, resume=True,
                 cache_dir=finished["cache"], progress=False, **options)


def test_a_finished_run_with_another_config_is_an_error_naming_the_keys(finished):
    with pytest.raises(ConfigError, match=r"config differs \(lr: 0\.003 -> 0\.1\)"):
        retrain(finished, TINY.replace(lr=0.1))
    assert load_file(str(finished["run"] / "model.safetensors")).keys() == finished["weights"].keys()


def test_a_finished_run_on_other_data_or_version_is_an_error(finished, tmp_path, monkeypatch):
    other = shutil.copytree(finished["root"], tmp_path / "other")
    (other / build_manifest("synthetic-a", other)["image"].iloc[0]).unlink()
    with pytest.raises(ConfigError, match="manifest_sha1.*num_samples: 12 -> 11"):
        retrain(finished, root=other)
    monkeypatch.setattr(pmoe, "__version__", "9.9.9")
    with pytest.raises(ConfigError, match="pmoe_version: '0.1.0' -> '9.9.9'"):
        retrain(finished)


def test_a_finished_run_that_matches_is_kept(finished, capsys):
    assert retrain(finished) == finished["run"]
    assert "nothing to do" in capsys.readouterr().out
    weights = load_file(str(finished["run"] / "model.safetensors"))
    assert all(torch.equal(weights[name], finished["weights"][name]) for name in weights)


def test_differences_name_nested_keys_and_ignore_tuple_versus_list():
    saved = {"config": {"layers": [1, 2], "lr": 0.1}, "version": "1"}
    assert differences(saved, {"config": {"layers": (1, 2), "lr": 0.1}, "version": "1"}) == []
    assert differences(saved, {"config": {"layers": (1, 3), "lr": 0.1}}) == [
        "config.layers: [1, 2] -> [1, 3]", "version: '1' -> '(absent)'"]


def test_digests_change_with_content_only(tmp_path):
    tensors = {"a": torch.ones(2, 3), "b": torch.zeros(4)}
    assert tensors_sha1(tensors) == tensors_sha1({"b": torch.zeros(4), "a": torch.ones(2, 3)})
    assert tensors_sha1(tensors) != tensors_sha1({**tensors, "a": torch.ones(3, 2)})
    assert tensors_sha1(tensors) != tensors_sha1({**tensors, "b": torch.tensor([0.0, 0, 0, 1e-6])})
    frame = build_manifest("synthetic-a", write_dataset("synthetic-a", tmp_path, n_normal=1, n_anomalous=1))
    assert manifest_digest(frame) == manifest_digest(frame.copy())
    assert manifest_digest(frame) != manifest_digest(frame.assign(label=1 - frame["label"]))
