"""Prompt learners: the trainable part that turns image features into the text features F_T.

A prompt learner is an ``nn.Module`` called as ``learner(image, class_names)`` with the
batch's :class:`pmoe.backbone.ImageFeatures` (and, when the config puts class names in the
prompt, one name per image). It returns :class:`PromptOutput`: the normalised text features
F_T (B, L, 2, D), one slot per tapped layer, states ordered [normal, abnormal], and the
routing decisions (a dict of stacked tensors) or None. The model computes maps, scores and
losses from these alone, so another learner is added by subclassing :class:`PromptLearner`
and registering it in ``LEARNERS`` under a new ``prompt_mode`` value (also listed in
``pmoe.config.CHOICES``); the map, score and loss path does not change.

:class:`StatePrompts` is the paper's learner (``prompt_mode="vgmop"``: one VGMoP per tapped
layer, Eq. 1-3) and the Table 2 baselines (``"static"``, ``"ensemble"``): learnable state
prompts and the shared context Q_ctx, laid into ``[SOS] S^n (S^a) [class] Q_ctx [EOT]`` and
encoded by the frozen text tower, all B x slots x 2 prompts in one call.
:class:`AnomalyCLIPPrompts` (``"anomalyclip"``) is AnomalyCLIP's object-agnostic learner and
:class:`FixedEnsemblePrompts` (``"fixed_ensemble"``) the training-free written ensemble: both
give one [normal, abnormal] pair for every image and tapped layer, unrouted.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pmoe.anomalyclip import AnomalyCLIPPromptLearner
from pmoe.backbone import ImageFeatures
from pmoe.errors import ConfigError
from pmoe.text import PromptAssembler, TextEncoder
from pmoe.vgmop import INIT_STD, STATES, StaticPrompts, VGMoP
from pmoe.zero_shot_prompts import ensemble_text_features


class PromptOutput(NamedTuple):
    text: torch.Tensor  # (B, L, 2, D) normalised F_T, [normal, abnormal] per tapped layer
    routing: Optional[dict]  # indices, weights (B, P, 2, k) and probs (B, P, 2, E); None if unrouted


class PromptLearner(nn.Module):
    """Interface of a prompt learner (see the module docstring).

    Built as ``Learner(config, text=..., assembler=..., visual_width=..., embed_width=...)``
    from the frozen text tower, the prompt assembler and the widths Dx and D of the image side.
    """

    def forward(self, image: ImageFeatures, class_names=None) -> PromptOutput:
        raise NotImplementedError

    def expert_pools(self) -> list:
        """Every expert pool tensor (E, M, D), for L_decouple; none by default."""
        return []

    def parameter_counts(self) -> dict:
        """Trainable parameters by group; one group by default."""
        return {"prompt_generator": sum(p.numel() for p in self.parameters() if p.requires_grad)}


class StatePrompts(PromptLearner):
    """The paper's prompts: VGMoP (or the static baselines) for the states, and Q_ctx."""

    def __init__(self, config, *, text: TextEncoder, assembler: PromptAssembler, visual_width: int,
                 embed_width: int):
        super().__init__()
        self.config = config
        self.text = text
        self.assembler = assembler
        dim = text.width
        context_sets = config.num_layers if config.ctx_per_layer else 1
        self.context = nn.Parameter(torch.randn(context_sets, config.ctx_len, dim) * INIT_STD)  # Q_ctx
        if config.prompt_mode == "vgmop":
            token_width = visual_width if config.vgmop_input == "pre_projection" else embed_width
            self.vgmop = nn.ModuleList(VGMoP(config, token_width, dim) for _ in range(config.num_prompt_sets))
        else:
            self.prompts = StaticPrompts(config, dim, config.pools_num_experts)
        self._generic_ids = assembler.class_token_ids([config.class_name])[0]

    def expert_pools(self) -> list:
        if self.config.prompt_mode != "vgmop":
            return []
        return [pool for unit in self.vgmop for pool in unit.experts.values()]

    def parameter_counts(self) -> dict:
        generator = self.vgmop if self.config.prompt_mode == "vgmop" else self.prompts
        return {"prompt_generator": sum(p.numel() for p in generator.parameters()), "context": self.context.numel()}

    def forward(self, image: ImageFeatures, class_names=None) -> PromptOutput:
        config = self.config
        batch = image.tokens.shape[0]
        class_ids = self._class_ids(batch, class_names)
        if config.prompt_mode == "vgmop":
            normal, abnormal, routing = self._mixed_states(image)
        else:
            states = self.prompts()
            normal, abnormal = (states[s][0][None, None] for s in STATES)
            routing = None
            if class_ids is not None:
                normal, abnormal = normal.expand(batch, -1, -1, -1, -1), abnormal.expand(batch, -1, -1, -1, -1)
        if config.abnormal_prompt == "suffix":
            abnormal = torch.cat([normal, abnormal], dim=3)
        text = self._encode(normal, abnormal, class_ids)
        return PromptOutput(text.expand(batch, config.num_layers, -1, -1), routing)

    def vgmop_tokens(self, image: ImageFeatures, tap: int) -> torch.Tensor:
        """VGMoP's visual input at a tap (Eq. 2): the HW patch tokens and the global token (B, HW+1, width)."""
        if self.config.vgmop_input == "projected":
            return torch.cat([image.patches[:, tap], image.global_feature[:, None]], dim=1)
        return torch.cat([image.tokens[:, tap], image.global_token[:, None]], dim=1)

    def _class_ids(self, batch: int, class_names):
        if not self.config.use_class_names:
            return None
        if class_names is None or len(class_names) != batch:
            raise ConfigError("use_class_names is set: pass one class name per image (class_names=[...]).")
        return self.assembler.class_token_ids(class_names)

    def _mixed_states(self, image: ImageFeatures):
        """S_agg^n, S_agg^a as (B, P, 1, M, D) and the stacked routing of the P VGMoP instances."""
        sets = len(self.vgmop)
        taps = range(sets) if sets > 1 else [image.tokens.shape[1] - 1]
        normal, abnormal, decisions = [], [], []
        for unit, tap in zip(self.vgmop, taps):
            out = unit(self.vgmop_tokens(image, tap))
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


class AnomalyCLIPPrompts(PromptLearner):
    """AnomalyCLIP's learnable prompts (:class:`pmoe.anomalyclip.AnomalyCLIPPromptLearner`) for every layer.

    ``ctx_len`` context vectors per state and ``deep_prompt_len`` learnable text tokens before
    text blocks 2 .. ``deep_prompt_depth``; the same F_T for every image and tap.
    """

    def __init__(self, config, *, text: TextEncoder, assembler: PromptAssembler, visual_width: int,
                 embed_width: int):
        super().__init__()
        self.layers = config.num_layers
        self.learner = AnomalyCLIPPromptLearner(text, n_ctx=config.ctx_len, depth=config.deep_prompt_depth,
                                                deep_len=config.deep_prompt_len, class_name=config.class_name,
                                                truncate=config.text_truncation)

    def forward(self, image: ImageFeatures, class_names=None) -> PromptOutput:
        return PromptOutput(self.learner().expand(image.tokens.shape[0], self.layers, -1, -1), None)


class FixedEnsemblePrompts(PromptLearner):
    """The written prompt ensemble (:mod:`pmoe.zero_shot_prompts`), encoded once: nothing to train."""

    def __init__(self, config, *, text: TextEncoder, assembler: PromptAssembler, visual_width: int,
                 embed_width: int):
        super().__init__()
        self.layers = config.num_layers
        self.register_buffer("pair", ensemble_text_features(text, config.class_name), persistent=False)

    def forward(self, image: ImageFeatures, class_names=None) -> PromptOutput:
        return PromptOutput(self.pair.expand(image.tokens.shape[0], self.layers, -1, -1), None)


LEARNERS = {"vgmop": StatePrompts, "static": StatePrompts, "ensemble": StatePrompts,
            "anomalyclip": AnomalyCLIPPrompts, "fixed_ensemble": FixedEnsemblePrompts}


def build_prompt_learner(config, **frozen_parts) -> PromptLearner:
    """The learner of ``config.prompt_mode``, built from the frozen parts (see :class:`PromptLearner`)."""
    return LEARNERS[config.prompt_mode](config, **frozen_parts)
