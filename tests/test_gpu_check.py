"""benchmarks/gpu_check.py --quick: every section runs on the CPU with the tiny CLIP, the table is
printed and written as JSON to $OUT, and its projection is pmoe.projection's of its own rates."""

import importlib.util
import json
import math

import pytest

from pmoe.projection import NOTEBOOKS, paper_plan, project

pytestmark = pytest.mark.slow
SCRIPT = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quick_check_measures_every_section_and_projects_from_its_rates(tmp_path, monkeypatch, capsys):
    gpu_check = load_script()
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("PMOE_CACHE", str(tmp_path / "unused-cache"))  # the check fills its own scratch cache
    assert gpu_check.main(["--quick", "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    table = json.loads((tmp_path / "gpu_check.json").read_text())
    assert table["mode"] == "quick" and table["device"] == "cpu" and table["seeds"] == 2
    assert [row["batch"] for row in table["encoder"]] == [4, 8]
    assert all(row["images_per_s"] > 0 for row in table["encoder"])
    fidelity = table["fidelity"]
    assert fidelity["device_vs_cpu"] == {"anomaly_map": 0.0, "score": 0.0} and not fidelity["compared"]
    assert 0 < fidelity["bf16_encoder"]["anomaly_map"] < 0.1  # bf16 rounds the features, a little
    data = table["data"]
    assert data["images"] == 16 and data["held_on"] == "cpu" and data["workers"] == 0
    assert all(data[key] > 0 for key in ("loading_images_per_s", "fill_images_per_s", "reading_images_per_s"))
    assert list(table["variants"]) == ["paper", "table2-ensemble", "table4-l24"]
    assert all(row["train_steps_per_s"] > 0 and row["evaluate_images_per_s"] > 0 for row in table["variants"].values())
    assert table["metrics"]["ok"] and table["metrics"]["max_difference"] <= 1e-6
    assert list(table["projection"]) == list(NOTEBOOKS)
    assert table["projection"] == pytest.approx(project(gpu_check.rates_of(table), paper_plan(), 2))
    assert all(math.isfinite(seconds) and seconds >= 0 for seconds in table["projection"].values())
    assert table["projection"]["05_ablations"] > 0 and table["projection"]["01_data_preparation"] == 0
    for text in ("encoder      batch 8", "fidelity", "fill the feature cache", "training     table4-l24",
                 "metrics", "pmoe reproduce --preset paper", f"wrote {tmp_path / 'gpu_check.json'}"):
        assert text in printed, text
    assert not (tmp_path / "unused-cache").exists()
