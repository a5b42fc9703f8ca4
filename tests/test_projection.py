"""The projected wall time of `pmoe reproduce --preset paper`: the plan counted from the package,
and the formula computed by hand on a small plan."""

import pytest

from pmoe.projection import NOTEBOOKS, Plan, Rates, metric_seconds, paper_plan, project, steps

RATES = Rates(encoder=10, loading=5, reading=20, train={"paper": 2, "v1": 4}, evaluate={"paper": 8, "v1": 16},
              metric_class_s=1.0, metric_class_images=10, metric_class_size=10, startup_s=3)
PLAN = Plan(images={"a": 32, "b": 16, "c": 10, "d": 5}, pixel=frozenset({"a", "b", "c"}), sources=("a", "b"),
            variants=("v1",), epochs=2, batch_size=16, image_size=10)


def test_the_paper_plan_is_table_7_the_paper_config_and_the_variants():
    plan = paper_plan()
    assert sum(plan.images.values()) == 20719 and len(plan.images) == 15
    assert plan.images["mvtec"] == 1725 and plan.images["visa"] == 2162 and plan.sources == ("mvtec", "visa")
    assert steps(plan, "mvtec") == 15 * 108 and steps(plan, "visa") == 15 * 136
    assert len(plan.variants) == 3 + 2 + 4 + 3 + 6  # the variants of Tables 2-6 besides the full model
    assert "paper" not in plan.variants and "table6-e16-k8" in plan.variants
    assert plan.pixel == set(plan.images) - {"headct", "brainmri", "br35h"}


def test_metric_time_scales_with_pixels_and_is_zero_without_masks():
    assert metric_seconds(RATES, PLAN, "a") == pytest.approx(3.2)  # 32 maps of 10x10 for 1 s per 10 maps
    assert metric_seconds(RATES, PLAN, "d") == 0.0


def test_the_projection_by_hand():
    """Seeds 2. steps: a 4, b 2; m: a 3.2, b 1.6, c 1.0, d 0; per image: stream max(1/5, 1/10 + 1/8)
    = 0.225, cached max(1/20, 1/8) = 0.125; run(paper, a) = 4/2 + 32/20 + 3 = 6.6, run(paper, b) = 4.8,
    run(v1, a) = 4/4 + 1.6 + 3 = 5.6, run(v1, b) = 4.3."""
    times = project(RATES, PLAN, seeds=2)
    assert list(times) == list(NOTEBOOKS)
    expected = {
        "00_quickstart": 3,
        "02_training": 48 * 0.2 + 2 * (6.6 + 4.8),
        "04_table1": 2 * ((2.25 + 1.0 + 3) + (1.125 + 0 + 3) + (4 + 3.2 + 3) + (2 + 1.6 + 3)),
        "05_ablations": 2 * (5.6 + 4.3) + (1.6 + 3 + 2 * (32 / 16 + 3.2)) + (0.8 + 3 + 2 * (16 / 16 + 1.6)),
        "07_figure5_qualitative": 6 * 3,
        "08_figure6_expert_activation": 4 + 3.2 + 3,
        "09_figure7_training_dynamics": 2 * 2 * (6.6 + 16 / 20 + 2 * 16 / 8),
    }
    for notebook, seconds in times.items():
        assert seconds == pytest.approx(expected.get(notebook, 0.0)), notebook


def test_unmeasured_variants_take_the_full_models_rates():
    partial = Rates(**{**RATES.__dict__, "train": {"paper": 2}, "evaluate": {"paper": 8}})
    assert partial.train_rate("v1") == 2 and partial.evaluate_rate("v1") == 8
    assert project(partial, PLAN)["05_ablations"] > project(RATES, PLAN)["05_ablations"]


def test_the_known_answer_check_counts_only_with_checkpoints():
    """Both AnomalyCLIP readings on both sources from the cache: per reading (a: 32/8 + 3.2 + 3) +
    (b: 16/8 + 1.6 + 3) = 16.8 (their variants take the full model's evaluation rate here)."""
    assert project(RATES, PLAN)["11_known_answer_anomalyclip"] == 0.0
    assert project(RATES, PLAN, known_answer=True)["11_known_answer_anomalyclip"] == pytest.approx(2 * 16.8)
