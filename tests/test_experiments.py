"""The experiment plan the notebooks follow: directions, configs, input checks, collected results."""

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from pmoe import experiments, tables
from pmoe.checkpoint import write_run_metadata
from pmoe.errors import ConfigError, DataError, PmoeError


def test_zero_shot_directions_never_evaluate_a_model_on_its_training_classes():
    assert experiments.train_set_for("mvtec", "paper") == "visa"
    assert {experiments.train_set_for(name, "paper") for name in ("visa", "mpdd", "kvasir")} == {"mvtec"}
    assert experiments.train_set_for("mvtec", "demo") == "synthetic-b"
    assert experiments.train_set_for("visa", "tiny") == "synthetic-a"
    assert experiments.train_set_for("synthetic-a", "tiny") == "synthetic-b"


def test_config_for_lays_ablations_over_the_preset_backbone():
    assert experiments.config_for("paper", "table6-e16-k8").num_experts == 16
    tiny = experiments.config_for("tiny", "table4-l24")
    assert tiny.clip_model == "pmoe-tiny" and tiny.layers == (4,)
    assert experiments.config_for("paper", clip_weights="/w.pt").clip_weights == "/w.pt"
    with pytest.raises(ConfigError, match="unknown preset"):
        experiments.config_for("paper", "table9-nothing")


def test_check_inputs_names_what_to_pass(tmp_path):
    with pytest.raises(PmoeError, match="-p data_root"):
        experiments.check_inputs("paper", str(tmp_path / "missing"), "openai")
    with pytest.raises(PmoeError, match="-p clip_weights"):
        experiments.check_inputs("paper", str(tmp_path), str(tmp_path / "nope.pt"))
    with pytest.raises(DataError, match="unknown"):
        experiments.check_inputs("demo", "data/demo", "random", ["mvtek"])
    with pytest.raises(PmoeError, match="preset"):
        experiments.check_inputs("huge", "data", "openai")
    experiments.check_inputs("paper", str(tmp_path), "openai", ["mvtec"])
    with pytest.raises(PmoeError, match="dataset 'mvtec' not found"):
        experiments.dataset_root(tmp_path, "mvtec")


def test_notebook_inputs_fill_empty_values_with_the_preset_defaults(tmp_path):
    data_root, clip_weights, out = experiments.notebook_inputs("demo", "", "", "")
    assert (data_root, clip_weights, out) == (experiments.REPO / "data" / "demo", "random",
                                              experiments.REPO / "results" / "run-demo")
    assert experiments.notebook_inputs("paper", str(tmp_path), "", "x")[1:] == ("openai", experiments.REPO / "x")
    with pytest.raises(PmoeError, match="-p data_root"):
        experiments.notebook_inputs("paper", "", "", "")
    with pytest.raises(PmoeError, match="tiny random CLIP.*leave clip_weights empty"):
        experiments.notebook_inputs("demo", "", "openai", "")
    with pytest.raises(PmoeError, match="preset must be one of"):
        experiments.notebook_inputs("huge", "", "", "")


def test_repo_path_resolves_relative_paths_from_the_repository(tmp_path):
    assert experiments.repo_path("results/x") == experiments.REPO / "results" / "x"
    assert experiments.repo_path(tmp_path) == tmp_path


def test_expert_embeddings_are_the_mean_of_each_expert_per_layer(tmp_path):
    config = experiments.config_for("tiny")
    write_run_metadata(tmp_path, config)
    rng = np.random.default_rng(0)
    pools = {f"vgmop.{i}.experts.{state}": rng.normal(size=(config.num_experts, length, 64)).astype(np.float32)
             for i in range(4) for state, length in (("normal", 5), ("abnormal", 6))}
    save_file(pools, str(tmp_path / "model.safetensors"))
    embeddings, labels = experiments.expert_embeddings(tmp_path)
    assert embeddings["normal"].shape == (4 * 8, 64) and labels["abnormal"][:2] == ["L1-E1", "L1-E2"]
    assert np.allclose(embeddings["abnormal"][8 + 2], pools["vgmop.1.experts.abnormal"][2].mean(axis=0))


def write_evaluation(out_dir, variant, train_set, dataset, seed, value, finished=True):
    folder = experiments.eval_dir(out_dir, variant, train_set, dataset, seed)
    folder.mkdir(parents=True)
    pd.DataFrame({"run": [variant], "dataset": [dataset], "cls": ["01"], "metric": ["pro"],
                  "value": [value], "reason": [""]}).to_csv(folder / "metrics.csv", index=False)
    if finished:
        (folder / "evaluation.json").write_text(json.dumps({"train_set": train_set, "seed": seed}))


def test_collect_reads_every_finished_evaluation_with_its_train_set_and_seed(tmp_path):
    write_evaluation(tmp_path, "paper", "mvtec", "visa", 111, 50.0)
    write_evaluation(tmp_path, "paper", "visa", "mvtec", 112, 60.0)
    write_evaluation(tmp_path, "paper", "visa", "mpdd", 111, 70.0, finished=False)  # interrupted: left out
    frame = experiments.collect(tmp_path)
    assert sorted(zip(frame["dataset"], frame["train_set"], frame["seed"])) == [("mvtec", "visa", 112),
                                                                                 ("visa", "mvtec", 111)]
    assert frame["cls"].tolist() == ["01", "01"]
    assert experiments.collect(tmp_path / "nothing").empty
    with pytest.raises(PmoeError, match="evaluate 'paper' on 'mpdd' \\(seed 111\\) first"):
        experiments.evaluation_file(tmp_path, "paper", "mpdd", "paper", "routing.csv")


def test_zero_shot_keeps_the_rows_of_models_that_never_saw_the_dataset(tmp_path):
    write_evaluation(tmp_path, "paper", "visa", "mvtec", 111, 60.0)
    write_evaluation(tmp_path, "paper", "mvtec", "mvtec", 111, 99.0)  # Figure 6's seen evaluation
    write_evaluation(tmp_path, "paper", "mvtec", "visa", 111, 50.0)
    write_evaluation(tmp_path, "paper", "mvtec", "visa", 112, 52.0)
    ours = experiments.zero_shot_results(tmp_path, "paper")
    assert sorted(zip(ours["dataset"], ours["value"])) == [("mvtec", 60.0), ("visa", 50.0), ("visa", 52.0)]
    assert experiments.zero_shot_results(tmp_path, "paper", datasets=["visa"], seeds=[112])["value"].tolist() == [52.0]
    with pytest.raises(DataError, match="zero_shot"):
        tables.seed_values(experiments.collect(tmp_path), "paper")


def test_run_names_and_default_seeds():
    assert experiments.run_name("paper", "mvtec", 111) == "paper__mvtec__seed111"
    assert experiments.default_seeds("paper") == [111] and experiments.default_seeds("tiny") == [0]
    assert experiments.default_seeds("demo") == [0, 1]
    assert experiments.default_seeds("paper", (1, 2)) == [1, 2]


def test_require_complete_lists_every_failure():
    experiments.require_complete(pd.DataFrame(columns=["variant", "error"]), "runs")
    failures = pd.DataFrame([{"variant": "a", "error": "boom"}, {"variant": "b", "error": "bang"}])
    with pytest.raises(PmoeError, match="(?s)2 ablation runs failed.*variant=a, error=boom.*variant=b"):
        experiments.require_complete(failures, "ablation runs")
