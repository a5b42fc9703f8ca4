"""The real architecture: open_clip ViT-L-14-336 at 518 px, built with random weights (offline)."""

import pytest
import torch

import pmoe
from pmoe.backbone import load_clip
from pmoe.cli import main
from reference_model import trainable_parameters

PAPER = pmoe.Config.preset("paper").replace(clip_weights="random")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clip():
    return load_clip(PAPER)


@pytest.fixture(scope="module")
def vitl(clip):
    return pmoe.PromptMoE(PAPER, clip).eval()


def test_518_input_gives_37x37_grids_and_518_maps(vitl):
    with torch.no_grad():
        feats = vitl.encode_image(torch.randn(1, 3, 518, 518))
        out = vitl.forward_features(feats)
    assert feats.patch_tokens.shape == (1, 4, 37 * 37, 1024)
    assert feats.cls_token.shape == (1, 1024)
    assert out["anomaly_map"].shape == (1, 518, 518)
    assert out["layer_maps"].shape == (1, 4, 2, 518, 518)
    assert out["routing"]["indices"].shape == (1, 4, 2, 4)
    assert vitl.visual.positional_embedding.shape == (1 + 37 * 37, 1024)


def test_truncated_text_encoding_equals_full_77_tokens(vitl):
    torch.manual_seed(0)
    states = torch.randn(6, PAPER.normal_len + PAPER.abnormal_len, 768) * 0.02
    context = torch.randn(6, PAPER.ctx_len, 768) * 0.02
    ids = vitl.assembler.class_token_ids(["object", "metal_nut", "pcb1", "object", "pipe_fryum", "screw"])
    with torch.no_grad():
        sequences, eot = vitl.assembler(states, context, ids)
        truncated = vitl.text(sequences, eot)
        vitl.text.truncate = False
        try:
            untruncated = vitl.text(sequences, eot)
        finally:
            vitl.text.truncate = True
    assert int(eot.max()) + 1 < 77
    assert torch.allclose(truncated, untruncated, atol=1e-5)


def test_only_the_prompt_learner_trains_and_describe_prints_counts(vitl, capsys):
    trainable = {name for name, p in vitl.named_parameters() if p.requires_grad}
    assert all(name.startswith(("prompt_learner.vgmop.", "prompt_learner.context")) for name in trainable)
    counts = vitl.parameter_counts()
    assert counts["clip_frozen"] > 400_000_000
    assert main(["describe", "--preset", "paper"]) == 0
    printed = capsys.readouterr().out
    assert f"{counts['trainable']:,d}" in printed and f"{counts['clip_frozen']:,d}" in printed


@pytest.mark.parametrize("vgmop_input, token_width, pinned", [("pre_projection", 1024, 14_499_904),
                                                              ("projected", 768, 11_354_176)])
def test_trainable_parameter_count_of_the_paper_preset(clip, vgmop_input, token_width, pinned):
    """VGMoP's keys and values read 1024-wide tokens before the projection, or the 768-wide projected ones."""
    config = PAPER.replace(vgmop_input=vgmop_input)
    expected = trainable_parameters(config, token_width=token_width, text_width=768)
    assert expected == pinned
    counts = pmoe.PromptMoE(config, clip).parameter_counts()
    assert counts["trainable"] == expected
    assert counts["context"] == config.ctx_len * 768
