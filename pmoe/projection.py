"""Projected wall time of ``pmoe reproduce --preset paper``: the plan's work divided by measured rates.

``benchmarks/gpu_check.py`` measures the rates (:class:`Rates`) on a machine; :func:`project`
turns them into seconds per notebook for ``seeds`` training seeds. The work is counted from the
package's own plan (:func:`paper_plan`): the Table 7 test images of the fifteen datasets, the
paper config's epochs and batch size, the ablation variants of ``results/paper/variants.csv``
and the two training sets. With N_d the images of dataset d, S the seeds, E the epochs, B the
batch size, steps(d) = E * ceil(N_d / B), V the ablation variants (the full model excluded),
and the rates enc (frozen encoder, images/s), load (image decoding, images/s), read (cache
entries into memory, images/s), eval_v (trainable path in eval mode from cached features,
images/s), train_v (training steps/s from features in memory), m(d) (metrics of d's classes,
seconds: the measured class time scaled by pixels; 0 without masks) and u (building a model,
seconds)::

    stream(d) = N_d * max(1/load, 1/enc + 1/eval_paper)       image -> score, loading overlapped
    cached(d) = N_d * max(1/read, 1/eval_paper)
    run(v, d) = steps(d) / train_v + N_d / read + u             one training on source d

    00_quickstart     u
    02_training       (N_mvtec + N_visa) * max(1/load, 1/enc) + S * sum_d run(paper, d)
    04_table1         S * [sum_{d not a source} (stream(d) + m(d) + u) + sum_{d source} (cached(d) + m(d) + u)]
    05_ablations      S * sum_v sum_d run(v, d) + sum_t [N_t / read + u + S * sum_v (N_t / eval_v + m(t))]
    07_figure5        u * (datasets shown, 6)
    08_figure6        cached(mvtec) + m(mvtec) + u
    09_figure7        S * 2 * [run(paper, mvtec) + N_visa / read + E * N_visa / eval_paper]
    11_known_answer   sum_{v in anomalyclip, anomalyclip-4layers} sum_{d source} (N_d / eval_v + m(d) + u)
                      with AnomalyCLIP's checkpoints (``known_answer``), else 0 (skipped)
    01, 03, 06, 10    0 (file listing; 03 runs inside 04; 06 and 10 reuse results)

A variant without a measured rate takes the full model's. Notebook 03 is counted in 04, which
runs it once per dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NOTEBOOKS = ("00_quickstart", "01_data_preparation", "02_training", "03_evaluation", "04_table1", "05_ablations",
             "06_figure1b_routing", "07_figure5_qualitative", "08_figure6_expert_activation",
             "09_figure7_training_dynamics", "10_figure8_tsne", "11_known_answer_anomalyclip")
KNOWN_ANSWER_VARIANTS = ("anomalyclip", "anomalyclip-4layers")  # notebook 11: both readings of their test
FIGURE5_DATASETS = 6  # notebook 07's default datasets (a model is built for each)
FIGURE7_RUNS = 2  # notebook 09: the full model and the model without L_decouple


@dataclass(frozen=True)
class Rates:
    """What gpu_check measures (images/s, steps/s, seconds)."""

    encoder: float  # images/s of the frozen encoder in the feature-extraction precision
    loading: float  # images/s decoded and resized by the default data-loading workers
    reading: float  # cache entries/s read into memory
    train: dict  # variant -> training steps/s (batch 16, features in memory); "paper" is required
    evaluate: dict  # variant -> images/s from cached features in eval mode (maps, smoothing)
    metric_class_s: float  # seconds for every metric of one class ...
    metric_class_images: int  # ... of this many maps ...
    metric_class_size: int  # ... of this size (square)
    startup_s: float  # seconds to build a model on the device

    def train_rate(self, variant: str) -> float:
        return self.train.get(variant, self.train["paper"])

    def evaluate_rate(self, variant: str) -> float:
        return self.evaluate.get(variant, self.evaluate["paper"])


@dataclass(frozen=True)
class Plan:
    """The work of ``pmoe reproduce --preset paper`` besides the seeds (see :func:`paper_plan`)."""

    images: dict  # dataset -> test images (Table 7: normal + anomalous)
    pixel: frozenset  # datasets with pixel metrics (masks)
    sources: tuple  # (primary, secondary) training sets: MVTec AD, VisA
    variants: tuple  # ablation variants besides the full model
    epochs: int
    batch_size: int
    image_size: int
    figure5_datasets: int = FIGURE5_DATASETS


def paper_plan() -> Plan:
    """The paper's plan from the registry (Table 7), the paper config and the variants CSV."""
    from pmoe.config import Config
    from pmoe.data.registry import DATASETS
    from pmoe.experiments import PAPER_SOURCES
    from pmoe.paper import load_variants

    config = Config.preset("paper")
    variants = [name for name in dict.fromkeys(load_variants()["variant"]) if name != "paper"]
    return Plan(images={name: info.normal + info.anomalous for name, info in DATASETS.items()},
                pixel=frozenset(name for name, info in DATASETS.items() if info.has_masks),
                sources=(PAPER_SOURCES["primary"], PAPER_SOURCES["secondary"]), variants=tuple(variants),
                epochs=config.epochs, batch_size=config.batch_size, image_size=config.image_size)


def steps(plan: Plan, dataset: str) -> int:
    """Optimizer steps of one training on ``dataset`` (the last partial batch is a step)."""
    return plan.epochs * math.ceil(plan.images[dataset] / plan.batch_size)


def metric_seconds(rates: Rates, plan: Plan, dataset: str) -> float:
    """m(d): the metrics of every class of ``dataset``, the measured class time scaled by pixels."""
    if dataset not in plan.pixel:
        return 0.0
    pixels = plan.images[dataset] * plan.image_size ** 2
    return rates.metric_class_s * pixels / (rates.metric_class_images * rates.metric_class_size ** 2)


def project(rates: Rates, plan: Plan, seeds: int = 1, known_answer: bool = False) -> dict:
    """Seconds per notebook of ``pmoe reproduce --preset paper`` with ``seeds`` seeds (module docstring);
    ``known_answer``: notebook 11 is given AnomalyCLIP's checkpoints (it reads the cached training sets)."""
    primary, secondary = plan.sources
    sources, n = plan.sources, plan.images
    evaluate, startup = rates.evaluate_rate("paper"), rates.startup_s

    def stream(d):
        return n[d] * max(1 / rates.loading, 1 / rates.encoder + 1 / evaluate)

    def cached(d):
        return n[d] * max(1 / rates.reading, 1 / evaluate)

    def run(variant, d):
        return steps(plan, d) / rates.train_rate(variant) + n[d] / rates.reading + startup

    def m(d):
        return metric_seconds(rates, plan, d)

    others = [d for d in n if d not in sources]
    times = dict.fromkeys(NOTEBOOKS, 0.0)
    times["00_quickstart"] = startup
    times["02_training"] = (sum(n[d] for d in sources) * max(1 / rates.loading, 1 / rates.encoder)
                            + seeds * sum(run("paper", d) for d in sources))
    times["04_table1"] = seeds * (sum(stream(d) + m(d) + startup for d in others)
                                  + sum(cached(d) + m(d) + startup for d in sources))
    times["05_ablations"] = (seeds * sum(run(v, d) for v in plan.variants for d in sources)
                             + sum(n[t] / rates.reading + startup
                                   + seeds * sum(n[t] / rates.evaluate_rate(v) + m(t) for v in plan.variants)
                                   for t in sources))
    times["07_figure5_qualitative"] = plan.figure5_datasets * startup
    times["08_figure6_expert_activation"] = cached(primary) + m(primary) + startup
    times["09_figure7_training_dynamics"] = seeds * FIGURE7_RUNS * (
        run("paper", primary) + n[secondary] / rates.reading + plan.epochs * n[secondary] / evaluate)
    if known_answer:
        times["11_known_answer_anomalyclip"] = sum(n[d] / rates.evaluate_rate(v) + m(d) + startup
                                                   for v in KNOWN_ANSWER_VARIANTS for d in sources)
    return times
