"""The paper's result tables, ours beside the paper's, computed from tidy CSVs only.

Usage::

    import pandas as pd
    from pmoe import tables
    ours = pd.read_csv("runs/paper/metrics.csv")       # run, dataset, cls, metric, value, reason
    tables.format_pairs(tables.table1(ours))            # Table 1 as printed: "(AUROC, AP)" pairs
    tables.ablation_table(3, ours)                      # Table 3: paper / ours / diff per variant
    tables.per_class_table(8, ours)                     # Table 8: MVTec AD per class

``ours`` is the evaluation's metrics frame (``value`` in percent, ``cls == "mean"`` rows hold
the unweighted mean over classes). Anything missing from it shows as NaN. Every "Average"
row is computed here (unweighted mean, NaN when a member is missing); none is typed by hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pmoe.data.registry import dataset_info
from pmoe.errors import DataError, PmoeError
from pmoe.paper import PAPER_METHOD, load_paper, load_variants, table_number

OURS = "ours"
DIFF = "ours - paper"
SOURCES = ("paper", "ours", "diff")
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
OURS_COLUMNS = ("dataset", "cls", "metric", "value")


def dataset_title(name: str) -> str:
    """The display title of a dataset as the paper prints it (e.g. ``"MVTec AD"``)."""
    return dataset_info(name).title


def table1_group(dataset: str, metric: str) -> str:
    """Table 1's row group of a dataset's metric, e.g. ``"Industrial image-level"``."""
    level = "image" if metric.startswith("image_") else "pixel"
    return f"{dataset_info(dataset).domain.capitalize()} {level}-level"


def ours_values(ours: pd.DataFrame | None, run: str | None) -> pd.Series:
    """Our metric values of one run as a Series indexed by (dataset, cls, metric).

    ``run=None`` uses every row (they must then be unique per dataset, class and metric).
    A run absent from a non-empty frame is an error, naming the runs that are present.
    """
    if ours is None:
        return pd.Series(dtype=float, index=pd.MultiIndex.from_tuples([], names=OURS_COLUMNS[:3]))
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
        rows = ours[ours["run"] == run]
        if rows.empty and not ours.empty:
            present = sorted(ours["run"].astype(str).unique())
            raise PmoeError(f"no metrics for run {run!r}; the frame holds runs {present}: pass one as run=.")
    keys = rows[list(OURS_COLUMNS[:3])].astype(str)
    duplicated = keys.duplicated()
    if duplicated.any():
        example = tuple(keys[duplicated].iloc[0])
        raise DataError(
            f"several metric rows for (dataset, cls, metric) = {example}: select a single run with run=."
        )
    return pd.Series(rows["value"].astype(float).to_numpy(), index=pd.MultiIndex.from_frame(keys))


def _lookup(values: pd.Series, datasets, classes, metrics) -> np.ndarray:
    """Our values for aligned sequences of keys, NaN where we have none."""
    keys = pd.MultiIndex.from_arrays([list(datasets), list(classes), list(metrics)])
    return values.reindex(keys).to_numpy(dtype=float)


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


def _with_diff(paper: pd.DataFrame, ours: pd.DataFrame) -> pd.DataFrame:
    """Interleave paper / ours / diff (= ours - paper) as the last column level."""
    both = pd.concat(dict(zip(SOURCES, (paper, ours, ours - paper))), axis=1)
    order = [(source, *(c if isinstance(c, tuple) else (c,))) for c in paper.columns for source in SOURCES]
    both = both[pd.MultiIndex.from_tuples(order)]
    levels = list(range(1, both.columns.nlevels)) + [0]
    both.columns = both.columns.reorder_levels(levels)
    both.columns.names = [*(paper.columns.names), "source"]
    return both


def table1_long(ours: pd.DataFrame | None = None, run: str | None = "paper") -> pd.DataFrame:
    """Table 1 as a tidy frame: group, dataset, title, method, metric, value (ours as ``"ours"``).

    Our rows cover exactly the paper's (dataset, metric) cells; the ones we lack are NaN.
    """
    paper = load_paper(1)[["dataset", "method", "metric", "value"]]
    if ours is not None:
        cells = paper.loc[paper["method"] == PAPER_METHOD, ["dataset", "metric"]]
        value = _lookup(ours_values(ours, run), cells["dataset"], [MEAN_CLASS] * len(cells), cells["metric"])
        paper = pd.concat([paper, cells.assign(method=OURS, value=value)], ignore_index=True)
    groups = [table1_group(d, m) for d, m in zip(paper["dataset"], paper["metric"])]
    titles = paper["dataset"].map(dataset_title)
    return paper.assign(group=groups, title=titles)[["group", "dataset", "title", "method", "metric", "value"]]


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

    With ``ours`` two more columns: ``"ours"`` and ``"ours - paper"`` (difference to the
    paper's PromptMoE). Pass the result to :func:`format_pairs` for the paper's layout.
    """
    long = table1_long(ours, run)
    long = long.assign(metric=long["metric"].map(METRIC_LABELS))
    wide = _ordered_pivot(long, ["group", "title", "metric"], ["method"], "value")
    wide.index.names = ["group", "dataset", "metric"]
    wide.columns.name = None
    wide = _group_averages(wide)
    if OURS in wide.columns:
        wide[DIFF] = wide[OURS] - wide[PAPER_METHOD]
    return wide


def _format_number(value: float, signed: bool) -> str:
    """One decimal as in the paper, with a sign for differences; ``-`` for missing."""
    if pd.isna(value):
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def format_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """Render :func:`table1` as the paper prints it: one "(a, b)" cell per dataset and method.

    The metric names of each pair move into the group label, e.g.
    ``"Industrial image-level (I-AUROC, I-AP)"``.
    """
    rows, index = [], []
    for (group, dataset), block in table.groupby(level=["group", "dataset"], sort=False):
        metrics = ", ".join(block.index.get_level_values("metric"))
        index.append((f"{group} ({metrics})", dataset))
        rows.append(
            {
                column: "(" + ", ".join(_format_number(v, column == DIFF) for v in block[column]) + ")"
                for column in table.columns
            }
        )
    return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["group", "dataset"]))


def _runs(ours: pd.DataFrame | None) -> set:
    """The run names present in our metrics frame (none without a frame)."""
    if ours is None:
        return set()
    if "run" not in ours.columns:
        raise DataError("the metrics frame has no 'run' column: ablation rows are matched by run (= preset name).")
    return set(ours["run"].astype(str))


def ablation_table(number, ours: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tables 2-6: rows (variant, printed label) in paper order; columns (dataset, metric, source).

    ``source`` is paper / ours / diff; our value of a variant comes from the run named after
    the variant's preset (``paper`` for the full model) and is NaN when that run is absent.
    """
    number = table_number(number)
    variants = load_variants(number)
    paper = load_paper(number).merge(variants, on=["table", "variant"], how="left", validate="many_to_one")
    if paper["label"].isna().any():
        raise DataError(f"table{number}.csv names variants missing from variants.csv: restore both from git.")
    value = np.full(len(paper), np.nan)
    for variant in _runs(ours) & set(paper["variant"]):
        rows = (paper["variant"] == variant).to_numpy()
        mine = ours_values(ours, variant)
        value[rows] = _lookup(mine, paper["dataset"][rows], [MEAN_CLASS] * rows.sum(), paper["metric"][rows])
    long = paper.assign(ours=value, title=paper["dataset"].map(dataset_title))
    long["metric"] = long["metric"].map(METRIC_LABELS)
    long = long.drop(columns="dataset").rename(columns={"value": "paper", "title": "dataset"})
    wide = _ordered_pivot(long, ["variant", "label"], ["dataset", "metric"], ["paper", "ours"])
    return _with_diff(wide["paper"], wide["ours"])


def per_class_table(number, ours: pd.DataFrame | None = None, run: str | None = "paper") -> pd.DataFrame:
    """Tables 8-12: rows = the dataset's classes in paper order plus ``Average``; columns (metric, source).

    The Average row is the unweighted mean over the classes shown (NaN if one is missing).
    """
    number = table_number(number)
    paper = load_paper(number)
    if paper["cls"].eq(MEAN_CLASS).all():
        raise PmoeError(f"table {number} has no per-class results: per-class tables are 8-12.")
    value = _lookup(ours_values(ours, run), paper["dataset"], paper["cls"], paper["metric"])
    long = paper.assign(ours=value, metric=paper["metric"].map(METRIC_LABELS)).rename(columns={"value": "paper"})
    wide = _ordered_pivot(long, ["cls"], ["metric"], ["paper", "ours"])
    wide.loc[AVERAGE] = wide.mean(skipna=False)
    return _with_diff(wide["paper"], wide["ours"])
