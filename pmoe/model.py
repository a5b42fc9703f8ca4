"""PromptMoE (paper Fig. 3): frozen CLIP + VGMoP prompts + layer-wise anomaly maps.

``model(images)`` runs the frozen image encoder (``encode_image``) and then
``forward_features``, which is all the trainable computation: VGMoP builds the normal and
abnormal prompts of each tapped layer from the visual tokens (Eq. 2-3), the text encoder turns
them into F_T^(l) in one batched call, and Eq. 6-7 give the anomaly map and the image score.
Because the image encoder is frozen, its outputs can be cached (see ``pmoe.features``).

Outputs of ``forward_features`` (a dict):
    anomaly_map  (B, H, W)  M; Gaussian-smoothed in eval mode only
    score        (B,)       s = (max(M) + p_g) / 2
    global_prob  (B,)       p_g
    layer_maps   (B, L, 2, H, W) per-layer [normal, abnormal] probabilities (loss input)
    text_features (B, L, 2, D)
    routing      dict of stacked tensors, or None for the static baselines:
                 indices (B, P, 2, k), weights (B, P, 2, k), probs (B, P, 2, E), with
                 P the number of VGMoP instances (L, or 1 for the single-layer variant) and the
                 state axis ordered [normal, abnormal].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pmoe.backbone import VisualBackbone, VisualFeatures, load_clip
from pmoe.errors import CheckpointError, ConfigError
from pmoe.maps import combine_layers, gaussian_smooth, global_probability, image_score, layer_probability_maps
from pmoe.text import PromptAssembler, TextEncoder
from pmoe.vgmop import INIT_STD, STATES, StaticPrompts, VGMoP


def build_model(config) -> "PromptMoE":
    """The PromptMoE model of ``config`` with its frozen CLIP (weights per ``config.clip_weights``)."""
    return PromptMoE(config, load_clip(config))


class PromptMoE(nn.Module):
    def __init__(self, config, clip: nn.Module):
        super().__init__()
        self.config = config
        self.visual = VisualBackbone(clip, config)
        self.text = TextEncoder(clip, truncate=config.text_truncation)
        self.assembler = PromptAssembler(clip.token_embedding)
        dim = self.text.width
        context_sets = config.num_layers if config.ctx_per_layer else 1
        self.context = nn.Parameter(torch.randn(context_sets, config.ctx_len, dim) * INIT_STD)  # Q_ctx
        if config.prompt_mode == "vgmop":
            self.vgmop = nn.ModuleList(VGMoP(config, self.visual.width, dim) for _ in range(config.num_prompt_sets))
        else:
            self.prompts = StaticPrompts(config, dim, config.pools_num_experts)
        self._generic_ids = self.assembler.class_token_ids([config.class_name])[0]

    # --- modes and parameters ----------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.visual.eval()
        self.text.eval()
        return self

    def trainable_state_dict(self) -> dict:
        """The learnable tensors only (VGMoP or static prompts, and Q_ctx)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

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
            for name, param in self.named_parameters():
                if name in state:
                    param.copy_(state[name])

    def parameter_counts(self) -> dict:
        """Parameter counts per group: the trainable prompt generator, Q_ctx, the frozen CLIP."""
        generator = self.vgmop if self.config.prompt_mode == "vgmop" else self.prompts
        frozen = {id(p): p for p in self.parameters() if not p.requires_grad}
        return {
            "prompt_generator": sum(p.numel() for p in generator.parameters()),
            "context": self.context.numel(),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "clip_frozen": sum(p.numel() for p in frozen.values()),
        }

    def expert_pools(self) -> list:
        """Every expert pool tensor (E, M, D), one per VGMoP instance and pool (for L_decouple)."""
        if self.config.prompt_mode != "vgmop":
            return []
        return [pool for unit in self.vgmop for pool in unit.experts.values()]

    # --- forward -----------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> VisualFeatures:
        """Frozen CLIP features of the images (no gradient)."""
        with torch.no_grad():
            return self.visual(images)

    def forward(self, images: torch.Tensor, class_names=None) -> dict:
        return self.forward_features(self.encode_image(images), class_names)

    def forward_features(self, features: VisualFeatures, class_names=None) -> dict:
        config = self.config
        dtype = self.context.dtype
        patch_tokens, cls_token = features.patch_tokens.to(dtype), features.cls_token.to(dtype)
        if patch_tokens.shape[1] != config.num_layers:
            raise ConfigError(
                f"features have {patch_tokens.shape[1]} taps but the config has layers {config.layers}; "
                "the feature cache was made for another layer set."
            )
        patches = self.visual.project(patch_tokens)
        global_feature = self.visual.project(cls_token)
        text, routing = self.prompt_features(patch_tokens, cls_token, class_names)
        layer_maps = layer_probability_maps(patches, text, config.tau, config.image_size)
        anomaly_map = combine_layers(layer_maps, config.layer_reduce)
        if not self.training:
            anomaly_map = gaussian_smooth(anomaly_map, config.sigma)
        global_prob = global_probability(global_feature, text[:, -1], config.tau_global)
        return {
            "anomaly_map": anomaly_map,
            "score": image_score(anomaly_map, global_prob),
            "global_prob": global_prob,
            "layer_maps": layer_maps,
            "text_features": text,
            "routing": routing,
        }

    def prompt_features(self, patch_tokens, cls_token, class_names=None):
        """F_T (B, L, 2, D) for every image and layer, and the routing decisions."""
        config = self.config
        batch = patch_tokens.shape[0]
        class_ids = self._class_ids(batch, class_names)
        if config.prompt_mode == "vgmop":
            normal, abnormal, routing = self._mixed_states(patch_tokens, cls_token)
        else:
            states = self.prompts()
            normal, abnormal = (states[s][0][None, None] for s in STATES)
            routing = None
            if class_ids is not None:
                normal, abnormal = normal.expand(batch, -1, -1, -1, -1), abnormal.expand(batch, -1, -1, -1, -1)
        if config.abnormal_prompt == "suffix":
            abnormal = torch.cat([normal, abnormal], dim=3)
        text = self._encode(normal, abnormal, class_ids)
        return text.expand(batch, config.num_layers, -1, -1), routing

    def _class_ids(self, batch: int, class_names):
        if not self.config.use_class_names:
            return None
        if class_names is None or len(class_names) != batch:
            raise ConfigError("use_class_names is set: pass one class name per image (class_names=[...]).")
        return self.assembler.class_token_ids(class_names)

    def _mixed_states(self, patch_tokens, cls_token):
        """S_agg^n, S_agg^a as (B, P, 1, M, D) and the stacked routing of the P VGMoP instances."""
        sets = len(self.vgmop)
        taps = range(sets) if sets > 1 else [patch_tokens.shape[1] - 1]
        normal, abnormal, decisions = [], [], []
        for unit, tap in zip(self.vgmop, taps):
            tokens = torch.cat([patch_tokens[:, tap], cls_token[:, None]], dim=1)  # (B, HW+1, Dx)
            out = unit(tokens)
            normal.append(out["normal"][0])
            abnormal.append(out["abnormal"][0])
            decisions.append([out[s][1] for s in STATES])
        routing = {
            field: torch.stack([torch.stack([getattr(d, field) for d in pair], dim=1) for pair in decisions], dim=1)
            for field in ("indices", "weights", "probs")
        }
        return torch.stack(normal, 1)[:, :, None], torch.stack(abnormal, 1)[:, :, None], routing

    def _encode(self, normal, abnormal, class_ids):
        """Encode states (B_s, P, E', M, D) of both states into F_T (B_s, slots, 2, D_embed).

        ``slots`` is L when prompts differ per layer (per-layer VGMoP or per-layer Q_ctx), else 1;
        the E' prompts of the static ensemble are averaged (their outputs, as in Table 2).
        """
        config = self.config
        group, sets, ensemble = normal.shape[:3]
        slots = config.num_layers if (sets > 1 or self.context.shape[0] > 1) else 1
        set_index = torch.arange(slots, device=normal.device).clamp(max=sets - 1)
        ctx_index = torch.arange(slots, device=normal.device).clamp(max=self.context.shape[0] - 1)
        context = self.context[ctx_index][None, :, None].expand(group, -1, ensemble, -1, -1)
        count = group * slots * ensemble
        ids = class_ids if class_ids is not None else [self._generic_ids] * group
        ids = [name for name in ids for _ in range(slots * ensemble)]
        flat_context = context.reshape(count, *context.shape[3:])
        sequences = [
            self.assembler(states[:, set_index].reshape(count, *states.shape[3:]), flat_context, ids)
            for states in (normal, abnormal)
        ]
        length = max(embeddings.shape[1] for embeddings, _ in sequences)
        embeddings = torch.cat([F.pad(e, (0, 0, 0, length - e.shape[1])) for e, _ in sequences])
        eot = torch.cat([eot for _, eot in sequences])
        text = self.text(embeddings, eot).view(2, group, slots, ensemble, -1)
        if ensemble > 1:
            text = F.normalize(text.mean(dim=3, keepdim=True), dim=-1)
        return text[:, :, :, 0].permute(1, 2, 0, 3)
