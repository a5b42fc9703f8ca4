"""The first command to run on a GPU: the engine's measured rates and the projected wall time of
``pmoe reproduce --preset paper``, in one table (random ViT-L-14-336 weights, nothing downloaded).

Usage:
    python benchmarks/gpu_check.py               # the GPU: under 8 minutes on one H200
    python benchmarks/gpu_check.py --seeds 3     # the projection for 3 training seeds
    python benchmarks/gpu_check.py --compile     # also training under torch.compile (a few minutes more)
    python benchmarks/gpu_check.py --known-answer  # the projection with notebook 11 given AnomalyCLIP's checkpoints
    python benchmarks/gpu_check.py --quick       # tiny CLIP on the CPU, under a minute (a test runs this)

Sections (each a warm-up, then timed calls within a time box):
  encoder     images/s of the frozen encoder at the preset's image size, in the precision feature
              extraction uses (bf16 autocast on CUDA), batch 16/32/64, and peak memory
  fidelity    the device's fp32 forward against the CPU's on 2 images (maps and scores), and what
              half precision changes: the bf16 encoder, then also the fp16 cache entries
  data        synthetic MVTec-sized PNGs: decoding and resizing by the default workers and reading
              the feature cache into memory (both without the workers' start-up), and filling the
              cache (hashing, loading, encoder, writes)
  training    steps/s of the full model, every ablation variant and AnomalyCLIP's two readings from the held features
              (the preset's batch, 16 for paper), peak memory
  evaluation  images/s of every variant from the held features in eval mode (maps, smoothing)
  metrics     every metric of a VisA-sized class (200 maps of 518 x 518) on the device and on the CPU
  projection  seconds per notebook of ``pmoe reproduce --preset paper`` (pmoe.projection)

Writes the table as JSON to $OUT/gpu_check.json when OUT is set (or to --json PATH). Exits 1 when
the device and CPU forwards differ by more than FIDELITY_TOLERANCE or the metrics differ.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pmoe.backbone import VisualFeatures, load_clip
from pmoe.data import AnomalyDataset, build_manifest
from pmoe.data.synthetic import write_dataset
from pmoe.experiments import config_for
from pmoe.features import CachedFeatures, FeatureCache, Images, encode, precision, stored_layers, tap_positions
from pmoe.inference import forward_batch
from pmoe.io import write_text
from pmoe.metrics import class_metrics
from pmoe.model import build_model
from pmoe.projection import KNOWN_ANSWER_VARIANTS, Rates, paper_plan, project
from pmoe.resident import ResidentFeatures, batches, hold
from pmoe.runtime import configure_backend, data_workers, pick_device, seed_everything
from pmoe.training import Trainer
from pmoe.training_log import TrainingLog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_metrics import synthetic_class  # noqa: E402

LOADING_PASSES = 4  # the data set's images decoded this many times per timed pass
FIDELITY_TOLERANCE = 1e-3  # max |difference| of maps and scores, device fp32 vs CPU fp32 (tau' = 0.01 amplifies)
METRIC_TOLERANCE = 1e-6
MODES = {  # what each mode measures; *budget_s: the time box of a timed loop; variants None: all of them
    "full": {"preset": "paper", "batches": (16, 32, 64), "images": (5, 11), "image_px": 1024,
             "metric_class": (200, 518), "budget_s": 5.0, "eval_budget_s": 1.0, "variants": None, "timed_epochs": 2},
    "quick": {"preset": "tiny", "batches": (4, 8), "images": (2, 2), "image_px": 64, "metric_class": (24, 96),
              "budget_s": 0.3, "eval_budget_s": 0.3, "variants": ("paper", "table2-ensemble", "table4-l24"),
              "timed_epochs": 1},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CLIP on the CPU (a smoke run of every section)")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds in the projection (default 1)")
    parser.add_argument("--compile", action="store_true", help="also time the full model's training compiled")
    parser.add_argument("--known-answer", action="store_true",
                        help="project notebook 11 as run with AnomalyCLIP's checkpoints (skipped by default)")
    parser.add_argument("--device", help="default: the GPU (the CPU with --quick)")
    parser.add_argument("--json", help="write the table here as JSON (default $OUT/gpu_check.json when OUT is set)")
    return parser.parse_args(argv)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calls_per_second(function, device, budget_s: float, min_calls: int = 2) -> float:
    """Calls per second after one warm-up call: at least ``min_calls`` timed, then until ``budget_s``."""
    function()
    synchronize(device)
    start, calls = time.perf_counter(), 0
    while calls < min_calls or time.perf_counter() - start < budget_s:
        function()
        synchronize(device)
        calls += 1
    return calls / (time.perf_counter() - start)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# --- sections -----------------------------------------------------------------------------------
@torch.no_grad()
def encoder_section(model, config, device, mode) -> list:
    """Encoder images/s and peak memory per batch size (the cache-filling call)."""
    rows = []
    for size in mode["batches"]:
        images = torch.randn(size, 3, config.image_size, config.image_size, device=device)
        reset_peak(device)
        rate = calls_per_second(lambda: encode(model, images, device, stored_layers(config)), device,
                                mode["budget_s"]) * size
        rows.append({"batch": size, "images_per_s": rate, "peak_gib": peak_gib(device)})
        del images
    return rows


@contextlib.contextmanager
def exact_fp32():
    """Plain fp32 matmuls on CUDA for the fidelity comparison (TF32 off), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def deviation(ours: dict, reference: dict) -> dict:
    return {key: float((ours[key].float().cpu() - reference[key].float().cpu()).abs().max())
            for key in ("anomaly_map", "score")}


@torch.no_grad()
def fidelity_section(model, cpu_model, config, device) -> dict:
    """The device's fp32 forward vs the CPU's, and the deviation of half precision from fp32."""
    images = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    reference = cpu_model(images)
    with exact_fp32():
        exact = model(images.to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            half = model.visual(images.to(device))
        bf16 = model.forward_features(half)
        stored = model.forward_features(VisualFeatures(half.patch_tokens.half(), half.cls_token.half()))
    result = {"device_vs_cpu": deviation(exact, reference), "bf16_encoder": deviation(bf16, exact),
              "bf16_encoder_fp16_cache": deviation(stored, exact), "tolerance": FIDELITY_TOLERANCE,
              "compared": device.type != "cpu"}
    result["ok"] = max(result["device_vs_cpu"].values()) <= FIDELITY_TOLERANCE
    return result


def data_section(model, config, device, mode, scratch: Path) -> tuple:
    """(rows, held features): loading, cache filling and reading rates on synthetic PNGs."""
    normal, anomalous = mode["images"]
    root = write_dataset("synthetic-a", scratch / "data", image_size=mode["image_px"], n_normal=normal,
                         n_anomalous=anomalous)
    dataset = AnomalyDataset(build_manifest("synthetic-a", root), root, config.image_size, mask_rule=config.mask_rule)
    workers = data_workers(None, device)
    images = Images(dataset, list(range(len(dataset))) * LOADING_PASSES)
    loader = torch.utils.data.DataLoader(images, batch_size=config.batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    for _ in loader:  # the workers start (kept for the timed pass)
        pass
    start = time.perf_counter()
    for _ in loader:
        pass
    loading = len(images) / (time.perf_counter() - start)
    del loader
    synchronize(device)
    start = time.perf_counter()
    cached = FeatureCache(scratch / "cache", config).features(model, dataset, config.batch_size, device, False)
    synchronize(device)
    fill = len(dataset) / (time.perf_counter() - start)
    reading, held = reading_rate(cached, device)
    if not isinstance(held, ResidentFeatures):
        raise SystemExit(f"the {len(dataset)} synthetic entries did not fit in memory; free some and rerun")
    rows = {"workers": workers, "images": len(dataset), "image_px": mode["image_px"], "loading_images_per_s": loading,
            "fill_images_per_s": fill, "reading_images_per_s": reading, "held_on": str(held.tokens.device)}
    return rows, held


def reading_rate(cached, device) -> tuple:
    """(entries/s, all entries held with every stored tap): the time to hold half the entries is
    subtracted from the time to hold all, which removes the workers' start-up from the rate."""
    every = range(cached.stored)
    half = CachedFeatures(cached.dataset, cached.files[:len(cached) // 2], cached.stored, every)
    seconds = []
    for data in (half, cached.with_taps(every)):
        synchronize(device)
        start = time.perf_counter()
        held = hold(data, device)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    extra = seconds[1] - seconds[0]
    return ((len(cached) - len(half)) / extra if extra > 0 else len(cached) / seconds[1]), held


def variant_section(clip, preset: str, variants, held, device, mode, compile_backend=None) -> dict:
    """Training steps/s and evaluation images/s of each variant from ``held`` (peak memory of each)."""
    results = {}
    for variant in variants:
        config = config_for(preset, variant).replace(clip_weights="random")
        seed_everything(config.seed)
        model = build_model(config, clip).to(device)
        data = held.with_taps(tap_positions(config))
        trainer = Trainer(model, config, device, 0, 1, compile_backend)
        reset_peak(device)
        steps = trainer.epoch(1, 0, data, TrainingLog(), None, False)  # warm-up (and compilation)
        synchronize(device)
        start = time.perf_counter()
        for epoch in range(2, 2 + mode["timed_epochs"]):
            trainer.epoch(epoch, 0, data, TrainingLog(), None, False)
        synchronize(device)
        train_rate = mode["timed_epochs"] * steps / (time.perf_counter() - start)
        train_peak = peak_gib(device)
        model.eval()
        indices = list(range(len(data)))
        chunks = [indices[i:i + config.batch_size] for i in range(0, len(indices), config.batch_size)]

        def evaluate():
            for batch in batches(data, chunks, device=device):
                forward_batch(model, batch, device)
        evaluate_rate = calls_per_second(evaluate, device, mode["eval_budget_s"], min_calls=1) * len(indices)
        results[variant] = {"train_steps_per_s": train_rate, "train_peak_gib": train_peak,
                            "evaluate_images_per_s": evaluate_rate}
        del model, trainer
    return results


def metrics_section(device, mode) -> dict:
    """Seconds for every metric of one class on the device and on the CPU, and their agreement."""
    count, size = mode["metric_class"]
    labels, scores, masks, maps = synthetic_class(np.random.default_rng(0), count, size, size,
                                                  radius=(size / 100, size / 8))
    start = time.perf_counter()
    on_cpu = class_metrics(labels, scores, masks, maps)
    cpu_s = time.perf_counter() - start
    tensors = [labels] + [torch.as_tensor(array).to(device) for array in (scores, masks, maps)]  # as evaluation
    class_metrics(*tensors)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    on_device = class_metrics(*tensors)
    synchronize(device)
    device_s = time.perf_counter() - start
    difference = max(metric_difference(on_device[name].value, on_cpu[name].value) for name in on_cpu)
    return {"images": count, "size": size, "device_s": device_s, "cpu_s": cpu_s, "max_difference": difference,
            "ok": difference <= METRIC_TOLERANCE}


def metric_difference(first: float, second: float) -> float:
    """|first - second|; 0 when both are undefined (NaN), infinite when only one is."""
    if math.isnan(first) or math.isnan(second):
        return 0.0 if math.isnan(first) and math.isnan(second) else math.inf
    return abs(first - second)


def rates_of(table: dict) -> Rates:
    """The projection's rates from the measured table."""
    variants = table["variants"]
    return Rates(encoder=max(row["images_per_s"] for row in table["encoder"]),
                 loading=table["data"]["loading_images_per_s"], reading=table["data"]["reading_images_per_s"],
                 train={name: row["train_steps_per_s"] for name, row in variants.items()},
                 evaluate={name: row["evaluate_images_per_s"] for name, row in variants.items()},
                 metric_class_s=table["metrics"]["device_s"], metric_class_images=table["metrics"]["images"],
                 metric_class_size=table["metrics"]["size"], startup_s=table["startup_s"])


# --- the table ------------------------------------------------------------------------------------
def measure(args) -> dict:
    mode = MODES["quick" if args.quick else "full"]
    device = pick_device(args.device or ("cpu" if args.quick else None))
    configure_backend(device)
    config = config_for(mode["preset"]).replace(clip_weights="random")
    seed_everything(config.seed)
    table = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "torch": torch.__version__, "mode": "quick" if args.quick else "full", "clip_model": config.clip_model,
             "image_size": config.image_size, "precision": precision(device), "seeds": args.seeds}
    start = time.perf_counter()
    clip = load_clip(config)
    model = build_model(config, clip)
    built = time.perf_counter()
    cpu_model = copy.deepcopy(model).eval() if device.type != "cpu" else model.eval()  # the CPU reference
    moving = time.perf_counter()
    model.to(device).eval()
    synchronize(device)
    table["startup_s"] = built - start + time.perf_counter() - moving
    sections = table["section_s"] = {}

    def timed(name, function, *arguments):
        began = time.perf_counter()
        result = function(*arguments)
        sections[name] = time.perf_counter() - began
        return result
    table["encoder"] = timed("encoder", encoder_section, model, config, device, mode)
    table["fidelity"] = timed("fidelity", fidelity_section, model, cpu_model, config, device)
    del cpu_model
    with tempfile.TemporaryDirectory(prefix="pmoe-gpu-check-") as scratch:
        table["data"], held = timed("data", data_section, model, config, device, mode, Path(scratch))
    variants = mode["variants"] or ["paper", *paper_plan().variants, *KNOWN_ANSWER_VARIANTS]
    table["variants"] = timed("variants", variant_section, clip, mode["preset"], variants, held, device, mode)
    if args.compile:
        table["compiled"] = timed("compiled", variant_section, clip, mode["preset"], ["paper"], held, device, mode,
                                  "inductor")
    del held
    table["metrics"] = timed("metrics", metrics_section, device, mode)
    table["projection"] = project(rates_of(table), paper_plan(), args.seeds, args.known_answer)
    table["seconds"] = time.perf_counter() - start
    return table


def clock(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


def render(table: dict) -> str:
    """The whole table as text."""
    gib = lambda value: "-" if value is None else f"{value:.1f} GiB"  # noqa: E731
    lines = [f"pmoe GPU check on {table['device']} (torch {table['torch']}, {table['mode']} mode): "
             f"{table['clip_model']} at {table['image_size']} px, random weights, encoder in {table['precision']}",
             f"{'section':<12} {'what':<46} {'value':>14}  note"]

    def row(section, what, value, note=""):
        lines.append(f"{section:<12} {what:<46} {value:>14}  {note}")
    row("startup", "build the model on the device", f"{table['startup_s']:.1f} s")
    for entry in table["encoder"]:
        row("encoder", f"batch {entry['batch']}", f"{entry['images_per_s']:.1f} img/s",
            f"peak {gib(entry['peak_gib'])}")
    fidelity = table["fidelity"]
    for name, label in (("device_vs_cpu", "device fp32 vs CPU fp32"), ("bf16_encoder", "bf16 encoder vs fp32"),
                        ("bf16_encoder_fp16_cache", "bf16 encoder + fp16 cache vs fp32")):
        values = fidelity[name]
        note = ""
        if name == "device_vs_cpu":
            note = (f"{'PASS' if fidelity['ok'] else 'FAIL'} (tolerance {fidelity['tolerance']:g})"
                    if fidelity["compared"] else "same device: nothing to compare")
        row("fidelity", f"{label}: max|map|, max|score|",
            f"{values['anomaly_map']:.1e} {values['score']:.1e}", note)
    data = table["data"]
    row("data", f"decode + resize ({data['workers']} workers, {data['image_px']} px PNG)",
        f"{data['loading_images_per_s']:.1f} img/s")
    row("data", "fill the feature cache (load, encode, write)", f"{data['fill_images_per_s']:.1f} img/s")
    row("data", "read the cache into memory", f"{data['reading_images_per_s']:.1f} img/s", f"on {data['held_on']}")
    for section in ("variants", "compiled"):
        for name, entry in table.get(section, {}).items():
            label = f"{name}{' (compiled)' if section == 'compiled' else ''}"
            row("training", label, f"{entry['train_steps_per_s']:.2f} step/s", f"peak {gib(entry['train_peak_gib'])}")
    for name, entry in table["variants"].items():
        row("evaluation", f"{name} (cached features, maps, smoothing)", f"{entry['evaluate_images_per_s']:.1f} img/s")
    metrics = table["metrics"]
    what = f"all metrics, {metrics['images']} maps of {metrics['size']}^2"
    row("metrics", f"{what} on the device", f"{metrics['device_s']:.2f} s")
    row("metrics", f"{what} on the CPU", f"{metrics['cpu_s']:.2f} s",
        f"{'equal' if metrics['ok'] else 'DIFFERENT'} (max |diff| {metrics['max_difference']:.1e})")
    for notebook, seconds in table["projection"].items():
        row("projection", notebook, clock(seconds), f"{table['seeds']} seed(s)")
    row("projection", "pmoe reproduce --preset paper", clock(sum(table["projection"].values())),
        "from the rates above and Table 7 (pmoe.projection)")
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in table["section_s"].items())
    lines.append(f"measured in {table['seconds']:.0f} s ({spent})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    table = measure(args)
    print(render(table))
    target = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if target:
        write_text(Path(target), json.dumps(table, indent=2) + "\n")
        print(f"wrote {target}")
    return 0 if table["fidelity"]["ok"] and table["metrics"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
