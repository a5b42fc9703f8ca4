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
    assert pairs.loc[("Medical pixel-level (P-AUROC, PRO)", "Kvasir"), tables.OURS] == tables.MISSING
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


# --- over seeds ---------------------------------------------------------------------------------

def seeded(rows) -> pd.DataFrame:
    """A collected frame: (run, dataset, cls, metric, seed, value) tuples."""
    frame = pd.DataFrame(rows, columns=["run", "dataset", "cls", "metric", "seed", "value"])
    return frame.assign(reason="", train_set="x")


def test_seed_values_and_summary_against_hand_computation():
    ours = seeded([("paper", "mvtec", "mean", "pro", seed, value) for seed, value in ((1, 90.0), (2, 92.0), (3, 97.0))]
                  + [("paper", "mvtec", "mean", "image_auroc", seed, 80.0) for seed in (1, 2)])
    summary = tables.summarize(tables.seed_values(ours, "paper"))
    pro = summary.loc[("mvtec", "mean", "pro")]
    assert pro["mean"] == pytest.approx(93.0) and pro["n"] == 3
    assert pro["sd"] == pytest.approx(np.sqrt(((90 - 93) ** 2 + (92 - 93) ** 2 + (97 - 93) ** 2) / 2))
    auroc = summary.loc[("mvtec", "mean", "image_auroc")]
    assert auroc["mean"] == 80.0 and auroc["sd"] == 0.0 and auroc["n"] == 2
    with pytest.raises(DataError, match="one seed"):
        tables.seed_values(pd.concat([ours, ours.head(1)]), "paper")


def test_table1_over_two_seeds_shows_mean_sd_n_and_flags(ours_table1):
    two = pd.concat([ours_table1.assign(seed=1), ours_table1.assign(seed=2, value=ours_table1["value"] + 0.2)])
    table = tables.table1(two)
    assert list(table.columns)[-5:] == [tables.OURS, tables.OURS_SD, tables.OURS_N, tables.DIFF, tables.FLAG]
    mvtec = table.loc[("Industrial image-level", "MVTec AD", "I-AUROC")]
    assert mvtec[tables.OURS] == pytest.approx(94.9) and mvtec[tables.OURS_N] == 2
    assert mvtec[tables.OURS_SD] == pytest.approx(np.sqrt(2 * 0.1 ** 2))  # values 94.8 and 95.0
    assert mvtec[tables.DIFF] == pytest.approx(1.1) and mvtec[tables.FLAG]  # 1.1 > 2 x 0.14
    average = table.loc[("Industrial image-level", tables.AVERAGE, "I-AUROC")]
    assert average[tables.OURS_SD] == pytest.approx(np.sqrt(2 * 0.1 ** 2))  # the seeds' averages differ by 0.2
    assert average[tables.OURS_N] == 2
    pairs = tables.format_pairs(table)
    row = pairs.loc[("Industrial image-level (I-AUROC, I-AP)", "MVTec AD")]
    assert row[tables.OURS] == "(94.9 ± 0.1, 98.3 ± 0.1)" and row[tables.OURS_N] == "(2, 2)"
    assert row[tables.DIFF] == "(+1.1*, +1.1*)"
    assert tables.OURS_SD not in pairs.columns and tables.FLAG not in pairs.columns


def test_one_seed_looks_as_without_seeds(ours_table1):
    with_seed = tables.table1(ours_table1.assign(seed=111))
    pd.testing.assert_frame_equal(with_seed, tables.table1(ours_table1))


def test_ablation_and_per_class_tables_over_seeds():
    frame = paper.load_paper(3)
    rows = [("table3-alpha0", r.dataset, "mean", r.metric, seed, r.value + delta)
            for r in frame[frame.variant == "table3-alpha0"].itertuples() for seed, delta in ((1, -1.0), (2, 1.0))]
    table = tables.ablation_table(3, seeded(rows))
    alpha0 = table.loc[("table3-alpha0", "alpha = 0 (w/o L_balance)")]
    assert alpha0[("MVTec AD", "I-AUROC", "ours")] == pytest.approx(92.1)
    assert alpha0[("MVTec AD", "I-AUROC", "sd")] == pytest.approx(np.sqrt(2))
    assert alpha0[("MVTec AD", "I-AUROC", "n")] == 2 and not alpha0[("MVTec AD", "I-AUROC", "flag")]
    btad = paper.load_paper(11)
    rows = [("paper", "btad", r.cls, r.metric, seed, r.value + delta)
            for r in btad.itertuples() for seed, delta in ((1, -3.0), (2, 1.0))]
    per_class = tables.per_class_table(11, seeded(rows))
    assert per_class.loc["01", ("PRO", "ours")] == pytest.approx(77.8 - 1.0)
    assert per_class.loc[tables.AVERAGE, ("PRO", "sd")] == pytest.approx(np.sqrt(8))  # seed averages differ by 4
    assert per_class.loc[tables.AVERAGE, ("PRO", "diff")] == pytest.approx(-1.0)
    assert not per_class.loc[tables.AVERAGE, ("PRO", "flag")]  # |-1.0| is within 2 x 2.83
