"""Figures on synthetic inputs: they draw what they are given, save atomically, and the
activation frequencies and overlays equal plain reference computations."""

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from pmoe import paper, plotting, tables
from pmoe.errors import DataError, PmoeError

LAYERS = (6, 24)
N_EXPERTS, TOP_K = 4, 2


@pytest.fixture(scope="module")
def routing() -> pd.DataFrame:
    """Random top-2-of-4 routing of 3 images x 2 layers x 2 pools on two datasets."""
    rng = np.random.default_rng(0)
    rows = []
    for dataset in ("mvtec", "visa"):
        for image in range(3):
            for layer in LAYERS:
                for state in plotting.STATES:
                    experts = rng.choice(N_EXPERTS, TOP_K, replace=False)
                    weights = np.sort(rng.dirichlet(np.ones(TOP_K)))[::-1]
                    for rank, (expert, weight) in enumerate(zip(experts, weights)):
                        rows.append((dataset, "c", f"{dataset}/img{image}.png", layer, state, rank, expert, weight))
    return pd.DataFrame(rows, columns=list(plotting.ROUTING_COLUMNS))


def reference_frequency(routing, dataset, state, expert):
    """Times selected / (images x layers), counted with a plain loop."""
    slots, hits = set(), 0
    for row in routing.itertuples():
        if row.dataset == dataset and row.state == state:
            slots.add((row.cls, row.image, row.layer))
            hits += row.expert == expert
    return hits / len(slots)


def test_activation_frequency_equals_a_plain_count(routing):
    frequency = plotting.activation_frequency(routing, n_experts=N_EXPERTS + 1)
    assert len(frequency) == 2 * 2 * (N_EXPERTS + 1)
    for row in frequency.itertuples():
        assert row.frequency == pytest.approx(reference_frequency(routing, row.dataset, row.state, row.expert))
    sums = frequency.groupby(["dataset", "state"])["frequency"].sum()
    assert sums.to_numpy() == pytest.approx(TOP_K)
    with pytest.raises(DataError, match="beyond n_experts"):
        plotting.activation_frequency(routing, n_experts=2)


def test_expert_activation_draws_one_heat_map_per_pool(routing, tmp_path):
    fig = plotting.expert_activation(routing, path=tmp_path / "figure6.png")
    assert isinstance(fig, Figure)
    heatmaps = [ax for ax in fig.axes if ax.get_title().endswith("experts")]
    assert [ax.get_title() for ax in heatmaps] == ["normal experts", "abnormal experts"]
    assert [t.get_text() for t in heatmaps[0].get_xticklabels()] == ["E1", "E2", "E3", "E4"]
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()] == ["MVTec AD", "VisA"]
    assert (tmp_path / "figure6.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_routing_weights_bars_are_the_selected_weights(routing):
    image = "visa/img1.png"
    fig = plotting.routing_weights(routing, [image, "mvtec/img0.png"], layer=6)
    assert len(fig.axes) == 4
    records = routing[(routing.image == image) & (routing.layer == 6) & (routing.state == "abnormal")]
    heights = [bar.get_height() for bar in fig.axes[1].patches]
    expected = np.zeros(N_EXPERTS)
    expected[records.expert.to_numpy()] = records.weight.to_numpy()
    assert heights == pytest.approx(expected)
    with pytest.raises(DataError, match="no routing records"):
        plotting.routing_weights(routing, ["absent.png"])
    with pytest.raises(DataError, match="lack the columns"):
        plotting.routing_weights(routing.drop(columns="weight"), [image])


def test_radar_chart_has_one_polar_panel_per_metric_and_our_line(tmp_path):
    table1 = paper.load_paper(1)
    mine = table1[(table1.method == "PromptMoE") & (table1.dataset != "sdd")]
    ours = mine.assign(run="paper", value=mine.value - 1, reason="")
    long = tables.table1_long(ours)
    fig = plotting.radar_chart(long, path=tmp_path / "figure2.pdf")
    assert len(fig.axes) == 2 and all(ax.name == "polar" for ax in fig.axes)
    assert len(fig.axes[0].lines) == 8
    image_datasets = long[long.metric == "image_auroc"]["dataset"].nunique()
    assert len(fig.axes[0].get_xticks()) == image_datasets == 10
    assert len(fig.axes[1].get_xticks()) == 12
    assert (tmp_path / "figure2.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(DataError, match="no Table 1 values"):
        plotting.radar_chart(long, metrics=("pixel_ap",))


def test_training_dynamics_draws_solid_and_dashed_runs():
    epochs = np.arange(1, 6)
    log = pd.DataFrame({
        "epoch": epochs, "loss_balance": 1 / epochs, "loss_decouple": 0.1 * epochs,
        "val_image_auroc": [np.nan, 80, np.nan, 85, 86],
    })
    fig = plotting.training_dynamics({"with": log, "without": log.assign(loss_decouple=epochs)})
    assert len(fig.axes) == 3
    styles = [line.get_linestyle() for line in fig.axes[1].lines]
    assert styles == ["-", "--"]
    assert len(fig.axes[2].lines[0].get_xdata()) == 3
    with pytest.raises(DataError, match="loss_decouple"):
        plotting.training_dynamics({"broken": log.drop(columns="loss_decouple")})


def test_tsne_experts_is_deterministic_and_labels_points():
    rng = np.random.default_rng(1)
    embeddings = {"normal": rng.normal(size=(8, 16)), "abnormal": rng.normal(3, 1, size=(8, 16))}
    labels = plotting.expert_point_labels(LAYERS, N_EXPERTS)
    assert labels[:2] == ["L6-E1", "L6-E2"] and labels[-1] == "L24-E4"
    fig = plotting.tsne_experts(embeddings, labels={"normal": labels, "abnormal": labels})
    ax = fig.axes[0]
    assert len(ax.collections) == 2 and len(ax.texts) == 16
    points = np.concatenate(list(embeddings.values()))
    first = plotting.tsne_coordinates(points)
    assert first.shape == (16, 2)
    assert np.array_equal(first, plotting.tsne_coordinates(points))
    with pytest.raises(DataError, match="one width"):
        plotting.tsne_experts({"normal": np.zeros((4, 3)), "abnormal": np.zeros((4, 5))})


def test_qualitative_maps_grid_with_several_methods():
    image = np.random.default_rng(2).random((32, 40, 3))
    mask = np.zeros((32, 40))
    mask[5:10, 5:10] = 1
    maps = {"ours": [mask, mask], "other": [mask * 0.5, np.ones((16, 20))]}
    fig = plotting.qualitative_maps([image, image], [mask, None], maps, titles=["a", "b"])
    assert len(fig.axes) == 8
    assert [ax.get_title() for ax in fig.axes[:4]] == ["Image", "Ground truth", "ours", "other"]
    assert not fig.axes[5].images
    with pytest.raises(DataError, match="same length"):
        plotting.qualitative_maps([image], [mask, mask], [mask])


def test_overlay_shape_dtype_and_blend():
    image = np.full((20, 30, 3), 100, dtype=np.uint8)
    anomaly_map = np.linspace(0, 5, 600).reshape(20, 30)
    out = plotting.overlay(image, anomaly_map, alpha=0.4)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    heat = matplotlib.colormaps["jet"](anomaly_map / 5)[..., :3] * 255
    assert np.abs(out.astype(float) - (0.6 * 100 + 0.4 * heat)).max() <= 0.5
    assert np.array_equal(plotting.overlay(image, anomaly_map, alpha=0.0), image)


def test_overlay_accepts_float_grey_and_other_map_sizes():
    grey = np.random.default_rng(3).random((24, 24))
    out = plotting.overlay(grey, np.zeros((12, 12)))
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    assert plotting.overlay(rgba, np.ones((8, 8)), vmin=0, vmax=2).shape == (8, 8, 3)
    with pytest.raises(DataError, match="rescale"):
        plotting.overlay(grey * 255, np.zeros((24, 24)))
    with pytest.raises(DataError, match="uint8 or float"):
        plotting.overlay(np.zeros((4, 4, 3), dtype=np.uint16), np.zeros((4, 4)))
    with pytest.raises(DataError, match="finite HxW"):
        plotting.overlay(grey, np.full((24, 24), np.nan))


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_save_figure_writes_the_format_of_the_extension_atomically(tmp_path, suffix, magic):
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    target = plotting.save_figure(fig, tmp_path / "sub" / f"figure{suffix}")
    assert target.read_bytes().startswith(magic)
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_save_figure_refuses_unknown_extensions(tmp_path):
    with pytest.raises(PmoeError, match="extensions"):
        plotting.save_figure(Figure(), tmp_path / "figure.xyz")
    assert not list(tmp_path.iterdir())


def test_radar_chart_draws_a_band_of_one_sd_over_seeds():
    table1 = paper.load_paper(1)
    mine = table1[(table1.method == "PromptMoE") & (table1.dataset != "sdd")]
    ours = pd.concat([mine.assign(run="paper", value=mine.value - 1, seed=1, reason=""),
                      mine.assign(run="paper", value=mine.value + 1, seed=2, reason="")])
    fig = plotting.radar_chart(tables.table1_long(ours))
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    mvtec = mine.query("dataset == 'mvtec' and metric == 'image_auroc'")["value"].item()
    assert np.isclose(band, mvtec + np.sqrt(2)).any() and np.isclose(band, mvtec - np.sqrt(2)).any()
    assert not plotting.radar_chart(tables.table1_long(ours.query("seed == 1"))).axes[0].collections


def test_training_dynamics_over_seeds_draws_the_mean_and_a_band():
    epochs = np.arange(1, 4)
    logs = [pd.DataFrame({"epoch": epochs, "loss_balance": [1.0, 2.0, 3.0], "loss_decouple": 0.1 * epochs,
                          "val_image_auroc": [80.0, 82.0, 84.0], "seed": seed}) for seed in (1, 2)]
    logs[1]["loss_balance"] += 2.0
    fig = plotting.training_dynamics({"with L_decouple": pd.concat(logs)})
    line = fig.axes[0].lines[0]
    assert np.allclose(line.get_ydata(), [2.0, 3.0, 4.0])
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert np.isclose(band, 2.0 + np.sqrt(2)).any() and np.isclose(band, 4.0 - np.sqrt(2)).any()
