"""The paper's experiment plan, shared by the notebooks: which model evaluates which dataset,
where runs and results live, and the checks a notebook makes before doing any work.

Zero-shot protocol (spec 6): a model trained on MVTec AD evaluates the other fourteen
datasets; a model trained on VisA evaluates MVTec AD. The ``demo`` and ``tiny`` presets play
the same plan with a tiny random CLIP: ``synthetic-a`` stands in for MVTec AD and
``synthetic-b`` for VisA as training sets, and the evaluation datasets are tiny "twins" in the
fifteen real layouts, so every table and figure is produced end to end without a download.

Folder layout under ``out_dir``::

    runs/<variant>__<train_set>/      a trained model (pmoe train)
    eval/<variant>__<train_set>/<dataset>/metrics.csv, scores.csv, routing.csv
    tables/, figures/                 what the notebooks draw
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pmoe.config import Config
from pmoe.data.registry import DATASETS, dataset_info
from pmoe.errors import PmoeError

PAPER_SOURCES = {"primary": "mvtec", "secondary": "visa"}
DEMO_SOURCES = {"primary": "synthetic-a", "secondary": "synthetic-b"}
DEMO_PRESETS = ("demo", "tiny")
# Synthetic data sizes of the demo presets: (image_size, normal, anomalous) per class.
SYNTHETIC_SIZES = {"demo": (112, 6, 10), "tiny": (96, 4, 6)}
PER_CLASS_TABLES = {"mvtec": 8, "visa": 9, "mpdd": 10, "btad": 11, "dtd": 12}
REPO = Path(__file__).resolve().parents[1]


def repo_path(path) -> Path:
    """``path`` as given if absolute, else relative to the repository root (notebooks run anywhere)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO / path


def is_demo(preset: str) -> bool:
    return preset in DEMO_PRESETS


def sources(preset: str) -> dict:
    """The two training sets of the preset: ``primary`` (MVTec AD) and ``secondary`` (VisA)."""
    return DEMO_SOURCES if is_demo(preset) else PAPER_SOURCES


def train_set_for(target: str, preset: str) -> str:
    """The training set whose model evaluates ``target`` zero-shot (classes never overlap)."""
    src = sources(preset)
    return src["secondary"] if target in ("mvtec", src["primary"]) else src["primary"]


def config_for(preset: str, variant: str = "paper", clip_weights: str | None = None) -> Config:
    """The config of an ablation ``variant`` (or ``paper``) on the preset's backbone."""
    config = Config.preset(variant, base=preset if preset in ("tiny", "demo") else "paper")
    return config.replace(clip_weights=clip_weights) if clip_weights else config


def run_name(variant: str, train_set: str, seed: int) -> str:
    return f"{variant}__{train_set}__seed{seed}"


def run_dir(out_dir, variant: str, train_set: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / run_name(variant, train_set, seed)


def eval_dir(out_dir, variant: str, train_set: str, dataset: str, seed: int) -> Path:
    return Path(out_dir) / "eval" / run_name(variant, train_set, seed) / dataset


def dataset_root(data_root, name: str) -> Path:
    """``data_root/<name>``, which must exist."""
    dataset_info(name)
    root = Path(data_root) / name
    if not root.is_dir():
        raise PmoeError(
            f"dataset {name!r} not found at {root}: put (or symlink) the dataset as distributed in "
            f"{Path(data_root) / name}, or pass data_root=... to the folder holding it."
        )
    return root


def notebook_inputs(preset: str, data_root: str, clip_weights: str, out_dir: str, datasets=()) -> tuple:
    """The first cell of every notebook: ``(data_root, clip_weights, out)``, checked.

    An empty value takes the preset's own (as ``pmoe reproduce`` does): the demo's data folder
    and tiny random CLIP, OpenAI's weights for the paper, ``results/run-<preset>``. Relative
    paths start at the repository, wherever the notebook runs.
    """
    from pmoe.reproduce import PRESETS, preset_inputs

    if preset not in PRESETS:
        raise PmoeError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {preset!r}.")
    data_root, clip_weights, out_dir = preset_inputs(preset, data_root, clip_weights, out_dir)
    check_inputs(preset, data_root, clip_weights, datasets)
    return repo_path(data_root), clip_weights, repo_path(out_dir)


def check_inputs(preset: str, data_root, clip_weights: str, datasets=()) -> None:
    """The first cell's checks: a clear message saying what to pass, before any work."""
    if preset not in ("paper", *DEMO_PRESETS):
        raise PmoeError(f"preset must be 'paper', 'demo' or 'tiny', got {preset!r}.")
    for name in datasets:
        dataset_info(name)
    if is_demo(preset):
        if clip_weights != "random":
            raise PmoeError(f"the {preset} preset runs a tiny random CLIP, not clip_weights {clip_weights!r}: "
                            "leave clip_weights empty (or 'random'); real weights need preset 'paper'.")
        return
    if not data_root or not Path(data_root).is_dir():
        raise PmoeError(
            f"data_root {data_root!r} is not a folder. Pass -p data_root /path/to/datasets: a folder with "
            "one sub-folder per dataset (mvtec, visa, ...) as distributed; see README 'Real data'."
        )
    if clip_weights != "openai" and not Path(clip_weights).expanduser().is_file():
        raise PmoeError(
            f"clip_weights {clip_weights!r} is neither 'openai' nor an existing file. Pass -p clip_weights "
            "/path/to/ViT-L-14-336.pt (OpenAI's weights) or 'openai' on a machine with network access."
        )


def prepare_demo_data(preset: str, data_root) -> Path:
    """Write the demo's synthetic training sets and the fifteen layout twins (idempotent)."""
    from pmoe.data.synthetic import write_dataset
    from pmoe.data.twins import write_twin

    data_root = Path(data_root)
    size, normal, anomalous = SYNTHETIC_SIZES[preset]
    for seed, name in enumerate(DEMO_SOURCES.values()):
        if not (data_root / name).is_dir():
            write_dataset(name, data_root / name, seed=seed, image_size=size, n_normal=normal, n_anomalous=anomalous)
    for name in DATASETS:
        if not (data_root / name).is_dir():
            write_twin(name, data_root / name)
    return data_root


def dataset_statistics(data_root, datasets) -> pd.DataFrame:
    """Table 7: per dataset, classes and (normal, anomalous) counts found beside the paper's."""
    from pmoe.data import build_manifest

    rows = []
    for name in datasets:
        info = dataset_info(name)
        frame = build_manifest(name, dataset_root(data_root, name))
        rows.append({
            "dataset": info.title, "domain": info.domain, "classes": frame["cls"].nunique(),
            "normal": int((frame["label"] == 0).sum()), "anomalous": int((frame["label"] == 1).sum()),
            "paper_classes": len(info.classes), "paper_normal": info.normal, "paper_anomalous": info.anomalous,
        })
    return pd.DataFrame(rows)


def write_manifests(data_root, datasets, folder) -> pd.DataFrame:
    """Build and write ``folder/<dataset>.csv`` for each dataset; one row per dataset with its path."""
    from pmoe.data import build_manifest
    from pmoe.io import write_csv

    rows = []
    for name in datasets:
        path = write_csv(build_manifest(name, dataset_root(data_root, name)), Path(folder) / f"{name}.csv")
        rows.append({"dataset": name, "manifest": str(path)})
    return pd.DataFrame(rows)


def train(preset: str, variant: str, train_set: str, data_root, out_dir, clip_weights=None, *,
          seed: int | None = None, folder: str = "runs", **options) -> Path:
    """Train ``variant`` on ``train_set`` with ``seed`` (default: the config's); a finished run is kept
    and an interrupted one resumed when its config and data are the same, else a clear error."""
    from pmoe.features import default_cache_dir
    from pmoe.training import train as train_run

    config = config_for(preset, variant, clip_weights)
    config = config.replace(seed=config.seed if seed is None else seed)
    target = Path(out_dir) / folder / run_name(variant, train_set, config.seed)
    options.setdefault("cache_dir", default_cache_dir())  # a training set is read every epoch
    return train_run(config, train_set, dataset_root(data_root, train_set), target, resume=True, **options)


def evaluate(preset: str, variant: str, target: str, data_root, out_dir, clip_weights=None, *,
             train_set: str | None = None, seed: int | None = None, reuse: bool = True,
             **options) -> pd.DataFrame:
    """Evaluate ``variant`` (seed ``seed``) on ``target``, training it first if needed; the metrics frame.

    The model is the zero-shot one (trained on the other source) unless ``train_set`` is given.
    The frame has ``train_set`` and ``seed`` columns besides those of metrics.csv.
    With ``reuse``, a finished evaluation whose key (:func:`pmoe.evaluation.evaluation_key`)
    matches is read back instead of recomputed. Features are cached for the preset's training
    sets only (their entries exist from training and ablations read them again); any other
    dataset is read once, so its features stream.
    """
    from pmoe.evaluation import evaluate as evaluate_run
    from pmoe.evaluation import reusable_metrics

    train_set = train_set or train_set_for(target, preset)
    run = train(preset, variant, train_set, data_root, out_dir, clip_weights, seed=seed,
                progress=options.get("progress", True))
    seed = config_for(preset, variant).seed if seed is None else seed
    folder, root = eval_dir(out_dir, variant, train_set, target, seed), dataset_root(data_root, target)
    metrics = reusable_metrics(run, target, root, folder, clip_weights=clip_weights, **options) if reuse else None
    if metrics is None:
        options.setdefault("cache_dir", evaluation_cache(preset, target))
        metrics = evaluate_run(run, target, root, folder, clip_weights=clip_weights, run_name=variant, **options)
    return metrics.assign(train_set=train_set, seed=seed)


def evaluation_cache(preset: str, target: str):
    """The feature cache an evaluation of ``target`` uses: the default one for the preset's training
    sets (their entries exist from training, and the ablations read them again), else None (a
    dataset evaluated once streams its features)."""
    from pmoe.features import default_cache_dir

    return default_cache_dir() if target in sources(preset).values() else None


def evaluate_together(preset: str, jobs, runs: dict, target: str, data_root, out_dir, clip_weights=None,
                      **options) -> dict:
    """Evaluate the trained ``runs`` of ``jobs`` ((variant, target, seed) triples) on ``target`` in one
    pass (:func:`pmoe.evaluation.evaluate_runs`); each job's metrics frame, with ``train_set`` and
    ``seed`` columns, by job. The folders and files are those :func:`evaluate` writes; current
    evaluations are read back."""
    from pmoe.evaluation import evaluate_runs

    train_set = train_set_for(target, preset)
    triples = [(runs[job], eval_dir(out_dir, job[0], train_set, target, job[2]), job[0]) for job in jobs]
    options.setdefault("cache_dir", evaluation_cache(preset, target))
    frames = evaluate_runs(triples, target, dataset_root(data_root, target), clip_weights=clip_weights, **options)
    return {job: frame.assign(train_set=train_set, seed=job[2]) for job, frame in zip(jobs, frames)}


def evaluation_file(out_dir, variant: str, target: str, preset: str, filename: str,
                    train_set: str | None = None, seed: int | None = None) -> pd.DataFrame:
    """Read one file of an evaluation (e.g. ``routing.csv``), with a clear error if it is missing."""
    train_set = train_set or train_set_for(target, preset)
    seed = config_for(preset, variant).seed if seed is None else seed
    path = eval_dir(out_dir, variant, train_set, target, seed) / filename
    if not path.is_file():
        raise PmoeError(f"{path} does not exist: evaluate {variant!r} on {target!r} (seed {seed}) first "
                        "(notebook 03_evaluation, or pmoe.experiments.evaluate).")
    return pd.read_csv(path, dtype={"cls": str, "image": str})


def default_seeds(preset: str, seeds=None) -> list:
    """``seeds`` as a list of ints, or the preset's own when none are given (``pmoe reproduce``'s
    default: paper 111, demo 0 and 1, tiny 0)."""
    from pmoe.reproduce import PRESETS

    return [int(seed) for seed in seeds] if seeds else list(PRESETS[preset]["seeds"])


def run_ablations(preset: str, variants, targets, data_root, out_dir, clip_weights=None, seeds=None) -> tuple:
    """Train and evaluate every ablation variant and seed in both directions.

    Every run is trained first (a finished one is kept); then each target is evaluated by all its
    runs in one pass (:func:`evaluate_together`: each class's cached features are read once, and
    evaluations that are current are read back). Returns (the metrics of every evaluation, in the
    order of the (variant, target, seed) jobs; failures: variant, target, seed, error). A failing
    training is recorded and the other jobs still run; a failing pass records every job of its target.
    """
    from tqdm.auto import tqdm

    from pmoe.evaluation import METRIC_COLUMNS

    jobs = [(variant, target, seed) for variant in variants for target in targets
            for seed in default_seeds(preset, seeds)]
    runs, frames, errors = {}, {}, {}
    for variant, target, seed in tqdm(jobs, desc="ablation trainings"):  # one bar: per-run bars would flood
        try:
            runs[variant, target, seed] = train(preset, variant, train_set_for(target, preset), data_root, out_dir,
                                                clip_weights, seed=seed, progress=False)
        except PmoeError as error:
            errors[variant, target, seed] = str(error)
    for target in tqdm(list(dict.fromkeys(targets)), desc="ablation evaluations"):
        ready = [job for job in jobs if job[1] == target and job in runs]
        if not ready:
            continue
        try:
            frames.update(evaluate_together(preset, ready, runs, target, data_root, out_dir, clip_weights,
                                            progress=False))
        except PmoeError as error:
            errors.update({job: str(error) for job in ready})
    columns = [*METRIC_COLUMNS, "train_set", "seed"]
    found = [frames[job] for job in jobs if job in frames]
    metrics = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=columns)
    failures = [{"variant": job[0], "target": job[1], "seed": job[2], "error": errors[job]}
                for job in jobs if job in errors]
    return metrics, pd.DataFrame(failures, columns=["variant", "target", "seed", "error"])


def require_complete(failures: pd.DataFrame, what: str) -> None:
    """Raise a PmoeError listing every failed job (after the notebook has drawn what it could)."""
    if len(failures):
        listing = "\n".join("  " + ", ".join(f"{key}={value}" for key, value in row.items())
                             for row in failures.to_dict("records"))
        raise PmoeError(f"{len(failures)} {what} failed (their cells are missing from the tables):\n{listing}")


def training_dynamics(preset: str, data_root, out_dir, clip_weights=None, seeds=None) -> dict:
    """Figure 7: the full model and the model without L_decouple, trained on the primary source with
    the validation I-AUROC on the secondary one after every epoch; their epoch logs (all seeds,
    a ``seed`` column) by label."""
    src = sources(preset)
    labels = {"paper": "with L_decouple", "fig7-no-decouple": "w/o L_decouple"}
    logs = {}
    for variant, label in labels.items():
        logs[label] = pd.concat([
            pd.read_csv(train(preset, variant, src["primary"], data_root, out_dir, clip_weights, seed=seed,
                              folder="figure7", val_set=src["secondary"],
                              val_root=dataset_root(data_root, src["secondary"])) / "log_epochs.csv").assign(seed=seed)
            for seed in default_seeds(preset, seeds)], ignore_index=True)
    return logs


def qualitative_samples(preset: str, datasets, data_root, out_dir, clip_weights=None, per_dataset: int = 2,
                        variant: str = "paper", seed: int | None = None) -> dict:
    """Figure 5: the highest-scoring anomalous images of each dataset with their masks and maps
    (the model of ``seed``, default the config's)."""
    from pmoe.checkpoint import load_run
    from pmoe.data import AnomalyDataset, build_manifest
    from pmoe.evaluation import image_ids
    from pmoe.inference import predict

    seed = config_for(preset, variant).seed if seed is None else seed
    picked = {"images": [], "masks": [], "maps": [], "titles": []}
    for name in datasets:
        train_set = train_set_for(name, preset)
        scores = evaluation_file(out_dir, variant, name, preset, "scores.csv", seed=seed)
        top = scores[scores["label"] == 1].nlargest(per_dataset, "score")
        model = load_run(run_dir(out_dir, variant, train_set, seed), clip_weights=clip_weights)
        root = dataset_root(data_root, name)
        manifest = build_manifest(name, root)
        rows = manifest[pd.Series(image_ids(manifest)).isin(top["image"]).to_numpy()].reset_index(drop=True)
        dataset = AnomalyDataset(rows, root, model.config.image_size, mask_rule=model.config.mask_rule)
        result = predict(model, [dataset[i] for i in range(len(dataset))], with_images=True)
        picked["images"] += list(result["image"])
        picked["masks"] += list(result["mask"])
        picked["maps"] += list(result["anomaly_map"])
        picked["titles"] += [f"{dataset_info(name).title}\n{path}" for path in result["path"]]
    return picked


def expert_embeddings(run) -> tuple:
    """Figure 8: the mean embedding of every expert of a trained run, per pool, with point labels."""
    from safetensors.numpy import load_file

    from pmoe.checkpoint import WEIGHTS, run_config

    config = run_config(run)
    weights = load_file(str(Path(run) / WEIGHTS))
    embeddings, labels = {}, {}
    for state in ("normal", "abnormal"):
        keys = sorted((k for k in weights if k.startswith("vgmop.") and k.endswith(f"experts.{state}")),
                      key=lambda k: int(k.split(".")[1]))
        if not keys:
            raise PmoeError(f"{run} has no {state} expert pool (a static or shared-pool variant); use a VGMoP run.")
        embeddings[state] = np.concatenate([weights[k].mean(axis=1) for k in keys])
        layers = config.layers if len(keys) == config.num_layers else ("all",)
        labels[state] = [f"L{layer}-E{e + 1}" for layer in layers for e in range(config.num_experts)]
    return embeddings, labels


def collect(out_dir) -> pd.DataFrame:
    """Every finished evaluation's metrics under ``out_dir/eval``, with its ``train_set`` and ``seed``
    (from its evaluation.json); a frame without rows if none. Unfinished folders are left out."""
    from pmoe.evaluation import METRIC_COLUMNS, SETTINGS, read_metrics

    frames = []
    for settings in sorted((Path(out_dir) / "eval").glob(f"*/*/{SETTINGS}")):
        recorded = json.loads(settings.read_text())
        metrics = read_metrics(settings.parent / "metrics.csv")
        frames.append(metrics.assign(train_set=recorded["train_set"], seed=recorded["seed"]))
    if not frames:
        return pd.DataFrame(columns=[*METRIC_COLUMNS, "train_set", "seed"])
    return pd.concat(frames, ignore_index=True)


def zero_shot_results(out_dir, preset: str, datasets=None, seeds=None) -> pd.DataFrame:
    """The zero-shot rows of every finished evaluation under ``out_dir`` (one row per seed, dataset,
    class and metric), of ``datasets`` and ``seeds`` only when given: what the tables are made of."""
    frame = zero_shot(collect(out_dir), preset)
    if frame.empty:
        return frame
    keep = pd.Series(True, index=frame.index)
    if datasets is not None:
        keep &= frame["dataset"].isin(list(datasets))
    if seeds is not None:
        keep &= frame["seed"].isin(list(seeds))
    return frame[keep].reset_index(drop=True)


def zero_shot(frame: pd.DataFrame, preset: str) -> pd.DataFrame:
    """The rows of a collected frame that are zero-shot: the model never saw the dataset's classes
    (Table 1 and Tables 2-6; Figure 6's "seen" evaluation is left out)."""
    if frame.empty:
        return frame
    keep = [train_set == train_set_for(dataset, preset)
            for dataset, train_set in zip(frame["dataset"], frame["train_set"])]
    return frame[keep].reset_index(drop=True)
