"""The known-answer check of the evaluation pipeline: AnomalyCLIP's released checkpoints run
through pmoe and compared with the per-class numbers their authors logged (results/anomalyclip/).

Their checkpoint trained on VisA is evaluated on MVTec AD and the one trained on MVTec AD on
VisA, each imported (:func:`pmoe.anomalyclip.import_run`) under both readings of their test
setting: ``anomalyclip`` (the map of layer 24) and ``anomalyclip-4layers`` (layers 6, 12, 18 and
24 summed). Per class and mean: ours, theirs and ours - theirs, in percent. The reading whose
numbers are closer to their log is the one their logs were made with. With the demo presets the
same plan runs on random checkpoints written in their format and on the twins of MVTec AD and
VisA (meaningless numbers, every step exercised). Without checkpoints (the paper preset's
default) the check is skipped with a note saying how to run it.

Usage (notebook 11)::

    from pmoe import known_answer
    checkpoints = known_answer.prepare("paper", data_root, "ViT-L-14-336px.pt", out_dir,
                                       visa_trained="9_12_4_multiscale/epoch_15.pth",
                                       mvtec_trained="9_12_4_multiscale_visa/epoch_15.pth")
    runs = known_answer.import_runs("paper", checkpoints, out_dir, "ViT-L-14-336px.pt")
    table = known_answer.comparison(known_answer.evaluate_runs(runs, data_root, out_dir))

Folder layout under ``out_dir`` (apart from ``eval/``, so the paper's tables never collect it)::

    known_answer/checkpoints/<their folder>/epoch_15.pth   the demo presets' random checkpoints
    known_answer/runs/<variant>__<train set>/               the imported runs
    known_answer/eval/<variant>__<train set>/<dataset>/     their evaluations
    tables/known_answer_anomalyclip.csv                     variant, train_set, dataset, cls, metric,
                                                            ours, published, difference
    tables/known_answer_agreement.csv                       per dataset and variant: mean and largest
                                                            absolute difference over classes and metrics
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pmoe import experiments
from pmoe.anomalyclip import CHECKPOINT_TRAIN_SETS, load_published
from pmoe.errors import PmoeError

VARIANTS = ("anomalyclip", "anomalyclip-4layers")
EVALUATED_ON = {"visa": "mvtec", "mvtec": "visa"}  # the training set of a checkpoint -> the dataset it is tested on
FOLDER = "known_answer"
CHECKPOINT_FILE = "epoch_15.pth"
KEYS = ["variant", "train_set", "dataset", "cls", "metric"]
TABLE = "known_answer_anomalyclip.csv"
AGREEMENT = "known_answer_agreement.csv"


def prepare(preset: str, data_root, clip_weights: str, out_dir, visa_trained: str = "",
            mvtec_trained: str = "") -> dict:
    """The checkpoints to check, by training set: the files given (empty: left out); with the demo
    presets, random ones in their format for any not given, and the demo data. The inputs the
    check needs are validated (only when there is something to check)."""
    data_root, out_dir = Path(data_root), Path(out_dir)
    if experiments.is_demo(preset):
        experiments.prepare_demo_data(preset, data_root)
    given = {"visa": visa_trained, "mvtec": mvtec_trained}
    paths = {train_set: Path(path).expanduser() for train_set, path in given.items() if path}
    if experiments.is_demo(preset):
        for seed, train_set in enumerate(given):
            paths.setdefault(train_set, random_checkpoint(preset, train_set, out_dir, clip_weights, seed))
    absent = [str(path) for path in paths.values() if not path.is_file()]
    if absent:
        raise PmoeError(f"AnomalyCLIP checkpoint(s) {', '.join(absent)} do not exist; pass the paths of their "
                        "9_12_4_multiscale/epoch_15.pth (visa_trained_checkpoint) and "
                        "9_12_4_multiscale_visa/epoch_15.pth (mvtec_trained_checkpoint).")
    if paths:
        experiments.check_inputs(preset, data_root, clip_weights, [EVALUATED_ON[name] for name in paths])
    return paths


def random_checkpoint(preset: str, train_set: str, out_dir, clip_weights: str, seed: int) -> Path:
    """A random checkpoint for the preset's CLIP, written in their format under their folder name.

    One written before is kept while it still loads into this CLIP (its file, hence the imported
    runs and their evaluations, stay the same).
    """
    import torch

    from pmoe.anomalyclip import AnomalyCLIPPromptLearner, load_checkpoint, save_checkpoint
    from pmoe.backbone import load_clip
    from pmoe.errors import CheckpointError

    folder = {trained_on: name for name, trained_on in CHECKPOINT_TRAIN_SETS.items()}[train_set]
    path = Path(out_dir) / FOLDER / "checkpoints" / folder / CHECKPOINT_FILE
    config = experiments.config_for(preset, VARIANTS[0], clip_weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        learner = AnomalyCLIPPromptLearner(load_clip(config), n_ctx=config.ctx_len, depth=config.deep_prompt_depth,
                                           deep_len=config.deep_prompt_len, class_name=config.class_name)
    if path.is_file():
        try:
            load_checkpoint(learner, path)
            return path
        except CheckpointError:
            pass  # made for another CLIP or setting: written again below
    return save_checkpoint(learner, path)


def status(checkpoints: dict) -> str:
    """What the check does with these checkpoints, or that it is skipped and how to run it."""
    if not checkpoints:
        return ("Known-answer check skipped: no AnomalyCLIP checkpoint given. To run it, download their "
                "checkpoints (github.com/zqhang/AnomalyCLIP, checkpoints/) and run this notebook with\n"
                "  -p visa_trained_checkpoint .../9_12_4_multiscale/epoch_15.pth\n"
                "  -p mvtec_trained_checkpoint .../9_12_4_multiscale_visa/epoch_15.pth\n"
                "(README, 'Real weights and data on a GPU').")
    lines = [f"trained on {train_set}: {path} -> evaluated on {EVALUATED_ON[train_set]}"
             for train_set, path in checkpoints.items()]
    skipped = sorted(set(EVALUATED_ON) - set(checkpoints))
    lines += [f"no checkpoint trained on {name} given: its direction is skipped" for name in skipped]
    return "\n".join(lines)


def import_runs(preset: str, checkpoints: dict, out_dir, clip_weights: str | None = None,
                variants=VARIANTS) -> dict:
    """(variant, train set) -> run directory: every checkpoint imported under every variant. A run
    imported before from the same file content with the same config is kept."""
    from pmoe.anomalyclip import import_run

    runs = {}
    for train_set, path in checkpoints.items():
        for variant in variants:
            config = experiments.config_for(preset, variant, clip_weights)
            target = Path(out_dir) / FOLDER / "runs" / f"{variant}__{train_set}"
            if not imported_from(target, path, config):
                import_run(path, target, config, train_set=train_set, overwrite=True)
            runs[variant, train_set] = target
    return runs


def imported_from(run_dir: Path, path: Path, config) -> bool:
    """Whether ``run_dir`` holds the import of ``path`` (by content) with ``config``."""
    from pmoe.checkpoint import WEIGHTS, run_config
    from pmoe.identity import file_sha1
    from pmoe.training import IDENTITY

    identity = run_dir / IDENTITY
    if not identity.is_file() or not (run_dir / WEIGHTS).is_file():
        return False
    recorded = json.loads(identity.read_text()).get("source_sha1")
    return recorded == file_sha1(path) and run_config(run_dir) == config


def evaluate_runs(runs: dict, data_root, out_dir) -> pd.DataFrame:
    """Each imported run evaluated on the dataset its checkpoint is tested on (:data:`EVALUATED_ON`);
    the metrics frames with ``variant`` and ``train_set`` columns. A finished evaluation whose key
    matches is read back. Features are cached (the two datasets are read once per variant)."""
    from tqdm.auto import tqdm

    from pmoe.evaluation import METRIC_COLUMNS, evaluate, reusable_metrics
    from pmoe.features import default_cache_dir

    frames = []
    for (variant, train_set), run in tqdm(runs.items(), desc="known-answer evaluations"):
        dataset = EVALUATED_ON[train_set]
        root = experiments.dataset_root(data_root, dataset)
        folder = Path(out_dir) / FOLDER / "eval" / f"{variant}__{train_set}" / dataset
        metrics = reusable_metrics(run, dataset, root, folder)
        if metrics is None:
            metrics = evaluate(run, dataset, root, folder, run_name=variant, cache_dir=default_cache_dir(),
                               progress=False)
        frames.append(metrics.assign(variant=variant, train_set=train_set))
    if not frames:
        return pd.DataFrame(columns=[*METRIC_COLUMNS, "variant", "train_set"])
    return pd.concat(frames, ignore_index=True)


def comparison(metrics: pd.DataFrame) -> pd.DataFrame:
    """Every class and metric of their log, per variant evaluated: ``ours``, ``published`` and
    ``difference`` (ours - published, percent). A value we lack is NaN."""
    published = load_published().rename(columns={"value": "published"})
    evaluated = metrics[["variant", "train_set"]].drop_duplicates()
    rows = evaluated.merge(published[[*KEYS[1:], "published"]], on="train_set")
    ours = metrics.rename(columns={"value": "ours"})[[*KEYS, "ours"]]
    table = rows.merge(ours, on=KEYS, how="left")[[*KEYS, "ours", "published"]]
    return table.assign(difference=table["ours"] - table["published"])


def agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and variant: the mean and largest |ours - published| over classes and metrics
    (the printed means left out), and whether the variant is the closer one for that dataset."""
    columns = ["dataset", "train_set", "variant", "mean_abs_difference", "max_abs_difference", "closest"]
    per_class = table[table["cls"] != "mean"]
    per_class = per_class.assign(abs_difference=per_class["difference"].abs())
    if per_class.empty:
        return pd.DataFrame(columns=columns)
    grouped = per_class.groupby(["dataset", "train_set", "variant"], sort=False)["abs_difference"]
    summary = grouped.agg(mean_abs_difference="mean", max_abs_difference="max").reset_index()
    best = summary.groupby("dataset")["mean_abs_difference"].transform("min")
    return summary.assign(closest=summary["mean_abs_difference"] == best)[columns]


def verdict(agreement_frame: pd.DataFrame) -> str:
    """One line per dataset naming the variant closer to their log."""
    lines = []
    for dataset, rows in agreement_frame.groupby("dataset", sort=False):
        ranked = rows.sort_values("mean_abs_difference")
        others = ", ".join(f"{row.variant} {row.mean_abs_difference:.2f}" for row in ranked.iloc[1:].itertuples())
        best = ranked.iloc[0]
        lines.append(f"{dataset}: {best.variant} is closest to their log (mean |ours - theirs| "
                     f"{best.mean_abs_difference:.2f} points per class and metric{'; ' + others if others else ''})")
    return "\n".join(lines)


def per_class_view(table: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One dataset's rows as a wide table: classes down, (variant, metric, ours/published/difference) across."""
    rows = table[table["dataset"] == dataset]
    wide = rows.pivot_table(index="cls", columns=["variant", "metric"], values=["ours", "published", "difference"],
                            sort=False, dropna=False)
    wide = wide.reorder_levels([1, 2, 0], axis=1)
    order = [(variant, metric, value) for variant in rows["variant"].unique() for metric in rows["metric"].unique()
             for value in ("ours", "published", "difference")]
    return wide.reindex(index=list(dict.fromkeys(rows["cls"])), columns=pd.MultiIndex.from_tuples(order))


def write_tables(table: pd.DataFrame, agreement_frame: pd.DataFrame, out_dir) -> list:
    """Write the comparison and the agreement under ``out_dir/tables`` (nothing when the check was skipped)."""
    from pmoe.io import write_csv

    if table.empty:
        return []
    folder = Path(out_dir) / "tables"
    return [write_csv(table, folder / TABLE), write_csv(agreement_frame, folder / AGREEMENT)]
