"""Training (spec 5-6): Adam with per-step warm-up on frozen, cached CLIP features.

``train(config, "mvtec", "/data/mvtec", "runs/paper")`` trains on every sample of the
dataset's test split (the cross-dataset protocol) and writes the run directory::

    config.json, provenance.json   the resolved config, git revision, package versions
    identity.json                  what it is trained on: manifest digests, package version
    log_steps.csv, log_epochs.csv, expert_usage.csv   (see pmoe.training_log)
    state/epoch_NNN/               the latest complete epoch, for --resume (see pmoe.resume)
    .lock                          held while a process prepares or trains the run: a second process
                                   asking for the same run waits, then keeps the finished one
    model.safetensors              the trainable weights after the last epoch
    done.json                      written last: the run is finished

A run killed at any moment continues from its last complete epoch with ``resume=True`` and,
on the CPU, ends with bit-identical weights: the data order and learning rates are functions
of (seed, epoch, step) (pmoe.schedule) and the state holds the weights and Adam's moments.

Under torchrun each global batch is split across the processes (DistributedDataParallel over
pmoe.train_step.TrainStep); the results equal a single process's up to floating-point
summation order. Only the main process writes files. On CUDA the trainable forward pass
runs in fp32 with TF32 matmuls (``train_precision="bf16"``: bf16 autocast); the CPU path is fp32.

Cached features (and masks) are read once into memory, on the device when they fit, else the
host (:mod:`pmoe.resident`); every epoch then indexes them, with the same values as read from
the disk cache, so the weights are the same either way. ``compile_backend="inductor"`` (``pmoe train
--compile``) runs the trainable step through ``torch.compile``; its fused kernels round
differently, so its weights agree with the plain path's to floating-point tolerance only.

Usage::

    from pmoe import Config
    from pmoe.training import train
    train(Config.preset("tiny"), "synthetic-a", "data/synthetic-a", "runs/tiny", epochs=2)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pmoe.checkpoint import CONFIG, PROVENANCE, WEIGHTS, run_config, save_weights, write_run_metadata
from pmoe.errors import ConfigError
from pmoe.features import FeatureCache, visual_features
from pmoe.identity import differences, run_identity
from pmoe.io import exclusive, write_text
from pmoe.model import build_model
from pmoe.resident import batches as feature_batches
from pmoe.resident import hold
from pmoe.resume import STATE_DIR, latest_state, load_state, save_state
from pmoe.runtime import autocast, barrier, configure_backend, init_distributed, pick_device, seed_everything
from pmoe.schedule import epoch_order, global_batches, learning_rate, shard, shard_sizes
from pmoe.train_step import TrainStep
from pmoe.training_log import FILES, TERMS, TrainingLog, layer_names

DONE = "done.json"
IDENTITY = "identity.json"
LOCK = ".lock"  # held while a process prepares or trains the run (pmoe.io.exclusive)
RUN_FILES = (CONFIG, PROVENANCE, IDENTITY, WEIGHTS, DONE, STATE_DIR, *FILES.values())
SUMMED_TERMS = ("cls", "seg", "focal", "dice")  # per-sample means, weighted by shard size


def train(config, train_set, data_root, out_dir, *, manifest=None, epochs=None, batch_size=None, seed=None,
          resume=False, overwrite=False, cache_dir=None, device=None, val_set=None, val_root=None,
          num_workers=None, compile_backend=None, progress=True) -> Path:
    """Train ``config`` on all samples of ``train_set`` under ``data_root``; returns the run dir.

    ``manifest`` (a manifest CSV) replaces building the manifest of ``train_set``.
    ``epochs``, ``batch_size`` and ``seed`` override the config (the resolved config is saved).
    ``cache_dir`` holds the frozen-feature cache (None: features computed every epoch).
    ``val_set``/``val_root`` add a validation image AUROC per epoch.
    ``num_workers``: data-loading processes (None: :func:`pmoe.runtime.data_workers`).
    ``compile_backend``: a ``torch.compile`` backend for the trainable step (``"inductor"``), or None.
    With ``resume`` a finished run is kept and an interrupted one continued, but only when its
    config and :func:`pmoe.identity.run_identity` (data, package version) equal the request.
    """
    if config.training_free:
        raise ConfigError(f"prompt_mode {config.prompt_mode!r} (preset clip-zero-shot) has nothing to train: it "
                          "needs only CLIP weights. Run it directly: pmoe evaluate/infer --preset clip-zero-shot.")
    overrides = {"epochs": epochs, "batch_size": batch_size, "seed": seed}
    config = config.replace(**{key: value for key, value in overrides.items() if value is not None})
    device = pick_device(device)
    configure_backend(device)
    rank, world = init_distributed(device)
    run_dir = Path(out_dir).expanduser()
    frame = training_manifest(train_set, data_root, manifest)
    val_frame = training_manifest(val_set, val_root, None) if val_set is not None else None
    identity = run_identity(train_set, manifest, frame, None if val_set is None else (val_set, val_frame))
    with exclusive(run_dir / LOCK) if rank == 0 else contextlib.nullcontext():  # one writer per run dir
        if prepare_run_dir(run_dir, config, identity, resume=resume, overwrite=overwrite, main=rank == 0):
            if rank == 0:
                print(f"{run_dir} already holds this finished run; nothing to do")
            return run_dir
        seed_everything(config.seed)
        model = build_model(config).to(device)
        cache = FeatureCache(cache_dir, config)
        data = hold(feature_dataset(cache, model, frame, data_root, device, num_workers, progress),
                    device, num_workers, progress)
        validation = None
        if val_set is not None:
            validation = hold(feature_dataset(cache, model, val_frame, val_root, device, num_workers, progress,
                                              masks=False), device, num_workers, progress)
        trainer = Trainer(model, config, device, rank, world, compile_backend)
        trainer.run(run_dir, data, validation, resume, num_workers, progress)
    return run_dir


def training_manifest(name, root, manifest):
    """The manifest frame of dataset ``name`` under ``root``, or read from the ``manifest`` CSV."""
    from pmoe.data import build_manifest, read_manifest

    if name is None and manifest is None:
        raise ConfigError("name the training data: a dataset (--train-set) or a manifest CSV (--manifest)")
    if root is None:
        raise ConfigError(f"dataset {name!r} needs its root folder (--data-root / --val-root)")
    return read_manifest(manifest) if manifest is not None else build_manifest(name, root)


def prepare_run_dir(run_dir: Path, config, identity: dict, *, resume: bool, overwrite: bool, main: bool) -> bool:
    """Check ``run_dir`` against the request; True when it holds the same finished run, to keep.

    Every process checks (so all raise alike); only the main process changes files.
    """
    if resume and overwrite:
        raise ConfigError("pass either --resume or --overwrite, not both")
    if overwrite and main:
        for name in RUN_FILES:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    barrier()
    started, finished = (run_dir / CONFIG).is_file(), (run_dir / DONE).is_file()
    barrier()  # every process has looked before the main one writes
    if finished and not resume:
        raise ConfigError(f"{run_dir} already holds a finished run; pass --overwrite to train it again, "
                          "or choose another --out")
    if started and not resume:
        raise ConfigError(f"{run_dir} holds an unfinished run; pass --resume to continue it, "
                          "or --overwrite to start again")
    if started:
        require_same_run(run_dir, config, identity, finished)
        return finished
    if main:
        write_run_metadata(run_dir, config)
        write_text(run_dir / IDENTITY, json.dumps(identity, indent=2) + "\n")
    barrier()
    return False


def require_same_run(run_dir: Path, config, identity: dict, finished: bool) -> None:
    """A ConfigError naming every difference between the run in ``run_dir`` and the request."""
    saved = run_config(run_dir)
    what = "keep the finished run" if finished else "resume"
    changed = differences(saved.to_dict(), config.to_dict())
    if changed:
        raise ConfigError(f"cannot {what} in {run_dir}: its config differs ({'; '.join(changed)}); use the run's "
                          "own settings, pass --overwrite to train it again, or choose another --out")
    path = run_dir / IDENTITY
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    changed = differences(recorded, identity)
    if changed:
        raise ConfigError(f"cannot {what} in {run_dir}: it was trained on other data or by another pmoe version "
                          f"({'; '.join(changed)}); pass the same training data, --overwrite to train it again, "
                          "or choose another --out")


def feature_dataset(cache, model, frame, root, device, num_workers, progress, masks=True):
    """The (cached) feature dataset of every sample of the manifest ``frame`` under ``root``."""
    from pmoe.data import AnomalyDataset

    dataset = AnomalyDataset(frame, root, model.config.image_size, return_mask=masks,
                             mask_rule=model.config.mask_rule)
    return cache.features(model, dataset, model.config.batch_size, device, progress, num_workers)


class Trainer:
    """The training loop of one process: epochs of sharded global batches, logs and states.

    ``compile_backend`` names a ``torch.compile`` backend for the step module (None: eager).
    """

    def __init__(self, model, config, device, rank: int, world: int, compile_backend=None):
        self.model, self.config, self.device = model, config, device
        self.rank, self.world = rank, world
        self.step_module = TrainStep(model)
        if world > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[device] if device.type == "cuda" else None)
        self.forward = torch.compile(self.step_module, backend=compile_backend) if compile_backend else self.step_module
        self.usage = None  # expert selections of the current epoch, (P, 2, E)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas), weight_decay=0.0)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def run(self, run_dir: Path, data, validation, resume: bool, num_workers: int, progress: bool):
        """All epochs not yet done, a state after each, then the final weights and done.json."""
        config = self.config
        log, first, step = TrainingLog(), 1, 0
        state = latest_state(run_dir) if resume else None
        if state is not None:
            done, log = load_state(state, self.model, self.optimizer)
            first, step = done["epoch"] + 1, done["step"]
        for epoch in range(first, config.epochs + 1):
            step = self.epoch(epoch, step, data, log, num_workers, progress)
            auroc = validation_auroc(self.model, validation, self.device, config.batch_size) if validation else math.nan
            names = layer_names(config, self.usage.shape[0]) if self.usage is not None else []
            row = log.end_epoch(epoch, self.usage, names, auroc)
            if self.main:
                save_state(run_dir, {"epoch": epoch, "step": step}, self.model, self.optimizer, log)
                log.write(run_dir)
                if progress:
                    validated = f", val image AUROC {auroc:.4f}" if validation else ""
                    tqdm.write(f"epoch {epoch}/{config.epochs}: loss {row['loss']:.4f}{validated}")
            barrier()
        if self.main:
            save_weights(self.model, run_dir / WEIGHTS)
            finished = {"epochs": config.epochs, "steps": step,
                        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            write_text(run_dir / DONE, json.dumps(finished, indent=2) + "\n")
            shutil.rmtree(run_dir / STATE_DIR, ignore_errors=True)
        barrier()

    def epoch(self, epoch: int, step: int, data, log: TrainingLog, num_workers: int, progress: bool) -> int:
        """Train one epoch; returns the global step count after it."""
        config, device = self.config, self.device
        batches = global_batches(epoch_order(len(data), config.seed, epoch), config.batch_size)
        shards = [shard(batch, self.rank, self.world) for batch in batches]
        loader = feature_batches(data, shards, num_workers, device)
        self.step_module.train()
        self.usage = None
        bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{config.epochs}", disable=not progress or not self.main)
        for batch, global_batch in zip(loader, batches):
            step += 1
            lr = learning_rate(config, step, len(batches))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            terms = self.step(batch, shard_sizes(len(global_batch), self.world))
            log.add_step(epoch, step, lr, terms)
            bar.update()
            bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{lr:.2e}")
        bar.close()
        if self.usage is not None and self.world > 1:
            dist.all_reduce(self.usage)
        if self.usage is not None:
            self.usage = self.usage.cpu().numpy()
        return step

    def step(self, batch: dict, sizes: list) -> dict:
        """One optimizer update on this process's shard; returns the global-batch loss terms."""
        device = self.device
        features = visual_features(self.model, batch, device)
        masks, labels = batch["mask"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        class_names = list(batch["cls"]) if self.config.use_class_names else None
        terms, routing = self.forward(features, masks, labels, class_names, sizes, self.rank)
        self.optimizer.zero_grad(set_to_none=True)
        terms["objective"].backward()
        self.optimizer.step()
        self.count_usage(routing, sizes[self.rank])
        return self.global_terms(terms, sizes)

    def global_terms(self, terms: dict, sizes: list) -> dict:
        """The loss terms of the whole global batch, as floats (same on every process)."""
        weight = sizes[self.rank] / sum(sizes)
        summed = torch.stack([terms[name].detach() * weight for name in SUMMED_TERMS])
        if self.world > 1:
            dist.all_reduce(summed)
        values = dict(zip(SUMMED_TERMS, summed.tolist()))
        values.update({name: float(terms[name].detach()) for name in ("balance", "decouple")})
        values["loss"] = values["cls"] + values["seg"] + values["balance"] + values["decouple"]
        return {name: values[name] for name in TERMS}

    def count_usage(self, routing, real: int) -> None:
        """Add this shard's expert selections to the epoch's counts (P, 2, E)."""
        if routing is None:
            return
        selected = routing["indices"][:real]
        counts = F.one_hot(selected, self.config.num_experts).sum(dim=(0, 3))
        self.usage = counts if self.usage is None else self.usage + counts


@torch.no_grad()
def validation_auroc(model, data, device, batch_size: int) -> float:
    """Figure 7's I-AUROC: the model's image AUROC on ``data`` per class, averaged over classes.

    Scored split across processes; see :func:`mean_class_image_auroc` for the average.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(data), world))
    loader = feature_batches(data, [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)],
                             None, device)
    model.eval()
    scores, classes = [], []
    for batch in loader:
        class_names = list(batch["cls"]) if model.config.use_class_names else None
        with autocast(device, model.config.train_precision):
            outputs = model.forward_features(visual_features(model, batch, device), class_names)
        scores.extend(outputs["score"].float().cpu().tolist())
        classes.extend(batch["cls"])
    model.train()
    parts = [None] * world
    if world > 1:
        dist.all_gather_object(parts, (indices, scores, classes))
    else:
        parts = [(indices, scores, classes)]
    ordered_scores, ordered_classes = np.empty(len(data)), np.empty(len(data), dtype=object)
    for part_indices, part_scores, part_classes in parts:
        ordered_scores[part_indices] = part_scores
        ordered_classes[part_indices] = part_classes
    return mean_class_image_auroc(data.labels, ordered_scores, ordered_classes)


def mean_class_image_auroc(labels, scores, classes) -> float:
    """The unweighted mean over classes of each class's image AUROC (as every table reports).

    Classes where it is undefined (one label only) are skipped; NaN when no class has it.
    """
    from pmoe.metrics import UndefinedMetricError, image_auroc

    labels, scores, classes = np.asarray(labels), np.asarray(scores), np.asarray(classes)
    values = []
    for cls in dict.fromkeys(classes.tolist()):
        chosen = classes == cls
        try:
            values.append(image_auroc(labels[chosen], scores[chosen]))
        except UndefinedMetricError:
            continue
    return float(np.mean(values)) if values else math.nan
