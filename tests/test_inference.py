"""`pmoe infer` on real fixture images, file discovery and naming, and `predict` for notebooks."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pmoe import cli
from pmoe.checkpoint import load_run
from pmoe.data import AnomalyDataset, build_manifest, load_image
from pmoe.data.images import open_image, to_rgb
from pmoe.data.twins import write_image
from pmoe.errors import CheckpointError, DataError, PmoeError
from pmoe.inference import collect_images, denormalize, infer, overlay_names, predict
from pmoe.model import build_model
from test_evaluation import TINY, make_run, write_synthetic


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("inference") / "run")


@pytest.fixture()
def kvasir_folder(real_fixtures, tmp_path):
    """A copy of the real Kvasir-SEG images with a corrupt image and a note beside them."""
    folder = tmp_path / "images"
    shutil.copytree(real_fixtures / "Kvasir-SEG" / "images", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_infer_writes_one_overlay_per_image_and_sorted_scores(run_dir, kvasir_folder, real_fixtures, tmp_path,
                                                              capsys):
    real = sorted((real_fixtures / "Kvasir-SEG" / "images").glob("*.jpg"))
    out = tmp_path / "out"
    code = cli.main(["infer", "--checkpoint", str(run_dir), str(kvasir_folder), "--out", str(out),
                     "--batch-size", "2", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1, "an unreadable image must fail the run"
    assert "broken.jpg" in captured.err and "notes.txt" in captured.out
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns) == ["image", "score", "overlay"]
    assert sorted(scores["image"].map(lambda p: p.rsplit("/", 1)[-1])) == [p.name for p in real]
    assert scores["score"].is_monotonic_decreasing
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == sorted(f"{p.stem}.png" for p in real)
    for name in overlays:
        assert Image.open(out / "overlays" / name).size == (TINY.image_size, TINY.image_size)
    expected = predict(load_run(run_dir), [kvasir_folder / p.name for p in real])["score"]
    by_name = dict(zip(scores["image"].map(lambda p: p.rsplit("/", 1)[-1]), scores["score"]))
    assert [by_name[p.name] for p in real] == pytest.approx(expected, abs=1e-5)


def test_infer_result_lists_unreadable_files_and_keeps_the_others(run_dir, kvasir_folder, tmp_path):
    result = infer(run_dir, [kvasir_folder], tmp_path / "out", progress=False)
    assert [path.name for path, _ in result.unreadable] == ["broken.jpg"]
    assert "broken.jpg" in result.unreadable[0][1]
    assert [path.name for path in result.skipped] == ["notes.txt"]
    assert len(result.scores) == 5 and (tmp_path / "out" / "scores.csv").is_file()


def test_collect_images_by_extension_in_any_case_and_recursive_on_request(tmp_path):
    for name in ("a.PNG", "b.Jpeg", "c.tif", "d.TIFF", "e.bmp", "f.jpg", "sub/g.png"):
        write_image(tmp_path / name)
    (tmp_path / "h.gif").write_bytes(b"GIF89a")
    images, skipped = collect_images([tmp_path])
    assert [p.name for p in images] == ["a.PNG", "b.Jpeg", "c.tif", "d.TIFF", "e.bmp", "f.jpg"]
    assert [p.name for p in skipped] == ["h.gif"]
    images, _ = collect_images([tmp_path, tmp_path / "a.PNG"], recursive=True)
    assert [p.name for p in images] == ["a.PNG", "b.Jpeg", "c.tif", "d.TIFF", "e.bmp", "f.jpg", "g.png"]


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
    with pytest.raises(DataError, match=words):
        infer(run_dir, [tmp_path / p for p in paths] or [tmp_path / "empty"], tmp_path / "out", progress=False)


def test_infer_needs_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        infer(tmp_path / "no-run", [tmp_path], tmp_path / "out", progress=False)


def test_infer_asks_for_the_class_name_when_the_prompt_uses_it(real_fixtures, tmp_path):
    model = build_model(TINY.replace(use_class_names=True))
    with pytest.raises(PmoeError, match="--class-name"):
        infer(model, [real_fixtures / "Kvasir-SEG" / "images"], tmp_path / "out", progress=False)
    result = infer(model, [real_fixtures / "Kvasir-SEG" / "images"], tmp_path / "out", class_name="colon",
                   progress=False)
    assert len(result.scores) == 5


def test_denormalize_gives_back_the_resized_image_exactly(real_fixtures):
    path = next((real_fixtures / "Kvasir-SEG" / "images").glob("*.jpg"))
    resized = to_rgb(open_image(path)).resize((TINY.image_size, TINY.image_size), Image.BICUBIC)
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
        reference = model(torch.stack([item["image"] for item in items]))
    assert out["score"] == pytest.approx(reference["score"].numpy(), abs=1e-6)
    assert np.allclose(out["anomaly_map"], reference["anomaly_map"].numpy(), atol=1e-6)
