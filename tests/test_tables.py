"""Table renderers: ours beside the paper, differences, computed averages, missing data as NaN."""

import numpy as np
import pandas as pd
import pytest

from pmoe import paper, tables
from pmoe.errors import DataError, PmoeError


def metrics_frame(rows) -> pd.DataFrame:
    """An evaluation metrics frame (run, dataset, cls, metric, value, reason) from tuples."""
    frame = pd.DataFrame(rows, columns=["run", "dataset", "cls", "metric", "value"])
    return frame.assign(reason="")


def roundtrip(frame: pd.DataFrame, tmp_path) -> pd.DataFrame:
    """Write and read back as the engine's metrics.csv would be read (default pandas parsing)."""
    frame.to_csv(tmp_path / "metrics.csv", index=False)
    return pd.read_csv(tmp_path / "metrics.csv")


@pytest.fixture()
def ours_table1():
    """Our headline numbers: the paper's PromptMoE + 1.0 everywhere, without Kvasir."""
    table1 = paper.load_paper(1)
    mine = table1[(table1.method == "PromptMoE") & (table1.dataset != "kvasir")]
    return metrics_frame([("paper", r.dataset, "mean", r.metric, r.value + 1.0) for r in mine.itertuples()])


def test_table1_diff_is_ours_minus_paper_and_missing_is_nan(ours_table1):
    table = tables.table1(ours_table1)
    assert list(table.columns)[-2:] == [tables.OURS, tables.DIFF]
    mvtec = table.loc[("Industrial image-level", "MVTec AD", "I-AUROC")]
    assert mvtec[tables.OURS] == pytest.approx(94.8)
    assert mvtec[tables.DIFF] == pytest.approx(1.0)
    for metric in ("P-AUROC", "PRO"):
        kvasir = table.loc[("Medical pixel-level", "Kvasir", metric)]
        assert np.isnan(kvasir[tables.OURS]) and np.isnan(kvasir[tables.DIFF])
    assert table.loc[("Industrial image-level", tables.AVERAGE, "I-AP"), tables.DIFF] == pytest.approx(1.0)
    assert np.isnan(table.loc[("Medical pixel-level", tables.AVERAGE, "PRO"), tables.OURS])


def test_table1_rows_follow_the_paper_layout():
    table = tables.table1()
    groups = list(table.index.get_level_values("group").unique())
    assert groups == ["Industrial image-level", "Industrial pixel-level", "Medical image-level", "Medical pixel-level"]
    assert len(table) == 2 * (7 + 1) * 2 + 2 * (3 + 1) + 2 * (5 + 1)
    assert tables.OURS not in table.columns


def test_table1_long_holds_our_line_only_where_the_paper_has_a_cell(ours_table1):
    long = tables.table1_long(ours_table1)
    ours = long[long.method == tables.OURS]
    assert len(ours) == len(long[long.method == "PromptMoE"])
    assert ours["value"].isna().sum() == 2
    assert set(long.columns) >= {"group", "dataset", "title", "method", "metric", "value"}


def test_format_pairs_renders_the_printed_layout(ours_table1):
    pairs = tables.format_pairs(tables.table1(ours_table1))
    row = pairs.loc[("Industrial image-level (I-AUROC, I-AP)", "MVTec AD")]
    assert row["PromptMoE"] == "(93.8, 97.2)"
    assert row[tables.OURS] == "(94.8, 98.2)"
    assert row[tables.DIFF] == "(+1.0, +1.0)"
    assert pairs.loc[("Medical pixel-level (P-AUROC, PRO)", "Kvasir"), tables.OURS] == "(-, -)"
    assert pairs.loc[("Medical pixel-level (P-AUROC, PRO)", "Average"), "APRIL-GAN"] == "(81.0, 58.7)"


def test_run_selection_errors_name_the_fix(ours_table1):
    with pytest.raises(PmoeError, match="holds runs \\['paper'\\]"):
        tables.table1(ours_table1, run="other")
    doubled = pd.concat([ours_table1, ours_table1.assign(run="other")])
    with pytest.raises(DataError, match="select a single run"):
        tables.table1(doubled, run=None)
    assert tables.table1(doubled, run="other")[tables.DIFF].notna().any()
    with pytest.raises(DataError, match="lacks columns \\['value'\\]"):
        tables.table1(ours_table1.drop(columns="value"))


def test_ablation_table_matches_runs_to_variants(tmp_path):
    frame = paper.load_paper(3)
    rows = []
    for run, delta in (("table3-alpha0", -0.5), ("paper", 0.25)):
        rows += [(run, r.dataset, "mean", r.metric, r.value + delta) for r in frame[frame.variant == run].itertuples()]
    ours = roundtrip(metrics_frame(rows + [("unrelated", "mvtec", "mean", "pro", 1.0)]), tmp_path)
    table = tables.ablation_table(3, ours)
    assert list(table.index.get_level_values("label")) == list(paper.load_variants(3)["label"])
    assert table.columns.names == ["dataset", "metric", "source"]
    alpha0 = table.loc[("table3-alpha0", "alpha = 0 (w/o L_balance)")]
    assert alpha0[("MVTec AD", "I-AUROC", "paper")] == 92.1
    assert alpha0[("MVTec AD", "I-AUROC", "ours")] == pytest.approx(91.6)
    assert alpha0.xs("diff", level="source").to_numpy() == pytest.approx(-0.5)
    assert table.loc["paper"].xs("diff", level="source", axis=1).to_numpy() == pytest.approx(0.25)
    assert table.loc["table3-alpha0.1"].xs("ours", level="source", axis=1).isna().all(axis=None)


def test_ablation_table_without_ours_shows_the_paper_only():
    table = tables.ablation_table("table6")
    assert len(table) == 7
    assert table.xs("paper", level="source", axis=1).notna().all(axis=None)
    assert table.xs("ours", level="source", axis=1).isna().all(axis=None)
    with pytest.raises(PmoeError, match="not an ablation"):
        tables.ablation_table(8)


def test_per_class_table_diffs_and_computed_average(tmp_path):
    btad = paper.load_paper(11)
    rows = [("paper", "btad", r.cls, r.metric, r.value - 2.0) for r in btad.itertuples()]
    rows += [("paper", "btad", "mean", "pro", 0.0)]
    ours = roundtrip(metrics_frame(rows), tmp_path)
    table = tables.per_class_table(11, ours)
    assert list(table.index) == ["01", "02", "03", tables.AVERAGE]
    assert table.xs("diff", level="source", axis=1).to_numpy() == pytest.approx(-2.0)
    assert table.loc[tables.AVERAGE, ("PRO", "ours")] == pytest.approx((77.8 + 72.4 + 91.6) / 3 - 2.0)


def test_per_class_average_is_nan_when_a_class_is_missing():
    rows = [("paper", "btad", "01", "image_auroc", 90.0), ("paper", "btad", "02", "image_auroc", 80.0)]
    table = tables.per_class_table(11, metrics_frame(rows))
    assert table.loc["02", ("I-AUROC", "ours")] == 80.0
    assert np.isnan(table.loc[tables.AVERAGE, ("I-AUROC", "ours")])
    assert not np.isnan(table.loc[tables.AVERAGE, ("I-AUROC", "paper")])
    with pytest.raises(PmoeError, match="per-class tables are 8-12"):
        tables.per_class_table(2)
