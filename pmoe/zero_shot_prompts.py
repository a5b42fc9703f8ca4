"""The text side of a training-free CLIP anomaly detector: a fixed ensemble of written prompts.

Usage::

    from pmoe.zero_shot_prompts import ensemble_text_features
    text_features = ensemble_text_features(clip)   # (2, D): [normal, abnormal], unit norm

Each state is described by short phrases around the object word, and each phrase is placed in
every sentence template (the prompt-ensemble idea of WinCLIP). The frozen text tower encodes
every sentence; the unit-norm features of a state are averaged and normalised again, giving
one feature per state, F_T = [normal, abnormal], that needs no training. The model uses them
with ``prompt_mode="fixed_ensemble"`` (preset ``clip-zero-shot``, see
:class:`pmoe.prompt_learners.FixedEnsemblePrompts`).
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from pmoe.text import TextEncoder

NORMAL_STATES = (
    "{}",
    "intact {}",
    "pristine {}",
    "{} in good condition",
    "{} with no defects",
    "{} without any damage",
    "normal {}",
)
ABNORMAL_STATES = (
    "defective {}",
    "{} with a defect",
    "cracked {}",
    "scratched {}",
    "{} with a hole",
    "contaminated {}",
    "{} with an anomaly",
)
TEMPLATES = (
    "a photo of a {}.",
    "a picture showing the {}.",
    "a close-up shot of a {}.",
    "a zoomed-in view of the {}.",
    "a well-lit photo of a {}.",
    "a dimly lit photo of the {}.",
    "an out-of-focus photo of a {}.",
    "a grainy photo of the {}.",
    "an inspection image of a {}.",
    "an industrial photo of the {}.",
    "a medical scan of a {}.",
    "there is a {} in the image.",
)


def state_sentences(class_name: str = "object") -> tuple:
    """The sentences of each state: (normal list, abnormal list), every phrase in every template."""
    name = class_name.replace("_", " ")
    return tuple(
        [template.format(phrase.format(name)) for phrase in phrases for template in TEMPLATES]
        for phrases in (NORMAL_STATES, ABNORMAL_STATES)
    )


def ensemble_text_features(clip: nn.Module, class_name: str = "object") -> torch.Tensor:
    """Normalised per-state mean of the normalised sentence features, (2, D_embed) = [normal, abnormal].

    ``clip``: the frozen text tower, as an open_clip CLIP or a :class:`pmoe.text.TextEncoder`.
    """
    encoder = clip if isinstance(clip, TextEncoder) else TextEncoder(clip)
    device = encoder.token_embedding.weight.device
    features = []
    with torch.no_grad():
        for sentences in state_sentences(class_name):
            tokens = open_clip.tokenize(sentences, context_length=encoder.context_length).to(device)
            encoded = encoder(encoder.token_embedding(tokens), tokens.argmax(dim=-1))
            features.append(encoded.mean(dim=0))
    return F.normalize(torch.stack(features), dim=-1)
