"""The PromptMoE model on the tiny CLIP: equations 2-7 against hand-written references."""

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

import pmoe
from pmoe.backbone import load_clip, vv_attention
from pmoe.losses import balance_loss, decouple_loss, total_loss
from pmoe.maps import gaussian_smooth
from pmoe.vgmop import QueryAttention, Routing, aggregate, route

TINY = pmoe.Config.preset("tiny")


@pytest.fixture(scope="module")
def model():
    return pmoe.build_model(TINY)


def images(count, size=TINY.image_size, seed=0):
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- Eq. 2-3: cross-attention, routing, aggregation -----------------------------------------

def test_routing_weights_sum_to_one_with_exactly_k_nonzero():
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    routing = route(logits, top_k=3)
    dense = torch.zeros_like(logits).scatter(1, routing.indices, routing.weights)
    assert torch.allclose(dense.sum(dim=1), torch.ones(64))
    assert ((dense > 0).sum(dim=1) == 3).all()
    for row in range(64):  # reference: sort, keep the k largest, softmax over them
        order = sorted(range(8), key=lambda j: -float(logits[row, j]))[:3]
        top = torch.tensor([float(logits[row, j]) for j in order])
        assert routing.indices[row].tolist() == order
        assert torch.allclose(routing.weights[row], torch.exp(top) / torch.exp(top).sum())
    assert torch.allclose(routing.probs, logits.softmax(dim=1))


def test_aggregate_is_the_weighted_sum_of_selected_experts():
    experts = torch.randn(6, 5, 16)
    routing = route(torch.randn(4, 6), top_k=2)
    expected = torch.stack([
        sum(routing.weights[b, i] * experts[routing.indices[b, i]] for i in range(2)) for b in range(4)
    ])
    assert torch.allclose(aggregate(experts, routing), expected, atol=1e-6)


def test_query_attention_matches_per_head_reference():
    torch.manual_seed(0)
    attention = QueryAttention(visual_width=12, dim=16, num_queries=3, num_heads=4)
    tokens = torch.randn(2, 7, 12)
    k, v = attention.key(tokens), attention.value(tokens)
    outputs = []
    for head in range(4):
        part = slice(4 * head, 4 * head + 4)
        scores = attention.queries[:, part] @ k[:, :, part].transpose(1, 2) / math.sqrt(4)
        outputs.append(scores.softmax(dim=-1) @ v[:, :, part])
    expected = torch.cat(outputs, dim=-1).mean(dim=1)  # r = mean over the queries of O
    assert torch.allclose(attention(tokens), expected, atol=1e-6)


def test_unselected_experts_get_exactly_zero_task_gradient():
    config = TINY.replace(alpha=0.0, beta=0.0)
    torch.manual_seed(3)
    net = pmoe.build_model(config).train()
    with torch.no_grad():  # make experts 0-3 of every pool win for every image
        for unit in net.vgmop:
            for router in unit.router.values():
                router.net[2].bias.copy_(torch.tensor([50.0, 40, 30, 20, 0, 0, 0, 0]))
    out = net(images(3))
    loss = total_loss(out, torch.zeros(3, 112, 112), torch.tensor([0, 1, 1]),
                      expert_pools=net.expert_pools(), config=config)["loss"]
    loss.backward()
    selected = set(out["routing"]["indices"].flatten().tolist())
    assert selected == {0, 1, 2, 3}
    for pool in net.expert_pools():
        for expert in range(8):
            grad = pool.grad[expert]
            if expert in selected:
                assert grad.abs().sum() > 0
            else:
                assert torch.equal(grad, torch.zeros_like(grad))


# --- Eq. 4-5: auxiliary losses ---------------------------------------------------------------

def test_balance_loss_is_alpha_per_router_when_uniform():
    probs = torch.full((5, 4, 2, 8), 1 / 8)  # B x layers x states x E
    assert balance_loss(probs, alpha=0.01).item() == pytest.approx(0.01 * 8)


def test_balance_loss_hand_computed_three_samples():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]])
    # mean usage (1.7/3, 1.3/3); E * sum of squares = 2 * (2.89 + 1.69) / 9
    assert balance_loss(probs, alpha=1.0).item() == pytest.approx(2 * (2.89 + 1.69) / 9)


def test_decouple_loss_zero_for_orthonormal_means_and_hand_value_otherwise():
    eye = torch.eye(4, 16)
    orthonormal = eye[:, None, :].expand(4, 5, 16) * torch.tensor([1.0, 2.0, 3.0, 0.5])[:, None, None]
    assert decouple_loss([orthonormal], beta=0.005).item() == pytest.approx(0.0, abs=1e-12)
    twins = torch.ones(2, 3, 16)  # two identical experts: ||[[1,1],[1,1]] - I||^2 = 2
    assert decouple_loss([twins, twins], beta=0.5).item() == pytest.approx(0.5 * 2 * 2)


# --- Text side -------------------------------------------------------------------------------

def test_assembled_prompt_equals_open_clip_on_real_words(model):
    """States made of real word embeddings must encode like open_clip's own tokenised text."""
    tokenizer = model.assembler.tokenizer
    embed = model.text.token_embedding
    state_ids = tokenizer.encode("flawless perfect")
    ctx_ids = tokenizer.encode("photo of a thing in a factory")
    class_ids = [tokenizer.encode("metal nut"), tokenizer.encode("object")]
    with torch.no_grad():
        states = embed(torch.tensor(state_ids))[None].expand(2, -1, -1)
        context = embed(torch.tensor(ctx_ids))[None].expand(2, -1, -1)
        sequences, eot = model.assembler(states, context, class_ids)
        ours = model.text(sequences, eot)
        texts = ["flawless perfect metal nut photo of a thing in a factory",
                 "flawless perfect object photo of a thing in a factory"]
        reference = F.normalize(_open_clip_text(model, texts), dim=-1)
    assert torch.allclose(ours, reference, atol=1e-5)


def _open_clip_text(model, texts):
    import open_clip

    tokens = open_clip.tokenize(texts)
    x = model.text.token_embedding(tokens) + model.text.positional_embedding
    x = model.text.ln_final(model.text.transformer(x, attn_mask=model.text.attn_mask))
    return x[torch.arange(len(texts)), tokens.argmax(dim=-1)] @ model.text.text_projection


@pytest.mark.parametrize("use_class_names", [False, True])
def test_truncated_text_encoding_equals_full_context(model, use_class_names):
    config = TINY.replace(use_class_names=use_class_names)
    truncated = pmoe.PromptMoE(config, load_clip(TINY)).eval()
    full = pmoe.PromptMoE(config.replace(text_truncation=False), load_clip(TINY)).eval()
    full.load_trainable_state_dict(truncated.trainable_state_dict())
    names = ["metal_nut", "pcb1"] if use_class_names else None
    feats = truncated.encode_image(images(2))
    a = truncated.prompt_features(*feats, class_names=names)[0]
    b = full.prompt_features(*feats, class_names=names)[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_batched_forward_equals_one_image_at_a_time(model):
    model.eval()
    batch = images(3)
    together = model(batch)
    for index in range(3):
        alone = model(batch[index:index + 1])
        assert torch.allclose(together["text_features"][index], alone["text_features"][0], atol=1e-5)
        assert torch.allclose(together["anomaly_map"][index], alone["anomaly_map"][0], atol=1e-5)
        for field in ("indices", "weights", "probs"):
            assert torch.allclose(together["routing"][field][index].float(), alone["routing"][field][0].float(), atol=1e-5)


def test_static_ensemble_averages_each_prompts_features():
    config = TINY.replace(prompt_mode="ensemble", num_experts=3, top_k=1)
    net = pmoe.build_model(config).eval()
    text = net.prompt_features(*net.encode_image(images(1)))[0][0, 0]  # (2, D)
    singles = []
    for index in range(3):
        single = pmoe.build_model(config.replace(prompt_mode="static")).eval()
        with torch.no_grad():
            single.context.copy_(net.context)
            for state in ("normal", "abnormal"):
                single.prompts.experts[state].copy_(net.prompts.experts[state][index:index + 1])
        singles.append(single.prompt_features(*single.encode_image(images(1)))[0][0, 0])
    assert torch.allclose(text, F.normalize(torch.stack(singles).mean(dim=0), dim=-1), atol=1e-6)


# --- Backbone --------------------------------------------------------------------------------

def test_taps_differ_and_are_copies(model):
    feats = model.encode_image(images(1))
    taps = feats.patch_tokens[0]
    for i in range(taps.shape[0]):
        for j in range(i + 1, taps.shape[0]):
            assert not torch.allclose(taps[i], taps[j]), f"taps {i} and {j} are identical"


def test_vv_stream_follows_its_definition(model):
    """Reference: the V-V stream written out block by block, without the model's loop."""
    visual = model.visual.visual
    x = images(1)
    tokens = visual.conv1(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([visual.class_embedding.expand(1, 1, -1), tokens], dim=1)
    tokens = visual.ln_pre(tokens + model.visual.positional_embedding)
    x_vv = tokens  # vv_start = 1 in the tiny preset
    expected = []
    with torch.no_grad():
        for block in visual.transformer.resblocks:
            v = block.ln_1(tokens) @ block.attn.in_proj_weight[128:].T + block.attn.in_proj_bias[128:]
            heads = v.view(1, -1, 4, 16).transpose(1, 2)
            mixed = ((heads @ heads.transpose(2, 3)) / 4.0).softmax(dim=-1) @ heads
            x_vv = x_vv + block.attn.out_proj(mixed.transpose(1, 2).reshape(1, -1, 64))
            tokens = block(tokens)
            expected.append(visual.ln_post(x_vv[:, 1:]))
    assert torch.allclose(model.encode_image(x).patch_tokens[0], torch.cat(expected), atol=1e-5)
    assert vv_attention(visual.transformer.resblocks[0].attn, tokens).shape == tokens.shape


def test_without_vv_the_taps_read_the_ordinary_stream():
    net = pmoe.build_model(TINY.replace(vv_attention=False))
    x = images(1)
    feats = net.encode_image(x)
    visual = net.visual.visual
    tokens = visual.conv1(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([visual.class_embedding.expand(1, 1, -1), tokens], dim=1)
    tokens = visual.ln_pre(tokens + net.visual.positional_embedding)
    with torch.no_grad():
        for block in visual.transformer.resblocks:
            tokens = block(tokens)
    assert torch.allclose(feats.patch_tokens[0, -1], visual.ln_post(tokens[0, 1:]), atol=1e-5)
    assert torch.allclose(feats.cls_token[0], visual.ln_post(tokens[0, 0]), atol=1e-5)


def test_position_grid_is_resized_bilinearly(model):
    native = model.visual.visual.positional_embedding.detach()
    grid = TINY.image_size // 14
    expected = F.interpolate(native[1:].reshape(1, 6, 6, -1).permute(0, 3, 1, 2), size=(grid, grid),
                             mode="bilinear", align_corners=False)
    assert torch.allclose(model.visual.positional_embedding[1:],
                          expected.permute(0, 2, 3, 1).reshape(grid * grid, -1))


# --- Maps and score --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 40, 40), (1, 20, 31), (1, 112, 112)])
def test_gaussian_smoothing_equals_scipy(shape):
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4) for m in maps.numpy()])
    assert np.allclose(gaussian_smooth(maps, 4.0).numpy(), expected, atol=1e-10)
    assert np.allclose(gaussian_smooth(maps.float(), 4.0).numpy(), expected, atol=1e-5)


def test_maps_and_score_follow_eq_6_and_7(model):
    out = model.train()(images(2))
    layer_abnormal = out["layer_maps"][:, :, 1]
    assert torch.allclose(out["layer_maps"].sum(dim=2), torch.ones_like(layer_abnormal), atol=1e-5)
    assert torch.allclose(out["anomaly_map"], layer_abnormal.mean(dim=1))
    expected = (out["anomaly_map"].flatten(1).max(dim=1).values + out["global_prob"]) / 2
    assert torch.allclose(out["score"], expected)
    smoothed = model.eval()(images(2))["anomaly_map"]
    assert torch.allclose(smoothed, gaussian_smooth(out["anomaly_map"], 4.0), atol=1e-5)
    assert out["anomaly_map"].shape == (2, 112, 112) and out["score"].shape == (2,)


def test_total_loss_returns_every_term_and_sums_them(model):
    out = model.train()(images(2))
    masks = torch.zeros(2, 1, 112, 112)
    masks[1, :, 30:50, 40:60] = 1
    terms = total_loss(out, masks, torch.tensor([0, 1]), expert_pools=model.expert_pools(), config=TINY)
    assert set(terms) == {"loss", "cls", "seg", "focal", "dice", "balance", "decouple"}
    assert torch.allclose(terms["loss"], terms["cls"] + terms["focal"] + terms["dice"] + terms["balance"] + terms["decouple"])
    assert torch.allclose(terms["cls"], F.binary_cross_entropy(out["score"], torch.tensor([0.0, 1.0])))


# --- Parameters and weights ------------------------------------------------------------------

def test_only_vgmop_and_context_require_grad(model):
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith(("vgmop.", "context")) for name in trainable)
    counts = model.parameter_counts()
    assert counts["trainable"] == counts["prompt_generator"] + counts["context"]


def test_trainable_state_round_trip_and_mismatch(model):
    other = pmoe.build_model(TINY)
    with torch.no_grad():
        other.context.add_(1.0)
    other.load_trainable_state_dict(model.trainable_state_dict())
    assert torch.equal(other.context, model.context)
    wide = pmoe.build_model(TINY.replace(num_experts=4, top_k=2))
    with pytest.raises(pmoe.errors.CheckpointError, match="wrong shape"):
        wide.load_trainable_state_dict(model.trainable_state_dict())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_from_local_file_reproduce_the_saved_model(tmp_path, suffix):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(123)
    source = open_clip.create_model(TINY.clip_model, pretrained=None).eval()
    path = tmp_path / f"clip{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    from_file = pmoe.build_model(TINY.replace(clip_weights=str(path))).eval()
    reference = pmoe.PromptMoE(TINY, source.requires_grad_(False)).eval()
    from_file.load_trainable_state_dict(reference.trainable_state_dict())
    x = images(2)
    a, b = from_file(x), reference(x)
    assert torch.equal(a["anomaly_map"], b["anomaly_map"]) and torch.equal(a["score"], b["score"])


# --- Bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 96, 96), (1, 1, 112, 112), (3, 112, 112)])
def test_wrong_image_shape_names_the_expected_shape(model, shape):
    with pytest.raises(pmoe.errors.ConfigError, match=r"\(B, 3, 112, 112\)"):
        model(torch.zeros(shape))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(pmoe.errors.CheckpointError, match="does not exist"):
        pmoe.build_model(TINY.replace(clip_weights=str(tmp_path / "nope.pt")))


def test_mismatched_weights_file_is_a_clear_error(tmp_path):
    import open_clip

    state = open_clip.create_model(TINY.clip_model, pretrained=None).state_dict()
    state["visual.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(pmoe.errors.CheckpointError, match="does not match the pmoe-tiny architecture"):
        pmoe.build_model(TINY.replace(clip_weights=str(tmp_path / "other.pt")))


def test_pretrained_tag_offline_is_a_clear_error():
    with pytest.raises(pmoe.errors.CheckpointError, match="clip_weights=/path/to/file"):
        pmoe.build_model(TINY.replace(clip_weights="no-such-tag"))
