"""Configuration: one dataclass with the paper's defaults (Appendix A) and named presets.

``Config()`` is the paper's model and protocol. Every choice the paper leaves open is a field
marked ``[decision]`` (see the README's "Reproduction decisions" table). Presets are named
overrides: ``Config.preset("paper")``, one preset per ablation row of Tables 2-6 and Figure 7,
one per alternative reading of the paper (``global-open-clip``, ``vgmop-projected``), the
baselines run through the same harness (``anomalyclip``, ``anomalyclip-4layers``: AnomalyCLIP's
object-agnostic prompts and recipe; ``clip-zero-shot``: written prompts, no training), and
``tiny`` (a random tiny CLIP for tests and the demo). An ablation preset can be applied on top
of another base: ``Config.preset("table3-alpha0", base="tiny")``. ``Config.presets()`` lists
every name. Unknown keys are errors; a config round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from pmoe.errors import ConfigError


@dataclass(frozen=True)
class Config:
    # --- Backbone (spec 1) -------------------------------------------------------------------
    clip_model: str = "ViT-L-14-336"  # open_clip architecture name
    clip_weights: str = "openai"  # "openai", a local weights file, or "random" (tests only)
    quick_gelu: bool = True  # the OpenAI weights were trained with QuickGELU
    image_size: int = 518
    layers: tuple = (6, 12, 18, 24)  # tapped vision blocks, 1-indexed
    vv_attention: bool = True  # [decision] V-V attention stream for the taps
    vv_start: int = 6  # [decision] first block of the V-V stream
    pos_embed_interp: str = "bilinear"  # [decision] resizing of the position grid (24 -> 37)
    # [decision] f_g: "anomalyclip" = final CLS of the ordinary stream @ proj, without ln_post (as
    # AnomalyCLIP computes it); "open_clip" = ln_post first (encode_image). Feeds p_g and VGMoP.
    global_feature: str = "anomalyclip"

    # --- Prompts and VGMoP (spec 2-3) --------------------------------------------------------
    # "vgmop" | "static" | "ensemble" (Table 2) | "anomalyclip" (their learnable prompts, pmoe.anomalyclip)
    # | "fixed_ensemble" (written prompts, pmoe.zero_shot_prompts: nothing to train)
    prompt_mode: str = "vgmop"
    vgmop_per_layer: bool = True  # False: one VGMoP on the last tap serves all layers (Table 2)
    num_queries: int = 8  # N_q
    num_heads: int = 8  # cross-attention heads
    router_hidden: int = 256
    num_experts: int = 8  # E
    top_k: int = 4  # k
    normal_len: int = 5  # M_n
    abnormal_len: int = 6  # M_a
    ctx_len: int = 8  # M_q; with prompt_mode="anomalyclip" their learnable context vectors per state (12)
    ctx_per_layer: bool = False  # [decision] one Q_ctx shared by all layers
    share_pool: bool = False  # Table 5
    share_attention: bool = False  # Table 5
    abnormal_prompt: str = "suffix"  # [decision] "suffix": [S_n][S_a]; "replace": [S_a] (Eq. 1)
    class_name: str = "object"  # generic class word of the prompt
    use_class_names: bool = False  # put the real class name in the prompt instead
    text_truncation: bool = True  # run the text transformer only up to the last EOT (exact)
    # AnomalyCLIP's learnable text tokens: sets of deep_prompt_len tokens replace the tokens after
    # [SOS] before text blocks 2 .. deep_prompt_depth (their --depth 9 --t_n_ctx 4).
    deep_prompt_depth: int = 9
    deep_prompt_len: int = 4
    # [decision] VGMoP's visual tokens (Eq. 2): "pre_projection" = F_x^(l) (1024 wide) and the
    # global token before proj; "projected" = the normalised 768-wide features of Eq. 6 and 7.
    vgmop_input: str = "pre_projection"

    # --- Maps and score (spec 4) -------------------------------------------------------------
    tau: float = 0.07
    tau_global: float = 0.01  # tau'
    layer_reduce: str = "mean"  # [decision] "mean" | "sum" (Eq. 6 sums; needs image_score="global")
    image_score: str = "eq7"  # [decision] "eq7": s = (max(M) + p_g) / 2; "global": s = p_g (AnomalyCLIP)
    sigma: float = 4.0  # Gaussian smoothing at evaluation

    # --- Losses (spec 5) ---------------------------------------------------------------------
    alpha: float = 0.01  # L_balance weight
    beta: float = 0.005  # L_decouple weight
    focal_gamma: float = 2.0
    dice_smooth: float = 1.0  # [decision]
    seg_loss_on: str = "per_layer"  # [decision] "per_layer" | "combined"
    # [decision] lam, the weight of L_seg in the total: 1 (AnomalyCLIP's train.py at the commit of
    # their logs, ff7ca47); their later commit 76b83e1 multiplies the segmentation loss by 4.
    seg_loss_weight: float = 1.0

    # --- Training protocol (spec 6) ----------------------------------------------------------
    epochs: int = 15
    batch_size: int = 16
    lr: float = 1e-3
    warmup_epochs: int = 3
    betas: tuple = (0.6, 0.999)
    seed: int = 111  # [decision]
    # [decision] arithmetic of the trainable forward on CUDA: "fp32" (TF32 matmuls) or "bf16"
    # autocast. The frozen image encoder runs in bf16 autocast on CUDA either way; CPUs: fp32.
    train_precision: str = "fp32"

    # --- Data (spec 6) -----------------------------------------------------------------------
    mask_rule: str = "nonzero"  # [decision] "nonzero" (the reference) | "jpeg_above_127" (JPEG masks)

    def __post_init__(self):
        _validate(self)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, base: str = "paper") -> "Config":
        """The named preset. An ablation (or ``paper``, the full model) is laid over ``base``."""
        if name not in PRESETS:
            raise ConfigError(_unknown("preset", name, PRESETS) + " List them with `pmoe describe --presets`.")
        if base not in BASES:
            raise ConfigError(_unknown("base preset", base, BASES))
        if name in BASES and name != "paper":
            if base != "paper":
                raise ConfigError(f"{name!r} is a complete preset; it cannot be laid over {base!r}.")
            return cls.from_dict(BASES[name])
        return ablation_config(name, cls.from_dict(BASES[base]))

    @staticmethod
    def presets() -> list:
        """Every preset name, bases first, then ablations in table order."""
        return list(PRESETS)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [key for key in values if key not in known]
        if unknown:
            raise ConfigError("; ".join(_unknown("config key", key, known) for key in unknown))
        converted = {key: _convert(known[key], value) for key, value in values.items()}
        return cls(**converted)

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (unknown keys are errors)."""
        return self.from_dict({**self.to_dict(), **changes})

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass the config.json of a run directory.")
        return cls.from_json(path.read_text())

    # --- derived quantities ------------------------------------------------------------------
    @property
    def training_free(self) -> bool:
        """Whether the model has nothing to train (the written prompt ensemble): CLIP weights suffice."""
        return self.prompt_mode == "fixed_ensemble"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_prompt_sets(self) -> int:
        """How many independent prompt generators there are (one per layer, or one in all)."""
        return self.num_layers if (self.prompt_mode == "vgmop" and self.vgmop_per_layer) else 1

    @property
    def pools_num_experts(self) -> int:
        """Experts per pool: E for VGMoP and the ensemble, 1 for the static prompt."""
        return 1 if self.prompt_mode == "static" else self.num_experts


def _convert(spec: dataclasses.Field, value):
    if isinstance(spec.default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {spec.name!r} takes a list, got {value!r}")
        return tuple(value)
    if isinstance(spec.default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {spec.name!r} takes true or false, got {value!r}")
        return value
    if isinstance(spec.default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, type(spec.default)):
        raise ConfigError(
            f"config key {spec.name!r} takes a {type(spec.default).__name__}, got {value!r}"
        )
    return value


CHOICES = {
    "prompt_mode": ("vgmop", "static", "ensemble", "anomalyclip", "fixed_ensemble"),
    "abnormal_prompt": ("suffix", "replace"),
    "layer_reduce": ("mean", "sum"),
    "seg_loss_on": ("per_layer", "combined"),
    "pos_embed_interp": ("bilinear", "bicubic"),
    "global_feature": ("anomalyclip", "open_clip"),
    "vgmop_input": ("pre_projection", "projected"),
    "image_score": ("eq7", "global"),
    "train_precision": ("fp32", "bf16"),
    "mask_rule": ("nonzero", "jpeg_above_127"),
}


def _validate(config: Config) -> None:
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {allowed}, got {getattr(config, key)!r}")
    if not config.layers or list(config.layers) != sorted(set(config.layers)) or min(config.layers) < 1:
        raise ConfigError(f"layers must be increasing block numbers starting at 1, got {config.layers}")
    if not 1 <= config.top_k <= config.num_experts:
        raise ConfigError(f"top_k must be between 1 and num_experts={config.num_experts}, got {config.top_k}")
    if config.vv_attention and not 1 <= config.vv_start <= min(config.layers):
        raise ConfigError(f"vv_start must be between 1 and the first tapped layer, got {config.vv_start}")
    if config.image_size < 14:
        raise ConfigError(f"image_size must be at least one patch, got {config.image_size}")
    if config.layer_reduce == "sum" and config.image_score == "eq7":
        raise ConfigError(
            "layer_reduce='sum' cannot train with image_score='eq7': M then sums the L layers' probabilities, "
            "so s = (max(M) + p_g) / 2 exceeds 1, where the BCE of L_cls is undefined and gives no gradient. "
            "Use layer_reduce='mean' (the same map up to the factor L) or image_score='global' (s = p_g)."
        )
    if config.prompt_mode in ("anomalyclip", "fixed_ensemble") and config.use_class_names:
        raise ConfigError(f"prompt_mode={config.prompt_mode!r} uses one prompt pair for every class; "
                          "set use_class_names=false (the class word is class_name).")
    if config.prompt_mode == "anomalyclip":
        _validate_deep_prompts(config)


def _validate_deep_prompts(config: Config) -> None:
    """AnomalyCLIP's deep text tokens must fit the text tower and the context."""
    from pmoe.backbone import text_depth

    blocks = text_depth(config.clip_model)
    if not 1 <= config.deep_prompt_len <= config.ctx_len:
        raise ConfigError(f"deep_prompt_len must be between 1 and ctx_len={config.ctx_len} (the deep tokens "
                          f"replace context vectors), got {config.deep_prompt_len}")
    if blocks is not None and not 1 <= config.deep_prompt_depth <= blocks:
        raise ConfigError(
            f"deep_prompt_depth must be between 1 and {blocks}, the text blocks of {config.clip_model}, got "
            f"{config.deep_prompt_depth}. Lay the preset over the base of this backbone (e.g. "
            "Config.preset('anomalyclip', base='tiny'), which maps their depth 9 of 12 onto it) or set it."
        )


def _unknown(what: str, name: str, valid) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown {what} {name!r}.{hint} Valid: {', '.join(valid)}."


# Base presets: complete configurations.
BASES = {
    "paper": {},
    "tiny": {
        "clip_model": "pmoe-tiny",
        "clip_weights": "random",
        "quick_gelu": False,
        "image_size": 112,
        "layers": (1, 2, 3, 4),
        "vv_start": 1,
        "num_heads": 4,
        "router_hidden": 32,
        "epochs": 2,
        "batch_size": 8,
        "warmup_epochs": 1,
        "lr": 3e-3,
        "seed": 0,
    },
}
BASES["demo"] = {**BASES["tiny"], "epochs": 4}

# Ablation presets: overrides laid over a base (Tables 2-6 and Figure 7), then the alternative
# values of two reproduction decisions, so both readings can be trained and compared.
ABLATIONS = {
    "table2-static": {"prompt_mode": "static", "alpha": 0.0, "beta": 0.0},
    "table2-ensemble": {"prompt_mode": "ensemble", "alpha": 0.0, "beta": 0.0},
    "table2-vgmop-single": {"vgmop_per_layer": False, "alpha": 0.0, "beta": 0.0},
    "table3-alpha0": {"alpha": 0.0},
    "table3-alpha0.1": {"alpha": 0.1},
    "table4-l24": {"layers": (24,)},
    "table4-l12-24": {"layers": (12, 24)},
    "table4-l6-12-24": {"layers": (6, 12, 24)},
    "table4-l6-18-24": {"layers": (6, 18, 24)},
    "table5-shared-pool": {"share_pool": True},
    "table5-shared-attention": {"share_attention": True},
    "table5-shared-both": {"share_pool": True, "share_attention": True},
    "table6-e4-k4": {"num_experts": 4, "top_k": 4},
    "table6-e8-k1": {"num_experts": 8, "top_k": 1},
    "table6-e8-k2": {"num_experts": 8, "top_k": 2},
    "table6-e16-k2": {"num_experts": 16, "top_k": 2},
    "table6-e16-k4": {"num_experts": 16, "top_k": 4},
    "table6-e16-k8": {"num_experts": 16, "top_k": 8},
    "fig7-no-decouple": {"beta": 0.0},
    "global-open-clip": {"global_feature": "open_clip"},
    "vgmop-projected": {"vgmop_input": "projected"},
}

# AnomalyCLIP (Zhou et al., ICLR 2024) through this harness: their prompt learner, their test
# setting (tau 0.07 for maps and p_g, s = p_g, layer maps summed, sigma 4) and their training recipe
# (train.py: Adam 1e-3, betas (0.5, 0.999), no warm-up, 15 epochs, batch 8, focal + dice on both
# states per layer, cross-entropy on p_g, no auxiliary losses). Their logs used maps of layers
# 6, 12, 18, 24; a later test.sh passes layer 24 alone (results/anomalyclip/README.md).
ANOMALYCLIP = {
    "prompt_mode": "anomalyclip", "ctx_len": 12, "deep_prompt_depth": 9, "deep_prompt_len": 4,
    "tau": 0.07, "tau_global": 0.07, "image_score": "global", "layer_reduce": "sum", "sigma": 4.0,
    "alpha": 0.0, "beta": 0.0, "seg_loss_on": "per_layer", "lr": 1e-3, "betas": (0.5, 0.999),
    "warmup_epochs": 0, "epochs": 15, "batch_size": 8,
}
ABLATIONS["anomalyclip"] = {**ANOMALYCLIP, "layers": (24,)}
ABLATIONS["anomalyclip-4layers"] = {**ANOMALYCLIP, "layers": (6, 12, 18, 24)}
# A training-free detector: the written prompt ensemble; s = p_g at CLIP's own temperature
# (tau' = 0.01, its logit scale of 100), the maps averaged over the taps as in the paper.
ABLATIONS["clip-zero-shot"] = {"prompt_mode": "fixed_ensemble", "image_score": "global", "alpha": 0.0, "beta": 0.0}

PRESETS = {**BASES, **ABLATIONS}
PAPER_TEXT_DEPTH = 12  # text blocks of ViT-L-14-336, where AnomalyCLIP's depth 9 was set


def ablation_config(name: str, base: Config) -> Config:
    """Lay the ablation ``name`` over an existing config, mapping layer sets and text depth to its backbone.

    Layer-set presets (Table 4, AnomalyCLIP) name ViT-L blocks {6,12,18,24}; on a backbone with
    fewer blocks (the tiny CLIP) they are mapped proportionally onto ``base.layers``.
    AnomalyCLIP's deep-token depth (9 of 12 text blocks) becomes ceil(9 * T / 12) on a text tower
    of T blocks (pmoe-tiny: 2, one set of deep tokens before block 2).
    """
    if name == "paper":
        return base
    if name not in ABLATIONS:
        raise ConfigError(_unknown("ablation preset", name, ABLATIONS))
    overrides = dict(ABLATIONS[name])
    if "layers" in overrides:
        paper_layers = Config().layers
        mapping = dict(zip(paper_layers, base.layers)) if len(base.layers) == len(paper_layers) else None
        if mapping is None:
            raise ConfigError(f"cannot map layer set {overrides['layers']} onto layers {base.layers}")
        overrides["layers"] = tuple(mapping[layer] for layer in overrides["layers"])
    if "deep_prompt_depth" in overrides:
        overrides["deep_prompt_depth"] = mapped_text_depth(overrides["deep_prompt_depth"], base.clip_model)
    return base.replace(**overrides)


def mapped_text_depth(depth: int, clip_model: str) -> int:
    """A depth set on ViT-L-14-336's 12 text blocks, scaled to ``clip_model``'s text tower (rounded up)."""
    from pmoe.backbone import text_depth

    blocks = text_depth(clip_model)
    if blocks is None or blocks == PAPER_TEXT_DEPTH:
        return depth
    return max(1, math.ceil(depth * blocks / PAPER_TEXT_DEPTH))
