"""The paper's plan end to end with the tiny preset: seeds, a second run that reuses everything,
Figure 6's seen-set evaluation beside the zero-shot rows, and honest failures (a missing dataset
in the demo and in the paper plan makes `pmoe reproduce` exit 1 after finishing the rest)."""

import shutil

import pandas as pd
import pytest

from pmoe import experiments
from pmoe.cli import main as cli_main
from pmoe.reproduce import reproduce

pytestmark = pytest.mark.slow
DATASETS = ["synthetic-a", "mvtec", "btad"]  # synthetic-a: Figure 6's seen set is also evaluated zero-shot


def run(plan, notebooks, seeds=(0, 1), datasets=DATASETS, data_root=None):
    report = reproduce("tiny", data_root=data_root or plan["data"], out_dir=plan["out"], executed_dir=plan["executed"],
                       datasets=datasets, notebooks=notebooks, seeds=list(seeds), echo=lambda *_: None)
    assert not report.failed, report.summary()
    return report


def snapshot(out):
    """Every trained weights file and finished evaluation, with its modification time."""
    files = list(out.glob("runs/*/model.safetensors")) + list(out.glob("eval/*/*/evaluation.json"))
    return {path.relative_to(out): path.stat().st_mtime_ns for path in files}


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    base = tmp_path_factory.mktemp("plan")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PMOE_CACHE", str(base / "cache"))
        space = {"data": experiments.prepare_demo_data("tiny", base / "data"), "out": base / "out",
                 "executed": base / "executed"}
        run(space, ["04_table1"])
        yield space


def table(out, name):
    return pd.read_csv(out / "tables" / name)


def test_two_seeds_give_two_runs_whose_table_cells_are_their_mean(plan):
    out = plan["out"]
    runs = sorted(path.name for path in (out / "runs").iterdir())
    assert runs == [f"paper__{source}__seed{seed}" for source in ("synthetic-a", "synthetic-b") for seed in (0, 1)]
    assert (out / "runs" / runs[0] / "model.safetensors").read_bytes() != \
        (out / "runs" / runs[1] / "model.safetensors").read_bytes()
    per_seed = [pd.read_csv(experiments.eval_dir(out, "paper", "synthetic-a", "btad", seed) / "metrics.csv")
                .query("cls == 'mean' and metric == 'pro'")["value"].item() for seed in (0, 1)]
    table1 = table(out, "table1.csv").set_index(["dataset", "metric"])
    assert table1.loc[("BTAD", "PRO"), "ours"] == pytest.approx(sum(per_seed) / 2)
    assert table1.loc[("BTAD", "PRO"), "n"] == 2
    assert table1.loc[("BTAD", "PRO"), "ours sd"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    tidy = table(out, "table1_runs.csv")
    assert set(tidy["seed"]) == {0, 1} and len(tidy.drop_duplicates(["dataset", "cls", "metric", "seed"])) == len(tidy)


def test_a_second_run_after_the_seen_evaluation_rebuilds_the_same_tables_from_reused_results(plan):
    out = plan["out"]
    before = {name: table(out, name) for name in ("table1.csv", "table1_runs.csv")}
    run(plan, ["08_figure6"])  # evaluates the synthetic-a model on synthetic-a (the "seen" panel)
    assert (experiments.eval_dir(out, "paper", "synthetic-a", "synthetic-a", 0) / "metrics.csv").is_file()
    untouched = snapshot(out)
    run(plan, ["04_table1"])
    assert snapshot(out) == untouched  # nothing trained or evaluated again
    for name, frame in before.items():
        pd.testing.assert_frame_equal(table(out, name), frame)


def test_a_third_seed_trains_only_the_new_one(plan):
    out = plan["out"]
    before = snapshot(out)
    run(plan, ["04_table1"], seeds=(0, 1, 2))
    after = snapshot(out)
    assert all(after[path] == time for path, time in before.items())
    assert sorted(str(path) for path in set(after) - set(before) if path.name == "model.safetensors") == [
        "runs/paper__synthetic-a__seed2/model.safetensors", "runs/paper__synthetic-b__seed2/model.safetensors"]
    assert (table(out, "table1.csv").set_index(["dataset", "metric"]).loc[("BTAD", "PRO"), "n"]) == 3


def test_a_missing_dataset_in_the_demo_plan_fails_the_run_after_the_rest(plan, tmp_path, capsys):
    data = shutil.copytree(plan["data"], tmp_path / "data", ignore=shutil.ignore_patterns("btad"))
    out = shutil.copytree(plan["out"], tmp_path / "out")
    code = cli_main(["reproduce", "--preset", "tiny", "--data-root", str(data), "--out-dir", str(out),
                     "--executed-dir", str(tmp_path / "executed"), "--datasets", "mvtec", "btad",
                     "--notebooks", "04_table1", "--seeds", "0"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "04_table1.ipynb failed" in printed and "1 Table 1 evaluations failed" in printed
    assert "03_evaluation [btad]" in printed and "dataset 'btad' not found" in printed
    assert str(tmp_path / "executed" / "04_table1.ipynb") in printed
    table1 = table(out, "table1.csv").set_index(["dataset", "metric"])
    assert pd.isna(table1.loc[("BTAD", "PRO"), "ours"]) and pd.notna(table1.loc[("MVTec AD", "PRO"), "ours"])
    assert table(out, "table1_failures.csv")["notebook"].tolist() == ["03_evaluation [btad]"]


def test_a_missing_dataset_in_the_paper_plan_fails_the_run(tmp_path, capsys):
    (tmp_path / "data" / "mpdd").mkdir(parents=True)  # the evaluation set is there, its training set is not
    code = cli_main(["reproduce", "--preset", "paper", "--data-root", str(tmp_path / "data"),
                     "--out-dir", str(tmp_path / "out"), "--executed-dir", str(tmp_path / "executed"),
                     "--datasets", "mpdd", "--notebooks", "04_table1"])
    printed = capsys.readouterr().out
    assert code == 1 and "1 of 1 notebooks failed" in printed
    assert "03_evaluation [mpdd]" in printed and "dataset 'mvtec' not found" in printed
