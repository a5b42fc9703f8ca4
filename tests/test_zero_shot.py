"""The training-free detector (preset clip-zero-shot): written prompts, CLIP weights only, no run directory."""

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import pmoe
from pmoe import cli
from pmoe.backbone import load_clip
from pmoe.data.synthetic import write_dataset
from pmoe.zero_shot_prompts import ensemble_text_features

CONFIG = pmoe.Config.preset("clip-zero-shot", base="tiny")
TINY_ARGS = ["--preset", "clip-zero-shot", "--base", "tiny", "--clip-weights", "random"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset("synthetic-b", tmp_path_factory.mktemp("zero-shot") / "synthetic-b", n_normal=1,
                         n_anomalous=1)


def images(count, seed=0):
    return torch.randn(count, 3, CONFIG.image_size, CONFIG.image_size, generator=torch.Generator().manual_seed(seed))


def test_the_preset_scores_with_the_written_ensemble_and_nothing_to_train():
    clip = load_clip(CONFIG)
    model = pmoe.PromptMoE(CONFIG, clip).eval()
    x = images(2)
    with torch.no_grad():
        out = model(x)
        cls_token = model.encode_image(x).cls_token
    text = ensemble_text_features(clip)  # tested against hand-encoded sentences in test_anomalyclip.py
    assert torch.allclose(out["text_features"], text.expand(2, CONFIG.num_layers, 2, -1))
    global_feature = F.normalize(cls_token @ clip.visual.proj, dim=-1)
    expected = ((global_feature @ text.T) / 0.01).softmax(dim=-1)[:, 1]  # CLIP's temperature, s = p_g
    assert torch.allclose(out["score"], expected, atol=1e-6)
    assert model.parameter_counts()["trainable"] == 0 and model.trainable_state_dict() == {}


def test_identical_images_give_identical_outputs_across_models_and_batches():
    """Two separately built models agree bit for bit; within a batch up to summation order."""
    batch = torch.cat([images(1), images(1, seed=3), images(1)])
    with torch.no_grad():
        first = pmoe.build_model(CONFIG).eval()(batch)
        second = pmoe.build_model(CONFIG).eval()(batch)
    for key in ("score", "anomaly_map"):
        assert torch.equal(first[key], second[key])
        assert torch.allclose(first[key][0], first[key][2], atol=1e-6)
    assert not torch.allclose(first["score"][0], first["score"][1], atol=1e-6)


def test_infer_and_evaluate_take_the_preset_without_a_run_directory(data, tmp_path):
    images_dir = data / "ring" / "test"
    for name in ("first", "second"):
        assert cli.main(["infer", *TINY_ARGS, str(images_dir), "--recursive", "--out", str(tmp_path / name),
                         "--quiet"]) == 0
    first, second = (pd.read_csv(tmp_path / name / "scores.csv") for name in ("first", "second"))
    assert len(first) == 2 and first.equals(second)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", *TINY_ARGS, "--dataset", "synthetic-b", "--data-root", str(data), "--out", str(out),
                     "--no-cache", "--quiet"]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["run"]) == {"clip-zero-shot"} and {"image_auroc", "pixel_auroc"} <= set(metrics["metric"])
    settings = json.loads((out / "evaluation.json").read_text())
    assert settings["run"] == "clip-zero-shot" and settings["train_set"] is None


def test_training_it_and_running_a_trainable_preset_without_a_run_are_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "clip-zero-shot", "--base", "tiny", "--train-set", "synthetic-b",
                     "--data-root", str(data), "--out", str(out), "--quiet"]) == 2
    assert "has nothing to train" in capsys.readouterr().err and not out.exists()
    assert cli.main(["infer", "--preset", "anomalyclip", "--base", "tiny", str(data), "--out", str(out)]) == 2
    assert "has learnable prompts: train it" in capsys.readouterr().err and not out.exists()
