"""The paper's result tables, ours beside the paper's, computed from tidy CSVs only.

Usage::

    import pandas as pd
    from pmoe import tables
    ours = pd.read_csv("runs/paper/metrics.csv")       # run, dataset, cls, metric, value, reason
    tables.format_pairs(tables.table1(ours))            # Table 1 as printed: "(AUROC, AP)" pairs
    tables.ablation_table(3, ours)                      # Table 3: paper / ours / diff per variant
    tables.per_class_table(8, ours)                     # Table 8: MVTec AD per class

``ours`` is the evaluation's metrics frame (``value`` in percent, ``cls == "mean"`` rows hold
the unweighted mean over classes), or several such frames concatenated with a ``seed`` column
(``pmoe.experiments.collect``). Over seeds every table shows the mean, and, when some value
has more than one seed, its standard deviation (n - 1), n, and a flag where the difference to
the paper exceeds two standard deviations; with one seed the tables look as with none.
Anything missing shows as NaN (``missing`` in :func:`format_pairs`). Every "Average" row is
computed here (unweighted mean, NaN when a member is missing; over seeds, each seed's average
first); none is typed by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pmoe.data.registry import dataset_info
from pmoe.errors import DataError, PmoeError
from pmoe.paper import PAPER_METHOD, load_paper, load_variants, table_number

OURS = "ours"
OURS_SD = "ours sd"
OURS_N = "n"
DIFF = "ours - paper"
FLAG = "beyond 2 sd"
FLAG_MARK = "*"
MISSING = "missing"
AVERAGE = "Average"
MEAN_CLASS = "mean"
METRIC_LABELS = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1_max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1_max": "P-F1max",
    "pro": "PRO",
}
KEY_COLUMNS = ("dataset", "cls", "metric")
OURS_COLUMNS = (*KEY_COLUMNS, "value")


def dataset_title(name: str) -> str:
    """The display title of a dataset as the paper prints it (e.g. ``"MVTec AD"``)."""
    return dataset_info(name).title


def table1_group(dataset: str, metric: str) -> str:
    """Table 1's row group of a dataset's metric, e.g. ``"Industrial image-level"``."""
    level = "image" if metric.startswith("image_") else "pixel"
    return f"{dataset_info(dataset).domain.capitalize()} {level}-level"


# --- our values over seeds ----------------------------------------------------------------------
def seed_values(ours: pd.DataFrame | None, run: str | None) -> pd.DataFrame:
    """Our values of one run: rows (dataset, cls, metric), one column per seed.

    ``ours`` is a metrics frame (one row per dataset, class, metric and, when it has a ``seed``
    column, seed); ``run=None`` uses every row. Two rows for the same cell and seed are an error
    (several runs, or a model evaluated on its own training set beside the zero-shot one: pass
    :func:`pmoe.experiments.zero_shot` rows). A run absent from a non-empty frame is an error
    naming the runs present.
    """
    empty = pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=KEY_COLUMNS))
    if ours is None:
        return empty
    missing = [column for column in OURS_COLUMNS if column not in ours.columns]
    if missing:
        raise DataError(
            f"the metrics frame lacks columns {missing}: pass the evaluation's metrics.csv "
            "(columns run, dataset, cls, metric, value, reason)."
        )
    rows = ours
    if run is not None:
        if "run" not in ours.columns:
            raise DataError(f"the metrics frame has no 'run' column to select run {run!r}: pass run=None.")
        rows = ours[ours["run"].astype(str) == run]
        if rows.empty and not ours.empty:
            present = sorted(ours["run"].astype(str).unique())
            raise PmoeError(f"no metrics for run {run!r}; the frame holds runs {present}: pass one as run=.")
    keys = rows[list(KEY_COLUMNS)].astype(str)
    seeds = rows["seed"].astype(int) if "seed" in rows.columns else pd.Series(0, index=rows.index)
    duplicated = keys.assign(seed=seeds).duplicated()
    if duplicated.any():
        example = tuple(keys[duplicated].iloc[0])
        several = "train_set" in rows.columns and rows["train_set"].nunique() > 1
        hint = ("keep the zero-shot rows (pmoe.experiments.zero_shot)" if several
                else "select a single run with run=")
        raise DataError(f"several metric rows for (dataset, cls, metric) = {example} and one seed: {hint}.")
    if rows.empty:
        return empty
    long = keys.assign(seed=seeds.to_numpy(), value=rows["value"].astype(float).to_numpy())
    return long.pivot(index=list(KEY_COLUMNS), columns="seed", values="value")


def summarize(values: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (n - 1) and n over the seed columns of ``values``, per row."""
    return pd.DataFrame({"mean": values.mean(axis=1), "sd": values.std(axis=1, ddof=1),
                         "n": values.count(axis=1)}, index=values.index)


def several_seeds(summary: pd.DataFrame) -> bool:
    """Whether some value is a mean over more than one seed (then sd, n and flags are shown)."""
    return bool((summary["n"] > 1).any())


def _lookup(values: pd.DataFrame, datasets, classes, metrics) -> pd.DataFrame:
    """Our per-seed values for aligned sequences of keys (rows of NaN where we have none)."""
    keys = pd.MultiIndex.from_arrays([list(datasets), list(classes), list(metrics)], names=KEY_COLUMNS)
    return values.reindex(keys)


# --- layout helpers -----------------------------------------------------------------------------
def _ordered_pivot(long: pd.DataFrame, index: list, columns: list, values) -> pd.DataFrame:
    """``DataFrame.pivot`` that keeps rows and columns in their order of first appearance."""
    wide = long.pivot(index=index, columns=columns, values=values)
    row_order = long[index].drop_duplicates()
    column_order = long[columns].drop_duplicates()
    rows = pd.MultiIndex.from_frame(row_order) if len(index) > 1 else pd.Index(row_order[index[0]])
    cols = pd.MultiIndex.from_frame(column_order) if len(columns) > 1 else pd.Index(column_order[columns[0]])
    if isinstance(values, list):
        cols = pd.MultiIndex.from_tuples(
            [(value, *(col if isinstance(col, tuple) else (col,))) for value in values for col in cols],
            names=[None, *columns],
        )
    return wide.reindex(index=rows, columns=cols)


def _with_diff(paper: pd.DataFrame, ours: dict) -> pd.DataFrame:
    """Interleave paper / ours [/ sd / n] / diff [/ flag] as the last column level.

    ``ours`` maps "mean", "sd" and "n" to frames shaped like ``paper``; diff is mean - paper;
    sd, n and the flag (|diff| > 2 sd) appear only when some value is a mean over several seeds.
    """
    seeds = bool((ours["n"] > 1).any(axis=None))
    parts = {"paper": paper, "ours": ours["mean"]}
    if seeds:
        parts.update({"sd": ours["sd"], "n": ours["n"]})
    parts["diff"] = ours["mean"] - paper
    if seeds:
        parts["flag"] = parts["diff"].abs() > 2 * ours["sd"]
    both = pd.concat(parts, axis=1)
    order = [(source, *(c if isinstance(c, tuple) else (c,))) for c in paper.columns for source in parts]
    both = both[pd.MultiIndex.from_tuples(order)]
    levels = list(range(1, both.columns.nlevels)) + [0]
    both.columns = both.columns.reorder_levels(levels)
    both.columns.names = [*(paper.columns.names), "source"]
    return both


def _summary_frames(long: pd.DataFrame, index: list, columns: list) -> dict:
    """The mean / sd / n columns of ``long`` each pivoted like the paper's values."""
    wide = _ordered_pivot(long, index, columns, ["mean", "sd", "n"])
    return {part: wide[part] for part in ("mean", "sd", "n")}


# --- Table 1 ------------------------------------------------------------------------------------
def _table1_cells() -> pd.DataFrame:
    """The paper's PromptMoE cells of Table 1: dataset, metric."""
    paper = load_paper(1)
    return paper.loc[paper["method"] == PAPER_METHOD, ["dataset", "metric"]].reset_index(drop=True)


def table1_long(ours: pd.DataFrame | None = None, run: str | None = "paper") -> pd.DataFrame:
    """Table 1 as a tidy frame: group, dataset, title, method, metric, value, sd, n (ours as ``"ours"``).

    Our rows cover exactly the paper's (dataset, metric) cells: the mean over seeds, with its
    standard deviation and count; the cells we lack are NaN. sd and n are NaN for the paper's rows.
    """
    paper = load_paper(1)[["dataset", "method", "metric", "value"]]
    if ours is not None:
        cells = _table1_cells()
        mine = summarize(_lookup(seed_values(ours, run), cells["dataset"], [MEAN_CLASS] * len(cells), cells["metric"]))
        mine = cells.assign(method=OURS, value=mine["mean"].to_numpy(), sd=mine["sd"].to_numpy(),
                            n=mine["n"].to_numpy())
        paper = pd.concat([paper, mine], ignore_index=True)
    paper = paper.reindex(columns=["dataset", "method", "metric", "value", "sd", "n"])
    groups = [table1_group(d, m) for d, m in zip(paper["dataset"], paper["metric"])]
    columns = ["group", "dataset", "title", "method", "metric", "value", "sd", "n"]
    return paper.assign(group=groups, title=paper["dataset"].map(dataset_title))[columns]


def _group_averages(wide: pd.DataFrame) -> pd.DataFrame:
    """Append an ``Average`` row per (group, metric) after each group's datasets."""
    parts = []
    for group in wide.index.get_level_values("group").unique():
        block = wide.xs(group, level="group", drop_level=False)
        means = block.groupby(level="metric", sort=False).agg(lambda column: column.mean(skipna=False))
        means.index = pd.MultiIndex.from_tuples([(group, AVERAGE, m) for m in means.index], names=wide.index.names)
        parts += [block, means]
    return pd.concat(parts)


def table1(ours: pd.DataFrame | None = None, run: str | None = "paper") -> pd.DataFrame:
    """Table 1: rows (group, dataset title, metric) with computed Average rows; one column per method.

    With ``ours`` more columns: ``"ours"`` (the mean over seeds), with several seeds ``"ours sd"``
    and ``"n"``, then ``"ours - paper"`` (the difference to the paper's PromptMoE) and, with
    several seeds, ``"beyond 2 sd"`` (that difference exceeds two standard deviations). An
    Average row of ours averages each seed's datasets first, so its sd is the spread of the
    seeds' averages. Pass the result to :func:`format_pairs` for the paper's layout.
    """
    long = table1_long(None)
    long = long.assign(metric=long["metric"].map(METRIC_LABELS))
    wide = _ordered_pivot(long, ["group", "title", "metric"], ["method"], "value")
    wide.index.names = ["group", "dataset", "metric"]
    wide.columns.name = None
    wide = _group_averages(wide)
    if ours is None:
        return wide
    cells = _table1_cells()
    values = _lookup(seed_values(ours, run), cells["dataset"], [MEAN_CLASS] * len(cells), cells["metric"])
    values.index = pd.MultiIndex.from_arrays(
        [[table1_group(d, m) for d, m in zip(cells["dataset"], cells["metric"])],
         cells["dataset"].map(dataset_title), cells["metric"].map(METRIC_LABELS)], names=wide.index.names)
    datasets = wide.index[wide.index.get_level_values("dataset") != AVERAGE]
    mine = summarize(_group_averages(values.reindex(datasets))).reindex(wide.index)
    seeds = several_seeds(mine)
    wide[OURS] = mine["mean"]
    if seeds:
        wide[OURS_SD], wide[OURS_N] = mine["sd"], mine["n"]
    wide[DIFF] = wide[OURS] - wide[PAPER_METHOD]
    if seeds:
        wide[FLAG] = wide[DIFF].abs() > 2 * wide[OURS_SD]
    return wide


def _format_number(value: float, signed: bool = False, spread: float = math.nan, flag: bool = False) -> str:
    """One decimal as in the paper (``± sd`` when given, a sign for differences, ``*`` when
    flagged); ``-`` for a missing number."""
    if pd.isna(value):
        return "-"
    text = f"{value:+.1f}" if signed else f"{value:.1f}"
    if not pd.isna(spread):
        text += f" ± {spread:.1f}"
    return text + (FLAG_MARK if flag else "")


def format_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """Render :func:`table1` as the paper prints it: one "(a, b)" cell per dataset and method.

    The metric names of each pair move into the group label, e.g.
    ``"Industrial image-level (I-AUROC, I-AP)"``. Over several seeds ours reads "mean ± sd",
    n is its own column and a difference beyond two standard deviations is marked ``*``. A
    cell of ours that is missing (a dataset that failed or was not run) reads ``missing``.
    """
    shown = [column for column in table.columns if column not in (OURS_SD, FLAG)]
    rows, index = [], []
    for (group, dataset), block in table.groupby(level=["group", "dataset"], sort=False):
        metrics = ", ".join(block.index.get_level_values("metric"))
        index.append((f"{group} ({metrics})", dataset))
        spread = block[OURS_SD] if OURS_SD in block else pd.Series(math.nan, index=block.index)
        flags = block[FLAG] if FLAG in block else pd.Series(False, index=block.index)
        cells = {}
        for column in shown:
            if column == OURS and block[OURS].isna().all():
                cells[column] = MISSING
                continue
            texts = [_format_number(value, signed=column == DIFF,
                                    spread=spread[key] if column == OURS else math.nan,
                                    flag=bool(flags[key]) if column == DIFF else False)
                     for key, value in block[column].items()]
            cells[column] = "(" + ", ".join(texts if column != OURS_N else
                                            [str(int(v)) for v in block[column]]) + ")"
        rows.append(cells)
    return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["group", "dataset"]))


# --- Tables 2-6 and 8-12 ------------------------------------------------------------------------
def _runs(ours: pd.DataFrame | None) -> set:
    """The run names present in our metrics frame (none without a frame)."""
    if ours is None:
        return set()
    if "run" not in ours.columns:
        raise DataError("the metrics frame has no 'run' column: ablation rows are matched by run (= preset name).")
    return set(ours["run"].astype(str))


def ablation_table(number, ours: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tables 2-6: rows (variant, printed label) in paper order; columns (dataset, metric, source).

    ``source`` is paper / ours [/ sd / n] / diff [/ flag]; our value of a variant comes from the
    run named after the variant's preset (``paper`` for the full model), averaged over seeds,
    and is NaN when that run is absent.
    """
    number = table_number(number)
    variants = load_variants(number)
    paper = load_paper(number).merge(variants, on=["table", "variant"], how="left", validate="many_to_one")
    if paper["label"].isna().any():
        raise DataError(f"table{number}.csv names variants missing from variants.csv: restore both from git.")
    summary = pd.DataFrame({"mean": np.nan, "sd": np.nan, "n": 0}, index=paper.index)
    for variant in _runs(ours) & set(paper["variant"]):
        rows = paper["variant"] == variant
        mine = summarize(_lookup(seed_values(ours, variant), paper["dataset"][rows], [MEAN_CLASS] * rows.sum(),
                                 paper["metric"][rows]))
        summary.loc[rows, ["mean", "sd", "n"]] = mine.to_numpy()
    long = pd.concat([paper, summary], axis=1).assign(title=paper["dataset"].map(dataset_title))
    long["metric"] = long["metric"].map(METRIC_LABELS)
    long = long.drop(columns="dataset").rename(columns={"title": "dataset"})
    ours_parts = _summary_frames(long, ["variant", "label"], ["dataset", "metric"])
    return _with_diff(_ordered_pivot(long, ["variant", "label"], ["dataset", "metric"], "value"), ours_parts)


def per_class_table(number, ours: pd.DataFrame | None = None, run: str | None = "paper") -> pd.DataFrame:
    """Tables 8-12: rows = the dataset's classes in paper order plus ``Average``; columns (metric, source).

    The Average row is the unweighted mean over the classes shown (NaN if one is missing), of
    each seed before the mean over seeds.
    """
    number = table_number(number)
    paper = load_paper(number)
    if paper["cls"].eq(MEAN_CLASS).all():
        raise PmoeError(f"table {number} has no per-class results: per-class tables are 8-12.")
    paper = paper.assign(metric=paper["metric"].map(METRIC_LABELS))
    values = _lookup(seed_values(ours, run), paper["dataset"], paper["cls"], load_paper(number)["metric"])
    values.index = pd.MultiIndex.from_arrays([paper["cls"], paper["metric"]], names=["cls", "metric"])
    averages = values.groupby(level="metric", sort=False).agg(lambda column: column.mean(skipna=False))
    averages.index = pd.MultiIndex.from_tuples([(AVERAGE, m) for m in averages.index], names=["cls", "metric"])
    mine = summarize(pd.concat([values, averages])).reset_index()
    wide = _ordered_pivot(paper.rename(columns={"value": "paper"}), ["cls"], ["metric"], "paper")
    wide.loc[AVERAGE] = wide.mean(skipna=False)
    ours_parts = {part: frame.reindex(index=wide.index, columns=wide.columns)
                  for part, frame in _summary_frames(mine, ["cls"], ["metric"]).items()}
    return _with_diff(wide, ours_parts)
