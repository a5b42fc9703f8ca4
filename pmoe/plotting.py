"""The paper's figures, drawn from tidy results (no numbers typed by hand).

Usage::

    from pmoe import plotting, tables
    fig = plotting.radar_chart(tables.table1_long(ours))            # Figure 2
    plotting.save_figure(fig, "results/figures/figure2.pdf")
    plotting.expert_activation(pd.read_csv("runs/paper/routing.csv"))  # Figure 6

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot state, so it is
safe without a display and in loops) and returns it; pass ``path=`` to also save it through
:func:`save_figure`, which writes atomically. :func:`overlay` is a pure array function that
the inference command uses for its heat-map images too.
"""

from __future__ import annotations

from itertools import cycle
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from pmoe.data.registry import dataset_info
from pmoe.errors import DataError, PmoeError
from pmoe.io import atomic_path
from pmoe.tables import METRIC_LABELS, OURS

STATES = ("normal", "abnormal")
STATE_COLORS = {"normal": "tab:blue", "abnormal": "tab:red"}
ROUTING_COLUMNS = ("dataset", "cls", "image", "layer", "state", "rank", "expert", "weight")
DYNAMICS_PANELS = (
    ("loss_balance", r"$\mathcal{L}_{balance}$"),
    ("loss_decouple", r"$\mathcal{L}_{decouple}$"),
    ("val_image_auroc", "I-AUROC"),
)
LINESTYLES = ("-", "--", ":", "-.")


def save_figure(fig: Figure, path, dpi: int = 150) -> Path:
    """Save ``fig`` atomically; the format follows the extension (``.png``, ``.pdf``, ``.svg``...)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        extensions = ", ".join(f".{name}" for name in sorted(supported))
        raise PmoeError(f"cannot save a figure as {path}: give it one of the extensions {extensions}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    return path


def _finish(fig: Figure, path) -> Figure:
    """Save the figure when a path is given; return it either way."""
    if path is not None:
        save_figure(fig, path)
    return fig


def _require(frame: pd.DataFrame, columns, what: str) -> None:
    """Fail with the missing column names when ``frame`` is not the expected record format."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise DataError(f"{what} lack the columns {missing}; expected the columns {list(columns)}.")


def expert_names(n_experts: int) -> list:
    """The paper's expert labels ``E1 .. E<n>``."""
    return [f"E{e + 1}" for e in range(n_experts)]


def radar_chart(table1_long: pd.DataFrame, metrics=("image_auroc", "pro"), path=None) -> Figure:
    """Figure 2: one radar panel per metric over the datasets that report it, one line per method.

    ``table1_long`` is :func:`pmoe.tables.table1_long` (columns dataset, method, metric, value,
    optionally title, sd); our line (method ``"ours"``) is drawn thicker, with a band of one
    standard deviation over seeds where ``sd`` is given. Values are percent on a 0-100 radius; a
    missing value leaves a gap.
    """
    _require(table1_long, ("dataset", "method", "metric", "value"), "the Table 1 rows")
    fig = Figure(figsize=(6.5 * len(metrics), 6.5), layout="constrained")
    axes = fig.subplots(1, len(metrics), subplot_kw={"projection": "polar"}, squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        rows = table1_long[table1_long["metric"] == metric]
        if rows.empty:
            present = sorted(table1_long["metric"].unique())
            raise DataError(f"no Table 1 values for metric {metric!r}; metrics present: {present}")
        labels = rows["title"] if "title" in rows.columns else rows["dataset"]
        wide = rows.assign(label=labels).pivot(index="label", columns="method", values="value")
        wide = wide.reindex(index=labels.unique(), columns=rows["method"].unique())
        angles = np.linspace(0, 2 * np.pi, len(wide), endpoint=False)
        closed = np.append(angles, angles[0])
        for method in wide.columns:
            values = wide[method].to_numpy(dtype=float)
            style = {"linewidth": 2.5, "color": "black"} if method == OURS else {"linewidth": 1.2}
            ax.plot(closed, np.append(values, values[0]), label=method, **style)
        if "sd" in rows.columns and rows.loc[rows["method"] == OURS, "sd"].notna().any():
            spread = rows[rows["method"] == OURS].assign(label=labels).set_index("label")["sd"]
            spread = spread.reindex(wide.index).fillna(0.0).to_numpy(dtype=float)
            mean = wide[OURS].to_numpy(dtype=float)
            ax.fill_between(closed, np.append(mean - spread, mean[0] - spread[0]),
                            np.append(mean + spread, mean[0] + spread[0]), color="black", alpha=0.15,
                            label=f"{OURS} ± sd")
        ax.set_xticks(angles, wide.index, fontsize=8)
        ax.tick_params(axis="x", pad=6)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_rlabel_position(180 / len(wide))
        ax.set_ylim(0, 100)
        ax.set_title(METRIC_LABELS.get(metric, metric), pad=18)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.05, 1.0), fontsize=8)
    return _finish(fig, path)


def _instance_weights(records: pd.DataFrame, state: str, n_experts: int, image: str) -> np.ndarray:
    """The weight of every expert for one image, state and layer (0 for experts not selected)."""
    selected = records[records["state"] == state]
    if selected["expert"].duplicated().any():
        raise DataError(
            f"image {image!r} has several {state} routing records per expert: it is ambiguous; "
            "filter the routing frame to one dataset and class first."
        )
    weights = np.zeros(n_experts)
    weights[selected["expert"].to_numpy(dtype=int)] = selected["weight"].to_numpy(dtype=float)
    return weights


def routing_weights(routing: pd.DataFrame, images, layer=None, n_experts=None, path=None) -> Figure:
    """Figure 1b: the top-k expert weights of single instances, normal and abnormal pool side by side.

    ``images`` are values of the ``image`` column; ``layer`` defaults to the deepest layer in the
    records and ``n_experts`` to the largest expert index seen plus one.
    """
    _require(routing, ROUTING_COLUMNS, "the routing records")
    images = list(images)
    layer = routing["layer"].max() if layer is None else layer
    n_experts = int(routing["expert"].max()) + 1 if n_experts is None else n_experts
    fig = Figure(figsize=(8, 1.9 * len(images) + 0.6), layout="constrained")
    axes = fig.subplots(len(images), len(STATES), squeeze=False, sharey=True)
    for row, image in enumerate(images):
        records = routing[(routing["image"] == image) & (routing["layer"] == layer)]
        if records.empty:
            raise DataError(
                f"no routing records for image {image!r} at layer {layer}: "
                "pick images and a layer present in routing.csv"
            )
        for ax, state in zip(axes[row], STATES):
            weights = _instance_weights(records, state, n_experts, image)
            ax.bar(expert_names(n_experts), weights, color=STATE_COLORS[state])
            ax.set_title(f"{'/'.join(Path(str(image)).parts[-3:])}: {state} pool", fontsize=9)
        axes[row][0].set_ylabel("weight")
    return _finish(fig, path)


def activation_frequency(routing: pd.DataFrame, n_experts=None) -> pd.DataFrame:
    """How often each expert is selected, per dataset and pool (columns dataset, state, expert, frequency).

    frequency = times selected / (number of images x layers) of the dataset, so the
    frequencies of one pool add up to k. Experts never selected get 0.
    """
    _require(routing, ROUTING_COLUMNS, "the routing records")
    largest = int(routing["expert"].max())
    n_experts = largest + 1 if n_experts is None else n_experts
    if largest >= n_experts:
        raise DataError(f"the routing records select expert index {largest}, beyond n_experts={n_experts}.")
    slots = routing.drop_duplicates(["dataset", "state", "cls", "image", "layer"])
    slots = slots.groupby(["dataset", "state"]).size()
    counts = routing.groupby(["dataset", "state", "expert"]).size()
    full = pd.MultiIndex.from_product(
        [routing["dataset"].unique(), list(STATES), range(n_experts)], names=["dataset", "state", "expert"]
    )
    counts = counts.reindex(full, fill_value=0)
    frequency = counts / slots.reindex(counts.index.droplevel("expert")).to_numpy()
    return frequency.rename("frequency").reset_index().dropna(subset=["frequency"])


def expert_activation(routing: pd.DataFrame, n_experts=None, path=None) -> Figure:
    """Figure 6: activation frequency of each expert (columns E1..E_E) per dataset (rows), one heat map per pool."""
    import seaborn as sns

    frequency = activation_frequency(routing, n_experts)
    n_experts = frequency["expert"].max() + 1
    titles = {name: dataset_info(name).title for name in frequency["dataset"].unique()}
    fig = Figure(figsize=(4.2 * len(STATES) + 1, 0.45 * len(titles) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(STATES), squeeze=False)[0]
    for ax, state in zip(axes, STATES):
        rows = frequency[frequency["state"] == state]
        grid = rows.pivot(index="dataset", columns="expert", values="frequency")
        grid = grid.reindex(index=list(titles), columns=range(n_experts))
        grid.index, grid.columns = list(titles.values()), expert_names(n_experts)
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f", annot_kws={"size": 7})
        ax.set_title(f"{state} experts")
        ax.set_ylabel("")
    return _finish(fig, path)


def training_dynamics(logs: dict, path=None) -> Figure:
    """Figure 7: L_balance, L_decouple and validation I-AUROC per epoch, one line style per run.

    ``logs`` maps a label (e.g. ``"with L_decouple"``) to that run's ``log_epochs.csv`` frame;
    the first is solid, the second dashed, as in the paper. A frame with a ``seed`` column and
    several seeds is drawn as the mean over seeds with a band of one standard deviation.
    Missing values are skipped.
    """
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, len(DYNAMICS_PANELS))
    colors = ("tab:blue", "tab:orange", "tab:green")
    for (label, frame), style in zip(logs.items(), cycle(LINESTYLES)):
        _require(frame, ("epoch", *(column for column, _ in DYNAMICS_PANELS)), f"the epoch log of {label!r}")
        for ax, (column, title), color in zip(axes, DYNAMICS_PANELS, colors):
            points = frame[["epoch", column]].dropna().groupby("epoch")[column].agg(["mean", "std"])
            ax.plot(points.index, points["mean"], linestyle=style, color=color, marker=".", label=label)
            if points["std"].notna().any():
                band = points["std"].fillna(0.0)
                ax.fill_between(points.index, points["mean"] - band, points["mean"] + band, color=color, alpha=0.15)
            ax.set_title(title)
            ax.set_xlabel("epoch")
    for ax in axes:
        ax.legend(fontsize=8)
    return _finish(fig, path)


def expert_point_labels(layers, n_experts: int) -> list:
    """Point labels ``L<layer>-E<e>`` for expert embeddings stacked layer-major (L*E rows)."""
    return [f"L{layer}-{name}" for layer in layers for name in expert_names(n_experts)]


def tsne_coordinates(points: np.ndarray, perplexity=None, random_state: int = 0) -> np.ndarray:
    """2-D t-SNE of a few points (exact gradients; the perplexity adapts to their number unless given)."""
    from sklearn.manifold import TSNE

    n = len(points)
    if n < 3:
        raise DataError(f"t-SNE needs at least 3 expert embeddings, got {n}.")
    perplexity = min(30.0, (n - 1) / 3) if perplexity is None else perplexity
    tsne = TSNE(2, perplexity=perplexity, random_state=random_state, init="pca", method="exact")
    return tsne.fit_transform(points)


def tsne_experts(embeddings: dict, labels=None, perplexity=None, random_state: int = 0, path=None) -> Figure:
    """Figure 8: t-SNE of the expert mean embeddings of both pools in one shared 2-D map.

    ``embeddings`` maps a state (``"normal"``, ``"abnormal"``) to an array (n_points, D);
    ``labels`` optionally maps each state to one text label per point
    (see :func:`expert_point_labels`).
    """
    arrays = {state: np.asarray(points, dtype=float) for state, points in embeddings.items()}
    dims = {points.shape[1] if points.ndim == 2 else None for points in arrays.values()}
    if len(dims) != 1 or None in dims:
        shapes = [points.shape for points in arrays.values()]
        raise DataError(f"expert embeddings must be 2-D arrays of one width, got shapes {shapes}.")
    coordinates = tsne_coordinates(np.concatenate(list(arrays.values())), perplexity, random_state)
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    start = 0
    for state, points in arrays.items():
        xy = coordinates[start:start + len(points)]
        start += len(points)
        ax.scatter(xy[:, 0], xy[:, 1], color=STATE_COLORS.get(state), label=f"{state} experts", s=28)
        for text, (x, y) in zip((labels or {}).get(state, []), xy):
            ax.annotate(text, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.legend()
    ax.set_xticks([])
    ax.set_yticks([])
    return _finish(fig, path)


def _rgb_uint8(image) -> np.ndarray:
    """An image as HxWx3 uint8: accepts uint8 or float in [0, 1], greyscale, RGB or RGBA."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise DataError(f"an image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}.")
    image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise DataError(f"an image must be uint8 or float in [0, 1], got dtype {image.dtype}: convert it first.")
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise DataError("a float image must hold finite values in [0, 1]: rescale it (e.g. divide by 255).")
    return np.round(image * 255).astype(np.uint8)


def _resized(anomaly_map: np.ndarray, shape) -> np.ndarray:
    """Bilinearly resize a float map to ``shape`` (H, W) when it differs."""
    if anomaly_map.shape == tuple(shape):
        return anomaly_map
    resized = Image.fromarray(anomaly_map.astype(np.float32)).resize(shape[::-1], Image.BILINEAR)
    return np.asarray(resized, dtype=float)


def overlay(image, anomaly_map, alpha: float = 0.5, cmap: str = "jet", vmin=None, vmax=None) -> np.ndarray:
    """Blend an anomaly map, as a colour-mapped heat map, over an image; returns HxWx3 uint8.

    The map is resized to the image when needed and scaled to [0, 1] by ``vmin``/``vmax``
    (its own minimum and maximum unless given); a constant map shows as the colormap's low end.
    """
    rgb = _rgb_uint8(image)
    anomaly_map = np.asarray(anomaly_map, dtype=float)
    if anomaly_map.ndim != 2 or not np.isfinite(anomaly_map).all():
        raise DataError(f"an anomaly map must be a finite HxW array, got shape {anomaly_map.shape}.")
    anomaly_map = _resized(anomaly_map, rgb.shape[:2])
    low = anomaly_map.min() if vmin is None else vmin
    high = anomaly_map.max() if vmax is None else vmax
    scaled = np.clip((anomaly_map - low) / (high - low), 0, 1) if high > low else np.zeros_like(anomaly_map)
    heat = matplotlib.colormaps[cmap](scaled)[..., :3] * 255
    return np.round((1 - alpha) * rgb + alpha * heat).astype(np.uint8)


def qualitative_maps(images, masks, maps, titles=None, path=None) -> Figure:
    """Figure 5: one row per sample: image, ground truth, then one anomaly-map overlay per method.

    ``maps`` is a list of HxW maps (one method) or a dict {method name: list of maps};
    a mask may be ``None`` (no ground truth) and is then shown blank.
    """
    maps = maps if isinstance(maps, dict) else {"Anomaly map": maps}
    lengths = {len(images), len(masks), *(len(column) for column in maps.values())}
    if len(lengths) != 1:
        raise DataError(
            f"images, masks and every list of maps must have the same length, got lengths {sorted(lengths)}."
        )
    headers = ["Image", "Ground truth", *maps]
    fig = Figure(figsize=(2.3 * len(headers), 2.3 * len(images) + 0.4), layout="constrained")
    axes = fig.subplots(len(images), len(headers), squeeze=False)
    for row, (image, mask) in enumerate(zip(images, masks)):
        rgb = _rgb_uint8(image)
        axes[row][0].imshow(rgb)
        if mask is None:
            axes[row][1].text(0.5, 0.5, "no mask", ha="center", va="center", transform=axes[row][1].transAxes)
        else:
            axes[row][1].imshow(np.asarray(mask, dtype=float), cmap="gray", vmin=0, vmax=1)
        for ax, column in zip(axes[row][2:], maps.values()):
            ax.imshow(overlay(rgb, column[row]))
        if titles is not None:
            axes[row][0].set_ylabel(titles[row], fontsize=8)
    for col, header in enumerate(headers):
        axes[0][col].set_title(header, fontsize=9)
    for ax in np.ravel(axes):
        ax.set_xticks([])
        ax.set_yticks([])
    return _finish(fig, path)
