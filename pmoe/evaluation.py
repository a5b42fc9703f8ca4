"""Zero-shot evaluation of a run on one dataset (spec section 7), one class at a time.

Usage::

    from pmoe.evaluation import evaluate, evaluate_runs
    metrics = evaluate("runs/mvtec", "visa", "/data/VisA", "results/visa")
    # or: pmoe evaluate --checkpoint runs/mvtec --dataset visa --data-root /data/VisA --out results/visa
    # several GPUs: torchrun --nproc_per_node 4 -m pmoe.cli evaluate ... (same files, same numbers)
    frames = evaluate_runs([("runs/a", "results/a/visa", "a"), ("runs/b", "results/b/visa", "b")],
                           "visa", "/data/VisA", cache_dir="~/.cache/pmoe/features")

Writes, atomically, under ``out_dir``:

    metrics.csv   run, dataset, cls, metric, value, reason: one row per class and metric, value
                  in percent (unrounded; NaN with the reason when undefined), plus a ``mean``
                  row per metric: the unweighted mean over the classes where it is defined
    scores.csv    dataset, cls, image, label, score: one row per test image
    routing.csv   dataset, cls, image, layer, state, rank, expert, weight: the top-k experts of
                  every image, tapped layer and pool (header only for the static baselines)
    overlays/<cls>/{top,bottom}NN_s<score>_<image>.png   with ``overlays=N``
    evaluation.json   settings, provenance and the reuse key (:func:`evaluation_key`); written
                      last and removed before any output changes, so it marks a complete folder

Which metrics a dataset gets follows its kind (image, pixel or both). Maps are evaluated at
the config's image size, Gaussian-smoothed (eval mode). Only one class's maps are in memory at
a time, and none for image-only datasets. Under ``torchrun`` every process scores a
deterministic shard of each class (whole batches dealt round-robin); the main process gathers
them in manifest order, computes the metrics and writes the files.

:func:`evaluate_runs` evaluates several runs on one dataset in one pass (the ablation tables):
runs whose evaluation folder is current (its key matches) are read back; the others share one
frozen CLIP, and each class's cached features are read once, held in memory
(:mod:`pmoe.resident`), and scored by every run in turn. Each run's folder, files and key are
the same as from its own :func:`evaluate`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch

from pmoe.errors import ConfigError, DataError
from pmoe.inference import denormalize, forward_batch, load_model, map_range, prepare_device, write_overlay

METRIC_COLUMNS = ("run", "dataset", "cls", "metric", "value", "reason")
SCORE_COLUMNS = ("dataset", "cls", "image", "label", "score")
ROUTING_COLUMNS = ("dataset", "cls", "image", "layer", "state", "rank", "expert", "weight")
MEAN = "mean"
SETTINGS = "evaluation.json"
OUTPUTS = ("metrics.csv", "scores.csv", "routing.csv")


def evaluate(run_dir_or_model, dataset: str, data_root, out_dir, *, manifest=None, classes=None,
             pro_mode: str = "anomalyclip", overlays: int = 0, cache_dir=None, batch_size: int = 16,
             device=None, clip_weights: str | None = None, run_name: str | None = None,
             num_workers=None, progress: bool = True) -> pd.DataFrame:
    """Evaluate a run directory (or an in-memory PromptMoE, or a training-free Config) on ``dataset``;
    returns metrics.csv.

    ``manifest``: a manifest CSV to use instead of building it from ``data_root``;
    ``classes``: a subset of the dataset's classes; ``pro_mode``: ``anomalyclip`` or ``exact``;
    ``overlays``: heat-map overlays of the N highest and N lowest scoring images per class;
    ``cache_dir``: the frozen-feature cache (``None``: compute features on the fly);
    ``num_workers``: data-loading processes (None: :func:`pmoe.runtime.data_workers`).
    An in-memory model is put in eval mode and moved to ``device``. Every process of a
    torchrun launch returns the same frame.
    """
    info, frame, selected = _inputs(dataset, data_root, manifest, classes, pro_mode, overlays, batch_size)
    model, run = load_model(run_dir_or_model, clip_weights, run_name)
    key = evaluation_key(model.config, checkpoint_digest(run_dir_or_model, model), info.name, frame,
                         classes, pro_mode, overlays)
    job = Evaluation(model, run, key, Path(out_dir), _train_set(run_dir_or_model))
    device = prepare_device(model, device)
    task = _task(info, data_root, device, cache_dir, model.config, batch_size, num_workers, progress)
    return _evaluate_together(task, [job], frame, selected, pro_mode, overlays, data_root, manifest)[0]


def evaluate_runs(runs, dataset: str, data_root, *, manifest=None, classes=None, pro_mode: str = "anomalyclip",
                  overlays: int = 0, cache_dir=None, batch_size: int = 16, device=None,
                  clip_weights: str | None = None, num_workers=None, progress: bool = True) -> list:
    """Evaluate several runs on ``dataset`` in one pass; one metrics frame per run, in order.

    ``runs``: ``(run_dir, out_dir, run_name)`` triples. A run whose ``out_dir`` holds a current
    evaluation (:func:`current_metrics`) is read back; the others are evaluated together (see
    the module docstring) and write exactly what :func:`evaluate` with the same options writes.
    The other arguments are :func:`evaluate`'s.
    """
    from pmoe.features import feature_key

    info, frame, selected = _inputs(dataset, data_root, manifest, classes, pro_mode, overlays, batch_size)
    keys = [run_key(run, clip_weights, info.name, frame, classes, pro_mode, overlays) for run, _, _ in runs]
    frames = [current_metrics(out_dir, key) for (_, out_dir, _), key in zip(runs, keys)]
    pending = [index for index, metrics in enumerate(frames) if metrics is None]
    models = load_runs([runs[index][0] for index in pending], clip_weights)
    jobs = {index: Evaluation(model, runs[index][2], keys[index], Path(runs[index][1]), _train_set(runs[index][0]))
            for index, model in zip(pending, models)}
    device = [prepare_device(model, device) for model in models][-1] if models else None
    groups = {}
    for index, job in jobs.items():  # runs that read the same features (and masks) go together
        groups.setdefault((feature_key(job.model.config, device), job.model.config.mask_rule), []).append(index)
    for indices in groups.values():
        config = jobs[indices[0]].model.config
        task = _task(info, data_root, device, cache_dir, config, batch_size, num_workers, progress)
        computed = _evaluate_together(task, [jobs[index] for index in indices], frame, selected, pro_mode,
                                      overlays, data_root, manifest)
        for index, metrics in zip(indices, computed):
            frames[index] = metrics
    return frames


def load_runs(run_dirs, clip_weights: str | None = None) -> list:
    """The models of several run directories (eval mode); runs on the same frozen CLIP
    (architecture, weights, activation) share one copy of it."""
    from pmoe.backbone import load_clip
    from pmoe.checkpoint import load_run, run_config

    clips, models = {}, []
    for run in run_dirs:
        config = run_config(run, clip_weights)
        frozen = (config.clip_model, config.clip_weights, config.quick_gelu)
        if frozen not in clips:
            clips[frozen] = load_clip(config)
        models.append(load_run(run, clip_weights, clip=clips[frozen]))
    return models


@dataclass
class Evaluation:
    """One model's evaluation: the model, its run name, reuse key, output folder and training set."""

    model: torch.nn.Module
    run: str
    key: dict
    out_dir: Path
    train_set: str | None


def _inputs(dataset, data_root, manifest, classes, pro_mode, overlays, batch_size) -> tuple:
    """(dataset info, manifest frame, selected classes), with the options checked."""
    from pmoe.data import dataset_info
    from pmoe.metrics import PRO_MODES

    info = dataset_info(dataset)
    if pro_mode not in PRO_MODES:
        raise ConfigError(f"unknown PRO mode {pro_mode!r}; use one of {', '.join(PRO_MODES)}")
    if overlays < 0 or batch_size < 1:
        raise ConfigError("overlays must be >= 0 and batch_size >= 1")
    frame = _manifest(info, data_root, manifest)
    return info, frame, _classes(frame, info, classes)


def _task(info, data_root, device, cache_dir, config, batch_size, num_workers, progress) -> "Task":
    """The settings one pass shares, with the torchrun layout (the process group starts here)."""
    from pmoe.features import FeatureCache
    from pmoe.runtime import init_distributed

    rank, world = init_distributed(device)
    return Task(info=info, root=Path(data_root).expanduser(), device=device, cache=FeatureCache(cache_dir, config),
                batch_size=batch_size, num_workers=num_workers, rank=rank, world=world,
                progress=progress and rank == 0)


def _evaluate_together(task, jobs: list, frame, selected, pro_mode, overlays, data_root, manifest) -> list:
    """Evaluate every job's model class by class, each class's features read once for all of
    them; write each job's files; return each job's metrics frame (on every process)."""
    from tqdm.auto import tqdm

    results = [[] for _ in jobs]
    for cls in tqdm(selected, desc=f"evaluating {task.info.name}", unit="class", disable=not task.progress):
        rows = frame[frame["cls"] == cls].reset_index(drop=True)
        data = task.class_data(rows, jobs[0].model)
        shared = task.hold(data, [job.model.config for job in jobs]) if len(jobs) > 1 else data
        for job, found in zip(jobs, results):
            found.append(task.evaluate_class(job.model, rows, _view(shared, job.model.config), pro_mode, overlays,
                                             job.out_dir))
    frames = []
    for job, found in zip(jobs, results):
        metrics = None
        if task.rank == 0:
            metrics = _write_outputs(found, job.run, task.info.name, job.out_dir, job.model.config)
            _write_settings(job.out_dir, job.run, job.key, data_root, manifest, selected, job.train_set)
        frames.append(_shared(metrics, task.world))
    return frames


def _view(data, config):
    """``data`` serving ``config``'s taps when it holds cached features (raw images: as they are)."""
    from pmoe.features import tap_positions

    return data.with_taps(tap_positions(config)) if hasattr(data, "with_taps") else data


def evaluation_key(config, checkpoint_sha1: str, dataset: str, frame: pd.DataFrame, classes, pro_mode: str,
                   overlays: int) -> dict:
    """Everything an evaluation's files depend on; an evaluation is reused only when this matches.

    The config (its smoothing ``sigma`` included) with the CLIP weights by content, the trained
    weights by content, the dataset's manifest, the evaluation options and the package version.
    """
    from pmoe.features import weights_identity
    from pmoe.identity import manifest_digest, package_version

    settings = {**config.to_dict(), "clip_weights": weights_identity(config)}
    return {
        "config": settings, "checkpoint_sha1": checkpoint_sha1, "dataset": dataset,
        "manifest_sha1": manifest_digest(frame), "classes": None if classes is None else sorted(
            [classes] if isinstance(classes, str) else classes),
        "pro_mode": pro_mode, "overlays": overlays, "pmoe_version": package_version(),
    }


def checkpoint_digest(run_dir_or_model, model) -> str:
    """The trained weights' SHA-1: of the run's weights file, or of an in-memory model's tensors."""
    from pmoe.checkpoint import WEIGHTS
    from pmoe.identity import file_sha1, tensors_sha1

    if not is_run_dir(run_dir_or_model):
        return tensors_sha1(model.trainable_state_dict())
    return file_sha1(Path(run_dir_or_model).expanduser() / WEIGHTS)


def reusable_metrics(run_dir, dataset: str, data_root, out_dir, *, manifest=None, classes=None,
                     pro_mode: str = "anomalyclip", overlays: int = 0, clip_weights: str | None = None,
                     **ignored):
    """The metrics of the finished evaluation in ``out_dir`` when :func:`evaluate` with these
    arguments would compute the same (its key matches), else None. Takes evaluate's keywords;
    those that do not change results (device, batch size, cache, progress ...) are ignored."""
    from pmoe.data import dataset_info

    info = dataset_info(dataset)
    frame = _manifest(info, data_root, manifest)
    return current_metrics(out_dir, run_key(run_dir, clip_weights, info.name, frame, classes, pro_mode, overlays))


def run_key(run_dir, clip_weights, dataset: str, frame: pd.DataFrame, classes, pro_mode: str, overlays: int) -> dict:
    """:func:`evaluation_key` of a run directory (its config with ``clip_weights``, its weights file),
    read without building the model."""
    from pmoe.checkpoint import WEIGHTS, run_config
    from pmoe.identity import file_sha1

    config = run_config(run_dir, clip_weights)
    return evaluation_key(config, file_sha1(Path(run_dir) / WEIGHTS), dataset, frame, classes, pro_mode, overlays)


def current_metrics(out_dir, key: dict):
    """The metrics frame of a finished evaluation in ``out_dir`` whose key equals ``key``, else None."""
    out_dir = Path(out_dir)
    try:
        recorded = json.loads((out_dir / SETTINGS).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None
    from pmoe.identity import differences

    if differences(recorded, key) or not all((out_dir / name).is_file() for name in OUTPUTS):
        return None
    return read_metrics(out_dir / "metrics.csv")


def read_metrics(path) -> pd.DataFrame:
    """A metrics.csv as :func:`evaluate` returned it: classes as text, NaN values, empty reasons."""
    return pd.read_csv(path, dtype={"cls": str, "run": str}, keep_default_na=False, na_values={"value": ["NaN"]})


def _train_set(run_dir_or_model):
    """The training set recorded in a run directory (None for an in-memory model, a config or an old run)."""
    from pmoe.training import IDENTITY

    if not is_run_dir(run_dir_or_model):
        return None
    path = Path(run_dir_or_model).expanduser() / IDENTITY
    return json.loads(path.read_text()).get("train_set") if path.is_file() else None


def is_run_dir(run_dir_or_model) -> bool:
    """Whether evaluate's first argument names a run directory (not a model or a config)."""
    return isinstance(run_dir_or_model, (str, os.PathLike))


# --- inputs -------------------------------------------------------------------------------------
def _manifest(info, data_root, manifest) -> pd.DataFrame:
    """The dataset's manifest: read from ``manifest`` or built from ``data_root``."""
    from pmoe.data import build_manifest, read_manifest

    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; pass --data-root the folder {info.title} "
                        f"was extracted to ({info.layout})")
    frame = read_manifest(manifest) if manifest is not None else build_manifest(info.name, root)
    if frame.empty:
        raise DataError(f"the manifest of {info.title} has no rows; rebuild it with 'pmoe manifest'")
    return frame


def _classes(frame: pd.DataFrame, info, classes) -> list:
    """The classes to evaluate, in manifest order; an unknown one is a DataError listing the valid."""
    present = list(dict.fromkeys(frame["cls"]))
    if classes is None:
        return present
    classes = [classes] if isinstance(classes, str) else list(classes)
    unknown = [cls for cls in classes if cls not in present]
    if unknown:
        raise DataError(f"{info.title} has no class {', '.join(map(repr, unknown))} in its manifest; "
                        f"valid classes: {', '.join(present)}")
    return [cls for cls in present if cls in classes]


def image_ids(frame: pd.DataFrame) -> list:
    """Identifiers of the samples: the manifest image path, with ``#i/n`` for a cropped band."""
    return [f"{image}#{crop}" if crop else image for image, crop in zip(frame["image"], frame["crop"])]


# --- sharding across processes ------------------------------------------------------------------
def shard_indices(count: int, batch_size: int, rank: int, world: int) -> list:
    """The sample indices process ``rank`` scores: whole batches dealt round-robin."""
    starts = range(rank * batch_size, count, world * batch_size)
    return [index for start in starts for index in range(start, min(start + batch_size, count))]


def gather_to_main(local: dict, count: int, batch_size: int, rank: int, world: int):
    """Every process's tensors, concatenated in sample order on the main process (else None).

    ``local`` maps names to tensors whose first axis follows :func:`shard_indices`; all
    processes pass the same names, trailing shapes and dtypes (an empty shard included).
    """
    if world == 1:
        return local
    import torch.distributed as dist

    shards = [shard_indices(count, batch_size, r, world) for r in range(world)]
    size = max(len(shard) for shard in shards)
    order = torch.as_tensor(np.argsort(np.concatenate(shards), kind="stable"))
    gathered = {}
    for key in sorted(local):
        tensor = local[key]
        padded = tensor.new_zeros((size, *tensor.shape[1:]))
        padded[:len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
        dist.gather(padded, parts, dst=0)
        if rank == 0:
            joined = torch.cat([part[:len(shard)] for part, shard in zip(parts, shards)])
            gathered[key] = joined[order.to(joined.device)]
    return gathered if rank == 0 else None


def _shared(frame, world: int):
    """The main process's frame, on every process."""
    if world == 1:
        return frame
    import torch.distributed as dist

    box = [frame]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- one class ----------------------------------------------------------------------------------
@dataclass
class ClassResult:
    """One class's metrics and per-image records (scores, routing), on the CPU."""

    cls: str
    frame: pd.DataFrame
    metrics: dict
    records: dict


@dataclass
class Task:
    """The fixed inputs of one evaluation pass: dataset, device, cache and process layout."""

    info: object  # pmoe.data.DatasetInfo
    root: Path
    device: torch.device
    cache: object  # pmoe.features.FeatureCache
    batch_size: int
    num_workers: int | None  # data-loading processes; None: pmoe.runtime.data_workers
    rank: int
    world: int
    progress: bool

    @property
    def keep_maps(self) -> bool:
        """Whether pixel metrics need the maps and masks (not for image-only datasets)."""
        return self.info.kind != "image"

    def class_data(self, frame: pd.DataFrame, model):
        """The class's samples with their cached features (computed first where missing), or its
        images when there is no cache; masks only where pixel metrics need them."""
        from pmoe.data import AnomalyDataset

        dataset = AnomalyDataset(frame, self.root, model.config.image_size, return_mask=self.keep_maps,
                                 mask_rule=model.config.mask_rule)
        return self.cache.features(model, dataset, self.batch_size, self.device, self.progress, self.num_workers)

    def hold(self, data, configs):
        """``data`` with the taps of every config, held in memory when it fits (read once)."""
        from pmoe.features import tap_positions
        from pmoe.resident import hold

        if not hasattr(data, "with_taps"):
            return data
        taps = sorted({tap for config in configs for tap in tap_positions(config)})
        return hold(data.with_taps(taps), self.device, self.num_workers)

    def evaluate_class(self, model, frame: pd.DataFrame, data, pro_mode: str, overlays: int, out_dir: Path):
        """Score one class's ``data`` (items aligned with ``frame``) with ``model``; on the main
        process, its metrics and records (else None).

        The class's maps are dropped before returning: only one class is held at a time.
        """
        cls = frame["cls"].iloc[0]
        shard = shard_indices(len(data), self.batch_size, self.rank, self.world)
        local = self.score(model, data, shard, f"{self.info.name}/{cls}")
        outputs = gather_to_main(local, len(data), self.batch_size, self.rank, self.world)
        if outputs is None:
            return None
        metrics = self.metrics(frame, outputs, pro_mode)
        if overlays:
            invalidate(out_dir)
            self.write_overlays(model, frame, data, outputs["score"].cpu().numpy(), overlays,
                                out_dir / "overlays" / cls)
        records = {key: value.cpu() for key, value in outputs.items() if key not in ("anomaly_map", "mask")}
        return ClassResult(cls, frame, metrics, records)

    def batches(self, data, indices: list):
        """The batches of ``data`` at ``indices``, ``batch_size`` consecutive indices each."""
        from pmoe.resident import batches

        chunks = [indices[start:start + self.batch_size] for start in range(0, len(indices), self.batch_size)]
        return batches(data, chunks, self.num_workers, self.device)

    def score(self, model, data, indices: list, desc: str) -> dict:
        """Scores (and maps, masks and routing where needed) of ``data`` at ``indices``, on the device."""
        from tqdm.auto import tqdm

        parts = [self._empty(model.config)]
        for batch in tqdm(self.batches(data, indices), desc=desc, unit="batch", disable=not self.progress,
                          leave=False, total=-(-len(indices) // self.batch_size)):
            out = forward_batch(model, batch, self.device)
            if self.keep_maps:
                out["mask"] = batch["mask"][:, 0].to(self.device, torch.uint8)
            else:
                del out["anomaly_map"]
            parts.append(out)
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def _empty(self, config) -> dict:
        """Zero-length outputs with the right shapes (what an empty shard contributes)."""
        device = self.device
        size = config.image_size
        empty = {"score": torch.zeros(0, device=device)}
        if self.keep_maps:
            empty["anomaly_map"] = torch.zeros(0, size, size, device=device)
            empty["mask"] = torch.zeros(0, size, size, dtype=torch.uint8, device=device)
        if config.prompt_mode == "vgmop":
            routed = (0, config.num_prompt_sets, 2, config.top_k)
            empty["routing_indices"] = torch.zeros(routed, dtype=torch.long, device=device)
            empty["routing_weights"] = torch.zeros(routed, device=device)
        return empty

    def metrics(self, frame: pd.DataFrame, outputs: dict, pro_mode: str) -> dict:
        """:func:`pmoe.metrics.class_metrics` of one class, as the dataset's kind allows."""
        from pmoe.metrics import class_metrics

        labels = np.array(frame["label"], dtype=np.int64)
        masks = outputs["mask"].bool() if self.keep_maps else None
        return class_metrics(labels, outputs["score"], masks, outputs.get("anomaly_map"),
                             kind=self.info.kind, pro_mode=pro_mode)

    def write_overlays(self, model, frame, data, scores: np.ndarray, count: int, folder: Path) -> None:
        """Overlays of the ``count`` highest and lowest scoring images; replaces ``folder`` whole."""
        order = np.argsort(-scores, kind="stable")
        top = [int(i) for i in order[:count]]
        bottom = [int(i) for i in order[::-1][:count] if i not in top]
        picks = [("top", r, i) for r, i in enumerate(top)] + [("bottom", r, i) for r, i in enumerate(bottom)]
        maps = np.concatenate([forward_batch(model, batch, self.device)["anomaly_map"].cpu().numpy()
                               for batch in self.batches(data, top + bottom)])
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            for (kind, rank, index), anomaly_map in zip(picks, maps):
                stem = _file_stem(frame["image"][index], frame["crop"][index])
                write_overlay(scratch / f"{kind}{rank + 1:02d}_s{scores[index]:.4f}_{stem}.png",
                              self.display_image(model, frame, index), anomaly_map, *map_range(model.config))
            if folder.exists():
                shutil.rmtree(folder)
            scratch.rename(folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def display_image(self, model, frame: pd.DataFrame, index: int) -> np.ndarray:
        """The sample's image as the model saw it (cropped, resized), in uint8 RGB."""
        from pmoe.data import load_image

        size = model.config.image_size
        return denormalize(load_image(self.root / frame["image"][index], size, frame["crop"][index]))


def _file_stem(image: str, crop: str) -> str:
    """A sample as one file-name component: ``cls/test/good/000.png`` + crop ``1/3`` gives
    ``cls__test__good__000_crop1of3``."""
    stem = "__".join(PurePosixPath(image).with_suffix("").parts)
    return stem + (f"_crop{crop.replace('/', 'of')}" if crop else "")


# --- tables and files ---------------------------------------------------------------------------
def metrics_frame(results: list, run: str, dataset: str) -> pd.DataFrame:
    """metrics.csv: per class and metric in percent, then the ``mean`` rows."""
    rows = [(run, dataset, result.cls, name, value.value * 100, value.reason)
            for result in results for name, value in result.metrics.items()]
    frame = pd.DataFrame(rows, columns=list(METRIC_COLUMNS))
    means = [mean_row(group, run, dataset, metric) for metric, group in frame.groupby("metric", sort=False)]
    return pd.concat([frame, pd.DataFrame(means, columns=list(METRIC_COLUMNS))], ignore_index=True)


def mean_row(group: pd.DataFrame, run: str, dataset: str, metric: str) -> tuple:
    """The unweighted mean over the classes where ``metric`` is defined; the reason names the rest."""
    defined = group["value"].notna()
    skipped = group.loc[~defined, "cls"].tolist()
    if not defined.any():
        return run, dataset, MEAN, metric, math.nan, "undefined for every class"
    reason = f"mean over {int(defined.sum())} classes; undefined for: {', '.join(skipped)}" if skipped else ""
    return run, dataset, MEAN, metric, float(group.loc[defined, "value"].mean()), reason


def scores_frame(results: list, dataset: str) -> pd.DataFrame:
    """scores.csv: one row per image."""
    parts = [pd.DataFrame({"dataset": dataset, "cls": r.cls, "image": image_ids(r.frame),
                           "label": r.frame["label"].to_numpy(),
                           "score": r.records["score"].cpu().numpy().astype(np.float64)})
             for r in results]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(SCORE_COLUMNS))


def routing_frame(results: list, dataset: str, config) -> pd.DataFrame:
    """routing.csv: the top-k experts per image, tapped layer and pool; empty for static models."""
    from pmoe.vgmop import STATES

    parts = []
    for result in results:
        if "routing_indices" not in result.records:
            continue
        indices = result.records["routing_indices"].cpu().numpy()
        weights = result.records["routing_weights"].cpu().numpy()
        count, slots, states, k = indices.shape
        layers = list(config.layers) if slots == config.num_layers else ["all"]
        parts.append(pd.DataFrame({
            "dataset": dataset, "cls": result.cls,
            "image": np.repeat(np.array(image_ids(result.frame), dtype=object), slots * states * k),
            "layer": np.tile(np.repeat(np.array(layers, dtype=object), states * k), count),
            "state": np.tile(np.repeat(np.array(STATES, dtype=object), k), count * slots),
            "rank": np.tile(np.arange(k), count * slots * states),
            "expert": indices.reshape(-1), "weight": weights.reshape(-1).astype(np.float64),
        }))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(ROUTING_COLUMNS))


def _write_outputs(results: list, run: str, dataset: str, out_dir: Path, config) -> pd.DataFrame:
    """Write metrics.csv, scores.csv and routing.csv; returns the metrics frame."""
    from pmoe.io import write_csv

    invalidate(out_dir)
    metrics = metrics_frame(results, run, dataset)
    write_csv(scores_frame(results, dataset), out_dir / "scores.csv")
    write_csv(routing_frame(results, dataset, config), out_dir / "routing.csv")
    write_csv(metrics, out_dir / "metrics.csv", na_rep="NaN")
    return metrics


def invalidate(out_dir: Path) -> None:
    """Remove evaluation.json before outputs change: the folder is complete again only when it returns."""
    (Path(out_dir) / SETTINGS).unlink(missing_ok=True)


def _write_settings(out_dir: Path, run, key: dict, data_root, manifest, classes, train_set) -> None:
    """evaluation.json, written last: what was evaluated, how, with which code, and its reuse key."""
    from pmoe.checkpoint import provenance
    from pmoe.io import write_text

    settings = {
        "run": run, "train_set": train_set, "seed": key["config"]["seed"], "dataset": key["dataset"],
        "data_root": str(Path(data_root).expanduser().resolve()),
        "manifest": str(manifest) if manifest is not None else None, "classes": list(classes),
        "pro_mode": key["pro_mode"], "key": key, "provenance": provenance(),
    }
    write_text(out_dir / SETTINGS, json.dumps(settings, indent=2, default=str) + "\n")
