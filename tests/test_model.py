"""The PromptMoE model on tiny CLIPs: equations 2-8 against hand-written references and open_clip."""

import contextlib
import math

import numpy as np
import open_clip
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

import pmoe
from pmoe.backbone import load_clip
from pmoe.losses import balance_loss, decouple_loss, dice_loss, focal_loss, total_loss
from pmoe.maps import gaussian_smooth
from pmoe.prompt_learners import LEARNERS, PromptLearner, PromptOutput
from pmoe.vgmop import QueryAttention, aggregate, route
from reference_model import anomalyclip_visual, bilinear_resize

TINY = pmoe.Config.preset("tiny")
# 24 blocks like ViT-L, at the tower's native 84 px (no position-grid resizing), V-V from block 6.
DEEP = TINY.replace(clip_model="pmoe-tiny-deep", image_size=84, layers=(6, 12, 18, 24), vv_start=6)


@pytest.fixture(scope="module")
def model():
    return pmoe.build_model(TINY)


@pytest.fixture(scope="module")
def deep_clip():
    return load_clip(DEEP)


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


@pytest.mark.parametrize("vgmop_input", ["pre_projection", "projected"])
@pytest.mark.parametrize("global_feature", ["anomalyclip", "open_clip"])
def test_vgmop_reads_the_patch_tokens_and_the_global_token_of_its_tap(vgmop_input, global_feature):
    config = TINY.replace(vgmop_input=vgmop_input, global_feature=global_feature)
    net = pmoe.build_model(config).eval()
    feats = net.encode_image(images(2))
    seen = {}
    handles = [unit.register_forward_pre_hook(lambda unit, args, tap=tap: seen.__setitem__(tap, args[0]))
               for tap, unit in enumerate(net.prompt_learner.vgmop)]
    net.forward_features(feats)
    for handle in handles:
        handle.remove()
    visual = net.visual.visual
    cls = feats.cls_token if global_feature == "anomalyclip" else visual.ln_post(feats.cls_token)
    for tap in range(config.num_layers):
        patches = feats.patch_tokens[:, tap]
        if vgmop_input == "projected":  # the normalised 64-wide features of Eq. 6 and Eq. 7
            patches, cls_in = (t @ visual.proj for t in (patches, cls))
            patches = patches / patches.norm(dim=-1, keepdim=True)
            cls_in = cls_in / cls_in.norm(dim=-1, keepdim=True)
        else:
            cls_in = cls
        assert seen[tap].shape == (2, 64 + 1, 64)
        assert torch.allclose(seen[tap], torch.cat([patches, cls_in[:, None]], dim=1), atol=1e-5)


def test_unselected_experts_get_exactly_zero_task_gradient():
    config = TINY.replace(alpha=0.0, beta=0.0)
    torch.manual_seed(3)
    net = pmoe.build_model(config).train()
    with torch.no_grad():  # make experts 0-3 of every pool win for every image
        for unit in net.prompt_learner.vgmop:
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


# --- Eq. 4-5 and 8: losses -------------------------------------------------------------------

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


def test_focal_and_dice_hand_computed_on_a_2x2_example():
    abnormal = torch.tensor([[0.9, 0.2], [0.6, 0.5]])
    probs = torch.stack([1 - abnormal, abnormal])[None]  # (1, 2, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None]
    # p_t = probability of the true state: 0.9 (anomalous), 0.8, 0.4 (normal), 0.5 (anomalous)
    focal = (0.1 ** 2 * -math.log(0.9) + 0.2 ** 2 * -math.log(0.8)
             + 0.6 ** 2 * -math.log(0.4) + 0.5 ** 2 * -math.log(0.5)) / 4
    assert focal_loss(probs, mask, gamma=2.0).item() == pytest.approx(focal, rel=1e-6)
    # abnormal channel vs m: overlap 0.9 + 0.5, sums 2.2 and 2; normal channel vs 1 - m: 0.8 + 0.4, 1.8, 2
    assert dice_loss(probs[:, 1], mask, smooth=1.0).item() == pytest.approx(1 - (2 * 1.4 + 1) / (2.2 + 2 + 1))
    assert dice_loss(probs[:, 0], 1 - mask, smooth=1.0).item() == pytest.approx(1 - (2 * 1.2 + 1) / (1.8 + 2 + 1))


def test_total_loss_terms_and_bce_by_hand(model):
    out = model.train()(images(2))
    masks = torch.zeros(2, 1, 112, 112)
    masks[1, :, 30:50, 40:60] = 1
    terms = total_loss(out, masks, torch.tensor([0, 1]), expert_pools=model.expert_pools(), config=TINY)
    assert set(terms) == {"loss", "cls", "seg", "focal", "dice", "balance", "decouple"}
    s = out["score"].tolist()
    assert terms["cls"].item() == pytest.approx(-(math.log(1 - s[0]) + math.log(s[1])) / 2, rel=1e-5)
    total = sum(terms[name].item() for name in ("cls", "focal", "dice", "balance", "decouple"))
    assert terms["loss"].item() == pytest.approx(total, rel=1e-6)


def test_layer_sum_trains_with_the_global_score_even_when_p_g_saturates():
    config = TINY.replace(layer_reduce="sum", image_score="global")
    net = pmoe.build_model(config).train()
    out = net(images(2))
    assert torch.equal(out["score"], out["global_prob"])
    assert out["anomaly_map"].amax() > 1  # the map is a sum of L probabilities
    saturated = {**out, "global_logit": out["global_logit"] + 60.0}  # p_g rounds to 1 in fp32
    assert torch.equal(saturated["global_logit"].sigmoid(), torch.ones(2))
    terms = total_loss(saturated, torch.zeros(2, 112, 112), torch.tensor([0, 0]),
                       expert_pools=net.expert_pools(), config=config)
    logit = saturated["global_logit"].tolist()
    assert terms["cls"].item() == pytest.approx(sum(x + math.log1p(math.exp(-x)) for x in logit) / 2, rel=1e-6)
    terms["cls"].backward()
    assert net.prompt_learner.context.grad.abs().sum() > 0


# --- Text side -------------------------------------------------------------------------------

WORDS = {"normal": "flawless perfect normal good clean", "abnormal": "broken damaged cracked torn dented bent",
         "context": "a photo of the part in the factory"}


@pytest.mark.parametrize("abnormal_prompt", ["suffix", "replace"])
@pytest.mark.parametrize("class_names", [None, ["metal_nut", "bottle"]])
def test_prompts_of_word_embeddings_encode_like_open_clip(abnormal_prompt, class_names):
    """Experts and Q_ctx set to word embeddings: the model's F_T equals open_clip's encode_text."""
    config = TINY.replace(abnormal_prompt=abnormal_prompt, use_class_names=class_names is not None)
    clip = load_clip(config)
    net = pmoe.PromptMoE(config, clip).eval()
    tokenizer = net.assembler.tokenizer
    ids = {part: tokenizer.encode(words) for part, words in WORDS.items()}
    assert [len(ids[p]) for p in WORDS] == [config.normal_len, config.abnormal_len, config.ctx_len]
    with torch.no_grad():
        learner = net.prompt_learner
        learner.context[0] = clip.token_embedding(torch.tensor(ids["context"]))
        for unit in learner.vgmop:  # every expert the same words: any routing gives S_agg = the words
            for state in ("normal", "abnormal"):
                unit.experts[state][:] = clip.token_embedding(torch.tensor(ids[state]))
        text = net(images(2), class_names)["text_features"]  # (2, L, 2, D)
    names = [name.replace("_", " ") for name in class_names] if class_names else ["object", "object"]
    abnormal_words = WORDS["abnormal"] if abnormal_prompt == "replace" else f"{WORDS['normal']} {WORDS['abnormal']}"
    for index, name in enumerate(names):
        sentences = [f"{WORDS['normal']} {name} {WORDS['context']}", f"{abnormal_words} {name} {WORDS['context']}"]
        with torch.no_grad():
            reference = clip.encode_text(open_clip.tokenize(sentences), normalize=True)
        for layer in range(config.num_layers):
            assert torch.allclose(text[index, layer], reference, atol=1e-5)


@pytest.mark.parametrize("use_class_names", [False, True])
def test_truncated_text_encoding_equals_full_context(model, use_class_names):
    config = TINY.replace(use_class_names=use_class_names)
    truncated = pmoe.PromptMoE(config, load_clip(TINY)).eval()
    full = pmoe.PromptMoE(config.replace(text_truncation=False), load_clip(TINY)).eval()
    full.load_trainable_state_dict(truncated.trainable_state_dict())
    names = ["metal_nut", "pcb1"] if use_class_names else None
    feats = truncated.encode_image(images(2))
    a = truncated.forward_features(feats, names)["text_features"]
    b = full.forward_features(feats, names)["text_features"]
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
            assert torch.allclose(together["routing"][field][index].float(), alone["routing"][field][0].float(),
                                  atol=1e-5)


def test_static_ensemble_averages_each_prompts_features():
    config = TINY.replace(prompt_mode="ensemble", num_experts=3, top_k=1)
    net = pmoe.build_model(config).eval()
    text = net(images(1))["text_features"][0, 0]  # (2, D)
    singles = []
    for index in range(3):
        single = pmoe.build_model(config.replace(prompt_mode="static")).eval()
        with torch.no_grad():
            single.prompt_learner.context.copy_(net.prompt_learner.context)
            for state in ("normal", "abnormal"):
                experts = net.prompt_learner.prompts.experts[state]
                single.prompt_learner.prompts.experts[state].copy_(experts[index:index + 1])
        singles.append(single(images(1))["text_features"][0, 0])
    assert torch.allclose(text, F.normalize(torch.stack(singles).mean(dim=0), dim=-1), atol=1e-6)


class FixedPrompts(PromptLearner):
    """A learner outside the paper: one learnable [normal, abnormal] pair of text features."""

    def __init__(self, config, *, text, assembler, visual_width, embed_width):
        super().__init__()
        self.layers = config.num_layers
        self.pair = torch.nn.Parameter(torch.randn(2, embed_width, generator=torch.Generator().manual_seed(5)))

    def forward(self, image, class_names=None):
        pair = self.pair / self.pair.norm(dim=-1, keepdim=True)
        return PromptOutput(pair.expand(image.tokens.shape[0], self.layers, 2, -1), None)


def test_another_prompt_learner_plugs_into_maps_scores_and_losses(monkeypatch):
    monkeypatch.setitem(LEARNERS, "static", FixedPrompts)
    config = TINY.replace(prompt_mode="static")
    net = pmoe.build_model(config).train()
    out = net(images(2))
    pair = F.normalize(net.prompt_learner.pair, dim=-1)
    assert torch.allclose(out["text_features"], pair.expand(2, 4, 2, -1))
    f_g = F.normalize(net.encode_image(images(2)).cls_token @ net.visual.visual.proj, dim=-1)
    assert torch.allclose(out["global_prob"], ((f_g @ pair.T) / 0.01).softmax(dim=-1)[:, 1], atol=1e-6)
    assert out["routing"] is None and net.expert_pools() == []
    assert net.parameter_counts()["prompt_generator"] == net.parameter_counts()["trainable"] == 2 * 64
    assert set(net.trainable_state_dict()) == {"pair"}
    terms = total_loss(out, torch.zeros(2, 112, 112), torch.tensor([0, 1]), expert_pools=net.expert_pools(),
                       config=config)
    assert terms["balance"].item() == terms["decouple"].item() == 0
    terms["loss"].backward()
    assert net.prompt_learner.pair.grad.abs().sum() > 0


# --- Backbone --------------------------------------------------------------------------------

@contextlib.contextmanager
def block_outputs(visual):
    """Copies of every block's output (1-indexed), recorded by forward hooks on the resblocks."""
    outputs = {}

    def record(number):
        return lambda block, args, out: outputs.__setitem__(number, out.clone())

    handles = [block.register_forward_hook(record(number))
               for number, block in enumerate(visual.transformer.resblocks, start=1)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def test_taps_and_cls_token_equal_hooked_copies_of_open_clips_own_forward(deep_clip):
    config = DEEP.replace(vv_attention=False)
    net = pmoe.PromptMoE(config, deep_clip)
    x = images(2, 84)
    visual = deep_clip.visual
    with torch.no_grad(), block_outputs(visual) as hooked:
        visual(x)
    feats = net.encode_image(x)
    for index, block in enumerate((6, 12, 18, 24)):
        assert torch.allclose(feats.patch_tokens[:, index], visual.ln_post(hooked[block][:, 1:]), atol=1e-5)
    assert torch.allclose(feats.cls_token, hooked[24][:, 0], atol=1e-5)  # raw: no ln_post
    assert torch.allclose(net.encode_image(x).patch_tokens, feats.patch_tokens)  # taps are copies


def test_vv_stream_from_block_6_and_global_feature_follow_anomalyclip(deep_clip):
    net = pmoe.PromptMoE(DEEP, deep_clip)
    x = images(2, 84)
    taps, final = anomalyclip_visual(deep_clip.visual, x, DEEP.layers, DEEP.vv_start)
    feats = net.encode_image(x)
    for index, tapped in enumerate(taps):
        assert torch.allclose(feats.patch_tokens[:, index], deep_clip.visual.ln_post(tapped[:, 1:]), atol=1e-5)
    f_g = final[:, 0] @ deep_clip.visual.proj  # AnomalyCLIP: x_ori[0] @ proj, no ln_post
    f_g = f_g / f_g.norm(dim=-1, keepdim=True)
    derived = net.visual.image_features(feats, "anomalyclip")
    assert torch.allclose(derived.global_feature, f_g, atol=1e-5)
    assert not torch.allclose(derived.global_feature, net.visual.image_features(feats, "open_clip").global_feature,
                              atol=1e-3)


def test_open_clip_global_feature_equals_encode_image(deep_clip):
    net = pmoe.PromptMoE(DEEP.replace(global_feature="open_clip"), deep_clip)
    x = images(2, 84)
    with torch.no_grad():
        reference = deep_clip.encode_image(x, normalize=True)
    derived = net.visual.image_features(net.encode_image(x), "open_clip")
    assert torch.allclose(derived.global_feature, reference, atol=1e-5)


def test_taps_of_any_layer_set_are_rows_of_a_superset_and_bad_sets_are_refused(deep_clip):
    net = pmoe.PromptMoE(DEEP, deep_clip)
    x = images(1, 84)
    with torch.no_grad():
        everything = net.visual(x, layers=tuple(range(1, 25)))
        default = net.visual(x)
    assert everything.patch_tokens.shape[1] == 24
    assert torch.allclose(everything.patch_tokens[:, [5, 11, 17, 23]], default.patch_tokens, atol=1e-6)
    assert torch.equal(everything.cls_token, default.cls_token)
    for bad in [(), (0, 6), (6, 25), (12, 6), (6, 6), (6.0,), (True,)]:
        with pytest.raises(pmoe.errors.ConfigError, match="increasing block numbers between 1 and 24"):
            net.visual(x, layers=bad)


def test_towers_stay_in_eval_mode_when_the_model_trains(model):
    model.train()
    assert all(module.training for module in model.prompt_learner.vgmop.modules())
    assert not any(module.training for module in model.visual.modules())
    assert not any(module.training for module in model.text.modules())
    model.eval()


def test_position_grid_is_resized_bilinearly(model):
    native = model.visual.visual.positional_embedding.detach()
    grid = TINY.image_size // 14
    expected = F.interpolate(native[1:].reshape(1, 6, 6, -1).permute(0, 3, 1, 2), size=(grid, grid),
                             mode="bilinear", align_corners=False)
    assert torch.allclose(model.visual.positional_embedding[1:],
                          expected.permute(0, 2, 3, 1).reshape(grid * grid, -1))


# --- Eq. 6-7: maps and score -----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 40, 40), (1, 20, 31), (1, 112, 112)])
def test_gaussian_smoothing_equals_scipy(shape):
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4) for m in maps.numpy()])
    assert np.allclose(gaussian_smooth(maps, 4.0).numpy(), expected, atol=1e-10)
    assert np.allclose(gaussian_smooth(maps.float(), 4.0).numpy(), expected, atol=1e-5)


def softmax_abnormal(features, text, tau):
    """exp(f.t_a / tau) / (exp(f.t_n / tau) + exp(f.t_a / tau)) for features (N, D), text (2, D)."""
    normal, abnormal = np.exp(features @ text[0] / tau), np.exp(features @ text[1] / tau)
    return abnormal / (normal + abnormal)


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("image_score", ["eq7", "global"])
def test_layer_maps_global_probability_and_score_by_hand(image_score):
    net = pmoe.build_model(TINY.replace(image_score=image_score))
    feats = net.encode_image(images(2))
    with torch.no_grad():
        out = net.train().forward_features(feats)
    proj = net.visual.visual.proj.double().numpy()
    text = out["text_features"].double().numpy()  # (B, L, 2, D), from the encoder tested above
    grid, size = 8, 112
    for b in range(2):
        layer_abnormal = []
        for layer in range(4):
            patches = unit_rows(feats.patch_tokens[b, layer].double().numpy() @ proj)
            abnormal = bilinear_resize(softmax_abnormal(patches, text[b, layer], 0.07).reshape(grid, grid), size)
            assert np.allclose(out["layer_maps"][b, layer, 1].numpy(), abnormal, atol=1e-5)
            assert np.allclose(out["layer_maps"][b, layer, 0].numpy(), 1 - abnormal, atol=1e-5)
            layer_abnormal.append(abnormal)
        anomaly_map = np.mean(layer_abnormal, axis=0)
        assert np.allclose(out["anomaly_map"][b].numpy(), anomaly_map, atol=1e-5)
        f_g = unit_rows(feats.cls_token[b].double().numpy() @ proj)  # default: no ln_post
        p_g = softmax_abnormal(f_g[None], text[b, -1], 0.01)[0]  # the LAST layer's prompts, tau'
        assert out["global_prob"][b].item() == pytest.approx(p_g, abs=1e-5)
        score = (anomaly_map.max() + p_g) / 2 if image_score == "eq7" else p_g
        assert out["score"][b].item() == pytest.approx(score, abs=1e-5)
    with torch.no_grad():
        smoothed = net.eval().forward_features(feats)["anomaly_map"]
    assert np.allclose(smoothed.numpy(), np.stack([scipy.ndimage.gaussian_filter(m, sigma=4)
                                                   for m in out["anomaly_map"].double().numpy()]), atol=1e-5)


# --- Precision -------------------------------------------------------------------------------

def test_training_forward_runs_in_the_configured_precision(monkeypatch):
    from pmoe import train_step

    asked = []
    real = train_step.autocast

    def recording(device, precision):
        asked.append(precision)
        return real(device, precision)

    monkeypatch.setattr(train_step, "autocast", recording)
    for precision in ("fp32", "bf16"):
        net = pmoe.build_model(TINY.replace(train_precision=precision))
        features = net.encode_image(images(2))
        train_step.TrainStep(net)(features, torch.zeros(2, 112, 112), torch.tensor([0, 1]), None, [2], 0)
    assert asked == ["fp32", "bf16"]


def test_autocast_is_bf16_on_cuda_only_when_asked():
    from pmoe.runtime import autocast

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        context = autocast(cuda, "bf16")
    assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
    assert isinstance(autocast(cuda, "fp32"), contextlib.nullcontext)
    assert isinstance(autocast(cpu, "bf16"), contextlib.nullcontext)
    with pytest.raises(pmoe.errors.ConfigError, match="precision must be one of"):
        autocast(cpu, "fp16")


# --- Parameters and weights ------------------------------------------------------------------

def test_only_the_prompt_learner_requires_grad(model):
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("prompt_learner.vgmop.", "prompt_learner.context")) for name in trainable)
    assert set(model.trainable_state_dict()) == {name.removeprefix("prompt_learner.") for name in trainable}


def test_trainable_state_round_trip_and_mismatch(model):
    other = pmoe.build_model(TINY)
    with torch.no_grad():
        other.prompt_learner.context.add_(1.0)
    other.load_trainable_state_dict(model.trainable_state_dict())
    assert torch.equal(other.prompt_learner.context, model.prompt_learner.context)
    wide = pmoe.build_model(TINY.replace(num_experts=4, top_k=2))
    with pytest.raises(pmoe.errors.CheckpointError, match="wrong shape"):
        wide.load_trainable_state_dict(model.trainable_state_dict())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_from_local_file_reproduce_the_saved_model(tmp_path, suffix):
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
    state = open_clip.create_model(TINY.clip_model, pretrained=None).state_dict()
    state["visual.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(pmoe.errors.CheckpointError, match="does not match the pmoe-tiny architecture"):
        pmoe.build_model(TINY.replace(clip_weights=str(tmp_path / "other.pt")))


def test_pretrained_tag_offline_is_a_clear_error():
    with pytest.raises(pmoe.errors.CheckpointError, match="clip_weights=/path/to/file"):
        pmoe.build_model(TINY.replace(clip_weights="no-such-tag"))
