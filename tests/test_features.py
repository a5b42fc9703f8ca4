"""The frozen-feature cache: equal to the uncached encoder, content-addressed, keyed by every setting
and the code, shared by layer subsets, bounded by the free disk space, listed and cleared."""

import errno
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pmoe
from pmoe import features
from pmoe.cli import main as cli_main
from pmoe.data import AnomalyDataset, build_manifest
from pmoe.data.synthetic import write_dataset
from pmoe.errors import DataError
from pmoe.features import FeatureCache, entry_bytes, feature_key, stored_layers, visual_features

TINY = pmoe.Config.preset("tiny")


@pytest.fixture(scope="module")
def model():
    return pmoe.build_model(TINY)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset("synthetic-a", tmp_path_factory.mktemp("data") / "synthetic-a", n_normal=1, n_anomalous=2)


def dataset(root, config=TINY):
    return AnomalyDataset(build_manifest("synthetic-a", root), root, config.image_size)


def entries(cache_dir):
    return sorted(cache_dir.rglob("*.npy"))


def uncached(model, data):
    """The encoder run on the images directly (no cache involved)."""
    images = torch.stack([data[index]["image"] for index in range(len(data))])
    with torch.no_grad():
        return model.encode_image(images)


def test_cached_items_equal_the_uncached_encoder_and_the_dataset_fields(model, root, tmp_path):
    data = dataset(root)
    cached = FeatureCache(tmp_path, TINY).features(model, data, batch_size=5, device="cpu", progress=False)
    assert len(cached) == len(data) == len(entries(tmp_path))
    reference = uncached(model, data)
    for index in range(len(data)):
        item, expected = cached[index], data[index]
        assert item["patch_tokens"].dtype == item["cls_token"].dtype == torch.float16
        torch.testing.assert_close(item["patch_tokens"].float(), reference.patch_tokens[index], rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(item["cls_token"].float(), reference.cls_token[index], rtol=1e-3, atol=2e-3)
        assert "image" not in item
        assert torch.equal(item["mask"], expected["mask"])
        assert all(item[field] == expected[field] for field in ("label", "cls", "path", "crop"))


def test_a_warm_cache_never_runs_the_encoder_and_still_equals_it(model, root, tmp_path, monkeypatch):
    data = dataset(root)
    FeatureCache(tmp_path, TINY).features(model, data, 4, "cpu", progress=False)
    files = {path: path.stat().st_mtime_ns for path in entries(tmp_path)}
    reference = uncached(model, data)

    def forbidden(*args, **kwargs):
        raise AssertionError("the encoder ran although every entry is cached")

    monkeypatch.setattr(model.visual, "forward", forbidden)
    again = FeatureCache(tmp_path, TINY).features(model, data, 4, "cpu", progress=False)
    assert {path: path.stat().st_mtime_ns for path in entries(tmp_path)} == files
    torch.testing.assert_close(again[2]["patch_tokens"].float(), reference.patch_tokens[2], rtol=1e-3, atol=2e-3)


def test_entries_are_addressed_by_file_content(model, root, tmp_path):
    FeatureCache(tmp_path / "cache", TINY).features(model, dataset(root), 8, "cpu", progress=False)
    count = len(entries(tmp_path / "cache"))
    moved = shutil.copytree(root, tmp_path / "moved")  # same bytes elsewhere: every entry is reused
    FeatureCache(tmp_path / "cache", TINY).features(model, dataset(moved), 8, "cpu", progress=False)
    assert len(entries(tmp_path / "cache")) == count
    first = moved / dataset(moved).records[0][0]
    image = np.array(Image.open(first))
    image[0, 0] = 255 - image[0, 0]  # an edited image gets a new entry, equal to the encoder's output
    Image.fromarray(image).save(first)
    edited = FeatureCache(tmp_path / "cache", TINY).features(model, dataset(moved), 8, "cpu", progress=False)
    assert len(entries(tmp_path / "cache")) == count + 1
    torch.testing.assert_close(edited[0]["patch_tokens"].float(), uncached(model, dataset(moved)).patch_tokens[0],
                               rtol=1e-3, atol=2e-3)


def test_layer_subsets_read_the_four_tap_entries(model, root, tmp_path, monkeypatch):
    """Table 4's layer sets: no new entry, and each tap equals the encoder run for that set."""
    FeatureCache(tmp_path, TINY).features(model, dataset(root), 8, "cpu", progress=False)
    count = len(entries(tmp_path))
    for variant in ("table4-l24", "table4-l12-24", "table4-l6-18-24"):
        config = pmoe.Config.preset(variant, base="tiny")
        assert feature_key(config) == feature_key(TINY) and stored_layers(config) == (1, 2, 3, 4)
        subset_model = pmoe.build_model(config)
        cached = FeatureCache(tmp_path, config).features(subset_model, dataset(root), 8, "cpu", progress=False)
        assert len(entries(tmp_path)) == count
        reference = uncached(subset_model, dataset(root))
        assert cached[1]["patch_tokens"].shape[0] == len(config.layers)
        torch.testing.assert_close(cached[1]["patch_tokens"].float(), reference.patch_tokens[1], rtol=1e-3, atol=2e-3)


def test_stored_layers_are_the_quarter_blocks_and_the_config_layers():
    paper = pmoe.Config.preset("paper")
    assert stored_layers(paper) == (6, 12, 18, 24)
    assert stored_layers(pmoe.Config.preset("table4-l12-24")) == (6, 12, 18, 24)
    assert stored_layers(paper.replace(layers=(3, 24), vv_start=3)) == (3, 6, 12, 18, 24)
    assert stored_layers(paper.replace(layers=(12, 24), vv_start=8)) == (12, 18, 24)  # no tap before V-V


@pytest.mark.parametrize("change", [
    {"image_size": 84}, {"vv_attention": False}, {"vv_start": 2}, {"quick_gelu": True},
    {"pos_embed_interp": "bicubic"}, {"clip_model": "ViT-B-32"}, {"clip_weights": "openai"},
])
def test_the_key_changes_with_every_setting_of_the_encoder(change):
    base = TINY.replace(layers=(2, 3, 4))
    assert feature_key(base.replace(**change)) != feature_key(base)


@pytest.mark.parametrize("change", [{"lr": 1.0}, {"num_experts": 4, "top_k": 2}, {"alpha": 0.5}, {"epochs": 1},
                                    {"seed": 5}, {"layers": (2, 4)}])
def test_the_key_ignores_the_trainable_part_the_seed_and_layer_subsets(change):
    assert feature_key(TINY.replace(**change)) == feature_key(TINY)


def test_the_key_follows_a_weights_file_by_content_and_the_precision(tmp_path):
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"x")
    config = TINY.replace(clip_weights=str(weights))
    key = feature_key(config)
    weights.write_bytes(b"xy")  # another file at the same path
    assert feature_key(config) != key
    moved = tmp_path / "elsewhere" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.copy(weights, moved)  # the same weights at another path
    assert feature_key(TINY.replace(clip_weights=str(moved))) == feature_key(config)
    assert feature_key(config, "cuda") != feature_key(config, "cpu")


def test_an_edited_encoder_source_is_a_miss(model, root, tmp_path, monkeypatch):
    probe = tmp_path / "code" / "fingerprint_probe.py"
    probe.parent.mkdir()
    probe.write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(probe.parent))
    monkeypatch.setattr(features, "FINGERPRINT_MODULES", features.FINGERPRINT_MODULES + ("fingerprint_probe",))
    cache = FeatureCache(tmp_path / "cache", TINY)
    cache.features(model, dataset(root), 8, "cpu", progress=False)
    before = cache.folder()
    probe.write_text("SCALE = 2\n")  # an edit of the code that computes features
    features.code_fingerprint.cache_clear()
    sys.modules.pop("fingerprint_probe", None)
    assert cache.folder() != before
    computed, encode = [], features.encode
    monkeypatch.setattr(features, "encode", lambda *args, **kw: computed.append(1) or encode(*args, **kw))
    cache.features(model, dataset(root), 8, "cpu", progress=False)
    assert computed and len(entries(cache.folder())) == len(entries(before))


def test_entry_bytes_is_the_size_on_disk(model, root, tmp_path):
    FeatureCache(tmp_path, TINY).features(model, dataset(root), 8, "cpu", progress=False)
    assert {path.stat().st_size for path in entries(tmp_path)} == {entry_bytes(TINY)}
    # ViT-L-14-336 at 518 px, taps 6/12/18/24: 4 x 37 x 37 patch rows + 1 CLS row of 1024 fp16 values
    assert entry_bytes(pmoe.Config.preset("paper")) == (4 * 37 * 37 + 1) * 1024 * 2 + 128


def test_too_little_free_space_refuses_before_writing(model, root, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "free_bytes", lambda folder: 3 * entry_bytes(TINY))
    with pytest.raises(DataError, match=r"needs 0\.0 GB for 12 images.*--cache-dir.*--no-cache"):
        FeatureCache(tmp_path, TINY).features(model, dataset(root), 8, "cpu", progress=False)
    assert not list(tmp_path.rglob("*"))


def test_a_disk_filling_up_midway_names_the_fix(model, root, tmp_path, monkeypatch):
    def full(handle, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features.np, "save", full)
    with pytest.raises(DataError, match="is full.*--cache-dir"):
        FeatureCache(tmp_path, TINY).features(model, dataset(root), 8, "cpu", progress=False)
    assert not entries(tmp_path) and not list(tmp_path.rglob("*.tmp"))


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


def test_pmoe_cache_lists_and_clears(model, root, tmp_path, capsys):
    FeatureCache(tmp_path, TINY).features(model, dataset(root), 8, "cpu", progress=False)
    stale = tmp_path / "0123456789abcdef01234567"
    (stale / "ab").mkdir(parents=True)
    (stale / "ab" / "x.npy").write_bytes(b"0" * 1000)
    (stale / "key.json").write_text(json.dumps({"format": 1, "clip_model": "ViT-L-14-336"}))
    assert cli_main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    current = feature_key(TINY)
    assert f"{current}" in listing and "current" in listing and "stale" in listing
    assert f"{12 * entry_bytes(TINY) / 1e9:.2f} GB" in listing and "2 folder(s)" in listing
    assert cli_main(["cache", "clear", "--stale", "--cache-dir", str(tmp_path)]) == 0
    assert not stale.exists() and (tmp_path / current).is_dir()
    assert cli_main(["cache", "clear", "nope", "--cache-dir", str(tmp_path)]) == 2
    assert "no cache folder nope" in capsys.readouterr().err
    assert cli_main(["cache", "clear", current, "--cache-dir", str(tmp_path)]) == 0
    assert not (tmp_path / current).exists()
    assert cli_main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 2
