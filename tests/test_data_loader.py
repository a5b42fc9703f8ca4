"""Image and mask preprocessing against a plain torchvision reference, odd formats, real files."""

import io
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms

from pmoe import Config
from pmoe.data import (CLIP_MEAN, CLIP_STD, AnomalyDataset, DataWarning, build_manifest, load_image,
                       load_mask)
from pmoe.data.images import mask_array, open_image
from pmoe.data.loader import image_tensor, mask_tensor
from pmoe.data.twins import write_twin
from pmoe.errors import ConfigError, DataError
from pmoe.features import FeatureCache
from pmoe.training import feature_dataset

SIZE = 64


def reference_image(image: Image.Image, size: int) -> torch.Tensor:
    """The reference's preprocessing written with torchvision: bicubic resize of the image as
    decoded (its own mode), then conversion to RGB, ToTensor, CLIP normalisation."""
    return transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.Lambda(lambda resized: resized.convert("RGB")),
        transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])(image)


def eight_bit(tensor: torch.Tensor) -> np.ndarray:
    """A preprocessed (3, S, S) tensor back to 8-bit RGB values (S, S, 3)."""
    unnormalised = tensor * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    return np.rint(unnormalised.permute(1, 2, 0).numpy() * 255).astype(np.int64)


def grey(rgb: np.ndarray) -> np.ndarray:
    """8-bit grey of RGB values by hand: ITU-R 601-2 luma (PIL's "L"), rounded."""
    return np.floor(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114 + 0.5)


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
    torch.testing.assert_close(tensor, reference_image(Image.open(path), SIZE), atol=1e-6, rtol=0)


def test_greyscale_is_replicated(tmp_path):
    path = save(noise((20, 20)), tmp_path / "grey.png")
    pixels = eight_bit(load_image(path, SIZE))
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    torch.testing.assert_close(load_image(path, SIZE), reference_image(Image.open(path), SIZE), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode,suffix", [("L", ".png"), ("LA", ".png"), ("RGBA", ".png"), ("P", ".png"),
                                         ("1", ".png"), ("CMYK", ".jpg"), ("RGB", ".bmp")])
def test_images_are_resized_in_their_own_mode_then_converted_as_the_reference(tmp_path, mode, suffix):
    rgba = noise((23, 17, 4), seed=3)
    rgba[:, :8, 3] = 0
    source = Image.fromarray(rgba, "RGBA") if mode in ("LA", "RGBA") else Image.fromarray(rgba[..., :3])
    path = save(source.convert(mode), tmp_path / f"image{suffix}")
    assert Image.open(path).mode == mode
    torch.testing.assert_close(load_image(path, SIZE), reference_image(Image.open(path), SIZE), atol=1e-6, rtol=0)


def test_rgba_is_resized_with_premultiplied_alpha_then_alpha_dropped(tmp_path):
    """Hand values: transparent red beside opaque blue. Resized with premultiplied alpha, the red
    never bleeds into the result and the fully transparent part is black (converting first
    would keep it red)."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 0)
    rgba[:, 16:] = (0, 0, 255, 255)
    pixels = eight_bit(load_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"), SIZE))
    assert (pixels[..., 0] == 0).all() and (pixels[..., 1] == 0).all()
    assert (pixels[:, :SIZE // 2 - 4] == 0).all() and (pixels[:, SIZE // 2 + 4:, 2] == 255).all()


def test_palette_images_are_resized_by_nearest_neighbour(tmp_path):
    """PIL resizes palette images by nearest neighbour, so every pixel keeps a palette colour."""
    palette_image = Image.fromarray(noise((20, 20, 3))).quantize(colors=16)
    path = save(palette_image, tmp_path / "palette.png")
    assert Image.open(path).mode == "P"
    colours = {tuple(colour) for colour in np.asarray(palette_image.convert("RGB")).reshape(-1, 3)}
    pixels = eight_bit(load_image(path, SIZE)).reshape(-1, 3)
    assert {tuple(pixel) for pixel in pixels} <= colours
    converted_first = reference_image(palette_image.convert("RGB"), SIZE)
    assert not torch.allclose(load_image(path, SIZE), converted_first, atol=1e-3)


def _sixteen_bit():
    values = noise((20, 30), high=65536, dtype=np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    return values


def _hand_sixteen_bit(values: np.ndarray) -> np.ndarray:
    """Float resize of the 16-bit values, then /257 rounded and clipped: 8-bit (S, S)."""
    resized = np.asarray(Image.fromarray(values.astype(np.float32)).resize((SIZE, SIZE), Image.BICUBIC))
    return np.clip(np.rint(resized / 257.0), 0, 255)


def test_16bit_png_is_resized_then_scaled_to_8bit(tmp_path):
    values = _sixteen_bit()
    path = save(values, tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    pixels = eight_bit(load_image(path, SIZE))
    assert (pixels[..., 0] == pixels[..., 2]).all()
    assert np.abs(pixels[..., 0] - _hand_sixteen_bit(values)).max() <= 1  # integer vs float resize


def test_big_endian_16bit_images_equal_little_endian_ones():
    values = _sixteen_bit()
    big = Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())
    little = Image.frombytes("I;16", values.shape[::-1], values.astype("<u2").tobytes())
    torch.testing.assert_close(image_tensor(big, SIZE), image_tensor(little, SIZE), atol=0, rtol=0)


def test_pa_images_are_resized_as_rgba():
    palette_alpha = Image.fromarray(noise((20, 20, 4)), "RGBA").convert("PA")
    expected = reference_image(palette_alpha.convert("RGBA"), SIZE)
    torch.testing.assert_close(image_tensor(palette_alpha, SIZE), expected, atol=1e-6, rtol=0)


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


def test_colour_masks_are_judged_on_their_grey_value(tmp_path):
    """As the reference (convert("L") > 0): a faint blue pixel (0, 0, 1) has grey 0."""
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0], rgb[1, 1], rgb[2, 2] = (0, 0, 1), (0, 0, 5), (2, 0, 0)
    expected = grey(rgb.astype(np.int64)) > 0
    assert expected.sum() == 2 and not expected[0, 0]
    np.testing.assert_array_equal(mask_array(Image.open(save(rgb, tmp_path / "colour.png"))), expected)


KVASIR_RULES = {"nonzero": 0, "jpeg_above_127": 127}


@pytest.mark.parametrize("rule,threshold", KVASIR_RULES.items())
def test_real_jpeg_masks_under_each_rule(real_fixtures, rule, threshold):
    """Kvasir-SEG's JPEG masks: grey (by hand) > 0 by default, > 127 with the JPEG rule."""
    for path in sorted((real_fixtures / "Kvasir-SEG" / "masks").glob("*.jpg")):
        values = grey(np.asarray(Image.open(path)).astype(np.int64))
        assert ((values > 0) & (values < 128)).any(), "fixture should carry compression noise"
        np.testing.assert_array_equal(mask_array(Image.open(path), rule), values > threshold)
        torch.testing.assert_close(load_mask(path, SIZE, mask_rule=rule), reference_mask(values > threshold, SIZE))


def test_the_jpeg_rule_leaves_png_masks_alone(tmp_path):
    values = np.zeros((30, 20), dtype=np.uint8)
    values[5:15, 4:12] = 1
    path = save(values, tmp_path / "mask.png")
    for rule in KVASIR_RULES:
        torch.testing.assert_close(load_mask(path, SIZE, mask_rule=rule), reference_mask(values > 0, SIZE))


def test_dataset_masks_follow_the_mask_rule(real_fixtures):
    root = real_fixtures / "Kvasir-SEG"
    frame = build_manifest("kvasir", root)
    nonzero, jpeg = (AnomalyDataset(frame, root, SIZE, mask_rule=rule)[0]["mask"] for rule in KVASIR_RULES)
    assert jpeg.sum() < nonzero.sum() and (jpeg <= nonzero).all()
    with pytest.raises(ConfigError, match="unknown mask rule 'above_0'.*jpeg_above_127"):
        AnomalyDataset(frame, root, SIZE, mask_rule="above_0")
    with pytest.raises(ConfigError, match="mask_rule"):
        Config(mask_rule="above_0")
    assert Config().mask_rule == "nonzero"


def test_a_models_training_data_uses_its_mask_rule(real_fixtures):
    model = SimpleNamespace(config=Config.preset("tiny").replace(mask_rule="jpeg_above_127"))
    root = real_fixtures / "Kvasir-SEG"
    dataset = feature_dataset(FeatureCache(None, model.config), model, build_manifest("kvasir", root), root,
                              "cpu", 0, False)
    assert dataset.mask_rule == "jpeg_above_127"


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
    with pytest.warns(DataWarning, match="NOT comparable with Table 1"):
        frame = build_manifest("sdd", root)
    dataset = AnomalyDataset(frame, root, image_size=SIZE)
    row = int(np.flatnonzero((frame["image"] == "kos02/Part0.jpg") & (frame["crop"] == "1/3"))[0])
    item = dataset[row]
    band = Image.open(root / "kos02/Part0.jpg").crop((0, 10, 12, 20))
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


def test_the_two_mask_rules_on_the_real_kvasir_masks(real_fixtures):
    """The numbers data_manifests/README.md quotes: on the five real Kvasir-SEG JPEG masks the rules
    differ on 1084-3679 pixels at full resolution (0.26-0.74 %) and on 373-1803 at 518 x 518."""
    full, resized, shares = [], [], []
    for path in sorted((real_fixtures / "Kvasir-SEG" / "masks").glob("*.jpg")):
        image = open_image(path)
        nonzero, above = mask_array(image, "nonzero"), mask_array(image, "jpeg_above_127")
        assert not (above & ~nonzero).any()  # the JPEG rule only ever removes noise pixels
        full.append(int((nonzero != above).sum()))
        shares.append(full[-1] / nonzero.size)
        resized.append(int((mask_tensor(image, 518, mask_rule="nonzero")
                            != mask_tensor(image, 518, mask_rule="jpeg_above_127")).sum()))
    assert len(full) == 5
    assert (min(full), max(full)) == (1084, 3679) and (min(resized), max(resized)) == (373, 1803)
    assert (round(100 * min(shares), 2), round(100 * max(shares), 2)) == (0.26, 0.74)
