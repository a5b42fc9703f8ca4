"""`pmoe infer` on generated photos (EXIF orientation, own-size overlays, raw maps, threshold,
unreadable and hidden files), file discovery and naming, and `predict` for notebooks."""

import struct

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from pmoe import cli, plotting
from pmoe.checkpoint import load_run
from pmoe.commands import infer as infer_command
from pmoe.data import AnomalyDataset, build_manifest, load_image
from pmoe.data.loader import image_tensor
from pmoe.data.twins import write_image
from pmoe.errors import CheckpointError, DataError, PmoeError
from pmoe.inference import (OVERLAY_MAX_SIDE, collect_images, denormalize, display_size, infer, overlay_names,
                            predict)
from pmoe.model import build_model
from test_evaluation import TINY, make_run, write_synthetic

EXIF_ORIENTATION = 0x0112  # TIFF/EXIF tag; value 6: the stored image is shown turned 90 degrees clockwise
PHOTOS = {"wide.png": (90, 40), "tall.jpg": (36, 80), "square.bmp": (50, 50), "big.tif": (300, 120)}


def write_photo(path, size, seed=0, orientation=None):
    """A noise photo of ``size`` (w, h) as stored, with an EXIF orientation tag if given."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    if orientation:
        exif[EXIF_ORIENTATION] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("inference") / "run")


@pytest.fixture(scope="module")
def model(run_dir):
    return load_run(run_dir).eval()


@pytest.fixture()
def photos(tmp_path):
    """Photos of several sizes and formats, a corrupt one, a note, and macOS's hidden files beside them."""
    folder = tmp_path / "photos"
    for seed, (name, size) in enumerate(PHOTOS.items()):
        write_photo(folder / name, size, seed)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._wide.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    return folder


def reference(model, pil_images) -> dict:
    """Scores and maps of a plain forward pass on decoded images preprocessed as the protocol does."""
    with torch.no_grad():
        out = model(torch.stack([image_tensor(image, TINY.image_size) for image in pil_images]))
    return {"score": out["score"].numpy(), "map": out["anomaly_map"].numpy()}


def test_infer_writes_own_size_overlays_and_sorted_scores(run_dir, model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["infer", "--checkpoint", str(run_dir), str(photos), "--out", str(out), "--batch-size", "3",
                     "--quiet"])
    captured = capsys.readouterr()
    assert code == 1, "an unreadable image must fail the run"
    assert "broken.jpg" in captured.err and "notes.txt" in captured.out and "._wide" not in captured.err
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns) == ["image", "score", "overlay"]
    assert sorted(scores["image"].map(lambda p: p.rsplit("/", 1)[-1])) == sorted(PHOTOS)
    assert scores["score"].is_monotonic_decreasing
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(f"{n.split('.')[0]}.png" for n in PHOTOS)
    for name, size in PHOTOS.items():
        assert Image.open(out / "overlays" / f"{name.split('.')[0]}.png").size == size, name
    expected = reference(model, [Image.open(photos / name) for name in PHOTOS])["score"]
    by_name = dict(zip(scores["image"].map(lambda p: p.rsplit("/", 1)[-1]), scores["score"]))
    assert [by_name[name] for name in PHOTOS] == pytest.approx(expected, abs=1e-5)


def test_exif_orientation_turns_model_input_overlay_and_map_upright(run_dir, model, tmp_path):
    stored = write_photo(tmp_path / "in" / "phone.jpg", (96, 48), seed=7, orientation=6)
    result = infer(run_dir, [stored], tmp_path / "out", save_maps=True, progress=False)
    decoded = Image.open(stored)
    decoded.load()
    upright = decoded.transpose(Image.Transpose.ROTATE_270)  # orientation 6: turn 90 degrees clockwise
    expected, sideways = reference(model, [upright]), reference(model, [decoded])
    saved = np.load(tmp_path / "out" / "maps" / "phone.npy")
    assert np.allclose(saved, expected["map"][0], atol=1e-6) and not np.allclose(saved, sideways["map"][0], atol=1e-3)
    assert result.scores["score"][0] == pytest.approx(expected["score"][0], abs=1e-6)
    written = np.asarray(Image.open(tmp_path / "out" / "overlays" / "phone.png"))
    assert written.shape == (96, 48, 3)
    assert np.array_equal(written, plotting.overlay(np.asarray(upright.convert("RGB")), saved, vmin=0.0, vmax=1.0))


def test_overlays_are_capped_at_the_long_side_keeping_the_aspect(run_dir, photos, tmp_path):
    infer(run_dir, [photos / "big.tif", photos / "tall.jpg"], tmp_path / "out", overlay_max_side=60, progress=False)
    assert Image.open(tmp_path / "out" / "overlays" / "big.png").size == (60, 24)
    assert Image.open(tmp_path / "out" / "overlays" / "tall.png").size == (27, 60)


@pytest.mark.parametrize("size, max_side, expected", [
    ((4000, 3000), 1024, (1024, 768)), ((3000, 4000), 1024, (768, 1024)), ((500, 300), 1024, (500, 300)),
    ((5000, 2), 1024, (1024, 1)), ((1025, 1025), 1024, (1024, 1024))])
def test_display_size(size, max_side, expected):
    assert display_size(size, max_side) == expected


def test_save_maps_writes_each_raw_map_at_model_resolution(run_dir, model, photos, tmp_path):
    result = infer(run_dir, [photos], tmp_path / "out", save_maps=True, batch_size=2, progress=False)
    scores = pd.read_csv(tmp_path / "out" / "scores.csv")
    assert list(scores.columns) == ["image", "score", "overlay", "map"] == list(result.scores.columns)
    expected = reference(model, [Image.open(photos / name) for name in PHOTOS])["map"]
    for name, reference_map in zip(PHOTOS, expected):
        row = scores[scores["image"].str.endswith(f"/{name}")].iloc[0]
        saved = np.load(tmp_path / "out" / row["map"])
        assert row["map"] == f"maps/{name.split('.')[0]}.npy"
        assert saved.dtype == np.float32 and saved.shape == (TINY.image_size, TINY.image_size)
        assert np.allclose(saved, reference_map, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "out" / "maps").iterdir()) == sorted(
        f"{n.split('.')[0]}.npy" for n in PHOTOS), "no temporary files are left"


def test_threshold_flags_images_in_scores_and_summary(run_dir, photos, tmp_path, capsys):
    plain = infer(run_dir, [photos], tmp_path / "plain", progress=False).scores
    threshold = float(plain["score"].iloc[1])  # the two highest scores reach it
    code = cli.main(["infer", "--checkpoint", str(run_dir), str(photos), "--out", str(tmp_path / "out"),
                     "--threshold", repr(threshold), "--quiet"])
    scores = pd.read_csv(tmp_path / "out" / "scores.csv")
    assert code == 1 and list(scores.columns) == ["image", "score", "anomalous", "overlay"]
    assert scores["anomalous"].tolist() == [True, True, False, False]
    summary = [line for line in capsys.readouterr().out.splitlines() if "flagged anomalous" in line]
    assert summary == [f"2 of 4 image(s) flagged anomalous (score >= {threshold:g}): "
                       f"{plain['image'][0]}, {plain['image'][1]}"]


def test_flagged_summary_names_at_most_the_first_twenty():
    scores = pd.DataFrame({"image": [f"{i}.png" for i in range(25)], "anomalous": [True] * 22 + [False] * 3})
    line = infer_command.flagged_summary(scores, 0.5)
    assert line.startswith("22 of 25 image(s) flagged anomalous (score >= 0.5): 0.png, 1.png")
    assert "19.png ... and 2 more (see scores.csv)" in line and "20.png" not in line
    assert infer_command.flagged_summary(scores.assign(anomalous=False), 0.5).endswith("flagged anomalous "
                                                                                       "(score >= 0.5).")


def test_cli_default_overlay_side_is_the_library_default():
    parser = cli.build_parser()
    assert parser.parse_args(["infer", "--checkpoint", "r", "x.png", "--out", "o"]).overlay_max_side == \
        OVERLAY_MAX_SIDE


def test_any_decoding_failure_is_reported_per_file(run_dir, photos, tmp_path, monkeypatch):
    real = ImageOps.exif_transpose

    def exif_transpose(image, **kwargs):
        if image.size == PHOTOS["square.bmp"]:
            raise struct.error("unpack requires a buffer of 4 bytes")  # as a malformed EXIF block can raise
        return real(image, **kwargs)

    monkeypatch.setattr(ImageOps, "exif_transpose", exif_transpose)
    result = infer(run_dir, [photos], tmp_path / "out", progress=False)
    reasons = dict((path.name, reason) for path, reason in result.unreadable)
    assert sorted(reasons) == ["broken.jpg", "square.bmp"]
    assert "cannot read image" in reasons["broken.jpg"]
    assert "square.bmp" in reasons["square.bmp"] and "error: unpack requires a buffer" in reasons["square.bmp"]
    assert [path.name for path in result.skipped] == ["notes.txt"]
    assert len(result.scores) == len(PHOTOS) - 1 and (tmp_path / "out" / "scores.csv").is_file()


@pytest.mark.parametrize("options, words", [({"overlay_max_side": 0}, "overlay-max-side"),
                                            ({"threshold": float("nan")}, "finite")])
def test_bad_options_are_clear_errors(run_dir, photos, tmp_path, options, words):
    with pytest.raises(PmoeError, match=words):
        infer(run_dir, [photos], tmp_path / "out", progress=False, **options)


def test_collect_images_by_extension_in_any_case_and_recursive_on_request(tmp_path):
    for name in ("a.PNG", "b.Jpeg", "c.tif", "d.TIFF", "e.bmp", "f.jpg", "sub/g.png", ".hidden/h.png"):
        write_image(tmp_path / name)
    (tmp_path / "h.gif").write_bytes(b"GIF89a")
    for name in (".DS_Store", "._a.PNG", "sub/._g.png"):
        (tmp_path / name).write_bytes(b"\x00\x05\x16\x07")
    images, skipped = collect_images([tmp_path])
    assert [p.name for p in images] == ["a.PNG", "b.Jpeg", "c.tif", "d.TIFF", "e.bmp", "f.jpg"]
    assert [p.name for p in skipped] == ["h.gif"]
    images, _ = collect_images([tmp_path, tmp_path / "a.PNG"], recursive=True)
    assert [p.name for p in images] == ["a.PNG", "b.Jpeg", "c.tif", "d.TIFF", "e.bmp", "f.jpg", "g.png"]
    assert collect_images([tmp_path / "._a.PNG"])[0] == [tmp_path / "._a.PNG"], "a file named explicitly is kept"


def test_overlay_names_are_unique_and_short(tmp_path):
    paths = [tmp_path / "x" / "a.png", tmp_path / "y" / "a.png", tmp_path / "y" / "b.png",
             tmp_path / "z" / "c.png", tmp_path / "z" / "c.jpg"]
    names = overlay_names(paths)
    assert names == ["x__a.png", "y__a.png", "b.png", "c.png.png", "c.jpg.png"]
    awkward = overlay_names([tmp_path / "A.png", tmp_path / "a.png", tmp_path / "x__a.png", tmp_path / "x" / "a.png"])
    assert len({name.casefold() for name in awkward}) == 4


@pytest.mark.parametrize("paths, words", [(["missing.png"], "does not exist"), ([], "no image files")])
def test_infer_bad_inputs(run_dir, tmp_path, paths, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "._ghost.png").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(DataError, match=words):
        infer(run_dir, [tmp_path / p for p in paths] or [tmp_path / "empty"], tmp_path / "out", progress=False)


def test_infer_needs_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        infer(tmp_path / "no-run", [tmp_path], tmp_path / "out", progress=False)


def test_infer_asks_for_the_class_name_when_the_prompt_uses_it(photos, tmp_path):
    model = build_model(TINY.replace(use_class_names=True))
    with pytest.raises(PmoeError, match="--class-name"):
        infer(model, [photos], tmp_path / "out", progress=False)
    result = infer(model, [photos], tmp_path / "out", class_name="colon", progress=False)
    assert len(result.scores) == len(PHOTOS)


def test_denormalize_gives_back_the_resized_image_exactly(photos):
    path = photos / "wide.png"
    resized = Image.open(path).convert("RGB").resize((TINY.image_size, TINY.image_size), Image.BICUBIC)
    assert np.array_equal(denormalize(load_image(path, TINY.image_size)), np.asarray(resized))


def test_predict_on_dataset_items_returns_maps_masks_and_routing(run_dir, tmp_path):
    root = write_synthetic(tmp_path / "data")
    dataset = AnomalyDataset(build_manifest("synthetic-b", root).head(3), root, TINY.image_size)
    items = [dataset[i] for i in range(3)]
    model = load_run(run_dir)
    out = predict(model, items, batch_size=2, with_images=True)
    size = TINY.image_size
    assert out["anomaly_map"].shape == (3, size, size) and out["mask"].shape == (3, size, size)
    assert out["image"].shape == (3, size, size, 3) and out["image"].dtype == np.uint8
    assert out["routing_indices"].shape == (3, TINY.num_layers, 2, TINY.top_k)
    assert list(out["path"]) == [item["path"] for item in items]
    with torch.no_grad():
        reference_out = model(torch.stack([item["image"] for item in items]))
    assert out["score"] == pytest.approx(reference_out["score"].numpy(), abs=1e-6)
    assert np.allclose(out["anomaly_map"], reference_out["anomaly_map"].numpy(), atol=1e-6)
