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


def run_name(variant: str, train_set: str) -> str:
    return f"{variant}__{train_set}"


def run_dir(out_dir, variant: str, train_set: str) -> Path:
    return Path(out_dir) / "runs" / run_name(variant, train_set)


def eval_dir(out_dir, variant: str, train_set: str, dataset: str) -> Path:
    return Path(out_dir) / "eval" / run_name(variant, train_set) / dataset


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


def check_inputs(preset: str, data_root, clip_weights: str, datasets=()) -> None:
    """The first cell's checks: a clear message saying what to pass, before any work."""
    if preset not in ("paper", *DEMO_PRESETS):
        raise PmoeError(f"preset must be 'paper', 'demo' or 'tiny', got {preset!r}.")
    for name in datasets:
        dataset_info(name)
    if is_demo(preset):
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
          folder: str = "runs", **options) -> Path:
    """Train ``variant`` on ``train_set``; a finished run is kept, an interrupted one resumed."""
    from pmoe.features import default_cache_dir
    from pmoe.training import train as train_run

    target = Path(out_dir) / folder / run_name(variant, train_set)
    config = config_for(preset, variant, clip_weights)
    options.setdefault("cache_dir", default_cache_dir())
    return train_run(config, train_set, dataset_root(data_root, train_set), target, resume=True, **options)


def evaluate(preset: str, variant: str, target: str, data_root, out_dir, clip_weights=None, *,
             train_set: str | None = None, reuse: bool = True, **options) -> pd.DataFrame:
    """Evaluate ``variant`` on ``target`` (training it first if needed) and return the metrics frame.

    The model is the zero-shot one (trained on the other source) unless ``train_set`` is given.
    With ``reuse``, an evaluation newer than the model's weights is read back, not recomputed.
    """
    from pmoe.checkpoint import WEIGHTS
    from pmoe.evaluation import evaluate as evaluate_run
    from pmoe.features import default_cache_dir

    train_set = train_set or train_set_for(target, preset)
    run = train(preset, variant, train_set, data_root, out_dir, clip_weights, progress=options.get("progress", True))
    folder = eval_dir(out_dir, variant, train_set, target)
    metrics = folder / "metrics.csv"
    if reuse and metrics.is_file() and metrics.stat().st_mtime >= (run / WEIGHTS).stat().st_mtime:
        return pd.read_csv(metrics, dtype={"cls": str})
    options.setdefault("cache_dir", default_cache_dir())
    return evaluate_run(run, target, dataset_root(data_root, target), folder, clip_weights=clip_weights,
                        run_name=variant, **options)


def evaluation_file(out_dir, variant: str, target: str, preset: str, filename: str,
                    train_set: str | None = None) -> pd.DataFrame:
    """Read one file of an evaluation (e.g. ``routing.csv``), with a clear error if it is missing."""
    train_set = train_set or train_set_for(target, preset)
    path = eval_dir(out_dir, variant, train_set, target) / filename
    if not path.is_file():
        raise PmoeError(f"{path} does not exist: evaluate {variant!r} on {target!r} first "
                        "(notebook 03_evaluation, or pmoe.experiments.evaluate).")
    return pd.read_csv(path, dtype={"cls": str, "image": str})


def run_ablations(preset: str, variants, targets, data_root, out_dir, clip_weights=None) -> pd.DataFrame:
    """Train and evaluate every ablation variant in both directions; the combined metrics frame."""
    from tqdm.auto import tqdm

    jobs = [(variant, target) for variant in variants for target in targets]
    frames = []
    for variant, target in tqdm(jobs, desc="ablations"):  # one bar: per-run bars would flood a notebook
        frames.append(evaluate(preset, variant, target, data_root, out_dir, clip_weights, progress=False))
    return pd.concat(frames, ignore_index=True)


def training_dynamics(preset: str, data_root, out_dir, clip_weights=None) -> dict:
    """Figure 7: the full model and the model without L_decouple, trained on the primary source with
    the validation I-AUROC on the secondary one after every epoch; their epoch logs by label."""
    src = sources(preset)
    labels = {"paper": "with L_decouple", "fig7-no-decouple": "w/o L_decouple"}
    logs = {}
    for variant, label in labels.items():
        run = train(preset, variant, src["primary"], data_root, out_dir, clip_weights, folder="figure7",
                    val_set=src["secondary"], val_root=dataset_root(data_root, src["secondary"]))
        logs[label] = pd.read_csv(run / "log_epochs.csv")
    return logs


def qualitative_samples(preset: str, datasets, data_root, out_dir, clip_weights=None, per_dataset: int = 2,
                        variant: str = "paper") -> dict:
    """Figure 5: the highest-scoring anomalous images of each dataset with their masks and maps."""
    from pmoe.checkpoint import load_run
    from pmoe.data import AnomalyDataset, build_manifest
    from pmoe.evaluation import image_ids
    from pmoe.inference import predict

    picked = {"images": [], "masks": [], "maps": [], "titles": []}
    for name in datasets:
        train_set = train_set_for(name, preset)
        scores = evaluation_file(out_dir, variant, name, preset, "scores.csv")
        top = scores[scores["label"] == 1].nlargest(per_dataset, "score")
        model = load_run(run_dir(out_dir, variant, train_set), clip_weights=clip_weights)
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


def collect(out_dir, filename: str = "metrics.csv") -> pd.DataFrame:
    """Concatenate every evaluation's ``filename`` under ``out_dir/eval`` (empty frame if none)."""
    paths = sorted((Path(out_dir) / "eval").glob(f"*/*/{filename}"))
    frames = [pd.read_csv(path, dtype={"cls": str}).assign(train_run=path.parent.parent.name) for path in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
