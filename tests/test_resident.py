"""Features held in memory: batches equal the collated disk-cache items value for value, they go
where they fit (device, host, or stay on disk), and the data-loading defaults."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import pmoe
from pmoe import resident, runtime
from pmoe.data import AnomalyDataset, build_manifest
from pmoe.data.synthetic import write_dataset
from pmoe.errors import ConfigError
from pmoe.features import CachedFeatures, FeatureCache
from pmoe.resident import ResidentFeatures, batches, held_bytes, hold, placement

TINY = pmoe.Config.preset("tiny")
GiB = 1 << 30


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """synthetic-a (3 images per class, masks) in a disk cache, all four stored taps served."""
    base = tmp_path_factory.mktemp("resident")
    root = write_dataset("synthetic-a", base / "data", n_normal=1, n_anomalous=2, image_size=48)
    dataset = AnomalyDataset(build_manifest("synthetic-a", root), root, TINY.image_size)
    data = FeatureCache(base / "cache", TINY).features(pmoe.build_model(TINY), dataset, 8, "cpu", progress=False)
    return data.with_taps([0, 1, 2, 3])


def collated(data, indices):
    """The reference: the disk cache's items, collated by torch's default_collate."""
    return torch.utils.data.default_collate([data[index] for index in indices])


def assert_same_batch(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if torch.is_tensor(value):
            assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
            assert torch.equal(ours[key].cpu(), value), key
        else:
            assert ours[key] == value, key


@pytest.mark.parametrize("taps", [[0, 1, 2, 3], [3], [1, 3]])
def test_held_batches_equal_the_collated_disk_items(cached, taps):
    held = hold(cached, "cpu")
    assert isinstance(held, ResidentFeatures) and len(held) == len(cached) == 12
    view, disk = held.with_taps(taps), cached.with_taps(taps)
    for indices in ([5, 0, 11], [7], list(range(12))):
        assert_same_batch(view.batch(indices), collated(disk, indices))
    np.testing.assert_array_equal(view.labels, disk.labels)
    item, expected = view[4], disk[4]
    assert item["label"] == expected["label"] and item["path"] == expected["path"]
    assert torch.equal(item["patch_tokens"], expected["patch_tokens"]) and torch.equal(item["mask"], expected["mask"])


def test_holding_only_some_taps_serves_those(cached):
    held = hold(cached.with_taps([1, 3]), "cpu")
    assert held.tokens.shape[1] == 2
    assert_same_batch(held.with_taps([3]).batch([2, 9]), collated(cached.with_taps([3]), [2, 9]))


def test_a_dataset_without_masks_is_held_without_them(cached):
    no_masks = AnomalyDataset(build_manifest("synthetic-a", cached.dataset.root), cached.dataset.root,
                              TINY.image_size, return_mask=False)
    data = CachedFeatures(no_masks, cached.files, cached.stored, [2])
    held = hold(data, "cpu")
    assert held.masks is None and "mask" not in held.batch([0])
    assert_same_batch(held.batch([3, 1]), collated(data, [3, 1]))


def test_batches_index_held_features_and_load_the_others(cached):
    chunks = [[3, 4], [0], [11, 10, 9]]
    loaded = list(batches(cached, chunks))
    direct = list(batches(hold(cached, "cpu"), chunks))
    assert len(loaded) == len(direct) == 3
    for ours, theirs in zip(direct, loaded):
        assert_same_batch(ours, theirs)


def test_held_bytes_count_taps_cls_rows_and_boolean_masks(cached):
    tokens, width = (TINY.image_size // 14) ** 2, 64  # pmoe-tiny: patch 14, width 64
    per_item = (4 * tokens + 1) * width * 2 + TINY.image_size ** 2
    assert held_bytes(cached) == 12 * per_item
    held = hold(cached, "cpu")
    assert held.tokens.nbytes + held.cls_tokens.nbytes + held.masks.nbytes == held_bytes(cached)


def test_placement_prefers_the_device_then_the_host_then_the_disk(monkeypatch):
    free = {"cuda": 8 * GiB, "cpu": 40 * GiB}
    monkeypatch.setattr(resident, "free_memory", lambda device: free[torch.device(device).type])
    assert placement(6 * GiB, "cuda") == torch.device("cuda")  # 6 <= 0.75 * 8
    assert placement(7 * GiB, "cuda") == torch.device("cpu")  # leaves the device less than its headroom
    assert placement(31 * GiB, "cuda") is None
    assert placement(30 * GiB, "cpu") == torch.device("cpu") and placement(31 * GiB, "cpu") is None


def test_features_that_fit_nowhere_stay_on_disk(cached, monkeypatch):
    monkeypatch.setattr(resident, "free_memory", lambda device: held_bytes(cached))  # less the headroom
    assert hold(cached, "cpu") is cached
    images = cached.dataset
    assert hold(images, "cpu") is images  # raw images (no cache) are never held


def test_data_workers_follow_the_device_and_the_cpus(monkeypatch):
    assert runtime.data_workers(3, "cuda") == 3 and runtime.data_workers(0, "cuda") == 0
    assert runtime.data_workers(None, "cpu") == 0
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 16)
    assert runtime.data_workers(None, "cuda") == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes share the 16 cores
    assert runtime.data_workers(None, "cuda") == 3
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert runtime.data_workers(None, "cuda") == runtime.MAX_WORKERS
    with pytest.raises(ConfigError, match="must be >= 0"):
        runtime.data_workers(-1, "cpu")


def test_host_memory_is_shared_by_the_local_processes(monkeypatch):
    monkeypatch.setattr(runtime, "host_available_bytes", lambda: 12 * GiB)
    assert runtime.free_memory("cpu") == 12 * GiB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert runtime.free_memory("cpu") == 4 * GiB


def test_gpu_memory_counts_the_blocks_torch_cached_but_does_not_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 30 * GiB)  # a finished run's cache
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5 * GiB)
    assert runtime.free_memory("cuda:0") == (10 + 30 - 5) * GiB


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="no /proc/meminfo on this OS")
def test_host_available_bytes_is_the_kernels_memavailable():
    expected = int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024
    assert abs(runtime.host_available_bytes() - expected) < 256 * 2 ** 20  # two reads, moments apart
