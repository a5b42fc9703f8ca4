"""PromptMoE (paper Fig. 3): frozen CLIP + VGMoP prompts + layer-wise anomaly maps.

``model(images)`` runs the frozen image encoder (``encode_image``) and then
``forward_features``, which is all the trainable computation: the prompt learner (VGMoP by
default, see ``pmoe.prompt_learners``) builds the normal and abnormal prompts of each tapped
layer from the visual tokens (Eq. 2-3), the text encoder turns them into F_T^(l) in one batched
call, and Eq. 6-7 give the anomaly map and the image score. Because the image encoder is
frozen, its outputs can be cached (see ``pmoe.features``).

Outputs of ``forward_features`` (a dict):
    anomaly_map  (B, H, W)  M; Gaussian-smoothed in eval mode only
    score        (B,)       s = (max(M) + p_g) / 2 (``image_score="eq7"``) or p_g (``"global"``)
    global_prob  (B,)       p_g = sigmoid(global_logit)
    global_logit (B,)       (f_g . F_T^(last)_abnormal - f_g . F_T^(last)_normal) / tau'
    layer_maps   (B, L, 2, H, W) per-layer [normal, abnormal] probabilities (loss input)
    text_features (B, L, 2, D)
    routing      dict of stacked tensors, or None for the static baselines:
                 indices (B, P, 2, k), weights (B, P, 2, k), probs (B, P, 2, E), with
                 P the number of VGMoP instances (L, or 1 for the single-layer variant) and the
                 state axis ordered [normal, abnormal].
"""

from __future__ import annotations

import torch
from torch import nn

from pmoe.backbone import VisualBackbone, VisualFeatures, load_clip
from pmoe.errors import CheckpointError, ConfigError
from pmoe.maps import combine_layers, gaussian_smooth, global_logit, image_score, layer_probability_maps
from pmoe.prompt_learners import build_prompt_learner
from pmoe.text import PromptAssembler, TextEncoder


def build_model(config, clip: nn.Module | None = None) -> "PromptMoE":
    """The PromptMoE model of ``config`` with its frozen CLIP (weights per ``config.clip_weights``).

    ``clip``: an already loaded frozen CLIP of the same architecture and weights to share
    (several models evaluated together hold one copy).
    """
    return PromptMoE(config, clip if clip is not None else load_clip(config))


class PromptMoE(nn.Module):
    def __init__(self, config, clip: nn.Module):
        super().__init__()
        self.config = config
        self.visual = VisualBackbone(clip, config)
        self.text = TextEncoder(clip, truncate=config.text_truncation)
        self.assembler = PromptAssembler(clip.token_embedding)
        self.prompt_learner = build_prompt_learner(
            config, text=self.text, assembler=self.assembler,
            visual_width=self.visual.width, embed_width=self.visual.embed_width,
        )

    # --- modes and parameters ----------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.visual.eval()
        self.text.eval()
        return self

    def trainable_state_dict(self) -> dict:
        """The prompt learner's learnable tensors (VGMoP or static prompts, and Q_ctx), by their names in it."""
        return {name: p.detach() for name, p in self.prompt_learner.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict) -> None:
        """Load tensors saved by ``trainable_state_dict``; a mismatch is a CheckpointError."""
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            detail = "; ".join(
                f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys
            )
            raise CheckpointError(
                f"the checkpoint does not match this model's config ({detail}); "
                "build the model from the config.json saved with the checkpoint."
            )
        with torch.no_grad():
            for name, param in self.prompt_learner.named_parameters():
                if name in state:
                    param.copy_(state[name])

    def parameter_counts(self) -> dict:
        """Parameter counts: the learner's groups (prompt generator, Q_ctx), all trainable, the frozen CLIP."""
        return {
            **self.prompt_learner.parameter_counts(),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "clip_frozen": sum(p.numel() for p in self.parameters() if not p.requires_grad),
        }

    def expert_pools(self) -> list:
        """Every expert pool tensor (E, M, D), one per VGMoP instance and pool (for L_decouple)."""
        return self.prompt_learner.expert_pools()

    # --- forward -----------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> VisualFeatures:
        """Frozen CLIP features of the images (no gradient)."""
        with torch.no_grad():
            return self.visual(images)

    def forward(self, images: torch.Tensor, class_names=None) -> dict:
        return self.forward_features(self.encode_image(images), class_names)

    def forward_features(self, features: VisualFeatures, class_names=None) -> dict:
        config = self.config
        if features.patch_tokens.shape[1] != config.num_layers:
            raise ConfigError(
                f"features have {features.patch_tokens.shape[1]} taps but the config has layers {config.layers}; "
                "the feature cache was made for another layer set."
            )
        image = self.visual.image_features(features, config.global_feature)
        text, routing = self.prompt_learner(image, class_names)
        layer_maps = layer_probability_maps(image.patches, text, config.tau, config.image_size)  # Eq. 6
        anomaly_map = combine_layers(layer_maps, config.layer_reduce)
        if not self.training:
            anomaly_map = gaussian_smooth(anomaly_map, config.sigma)
        logit = global_logit(image.global_feature, text[:, -1], config.tau_global)  # Eq. 7
        global_prob = logit.sigmoid()
        return {
            "anomaly_map": anomaly_map,
            "score": image_score(anomaly_map, global_prob, config.image_score),
            "global_prob": global_prob,
            "global_logit": logit,
            "layer_maps": layer_maps,
            "text_features": text,
            "routing": routing,
        }
