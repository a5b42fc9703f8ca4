"""Running a trained model on images: scores, anomaly maps, routing and heat-map overlays.

``predict`` is the low-level call (notebooks, Figure 5): a model and a list of image paths or
dataset items in, NumPy arrays out. ``infer`` is ``pmoe infer``: image files and folders in
(no manifest, EXIF orientation applied), one overlay per image at the photo's own aspect ratio,
optionally the raw maps as ``.npy``, and a ``scores.csv`` sorted by score out.

Usage::

    from pmoe.inference import infer, load_model, predict
    model, _ = load_model("runs/mvtec")
    out = predict(model, ["a.png", "b.png"], with_images=True)  # score, anomaly_map, image, ...
    infer("runs/mvtec", ["photos/"], "results/photos")            # overlays/ and scores.csv
    infer("runs/mvtec", ["photos/"], "results/photos", save_maps=True, threshold=0.6)  # + maps/, anomalous
    infer(Config.preset("clip-zero-shot"), ["photos/"], "results/photos")  # training-free: no run directory

On CUDA the frozen image encoder runs under bf16 autocast and matmuls use TF32; the maps and
scores are computed in fp32 (see :func:`forward_batch`). The CPU path is plain fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pmoe.errors import CheckpointError, ConfigError, DataError, PmoeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OVERLAY_MAX_SIDE = 1024  # px, long side of an overlay (smaller photos keep their size)


# --- model and device ---------------------------------------------------------------------------
def load_model(run_dir_or_model, clip_weights: str | None = None, run_name: str | None = None):
    """(model in eval mode, run name) from a run directory, an in-memory PromptMoE, or the
    :class:`pmoe.Config` of a training-free model (``Config.training_free``, e.g. preset
    ``clip-zero-shot``), which is built here with ``clip_weights`` if given.

    The run name is the directory's name unless ``run_name`` is given (``"model"`` for an
    in-memory model or a config without one).
    """
    from pmoe.checkpoint import load_run
    from pmoe.config import Config
    from pmoe.model import PromptMoE, build_model

    if isinstance(run_dir_or_model, PromptMoE):
        return run_dir_or_model.eval(), run_name or "model"
    if isinstance(run_dir_or_model, Config):
        if not run_dir_or_model.training_free:
            raise ConfigError(f"prompt_mode {run_dir_or_model.prompt_mode!r} has learnable prompts: train it "
                              "(pmoe train) and pass its run directory (--checkpoint); only a training-free preset "
                              "(clip-zero-shot) runs without one.")
        config = run_dir_or_model.replace(clip_weights=clip_weights) if clip_weights else run_dir_or_model
        return build_model(config).eval(), run_name or "model"
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

    scores: object  # pandas.DataFrame (see ``infer``), highest score first
    unreadable: list = field(default_factory=list)  # (path, reason)
    skipped: list = field(default_factory=list)  # paths that are not images


def collect_images(paths, recursive: bool = False) -> tuple:
    """(image files, skipped non-images) from files and folders, in the order given.

    Folders contribute their image files (by extension, case-insensitive), sorted by name;
    sub-folders only with ``recursive``. Hidden entries of a folder (names starting with a dot:
    ``.DS_Store``, AppleDouble ``._photo.jpg`` files, ``.git``) are ignored. A path that does
    not exist is a DataError. A file given twice is kept once.
    """
    images, skipped = [], []
    for path in map(lambda p: Path(p).expanduser(), paths):
        if path.is_dir():
            found = _visible_files(path, recursive)
            images += [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS]
            skipped += [p for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS]
        elif path.is_file():
            (images if path.suffix.lower() in IMAGE_EXTENSIONS else skipped).append(path)
        else:
            raise DataError(f"{path} does not exist; pass image files or folders of images")
    return _dedupe(images), skipped


def _visible_files(folder: Path, recursive: bool) -> list:
    """The files of ``folder`` (and of its sub-folders with ``recursive``), sorted, none hidden."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


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
          num_workers: int = 0, progress: bool = True, overlay_max_side: int = OVERLAY_MAX_SIDE,
          save_maps: bool = False, threshold: float | None = None) -> InferenceResult:
    """Score every image under ``paths``; write ``OUT/overlays/<name>.png`` and ``OUT/scores.csv``.

    Images are turned upright by their EXIF orientation, for the model as for the overlays.
    An overlay has the photo's size and aspect ratio, scaled down so that its long side is at
    most ``overlay_max_side`` px. With ``save_maps`` each anomaly map M is also saved as
    ``OUT/maps/<name>.npy`` (S x S float32, model resolution, smoothed as at evaluation).

    scores.csv columns: ``image``, ``score``, ``anomalous`` (``score >= threshold``; only with
    a ``threshold``), ``overlay``, ``map`` (only with ``save_maps``); highest score first.
    An image that cannot be decoded or converted is collected with the reason (not fatal): the
    others are still scored and written. Files are written atomically.
    """
    from tqdm.auto import tqdm

    from pmoe.io import write_csv

    _check_options(overlay_max_side, threshold)
    model, _ = load_model(run_dir_or_model, clip_weights)
    if model.config.use_class_names and not class_name:
        raise PmoeError("this run puts the class name in the prompt (use_class_names); "
                        "pass the class of the images with --class-name")
    images, skipped = collect_images(paths, recursive)
    if not images:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(map(str, paths))}"
                        + ("" if recursive else "; pass --recursive to search sub-folders"))
    device = prepare_device(model, device)
    writer = OutputWriter(Path(out_dir), overlay_names(images), *map_range(model.config), save_maps)
    loader = torch.utils.data.DataLoader(ImageFiles(images, model.config.image_size, overlay_max_side),
                                         batch_size=batch_size, num_workers=num_workers, collate_fn=collate_files)
    rows, unreadable = [], []
    for batch in tqdm(loader, desc="infer", unit="batch", disable=not progress):
        unreadable += [(images[i], error) for i, error in zip(batch["index"], batch["error"]) if error]
        readable = [n for n, error in enumerate(batch["error"]) if not error]
        if readable:
            rows += _score_batch(model, batch, readable, device, writer, images, class_name)
    scores = _scores_table(rows, threshold, save_maps)
    write_csv(scores, writer.out_dir / "scores.csv")
    return InferenceResult(scores, unreadable, skipped)


def _scores_table(rows: list, threshold, save_maps: bool):
    """scores.csv's table from rows (image, score, overlay, map), highest score first."""
    import pandas as pd

    scores = pd.DataFrame(rows, columns=["image", "score", "overlay", "map"])
    scores = scores.sort_values(["score", "image"], ascending=[False, True], kind="stable", ignore_index=True)
    if threshold is not None:
        scores.insert(2, "anomalous", scores["score"] >= threshold)
    return scores if save_maps else scores.drop(columns="map")


def _check_options(overlay_max_side, threshold) -> None:
    if not isinstance(overlay_max_side, int) or overlay_max_side < 1:
        raise PmoeError(f"overlay_max_side must be a whole number of pixels >= 1, got {overlay_max_side!r}; "
                        f"pass e.g. --overlay-max-side {OVERLAY_MAX_SIDE}")
    if threshold is not None and not math.isfinite(threshold):
        raise PmoeError(f"threshold must be a finite number, got {threshold!r}; pass e.g. --threshold 0.5")


def read_photo(path) -> Image.Image:
    """The image file decoded, turned upright by its EXIF orientation, as 8-bit RGB."""
    from pmoe.data.images import open_image, to_rgb

    return to_rgb(ImageOps.exif_transpose(open_image(path)))


def display_size(size: tuple, max_side: int) -> tuple:
    """(width, height) of ``size`` scaled down, aspect kept, so the long side is at most ``max_side``."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class ImageFiles(torch.utils.data.Dataset):
    """Image files read upright (EXIF), as the model's input and as a display-sized RGB array.

    An image that cannot be read or converted gives zeros, no display image and the reason.
    """

    def __init__(self, paths: list, image_size: int, max_side: int = OVERLAY_MAX_SIDE):
        self.paths, self.image_size, self.max_side = paths, image_size, max_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        from pmoe.data.loader import image_tensor

        path = self.paths[index]
        try:
            photo = read_photo(path)
            display = np.asarray(photo.resize(display_size(photo.size, self.max_side), Image.BICUBIC))
            return {"index": index, "image": image_tensor(photo, self.image_size), "display": display, "error": ""}
        except Exception as error:  # any failure to decode or convert one file is reported, not fatal
            reason = str(error) if isinstance(error, DataError) else \
                f"cannot convert image {path} ({type(error).__name__}: {error}); save it as an 8-bit PNG or JPEG"
            empty = torch.zeros(3, self.image_size, self.image_size)
            return {"index": index, "image": empty, "display": None, "error": reason}


def collate_files(items: list) -> dict:
    """A batch of :class:`ImageFiles` items: stacked model inputs, lists of the rest."""
    return {"image": torch.stack([item["image"] for item in items]),
            **{key: [item[key] for item in items] for key in ("index", "display", "error")}}


@dataclass
class OutputWriter:
    """Writes each image's overlay (and raw map) under ``out_dir``, named by ``names``."""

    out_dir: Path
    names: list  # one overlay file name per image (see overlay_names)
    vmin: float
    vmax: float
    save_maps: bool = False

    def write(self, index: int, display: np.ndarray, anomaly_map: np.ndarray) -> tuple:
        """Write image ``index``'s files; returns their paths relative to ``out_dir`` (map: "" if not saved)."""
        from pmoe.io import atomic_path

        overlay = f"overlays/{self.names[index]}"
        write_overlay(self.out_dir / overlay, display, anomaly_map, self.vmin, self.vmax)
        if not self.save_maps:
            return overlay, ""
        saved = f"maps/{Path(self.names[index]).with_suffix('.npy')}"
        with atomic_path(self.out_dir / saved) as tmp, open(tmp, "wb") as handle:
            np.save(handle, anomaly_map.astype(np.float32))
        return overlay, saved


def _score_batch(model, batch: dict, readable: list, device, writer: OutputWriter, images, class_name) -> list:
    """Score the readable images of a batch and write their files; returns rows (image, score, overlay, map)."""
    subset = {"image": batch["image"][readable], "cls": [class_name or ""] * len(readable)}
    out = forward_batch(model, subset, device)
    maps, scores = out["anomaly_map"].cpu().numpy(), out["score"].cpu().numpy()
    rows = []
    for position, anomaly_map, score in zip(readable, maps, scores):
        index = batch["index"][position]
        rows.append((str(images[index]), float(score), *writer.write(index, batch["display"][position], anomaly_map)))
    return rows


def write_overlay(path, image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float) -> Path:
    """Save the heat-map overlay of ``anomaly_map`` (resized to the image) on ``image`` as a PNG, atomically."""
    from pmoe.io import atomic_path
    from pmoe.plotting import overlay

    with atomic_path(path) as tmp:
        Image.fromarray(overlay(image, anomaly_map, vmin=vmin, vmax=vmax)).save(tmp, format="PNG")
    return Path(path)
