"""AnomalyCLIP's prompt learner against a step-by-step reference of their text path, their
checkpoint format, their published numbers, and the written prompt ensemble."""

import argparse
import statistics

import open_clip
import pytest
import torch
import torch.nn.functional as F

import pmoe
from pmoe import paper
from pmoe.anomalyclip import (AnomalyCLIPPromptLearner, checkpoint_shapes, load_checkpoint, load_published,
                              save_checkpoint)
from pmoe.backbone import load_clip
from pmoe.data.registry import DATASETS
from pmoe.errors import CheckpointError, ConfigError, DataError
from pmoe.tables import METRIC_LABELS
from pmoe.zero_shot_prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, ensemble_text_features, state_sentences
from reference_model import DEPTH, N_CTX, reference_features, their_state, their_texts

TINY_DEEP = pmoe.Config.preset("tiny").replace(clip_model="pmoe-tiny-deep")  # 12 text layers, width 64


@pytest.fixture(scope="module")
def clip():
    return load_clip(TINY_DEEP)


def randomised(learner, seed=0):
    """Give the learnable tensors values large enough that every deep set visibly matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in (learner.normal_context, learner.abnormal_context, learner.deep_tokens):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return learner


# --- the deep-token text path ------------------------------------------------------------------

def ours_and_reference(clip, learner) -> tuple:
    """The learner's F_T and the step-by-step reference's, from the same tensors."""
    tokens = open_clip.tokenize(their_texts())
    with torch.no_grad():
        embedded = clip.token_embedding(tokens)
        context = torch.stack([learner.normal_context, learner.abnormal_context])
        reference = reference_features(clip, embedded[:, :1], context, embedded[:, 1 + N_CTX:],
                                       list(learner.deep_tokens), tokens)
        return learner(), reference


@pytest.mark.parametrize("truncate", [True, False])
def test_text_features_equal_the_step_by_step_reference(clip, truncate):
    ours, reference = ours_and_reference(clip, randomised(AnomalyCLIPPromptLearner(clip, truncate=truncate)))
    assert ours.shape == (2, 64)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_every_learnable_tensor_gets_gradient_and_clip_stays_frozen(clip):
    learner = randomised(AnomalyCLIPPromptLearner(clip))
    learner()[:, 0].sum().backward()
    assert learner.normal_context.grad.abs().sum() > 0 and learner.abnormal_context.grad.abs().sum() > 0
    per_set = learner.deep_tokens.grad.abs().sum(dim=(1, 2))
    assert per_set.shape == (DEPTH - 1,) and (per_set > 0).all()
    trainable = {name for name, parameter in learner.named_parameters() if parameter.requires_grad}
    assert trainable == {"normal_context", "abnormal_context", "text.transformer.tokens"}


@pytest.mark.slow
def test_vit_l_text_tower_matches_the_reference_and_their_checkpoint_shapes():
    """ViT-L-14-336 with random weights: width 768, 12 text blocks, their exact settings."""
    vitl = load_clip(pmoe.Config.preset("paper").replace(clip_weights="random"))
    learner = randomised(AnomalyCLIPPromptLearner(vitl))
    ours, reference = ours_and_reference(vitl, learner)
    assert ours.shape == (2, 768)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert learner.checkpoint_shapes() == checkpoint_shapes(768)


@pytest.mark.parametrize("settings", [{"depth": 13}, {"depth": 0}, {"deep_len": 13}])
def test_settings_the_text_tower_cannot_hold_are_refused(clip, settings):
    with pytest.raises(ConfigError, match="depth"):
        AnomalyCLIPPromptLearner(clip, **settings)


# --- their checkpoint format -------------------------------------------------------------------

def save(content, path):
    torch.save(content, path)
    return path


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_their_checkpoint_gives_the_features_of_its_saved_tensors(clip, tmp_path, dtype, atol):
    """fp16 is what their CUDA training saves; its frozen buffers are rounded, hence the tolerance."""
    state = their_state(clip, dtype=dtype)
    learner = load_checkpoint(AnomalyCLIPPromptLearner(clip), save({"prompt_learner": state}, tmp_path / "e.pth"))
    saved = {key: value.float() for key, value in state.items()}
    prefix = torch.cat([saved["token_prefix_pos"][0], saved["token_prefix_neg"][0]])
    suffix = torch.cat([saved["token_suffix_pos"][0], saved["token_suffix_neg"][0]])
    context = torch.cat([saved["ctx_pos"][0], saved["ctx_neg"][0]])
    deep = [saved[f"compound_prompts_text.{index}"] for index in range(DEPTH - 1)]
    tokens = torch.cat([state["tokenized_prompts_pos"][0], state["tokenized_prompts_neg"][0]]).long()
    with torch.no_grad():
        reference = reference_features(clip, prefix, context, suffix, deep, tokens)
        ours = learner()
    assert torch.equal(learner.normal_context, saved["ctx_pos"][0, 0])
    assert torch.allclose(ours, reference, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_writer_lays_out_their_format_and_reads_back(clip, tmp_path, dtype):
    learner = randomised(AnomalyCLIPPromptLearner(clip))
    path = save_checkpoint(learner, tmp_path / "9_12_4_multiscale" / "epoch_15.pth", dtype=dtype)
    state = torch.load(path, weights_only=True)["prompt_learner"]
    theirs = their_state(clip)  # their layout, written independently of pmoe
    assert {key: tuple(value.shape) for key, value in state.items()} == \
        {key: tuple(value.shape) for key, value in theirs.items()}
    assert all(value.dtype == (dtype if theirs[key].is_floating_point() else torch.int32)
               for key, value in state.items())
    for key in ("tokenized_prompts_pos", "tokenized_prompts_neg"):
        assert torch.equal(state[key], theirs[key])
    for key in ("token_prefix_pos", "token_suffix_pos", "token_prefix_neg", "token_suffix_neg"):
        assert torch.equal(state[key], theirs[key].to(dtype))
    assert torch.equal(state["ctx_neg"][0, 0], learner.abnormal_context.detach().to(dtype))
    assert torch.equal(state["compound_prompts_text.7"], learner.deep_tokens[7].detach().to(dtype))
    reread = load_checkpoint(AnomalyCLIPPromptLearner(clip), path)
    with torch.no_grad():
        assert torch.allclose(reread(), learner(), atol=1e-6 if dtype == torch.float32 else 2e-3)


def test_the_vit_l_checkpoint_keys_and_shapes():
    expected = {
        "ctx_pos": (1, 1, 12, 768), "ctx_neg": (1, 1, 12, 768),
        "token_prefix_pos": (1, 1, 1, 768), "token_prefix_neg": (1, 1, 1, 768),
        "token_suffix_pos": (1, 1, 64, 768), "token_suffix_neg": (1, 1, 64, 768),
        "tokenized_prompts_pos": (1, 1, 77), "tokenized_prompts_neg": (1, 1, 77),
    }
    for index in range(8):
        expected[f"compound_prompts_text.{index}"] = (4, 768)
        expected[f"compound_prompt_projections.{index}.weight"] = (896, 768)
        expected[f"compound_prompt_projections.{index}.bias"] = (896,)
    assert checkpoint_shapes(768) == expected


def test_wrong_keys_name_the_missing_and_unexpected_ones(clip, tmp_path):
    state = their_state(clip)
    state["bogus"] = state.pop("ctx_neg")
    with pytest.raises(CheckpointError, match=r"missing keys \['ctx_neg'\], unexpected keys \['bogus'\]"):
        load_checkpoint(AnomalyCLIPPromptLearner(clip), save({"prompt_learner": state}, tmp_path / "e.pth"))


def test_a_checkpoint_of_another_depth_is_refused(clip, tmp_path):
    path = save({"prompt_learner": their_state(clip)}, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \[.*'compound_prompts_text\.4'"):
        load_checkpoint(AnomalyCLIPPromptLearner(clip, depth=5), path)


@pytest.mark.parametrize("value, shown", [(torch.zeros(1, 1, 12, 768), r"\(1, 1, 12, 768\)"), ([1.0, 2.0], "list")])
def test_wrong_shapes_name_the_key_and_both_shapes(clip, tmp_path, value, shown):
    state = their_state(clip)
    state["ctx_pos"] = value
    with pytest.raises(CheckpointError, match=rf"ctx_pos has shape {shown}, expected \(1, 1, 12, 64\)"):
        load_checkpoint(AnomalyCLIPPromptLearner(clip), save({"prompt_learner": state}, tmp_path / "e.pth"))


@pytest.mark.parametrize("content, message", [
    ([torch.zeros(2)], "expected a dict with a 'prompt_learner' state dict, found list"),
    ({"state_dict": {"ctx_pos": torch.zeros(2)}}, r"found keys \['state_dict'\]"),
    ({"prompt_learner": {}, "args": argparse.Namespace(depth=9)}, r"pickled Python object \(argparse.Namespace\)"),
])
def test_files_that_are_not_their_checkpoint_are_clear_errors(clip, tmp_path, content, message):
    path = save(content, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(AnomalyCLIPPromptLearner(clip), path)


def test_missing_and_unreadable_files_are_clear_errors(clip, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(AnomalyCLIPPromptLearner(clip), tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth is not a readable torch checkpoint"):
        load_checkpoint(AnomalyCLIPPromptLearner(clip), junk)


def test_frozen_buffers_of_other_clip_weights_are_refused_unless_told(clip, tmp_path):
    other = load_clip(TINY_DEEP)
    with torch.no_grad():
        other.token_embedding.weight.add_(0.1)  # the word embeddings of other CLIP weights
    path = save({"prompt_learner": their_state(other)}, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match="other CLIP weights"):
        load_checkpoint(AnomalyCLIPPromptLearner(clip), path)
    learner = load_checkpoint(AnomalyCLIPPromptLearner(clip), path, check_frozen=False)
    assert torch.equal(learner.deep_tokens[7], their_state(other)["compound_prompts_text.7"])


def test_token_ids_of_another_prompt_are_refused(clip, tmp_path):
    path = save({"prompt_learner": their_state(clip)}, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match="tokenized_prompts_pos"):
        load_checkpoint(AnomalyCLIPPromptLearner(clip, class_name="bottle"), path)


# --- their published numbers -------------------------------------------------------------------

PRINTED_MEANS = {  # the "mean" rows of their two log.txt files
    "mvtec": {"pixel_auroc": 91.1, "pro": 81.4, "image_auroc": 91.6, "image_ap": 96.4},
    "visa": {"pixel_auroc": 95.5, "pro": 86.7, "image_auroc": 82.0, "image_ap": 85.3},
}


def test_published_numbers_cover_every_class_and_metric_once():
    frame = load_published()
    assert set(frame["metric"]) <= set(METRIC_LABELS)
    assert not frame.duplicated(["dataset", "cls", "metric"]).any()
    for dataset, train_set in [("mvtec", "visa"), ("visa", "mvtec")]:
        rows = load_published(dataset)
        assert set(rows["cls"]) == set(DATASETS[dataset].classes) | {"mean"}
        assert len(rows) == 4 * (len(DATASETS[dataset].classes) + 1)
        assert set(rows["train_set"]) == {train_set}
        assert rows["value"].between(0, 100).all()


@pytest.mark.parametrize("dataset", ["mvtec", "visa"])
def test_printed_means_follow_from_the_per_class_rows(dataset):
    """Each printed value is rounded to 0.05, the printed mean too: they may differ by up to 0.1."""
    rows = load_published(dataset)
    for metric, printed in PRINTED_MEANS[dataset].items():
        per_metric = rows[rows["metric"] == metric]
        stored = per_metric.loc[per_metric["cls"] == "mean", "value"].item()
        computed = statistics.mean(per_metric.loc[per_metric["cls"] != "mean", "value"])
        assert stored == printed
        assert abs(computed - printed) <= 0.1, (metric, computed, printed)


def test_logged_means_are_within_0_3_of_the_papers_anomalyclip_row():
    """The PromptMoE paper cites AnomalyCLIP's paper; the log of the released checkpoints differs by
    up to 0.3 (VisA PRO 86.7 logged, 87.0 in Table 1)."""
    table1 = paper.load_paper(1)
    cited = table1[table1["method"] == "AnomalyCLIP"].set_index(["dataset", "metric"])["value"]
    means = load_published().query("cls == 'mean'")
    gaps = {(row.dataset, row.metric): abs(row.value - cited[row.dataset, row.metric]) for row in means.itertuples()}
    assert len(gaps) == 8
    assert max(gaps.values()) == pytest.approx(0.3)
    assert gaps["mvtec", "pixel_auroc"] == 0 and gaps["visa", "pixel_auroc"] == 0


def test_a_dataset_without_published_numbers_is_a_clear_error():
    with pytest.raises(DataError, match="no published AnomalyCLIP numbers for 'btad'"):
        load_published("btad")


# --- the written prompt ensemble ---------------------------------------------------------------

def test_sentences_put_every_phrase_in_every_template():
    normal, abnormal = state_sentences("metal_nut")
    assert len(normal) == len(NORMAL_STATES) * len(TEMPLATES) and len(abnormal) == len(ABNORMAL_STATES) * len(TEMPLATES)
    assert "a photo of a metal nut." in normal
    assert all("metal nut" in sentence for sentence in normal + abnormal)
    assert not set(normal) & set(abnormal)


def test_ensemble_features_equal_the_mean_of_hand_encoded_sentences(clip):
    ours = ensemble_text_features(clip, "metal_nut")
    reference = []
    with torch.no_grad():
        for sentences in state_sentences("metal_nut"):
            tokens = open_clip.tokenize(sentences)
            x = clip.token_embedding(tokens) + clip.positional_embedding
            for block in clip.transformer.resblocks:
                x = block(x, attn_mask=clip.attn_mask)
            x = clip.ln_final(x)[torch.arange(len(sentences)), tokens.argmax(dim=-1)] @ clip.text_projection
            reference.append(F.normalize(F.normalize(x, dim=-1).mean(dim=0), dim=0))
    assert torch.allclose(ours, torch.stack(reference), atol=1e-5)


def test_ensemble_is_deterministic_normalised_and_separates_the_states(clip):
    first = ensemble_text_features(clip)
    second = ensemble_text_features(load_clip(TINY_DEEP))
    assert torch.equal(first, second)
    assert torch.allclose(first.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert not torch.allclose(first[0], first[1], atol=1e-3)
