"""Config: the paper's defaults, presets, strict keys and a JSON round trip."""

import json

import pytest

from pmoe import Config
from pmoe.config import ABLATIONS, BASES, ablation_config
from pmoe.errors import ConfigError


def test_defaults_are_appendix_a():
    c = Config()
    assert (c.clip_model, c.image_size, c.layers) == ("ViT-L-14-336", 518, (6, 12, 18, 24))
    assert (c.num_queries, c.num_experts, c.top_k, c.num_heads, c.router_hidden) == (8, 8, 4, 8, 256)
    assert (c.normal_len, c.abnormal_len, c.ctx_len) == (5, 6, 8)
    assert (c.alpha, c.beta, c.tau, c.tau_global, c.sigma) == (0.01, 0.005, 0.07, 0.01, 4.0)
    assert (c.epochs, c.batch_size, c.lr, c.warmup_epochs, c.betas) == (15, 16, 1e-3, 3, (0.6, 0.999))
    assert Config.preset("paper") == c


def test_decision_defaults_follow_anomalyclip_and_fp32():
    c = Config()
    assert (c.global_feature, c.vgmop_input, c.image_score, c.train_precision, c.layer_reduce) == (
        "anomalyclip", "pre_projection", "eq7", "fp32", "mean")


def test_the_alternative_readings_are_presets_over_any_base():
    for base in ("paper", "tiny"):
        assert Config.preset("global-open-clip", base=base) == Config.preset(base).replace(global_feature="open_clip")
        assert Config.preset("vgmop-projected", base=base) == Config.preset(base).replace(vgmop_input="projected")


def test_a_layer_sum_is_refused_with_eq7_and_accepted_with_the_global_score():
    with pytest.raises(ConfigError, match="'sum' cannot train with image_score='eq7'.*image_score='global'"):
        Config().replace(layer_reduce="sum")
    assert Config().replace(layer_reduce="sum", image_score="global").layer_reduce == "sum"


@pytest.mark.parametrize("key, value", [("global_feature", "clip"), ("vgmop_input", "raw"),
                                        ("image_score", "max"), ("train_precision", "fp16")])
def test_unknown_values_of_the_new_fields_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}' must be one of"):
        Config().replace(**{key: value})


@pytest.mark.parametrize("name", Config.presets())
def test_every_preset_round_trips_through_json(name):
    config = Config.preset(name)
    assert Config.from_json(config.to_json()) == config
    assert Config.from_dict(json.loads(config.to_json())).layers == config.layers


def test_presets_list_bases_then_every_ablation_of_tables_2_to_6():
    names = Config.presets()
    assert names[:3] == list(BASES) and set(ABLATIONS) <= set(names)
    assert Config.preset("table6-e16-k2").num_experts == 16 and Config.preset("table6-e16-k2").top_k == 2
    assert Config.preset("table5-shared-both").share_pool and Config.preset("table5-shared-both").share_attention
    assert Config.preset("table2-static").prompt_mode == "static" and Config.preset("table2-static").alpha == 0


def test_ablations_lay_over_the_tiny_base_and_map_layer_sets():
    tiny = Config.preset("tiny")
    assert Config.preset("paper", base="tiny") == tiny
    assert Config.preset("table4-l6-18-24", base="tiny").layers == (1, 3, 4)
    assert Config.preset("table3-alpha0", base="tiny").replace(alpha=0.01) == tiny


def test_unknown_names_and_keys_are_errors_that_suggest_the_fix():
    with pytest.raises(ConfigError, match="Did you mean tiny"):
        Config.preset("tinny")
    with pytest.raises(ConfigError, match="unknown config key 'num_expert'.*num_experts"):
        Config.from_dict({"num_expert": 4})
    with pytest.raises(ConfigError, match="cannot be laid over"):
        Config.preset("tiny", base="demo")
    with pytest.raises(ConfigError, match="takes a int"):
        Config().replace(top_k="4")
    with pytest.raises(ConfigError, match="between 1 and num_experts"):
        Config().replace(top_k=9)
    with pytest.raises(ConfigError, match="must be one of"):
        Config().replace(layer_reduce="max")
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load("/nonexistent/config.json")


def test_anomalyclip_presets_carry_their_test_setting_and_recipe():
    for name, layers in (("anomalyclip", (24,)), ("anomalyclip-4layers", (6, 12, 18, 24))):
        c = Config.preset(name)
        assert (c.prompt_mode, c.layers, c.ctx_len, c.deep_prompt_depth, c.deep_prompt_len) == (
            "anomalyclip", layers, 12, 9, 4)
        assert (c.tau, c.tau_global, c.image_score, c.layer_reduce, c.sigma, c.global_feature) == (
            0.07, 0.07, "global", "sum", 4.0, "anomalyclip")
        assert (c.lr, c.betas, c.warmup_epochs, c.epochs, c.batch_size, c.alpha, c.beta, c.seg_loss_weight) == (
            1e-3, (0.5, 0.999), 0, 15, 8, 0.0, 0.0, 1.0)
        assert (c.vv_attention, c.vv_start, c.seg_loss_on) == (True, 6, "per_layer")


def test_anomalyclip_presets_map_layers_and_text_depth_onto_the_tiny_clip():
    """pmoe-tiny has 4 vision and 2 text blocks: their depth 9 of 12 becomes ceil(9 * 2 / 12) = 2."""
    assert Config.preset("anomalyclip", base="tiny").layers == (4,)
    assert Config.preset("anomalyclip-4layers", base="tiny").layers == (1, 2, 3, 4)
    assert Config.preset("anomalyclip", base="demo").deep_prompt_depth == 2
    deep = Config.preset("tiny").replace(clip_model="pmoe-tiny-deep")  # 12 text blocks, as ViT-L
    assert ablation_config("anomalyclip", deep).deep_prompt_depth == 9
    with pytest.raises(ConfigError, match="deep_prompt_depth must be between 1 and 2, the text blocks of pmoe-tiny"):
        Config.preset("tiny").replace(prompt_mode="anomalyclip")
    with pytest.raises(ConfigError, match="deep_prompt_len must be between 1 and ctx_len=8"):
        Config.preset("tiny").replace(prompt_mode="anomalyclip", deep_prompt_depth=2, deep_prompt_len=9)
    with pytest.raises(ConfigError, match="set use_class_names=false"):
        Config.preset("anomalyclip").replace(use_class_names=True)


def test_the_training_free_preset():
    c = Config.preset("clip-zero-shot")
    assert c.training_free and not Config().training_free
    assert (c.prompt_mode, c.image_score, c.tau_global, c.layer_reduce, c.layers) == (
        "fixed_ensemble", "global", 0.01, "mean", (6, 12, 18, 24))
