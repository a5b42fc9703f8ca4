"""Running a trained model on images: scores, anomaly maps, routing and heat-map overlays.

``predict`` is the low-level call (notebooks, Figure 5): a model and a list of image paths or
dataset items in, NumPy arrays out. ``infer`` is ``pmoe infer``: image files and folders in
(no manifest), one overlay per image and a ``scores.csv`` sorted by score out.

Usage::

    from pmoe.inference import infer, load_model, predict
    model, _ = load_model("runs/mvtec")
    out = predict(model, ["a.png", "b.png"], with_images=True)  # score, anomaly_map, image, ...
    infer("runs/mvtec", ["photos/"], "results/photos")            # overlays/ and scores.csv

On CUDA the frozen image encoder runs under bf16 autocast and matmuls use TF32; the maps and
scores are computed in fp32 (see :func:`forward_batch`). The CPU path is plain fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pmoe.errors import CheckpointError, DataError, PmoeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SCORE_COLUMNS = ("image", "score", "overlay")


# --- model and device ---------------------------------------------------------------------------
def load_model(run_dir_or_model, clip_weights: str | None = None, run_name: str | None = None):
    """(model in eval mode, run name) from a run directory or an in-memory PromptMoE.

    The run name is the directory's name unless ``run_name`` is given (``"model"`` for an
    in-memory model without one).
    """
    from pmoe.checkpoint import load_run
    from pmoe.model import PromptMoE

    if isinstance(run_dir_or_model, PromptMoE):
        return run_dir_or_model.eval(), run_name or "model"
    run_dir = Path(run_dir_or_model).expanduser()
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; pass --checkpoint the folder "
                              "`pmoe train` wrote (it holds config.json and model.safetensors)")
    return load_run(run_dir, clip_weights=clip_weights), run_name or run_dir.resolve().name


def prepare_device(model, device=None) -> torch.device:
    """Pick the device (see :func:`pmoe.runtime.pick_device`), enable TF32 there, move the model."""
    from pmoe.runtime import configure_backend, pick_device

    device = pick_device(device)
    configure_backend(device)
    model.to(device)
    return device


def map_range(config) -> tuple:
    """The fixed colour scale of overlays: M is a probability (mean over layers) or a sum of L."""
    return 0.0, (1.0 if config.layer_reduce == "mean" else float(config.num_layers))


# --- the forward pass ---------------------------------------------------------------------------
def forward_batch(model, batch: dict, device: torch.device) -> dict:
    """Score, anomaly map and routing of one batch, as float32 / int64 tensors on ``device``.

    The frozen encoder runs under bf16 autocast on CUDA (or the features come from the cache);
    the prompts, maps and scores are computed in fp32 (TF32 matmuls on CUDA) whatever the
    model's ``train_precision``, so that bf16 rounding cannot create ties in the rankings the
    metrics are made of.

    ``batch`` holds ``image`` (B, 3, S, S) or cached features (``patch_tokens``, ``cls_token``),
    and ``cls`` (class names, used when the config puts them in the prompt). The routing keys
    ``routing_indices`` / ``routing_weights`` (B, P, 2, k) are present for routed models only.
    """
    from pmoe.features import visual_features

    names = list(batch["cls"]) if model.config.use_class_names and "cls" in batch else None
    features = visual_features(model, batch, device)
    with torch.no_grad():
        out = model.forward_features(features, names)
    result = {"score": out["score"].float(), "anomaly_map": out["anomaly_map"].float()}
    if out["routing"] is not None:
        result["routing_indices"] = out["routing"]["indices"].long()
        result["routing_weights"] = out["routing"]["weights"].float()
    return result


def denormalize(image: torch.Tensor) -> np.ndarray:
    """The (S, S, 3) uint8 image a CLIP-normalised (3, S, S) tensor was made from (exact)."""
    from pmoe.data.loader import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = (image.detach().cpu().float() * std + mean) * 255
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def predict(model, inputs, *, batch_size: int = 8, device=None, with_images: bool = False,
            class_names=None, progress: bool = False) -> dict:
    """Run ``model`` on image paths or dataset items; returns a dict of NumPy arrays.

    ``inputs``: paths (read with :func:`pmoe.data.load_image`) or items of
    :class:`pmoe.data.AnomalyDataset` (dicts with ``image`` and optionally ``mask``, ``label``,
    ``cls``, ``path``). Keys: ``score`` (N,), ``anomaly_map`` (N, S, S); ``routing_indices`` and
    ``routing_weights`` (N, P, 2, k) for routed models; ``mask`` (N, S, S) bool, ``label``,
    ``cls``, ``path`` when the items carry them; ``image`` (N, S, S, 3) uint8, the input resized
    to S, with ``with_images``. ``class_names`` gives one class per path when needed.
    """
    from tqdm.auto import tqdm

    from pmoe.data import load_image

    items = list(inputs)
    if items and not isinstance(items[0], dict):
        items = [{"image": load_image(path, model.config.image_size), "path": str(path)} for path in items]
        if class_names is not None:
            items = [{**item, "cls": name} for item, name in zip(items, class_names)]
    device = prepare_device(model, device)
    parts = []
    for start in tqdm(range(0, len(items), batch_size), desc="predict", disable=not progress):
        chunk = items[start:start + batch_size]
        batch = {"image": torch.stack([item["image"] for item in chunk])}
        if "cls" in chunk[0]:
            batch["cls"] = [item["cls"] for item in chunk]
        parts.append({key: value.cpu().numpy() for key, value in forward_batch(model, batch, device).items()})
    result = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]} if parts else {}
    return {**result, **_item_fields(items, with_images)}


def _item_fields(items: list, with_images: bool) -> dict:
    """The ground truth and identifiers the items carry, as arrays."""
    fields = {}
    if items and "mask" in items[0]:
        fields["mask"] = np.stack([item["mask"][0].numpy() > 0.5 for item in items])
    for key in ("label", "cls", "path"):
        if items and key in items[0]:
            fields[key] = np.array([item[key] for item in items])
    if with_images:
        fields["image"] = np.stack([denormalize(item["image"]) for item in items])
    return fields


# --- pmoe infer ---------------------------------------------------------------------------------
@dataclass
class InferenceResult:
    """What ``infer`` did: the scores table, the files it could not read, what it skipped."""

    scores: object  # pandas.DataFrame with SCORE_COLUMNS, highest score first
    unreadable: list = field(default_factory=list)  # (path, reason)
    skipped: list = field(default_factory=list)  # paths that are not images


def collect_images(paths, recursive: bool = False) -> tuple:
    """(image files, skipped non-images) from files and folders, in the order given.

    Folders contribute their image files (by extension, case-insensitive), sorted by name;
    sub-folders only with ``recursive``. A path that does not exist is a DataError. A file
    given twice is kept once.
    """
    images, skipped = [], []
    for path in map(lambda p: Path(p).expanduser(), paths):
        if path.is_dir():
            found = sorted(p for p in (path.rglob("*") if recursive else path.iterdir()) if p.is_file())
            images += [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS]
            skipped += [p for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS]
        elif path.is_file():
            (images if path.suffix.lower() in IMAGE_EXTENSIONS else skipped).append(path)
        else:
            raise DataError(f"{path} does not exist; pass image files or folders of images")
    return _dedupe(images), skipped


def _dedupe(paths: list) -> list:
    """``paths`` without repeats of the same file (first occurrence kept)."""
    seen, kept = set(), []
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            kept.append(path)
    return kept


def overlay_names(paths) -> list:
    """A unique file name per image: its stem, with parent folders and then the extension
    added only where two images would otherwise get the same name (``a``, ``x__a``, ``a.jpg``).

    Names are unique ignoring letter case (for case-insensitive file systems); a clash left
    after that (a file really named ``x__a``) gets a ``-2`` suffix.
    """
    resolved = [Path(p).resolve() for p in paths]
    names = [p.stem for p in resolved]
    groups = {}
    for index, name in enumerate(names):
        groups.setdefault(name.casefold(), []).append(index)
    for members in (m for m in groups.values() if len(m) > 1):
        for index, name in zip(members, _distinct_names([resolved[i] for i in members])):
            names[index] = name
    taken, unique = set(), []
    for name in names:
        candidate, count = name, 1
        while candidate.casefold() in taken:
            count += 1
            candidate = f"{name}-{count}"
        taken.add(candidate.casefold())
        unique.append(f"{candidate}.png")
    return unique


def _distinct_names(paths: list) -> list:
    """The shortest 'parent__...__stem' (then with extension) names that tell ``paths`` apart."""
    depth = max(len(p.parent.parts) for p in paths)
    for with_suffix, n in [(suffix, n) for suffix in (False, True) for n in range(depth + 1)]:
        names = ["__".join(p.parent.parts[len(p.parent.parts) - n:] + ((p.name if with_suffix else p.stem),))
                 .replace("/", "_") for p in paths]
        if len({name.casefold() for name in names}) == len(names):
            return names
    return names  # they differ in letter case only: overlay_names numbers them


def infer(run_dir_or_model, paths, out_dir, *, recursive: bool = False, batch_size: int = 8,
          device=None, clip_weights: str | None = None, class_name: str | None = None,
          num_workers: int = 0, progress: bool = True) -> InferenceResult:
    """Score every image under ``paths``; write ``OUT/overlays/<name>.png`` and ``OUT/scores.csv``.

    Unreadable images are collected (not fatal): the others are still scored and written, and
    the result lists every unreadable file with its reason. Files are written atomically.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from pmoe.io import write_csv

    model, _ = load_model(run_dir_or_model, clip_weights)
    if model.config.use_class_names and not class_name:
        raise PmoeError("this run puts the class name in the prompt (use_class_names); "
                        "pass the class of the images with --class-name")
    images, skipped = collect_images(paths, recursive)
    if not images:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(map(str, paths))}"
                        + ("" if recursive else "; pass --recursive to search sub-folders"))
    device = prepare_device(model, device)
    out_dir, names = Path(out_dir), overlay_names(images)
    loader = torch.utils.data.DataLoader(ImageFiles(images, model.config.image_size), batch_size=batch_size,
                                         num_workers=num_workers)
    rows, unreadable = [], []
    for batch in tqdm(loader, desc="infer", unit="batch", disable=not progress):
        unreadable += [(images[i], error) for i, error in zip(batch["index"].tolist(), batch["error"]) if error]
        readable = [n for n, error in enumerate(batch["error"]) if not error]
        if readable:
            rows += _score_batch(model, batch, readable, device, out_dir, names, images, class_name)
    scores = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
    scores = scores.sort_values(["score", "image"], ascending=[False, True], kind="stable", ignore_index=True)
    write_csv(scores, out_dir / "scores.csv")
    return InferenceResult(scores, unreadable, skipped)


class ImageFiles(torch.utils.data.Dataset):
    """Image files preprocessed for the model; an unreadable one gives zeros and its error."""

    def __init__(self, paths: list, image_size: int):
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        from pmoe.data import load_image

        try:
            return {"index": index, "image": load_image(self.paths[index], self.image_size), "error": ""}
        except DataError as error:
            return {"index": index, "image": torch.zeros(3, self.image_size, self.image_size), "error": str(error)}


def _score_batch(model, batch: dict, readable: list, device, out_dir: Path, names, images, class_name) -> list:
    """Score the readable images of a batch and write their overlays; returns score rows."""
    subset = {"image": batch["image"][readable], "cls": [class_name or ""] * len(readable)}
    out = forward_batch(model, subset, device)
    maps, scores = out["anomaly_map"].cpu().numpy(), out["score"].cpu().numpy()
    rows = []
    for position, anomaly_map, score in zip(readable, maps, scores):
        index = int(batch["index"][position])
        write_overlay(out_dir / "overlays" / names[index], denormalize(batch["image"][position]), anomaly_map,
                      *map_range(model.config))
        rows.append((str(images[index]), float(score), f"overlays/{names[index]}"))
    return rows


def write_overlay(path, image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float) -> Path:
    """Save the heat-map overlay of ``anomaly_map`` on ``image`` as a PNG, atomically."""
    from PIL import Image

    from pmoe.io import atomic_path
    from pmoe.plotting import overlay

    with atomic_path(path) as tmp:
        Image.fromarray(overlay(image, anomaly_map, vmin=vmin, vmax=vmax)).save(tmp, format="PNG")
    return Path(path)
