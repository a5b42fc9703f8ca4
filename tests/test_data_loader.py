"""Image and mask preprocessing against a plain torchvision reference, odd formats, real files."""

import io
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms

from pmoe.data import (CLIP_MEAN, CLIP_STD, AnomalyDataset, DataWarning, build_manifest, load_image,
                       load_mask)
from pmoe.data.images import mask_array
from pmoe.data.twins import write_twin
from pmoe.errors import DataError

SIZE = 64


def reference_image(rgb: Image.Image, size: int) -> torch.Tensor:
    """The protocol written with torchvision, for an image already in 8-bit RGB."""
    return transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])(rgb)


def reference_mask(binary: np.ndarray, size: int) -> torch.Tensor:
    """The protocol's mask path: 0/255 image, bilinear resize, ToTensor, > 0.5."""
    image = Image.fromarray(binary.astype(np.uint8) * 255)
    resized = transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR)(image)
    return (transforms.ToTensor()(resized) > 0.5).float()


def noise(shape, seed=0, high=256, dtype=np.uint8):
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def save(array_or_image, path, **kwargs):
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    image.save(path, **kwargs)
    return path


def test_rgb_matches_torchvision_reference(tmp_path):
    path = save(noise((40, 30, 3)), tmp_path / "rgb.png")
    tensor = load_image(path, SIZE)
    assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, reference_image(Image.open(path).convert("RGB"), SIZE), atol=1e-6, rtol=0)


def test_greyscale_is_replicated(tmp_path):
    path = save(noise((20, 20)), tmp_path / "grey.png")
    tensor = load_image(path, SIZE)
    unnormalised = tensor * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    torch.testing.assert_close(unnormalised[0], unnormalised[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(tensor, reference_image(Image.open(path).convert("RGB"), SIZE), atol=1e-6, rtol=0)


def test_rgba_drops_alpha(tmp_path):
    rgba = noise((20, 20, 4))
    rgba[:10, :, 3] = 0
    path = save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png")
    expected = reference_image(Image.fromarray(rgba[..., :3]), SIZE)
    torch.testing.assert_close(load_image(path, SIZE), expected, atol=1e-6, rtol=0)


def test_palette_is_expanded(tmp_path):
    palette_image = Image.fromarray(noise((20, 20, 3))).quantize(colors=16)
    path = save(palette_image, tmp_path / "palette.png")
    assert Image.open(path).mode == "P"
    expected = reference_image(palette_image.convert("RGB"), SIZE)
    torch.testing.assert_close(load_image(path, SIZE), expected, atol=1e-6, rtol=0)


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    values = noise((20, 20), high=65536, dtype=np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    path = save(values, tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    eight_bit = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    expected = reference_image(Image.fromarray(eight_bit).convert("RGB"), SIZE)
    torch.testing.assert_close(load_image(path, SIZE), expected, atol=1e-6, rtol=0)


def test_truncated_and_missing_files_raise_naming_the_file(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(noise((64, 64, 3))).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*cut\.jpg.*re-download it, or remove it"):
        load_image(path, SIZE)
    with pytest.raises(DataError, match=r"none\.png is missing"):
        load_image(tmp_path / "none.png", SIZE)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png"):
        load_image(tmp_path / "text.png", SIZE)


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "P", "I;16"])
def test_any_nonzero_mask_pixel_is_anomalous(tmp_path, mode):
    values = np.zeros((30, 20), dtype=np.uint8)
    values[5:15, 4:12] = 1  # VisA masks use small values such as 1
    values[20:28, 2:6] = 200
    image = Image.fromarray(values.astype(np.uint16) if mode == "I;16" else values)
    if mode == "P":
        image = image.convert("P")
    elif mode != "I;16":
        image = image.point(lambda v: 255 if v else 0).convert(mode) if mode == "1" else image.convert(mode)
    path = save(image, tmp_path / "mask.png")
    torch.testing.assert_close(load_mask(path, SIZE), reference_mask(values > 0, SIZE))


def test_jpeg_masks_are_thresholded_at_half(real_fixtures):
    for path in sorted((real_fixtures / "Kvasir-SEG" / "masks").glob("*.jpg")):
        raw = np.asarray(Image.open(path)).max(axis=2)
        assert ((raw > 0) & (raw < 128)).any(), "fixture should carry compression noise"
        np.testing.assert_array_equal(mask_array(Image.open(path)), raw > 127)


def test_mask_size_mismatch_is_an_error_unless_allowed(tmp_path):
    root = write_twin("colondb", tmp_path / "colondb").root
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(root / "masks" / "1.png")
    dataset = AnomalyDataset(build_manifest("colondb", root), root, image_size=SIZE)
    with pytest.raises(DataError, match=r"masks/1.png is 10x10 but its image is 12x12.*allow_mask_resize"):
        dataset[0]
    resized = AnomalyDataset(build_manifest("colondb", root), root, image_size=SIZE, allow_mask_resize=True)
    assert resized[0]["mask"].min() == 1


def test_dataset_items_and_return_mask_switch(tmp_path):
    root = write_twin("mvtec", tmp_path / "mvtec").root
    frame = build_manifest("mvtec", root)
    dataset = AnomalyDataset(frame, root, image_size=SIZE)
    first_normal = int(np.argmin(dataset.labels))
    normal, anomalous = dataset[first_normal], dataset[int(np.argmax(dataset.labels))]
    assert set(normal) == {"image", "mask", "label", "cls", "path", "crop"}
    assert normal["mask"].shape == (1, SIZE, SIZE) and normal["mask"].sum() == 0 and normal["label"] == 0
    assert anomalous["label"] == 1 and anomalous["mask"].sum() > 0
    assert set(anomalous["mask"].unique().tolist()) == {0.0, 1.0}
    assert normal["path"] == frame["image"].iloc[first_normal] and normal["cls"] == "carpet"
    light = AnomalyDataset(frame, root, image_size=SIZE, return_mask=False)
    assert "mask" not in light[first_normal]
    torch.testing.assert_close(light[first_normal]["image"], normal["image"])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and len(batch["path"]) == 4


def test_sdd_crop_cuts_image_and_mask_bands(tmp_path):
    root = write_twin("sdd", tmp_path / "sdd").root
    frame = build_manifest("sdd", root)
    dataset = AnomalyDataset(frame, root, image_size=SIZE)
    row = int(np.flatnonzero((frame["image"] == "kos02/Part0.jpg") & (frame["crop"] == "1/3"))[0])
    item = dataset[row]
    whole = Image.open(root / "kos02/Part0.jpg")
    band = whole.convert("RGB").crop((0, 10, 12, 20))
    torch.testing.assert_close(item["image"], reference_image(band, SIZE), atol=1e-6, rtol=0)
    label = np.asarray(Image.open(root / "kos02/Part0_label.bmp"))[10:20] > 0
    torch.testing.assert_close(item["mask"], reference_mask(label, SIZE))


def test_every_real_fixture_file_loads(real_fixtures):
    for name, folder in (("dagm", "DAGM_KaggleUpload"), ("kvasir", "Kvasir-SEG")):
        root = real_fixtures / folder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # DAGM: 9 of 10 classes absent
            frame = build_manifest(name, root)
        dataset = AnomalyDataset(frame, root)
        for index in range(len(dataset)):
            item = dataset[index]
            assert item["image"].shape == (3, 518, 518) and torch.isfinite(item["image"]).all()
            assert (item["mask"].sum() > 0) == bool(item["label"])


def test_dataset_root_must_exist(tmp_path):
    frame = pd.DataFrame({"image": ["a.png"], "mask": [""], "cls": ["x"], "label": [0], "defect": ["good"]})
    with pytest.raises(DataError, match="is not a folder"):
        AnomalyDataset(frame, tmp_path / "missing")
