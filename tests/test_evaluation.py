"""Evaluation on synthetic data with a random tiny run: the files, their numbers against a
plain forward pass and scikit-learn, the dataset kinds, routing records, overlays,
atomic outputs, the command line and clear errors."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from pmoe import cli, plotting
from pmoe.checkpoint import load_run, save_weights, write_run_metadata
from pmoe.config import Config
from pmoe.data import AnomalyDataset, build_manifest, load_image
from pmoe.data.synthetic import write_dataset
from pmoe.data.twins import write_twin
from pmoe.errors import CheckpointError, ConfigError, DataError
from pmoe.evaluation import (METRIC_COLUMNS, ROUTING_COLUMNS, SCORE_COLUMNS, _file_stem, evaluate, image_ids,
                             shard_indices)
from pmoe.inference import denormalize
from pmoe.metrics import IMAGE_METRICS, KINDS, class_metrics
from pmoe.model import build_model

TINY = Config.preset("tiny")
CLASSES = ("mesh", "marble", "ring", "tablet")
N_NORMAL, N_ANOMALOUS = 1, 2


def read_metrics(path) -> pd.DataFrame:
    """metrics.csv as written: NaN values, empty reasons kept as empty strings."""
    return pd.read_csv(path, keep_default_na=False, na_values={"value": ["NaN"]})


def make_run(run_dir, config=TINY, seed=0) -> Path:
    """A run directory with random trainable weights, written without training."""
    torch.manual_seed(seed)
    model = build_model(config)
    write_run_metadata(run_dir, config)
    save_weights(model, Path(run_dir) / "model.safetensors")
    return Path(run_dir)


def write_synthetic(root) -> Path:
    """synthetic-b with 4 classes x (1 normal + 2 anomalous) small images."""
    return write_dataset("synthetic-b", root, image_size=48, n_normal=N_NORMAL, n_anomalous=N_ANOMALOUS)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A run, synthetic-b, and one evaluation of the run on it (with overlays)."""
    base = tmp_path_factory.mktemp("evaluation")
    space = {"run": make_run(base / "run"), "data": write_synthetic(base / "data"), "out": base / "out"}
    space["metrics"] = evaluate(space["run"], "synthetic-b", space["data"], space["out"], overlays=1,
                                batch_size=4, progress=False)
    return space


def reference_outputs(model, dataset) -> dict:
    """Scores and smoothed maps of every image of ``dataset``, in one plain forward pass."""
    items = [dataset[index] for index in range(len(dataset))]
    with torch.no_grad():
        out = model(torch.stack([item["image"] for item in items]))
    return {"score": out["score"].numpy(), "map": out["anomaly_map"].numpy(),
            "mask": np.stack([item["mask"][0].numpy() > 0.5 for item in items]), "label": dataset.labels}


def test_files_have_the_fixed_columns_and_one_row_per_item(workspace):
    out, n_images = workspace["out"], len(CLASSES) * (N_NORMAL + N_ANOMALOUS)
    metrics = read_metrics(out / "metrics.csv")
    scores = pd.read_csv(out / "scores.csv")
    routing = pd.read_csv(out / "routing.csv")
    assert tuple(metrics.columns) == METRIC_COLUMNS
    assert tuple(scores.columns) == SCORE_COLUMNS
    assert tuple(routing.columns) == ROUTING_COLUMNS == plotting.ROUTING_COLUMNS
    metric_names = KINDS["both"]
    assert len(metrics) == (len(CLASSES) + 1) * len(metric_names)
    assert list(metrics["cls"].unique()) == [*CLASSES, "mean"]
    assert set(metrics["run"]) == {"run"} and set(metrics["dataset"]) == {"synthetic-b"}
    assert len(scores) == n_images and scores["image"].is_unique
    manifest = build_manifest("synthetic-b", workspace["data"])
    assert scores["image"].tolist() == manifest["image"].tolist()
    assert scores["label"].tolist() == manifest["label"].tolist()
    assert len(routing) == n_images * TINY.num_layers * 2 * TINY.top_k
    assert set(routing["layer"]) == set(TINY.layers) and set(routing["state"]) == {"normal", "abnormal"}
    assert routing["expert"].between(0, TINY.num_experts - 1).all()
    assert routing.groupby(["image", "layer", "state"])["weight"].sum().to_numpy() == pytest.approx(1, abs=1e-5)
    largest = routing.groupby(["image", "layer", "state"])["weight"].max()
    first = routing[routing["rank"] == 0].set_index(["image", "layer", "state"])["weight"]
    assert (first.sort_index() == largest.sort_index()).all()
    assert (out / "evaluation.json").is_file()
    assert not list(out.rglob(".*")), "temporary files left behind"


def test_scores_and_metrics_equal_a_per_image_reference(workspace):
    model = load_run(workspace["run"])
    frame = build_manifest("synthetic-b", workspace["data"])
    scores = pd.read_csv(workspace["out"] / "scores.csv")
    metrics = workspace["metrics"].set_index(["cls", "metric"])
    for cls in CLASSES:
        subset = frame[frame["cls"] == cls].reset_index(drop=True)
        ref = reference_outputs(model, AnomalyDataset(subset, workspace["data"], TINY.image_size))
        assert scores.loc[scores["cls"] == cls, "score"].to_numpy() == pytest.approx(ref["score"], abs=1e-5)
        expected = class_metrics(ref["label"], ref["score"], ref["mask"], ref["map"])
        for name, result in expected.items():
            assert metrics.loc[(cls, name), "value"] == pytest.approx(100 * result.value, abs=1e-3), (cls, name)
        pixels = ref["mask"].reshape(-1), ref["map"].reshape(-1)
        assert metrics.loc[(cls, "image_auroc"), "value"] == pytest.approx(
            100 * roc_auc_score(ref["label"], ref["score"]))
        assert metrics.loc[(cls, "image_ap"), "value"] == pytest.approx(
            100 * average_precision_score(ref["label"], ref["score"]))
        assert metrics.loc[(cls, "pixel_auroc"), "value"] == pytest.approx(100 * roc_auc_score(*pixels), abs=1e-3)


def test_mean_row_is_the_unweighted_class_mean(workspace):
    metrics = workspace["metrics"]
    for name, group in metrics.groupby("metric"):
        classes = group[group["cls"] != "mean"]
        mean = group[group["cls"] == "mean"]
        assert len(mean) == 1
        assert mean["value"].iloc[0] == pytest.approx(classes["value"].mean())
        assert mean["reason"].iloc[0] == ""


def test_undefined_metric_is_nan_with_reason_and_left_out_of_the_mean(workspace, tmp_path):
    frame = build_manifest("synthetic-b", workspace["data"])
    frame = frame[(frame["cls"] == "tablet") | ((frame["cls"] == "ring") & (frame["label"] == 1))]
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    metrics = evaluate(workspace["run"], "synthetic-b", workspace["data"], tmp_path / "out",
                       manifest=tmp_path / "manifest.csv", classes=["ring", "tablet"], progress=False)
    table = metrics.set_index(["cls", "metric"])
    for name in IMAGE_METRICS[:2]:
        assert math.isnan(table.loc[("ring", name), "value"]) and table.loc[("ring", name), "reason"]
        assert table.loc[("mean", name), "value"] == pytest.approx(table.loc[("tablet", name), "value"])
        assert "ring" in table.loc[("mean", name), "reason"]
    assert not math.isnan(table.loc[("ring", "pixel_auroc"), "value"])
    written = read_metrics(tmp_path / "out" / "metrics.csv")
    assert written["value"].isna().sum() == metrics["value"].isna().sum() > 0
    assert (written["reason"] != "").sum() == (metrics["reason"] != "").sum()


@pytest.mark.filterwarnings("ignore:SDD at .*raw KolektorSDD:pmoe.data.DataWarning")  # the raw-tree twin
@pytest.mark.parametrize("name, kind", [("headct", "image"), ("kvasir", "pixel"), ("sdd", "both")])
def test_dataset_kind_selects_the_metrics(workspace, tmp_path, name, kind):
    twin = write_twin(name, tmp_path / name)
    metrics = evaluate(workspace["run"], name, twin.root, tmp_path / "out", overlays=1, progress=False)
    assert metrics["metric"].unique().tolist() == list(KINDS[kind])
    scores = pd.read_csv(tmp_path / "out" / "scores.csv")
    assert len(scores) == twin.normal + twin.anomalous and scores["image"].is_unique
    overlays = list((tmp_path / "out" / "overlays").rglob("*.png"))
    assert len(overlays) == 2 * scores["cls"].nunique()


def test_class_names_in_the_prompt_come_from_the_manifest(workspace, tmp_path):
    model = build_model(TINY.replace(use_class_names=True))
    evaluate(model, "synthetic-b", workspace["data"], tmp_path / "out", classes=["ring"], progress=False)
    assert len(pd.read_csv(tmp_path / "out" / "scores.csv")) == N_NORMAL + N_ANOMALOUS


def test_routing_layers_of_the_single_vgmop_and_static_models(workspace, tmp_path):
    single = build_model(Config.preset("table2-vgmop-single", base="tiny"))
    evaluate(single, "synthetic-b", workspace["data"], tmp_path / "single", classes=["ring"], progress=False)
    routing = pd.read_csv(tmp_path / "single" / "routing.csv")
    assert set(routing["layer"]) == {"all"} and len(routing) == (N_NORMAL + N_ANOMALOUS) * 2 * TINY.top_k
    static = build_model(Config.preset("table2-static", base="tiny"))
    metrics = evaluate(static, "synthetic-b", workspace["data"], tmp_path / "static", classes=["ring"],
                       run_name="static", progress=False)
    assert set(metrics["run"]) == {"static"}
    assert (tmp_path / "static" / "routing.csv").read_text().strip() == ",".join(ROUTING_COLUMNS)


def test_overlays_show_the_highest_and_lowest_scores(workspace):
    scores = pd.read_csv(workspace["out"] / "scores.csv")
    model = load_run(workspace["run"])
    for cls in CLASSES:
        files = sorted(p.name for p in (workspace["out"] / "overlays" / cls).iterdir())
        assert [name[:5] for name in files] == ["botto", "top01"]
        ranked = scores[scores["cls"] == cls].sort_values("score")
        top, bottom = ranked.iloc[-1], ranked.iloc[0]
        assert files[1].endswith(top["image"].rsplit(".", 1)[0].replace("/", "__") + ".png")
        assert files[0].endswith(bottom["image"].rsplit(".", 1)[0].replace("/", "__") + ".png")
        written = np.asarray(Image.open(workspace["out"] / "overlays" / cls / files[1]))
        image = load_image(workspace["data"] / top["image"], TINY.image_size)
        with torch.no_grad():
            anomaly_map = model(image[None])["anomaly_map"][0].numpy()
        expected = plotting.overlay(denormalize(image), anomaly_map, vmin=0, vmax=1)
        assert written.shape == (TINY.image_size, TINY.image_size, 3)
        assert np.abs(written.astype(int) - expected).mean() < 0.05


def test_a_failed_evaluation_leaves_earlier_outputs_untouched(workspace, tmp_path):
    out = tmp_path / "out"
    evaluate(workspace["run"], "synthetic-b", workspace["data"], out, classes=["mesh"], progress=False)
    before = {name: (out / name).read_bytes() for name in ("metrics.csv", "scores.csv", "routing.csv")}
    frame = build_manifest("synthetic-b", workspace["data"])
    frame = frame[frame["cls"].isin(["mesh", "marble"])]
    frame.loc[frame["cls"] == "marble", "image"] = "marble/missing.png"
    frame.to_csv(tmp_path / "broken.csv", index=False)
    with pytest.raises(DataError, match="missing.png"):
        evaluate(workspace["run"], "synthetic-b", workspace["data"], out, manifest=tmp_path / "broken.csv",
                 progress=False)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "metrics.csv", "routing.csv", "scores.csv"]


def test_command_line_writes_the_same_files_with_the_feature_cache(workspace, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(["evaluate", "--checkpoint", str(workspace["run"]), "--dataset", "synthetic-b",
                     "--data-root", str(workspace["data"]), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                     "--batch-size", "4", "--run-name", "run", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean" in printed and "metrics.csv" in printed
    ours, reference = (pd.read_csv(folder / "scores.csv") for folder in (out, workspace["out"]))
    assert ours["image"].tolist() == reference["image"].tolist()
    assert ours["score"].to_numpy() == pytest.approx(reference["score"].to_numpy(), abs=2e-3)  # fp16 features
    assert any((tmp_path / "cache").rglob("*.npy"))


@pytest.mark.parametrize("change, error, words", [
    ({"run": "no-such-run"}, CheckpointError, "does not exist"),
    ({"dataset": "mvtecc"}, DataError, "unknown dataset"),
    ({"root": "no-such-folder"}, DataError, "not a folder"),
    ({"dataset": "visa"}, DataError, "VisA layout"),
    ({"classes": ["screw"]}, DataError, "valid classes: mesh"),
    ({"pro_mode": "fast"}, ConfigError, "anomalyclip"),
])
def test_bad_inputs_name_the_problem(workspace, tmp_path, change, error, words):
    args = {"run": workspace["run"], "dataset": "synthetic-b", "root": workspace["data"], "classes": None,
            "pro_mode": "anomalyclip"}
    args.update({key: tmp_path / value if key in ("run", "root") else value for key, value in change.items()})
    with pytest.raises(error, match=words):
        evaluate(args["run"], args["dataset"], args["root"], tmp_path / "out", classes=args["classes"],
                 pro_mode=args["pro_mode"], progress=False)
    assert not (tmp_path / "out").exists()


def test_command_line_reports_errors_without_traceback(tmp_path, capsys):
    code = cli.main(["evaluate", "--checkpoint", str(tmp_path / "missing"), "--dataset", "synthetic-b",
                     "--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--no-cache"])
    assert code == 2
    assert "pmoe evaluate: error:" in capsys.readouterr().err


@pytest.mark.parametrize("count, batch, world", [(0, 2, 2), (1, 2, 2), (7, 2, 2), (10, 3, 4), (5, 8, 3)])
def test_shards_cover_every_sample_once_in_whole_batches(count, batch, world):
    shards = [shard_indices(count, batch, rank, world) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(count))
    for rank, shard in enumerate(shards):
        batches = {i // batch for i in shard}
        assert all(b % world == rank for b in batches)


def test_cropped_samples_have_distinct_identifiers_and_file_names():
    frame = pd.DataFrame({"image": ["kos01/Part0.jpg", "kos01/Part0.jpg", "a/b.png"], "crop": ["0/3", "1/3", ""]})
    assert image_ids(frame) == ["kos01/Part0.jpg#0/3", "kos01/Part0.jpg#1/3", "a/b.png"]
    names = [_file_stem(image, crop) for image, crop in zip(frame["image"], frame["crop"])]
    assert names == ["kos01__Part0_crop0of3", "kos01__Part0_crop1of3", "a__b"]
