"""The frozen-feature cache: equal to the encoder's output, content-addressed, keyed by every setting."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import pmoe
from pmoe.data import AnomalyDataset, build_manifest
from pmoe.data.synthetic import write_dataset
from pmoe.errors import DataError
from pmoe.features import FeatureCache, feature_key, visual_features

TINY = pmoe.Config.preset("tiny")


@pytest.fixture(scope="module")
def model():
    return pmoe.build_model(TINY)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset("synthetic-a", tmp_path_factory.mktemp("data") / "synthetic-a", n_normal=1, n_anomalous=2)


def dataset(root):
    return AnomalyDataset(build_manifest("synthetic-a", root), root, TINY.image_size)


def entries(cache_dir):
    return sorted(cache_dir.rglob("*.npy"))


def test_cached_items_equal_the_encoder_output_and_the_dataset_fields(model, root, tmp_path):
    data = dataset(root)
    cached = FeatureCache(tmp_path, TINY).features(model, data, batch_size=5, device="cpu", progress=False)
    assert len(cached) == len(data) == len(entries(tmp_path))
    references = [data[index] for index in range(len(data))]
    features = model.encode_image(torch.stack([reference["image"] for reference in references]))
    for index, reference in enumerate(references):
        item = cached[index]
        assert item["patch_tokens"].dtype == item["cls_token"].dtype == torch.float16
        torch.testing.assert_close(item["patch_tokens"].float(), features.patch_tokens[index], rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(item["cls_token"].float(), features.cls_token[index], rtol=1e-3, atol=2e-3)
        assert "image" not in item
        assert torch.equal(item["mask"], reference["mask"])
        assert all(item[field] == reference[field] for field in ("label", "cls", "path", "crop"))


def test_a_warm_cache_never_runs_the_encoder(model, root, tmp_path, monkeypatch):
    data = dataset(root)
    FeatureCache(tmp_path, TINY).features(model, data, 4, "cpu", progress=False)
    files = {path: path.stat().st_mtime_ns for path in entries(tmp_path)}

    def forbidden(images):
        raise AssertionError("the encoder ran although every entry is cached")

    monkeypatch.setattr(model, "encode_image", forbidden)
    again = FeatureCache(tmp_path, TINY).features(model, data, 4, "cpu", progress=False)
    assert {path: path.stat().st_mtime_ns for path in entries(tmp_path)} == files
    assert torch.equal(again[0]["patch_tokens"], FeatureCache(tmp_path, TINY).features(
        model, data, 4, "cpu", progress=False)[0]["patch_tokens"])


def test_entries_are_addressed_by_file_content(model, root, tmp_path):
    FeatureCache(tmp_path / "cache", TINY).features(model, dataset(root), 8, "cpu", progress=False)
    count = len(entries(tmp_path / "cache"))
    moved = shutil.copytree(root, tmp_path / "moved")  # same bytes elsewhere: every entry is reused
    FeatureCache(tmp_path / "cache", TINY).features(model, dataset(moved), 8, "cpu", progress=False)
    assert len(entries(tmp_path / "cache")) == count
    first = moved / dataset(moved).records[0][0]
    image = np.array(Image.open(first))
    image[0, 0] = 255 - image[0, 0]  # an edited image gets a new entry
    Image.fromarray(image).save(first)
    edited = FeatureCache(tmp_path / "cache", TINY).features(model, dataset(moved), 8, "cpu", progress=False)
    assert len(entries(tmp_path / "cache")) == count + 1
    assert not torch.equal(edited[0]["patch_tokens"], FeatureCache(tmp_path / "cache", TINY).features(
        model, dataset(root), 8, "cpu", progress=False)[0]["patch_tokens"])


@pytest.mark.parametrize("change", [
    {"image_size": 84}, {"layers": (2, 4)}, {"vv_attention": False}, {"vv_start": 2}, {"quick_gelu": True},
    {"pos_embed_interp": "bicubic"}, {"seed": 1}, {"clip_model": "ViT-B-32"},
])
def test_the_key_changes_with_every_setting_of_the_encoder(change):
    base = TINY.replace(layers=(2, 3, 4))
    assert feature_key(base.replace(**change)) != feature_key(base)


@pytest.mark.parametrize("change", [{"lr": 1.0}, {"num_experts": 4, "top_k": 2}, {"alpha": 0.5}, {"epochs": 1}])
def test_the_key_ignores_the_trainable_part(change):
    assert feature_key(TINY.replace(**change)) == feature_key(TINY)


def test_the_key_follows_a_weights_file_and_the_precision(tmp_path):
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"x")
    config = TINY.replace(clip_weights=str(weights))
    key = feature_key(config)
    weights.write_bytes(b"xy")  # another file at the same path
    assert feature_key(config) != key
    assert feature_key(config, "cuda") != feature_key(config, "cpu")
    assert feature_key(TINY.replace(clip_weights="openai")) != feature_key(TINY)


def test_a_corrupt_entry_is_a_data_error_naming_the_fix(model, root, tmp_path):
    cached = FeatureCache(tmp_path, TINY).features(model, dataset(root), 8, "cpu", progress=False)
    cached.files[0].write_bytes(b"not an array")
    with pytest.raises(DataError, match="delete it"):
        cached[0]


def test_a_dataset_at_another_image_size_is_refused(model, root, tmp_path):
    data = AnomalyDataset(build_manifest("synthetic-a", root), root, 84)
    with pytest.raises(DataError, match="image_size=112"):
        FeatureCache(tmp_path, TINY).features(model, data, 8, "cpu", progress=False)


def test_without_a_cache_features_are_computed_per_batch(model, root, tmp_path):
    data = dataset(root)
    assert FeatureCache(None, TINY).features(model, data, 8, "cpu") is data
    live = torch.utils.data.default_collate([data[0], data[1]])
    cached = FeatureCache(tmp_path, TINY).features(model, data, 8, "cpu", progress=False)
    stored = torch.utils.data.default_collate([cached[0], cached[1]])
    for ours, theirs in zip(visual_features(model, live, "cpu"), visual_features(model, stored, "cpu")):
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-3, atol=2e-3)
