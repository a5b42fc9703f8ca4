"""Frozen-CLIP weights files: OpenAI's TorchScript archives give the model they describe, state
dicts are read without unpickling objects, bad files are clear errors, and a random CLIP is
built without open_clip's 'No pretrained weights loaded' warning."""

import logging
import warnings
import zipfile

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import pmoe
from pmoe.backbone import load_clip
from pmoe.clip_weights import is_torchscript_archive, refused_global
from pmoe.config import Config
from pmoe.errors import CheckpointError

TINY = Config.preset("tiny").replace(quick_gelu=True)  # QuickGELU, as OpenAI's models
VISION_LAYERS, TEXT_LAYERS = 4, 2  # pmoe-tiny
NO_WEIGHTS = "No pretrained weights loaded"


def openai_parameter_names(vision_layers: int, text_layers: int) -> list:
    """The parameter names of OpenAI's CLIP ViT (the `CLIP` class of openai/CLIP), written out by hand."""
    block = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias"]
    visual = ["visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
              "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias"]
    text = ["positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
            "ln_final.weight", "ln_final.bias"]
    return (visual + text
            + [f"visual.transformer.resblocks.{i}.{name}" for i in range(vision_layers) for name in block]
            + [f"transformer.resblocks.{i}.{name}" for i in range(text_layers) for name in block])


def is_half_in_openai_files(name: str) -> bool:
    """OpenAI's files store convolution, linear and attention weights and the projections in float16."""
    return name.endswith(("conv1.weight", "text_projection", "visual.proj")) or ".attn." in name or ".mlp." in name


def save_openai_archive(state: dict, path, vision_layers: int = VISION_LAYERS) -> None:
    """A TorchScript archive laid out as OpenAI's released .pt files: a scripted module holding the
    tensors of ``state`` under OpenAI's names (float16 where OpenAI's are) and its metadata entries."""
    root = nn.Module()
    for name in openai_parameter_names(vision_layers, TEXT_LAYERS):
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        tensor = state[name].half() if is_half_in_openai_files(name) else state[name]
        module.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))
    for key, value in (("input_resolution", 84), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
        torch.jit.script(root).save(str(path))


@pytest.fixture(scope="module")
def source():
    """A tiny CLIP whose weights are float16 values (as OpenAI's file holds), seeded apart from TINY."""
    torch.manual_seed(123)
    clip = open_clip.create_model(TINY.clip_model, pretrained=None, force_quick_gelu=True).eval()
    with torch.no_grad():
        for tensor in clip.state_dict().values():
            tensor.copy_(tensor.half().float())
    return clip.requires_grad_(False)


@pytest.fixture(scope="module")
def archive(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "ViT-tiny.pt"
    save_openai_archive(source.state_dict(), path)
    return path


def test_open_clip_keeps_openai_parameter_names(source):
    assert sorted(source.state_dict()) == sorted(openai_parameter_names(VISION_LAYERS, TEXT_LAYERS))


def test_openai_archive_gives_the_model_it_describes(source, archive):
    from_file = pmoe.build_model(TINY.replace(clip_weights=str(archive))).eval()
    reference = pmoe.PromptMoE(TINY, source).eval()
    reference.load_trainable_state_dict(from_file.trainable_state_dict())
    images = torch.randn(2, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = from_file.encode_image(images), reference.encode_image(images)
        out, reference_out = from_file(images), reference(images)
    assert torch.equal(got.patch_tokens, expected.patch_tokens) and torch.equal(got.cls_token, expected.cls_token)
    for key in ("text_features", "anomaly_map", "score"):
        assert torch.equal(out[key], reference_out[key]), key


def test_archives_are_told_apart_from_state_dicts_by_their_entries(source, archive, tmp_path):
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "state.pt")
    save_file(state, str(tmp_path / "state.safetensors"))
    assert is_torchscript_archive(archive)
    assert any(name.endswith("/constants.pkl") for name in zipfile.ZipFile(archive).namelist())
    assert not is_torchscript_archive(tmp_path / "state.pt")
    assert not is_torchscript_archive(tmp_path / "state.safetensors")


def test_archive_of_another_architecture_names_the_problem_and_the_fix(source, tmp_path):
    path = tmp_path / "shallower.pt"
    save_openai_archive(source.state_dict(), path, vision_layers=VISION_LAYERS - 1)
    with pytest.raises(CheckpointError, match=r"does not match the pmoe-tiny architecture \(.*Missing key") as info:
        load_clip(TINY.replace(clip_weights=str(path)))
    assert str(path) in str(info.value) and "set clip_model to the file's architecture" in str(info.value)


def test_state_dict_files_never_unpickle_objects(source, tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    state = dict(source.state_dict())
    state["payload"] = Payload()
    torch.save(state, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_clip(TINY.replace(clip_weights=str(tmp_path / "unsafe.pt")))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_unreadable_weights_file_is_a_clear_error(archive, tmp_path, damage):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not a checkpoint" if damage == "junk" else archive.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cannot read CLIP weights file .*download it again"):
        load_clip(TINY.replace(clip_weights=str(path)))


def test_random_clip_is_built_without_the_no_weights_warning(caplog):
    caplog.set_level(logging.WARNING)
    open_clip.create_model(TINY.clip_model, pretrained=None)
    assert any(record.getMessage().startswith(NO_WEIGHTS) for record in caplog.records), "open_clip's warning"
    caplog.clear()
    filters = list(logging.getLogger().filters)
    load_clip(TINY)
    assert not any(NO_WEIGHTS in record.getMessage() for record in caplog.records)
    assert logging.getLogger().filters == filters


def test_only_the_no_weights_record_is_dropped(monkeypatch, caplog):
    real = open_clip.create_model

    def create_model(name, **kwargs):
        logging.warning(f"{NO_WEIGHTS} for model '{name}'. Model initialized randomly.")
        logging.warning("another warning")
        return real(name, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", create_model)
    caplog.set_level(logging.WARNING)
    load_clip(TINY)
    assert [record.getMessage() for record in caplog.records] == ["another warning"]


def test_refused_global_names_the_object_a_weights_only_load_refused(tmp_path):
    import pickle

    path = tmp_path / "object.pt"
    torch.save({"weights": torch.zeros(1), "object": zipfile.ZipInfo("x")}, path)
    with pytest.raises(pickle.UnpicklingError) as refused:
        torch.load(path, weights_only=True)
    assert refused_global(refused.value) == "zipfile.ZipInfo"
    assert refused_global(pickle.UnpicklingError("invalid load key, 'x'.")) is None
    assert refused_global(ValueError("GLOBAL os.system")) is None
