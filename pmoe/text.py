"""Prompt assembly and the frozen CLIP text encoder with exact context truncation (spec 3).

Prompts are built directly as token embeddings (Eq. 1):

    normal:   [SOS] S_agg^n        [class] Q_ctx [EOT]
    abnormal: [SOS] S_agg^n S_agg^a [class] Q_ctx [EOT]     (abnormal_prompt="suffix")

CLIP's text transformer is causal, so the feature at the EOT position does not depend on the
tokens after it: running the transformer on the first (last EOT position + 1) tokens instead
of all 77 gives the same features exactly. All prompts of a step go through one call.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

PAD_TOKEN = 0


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> SimpleTokenizer:
    """CLIP's BPE tokenizer, built once per process (building it takes about half a second)."""
    return SimpleTokenizer()


class TextEncoder(nn.Module):
    """The frozen CLIP text transformer applied to token-embedding sequences."""

    def __init__(self, clip: nn.Module, truncate: bool = True):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.truncate = truncate

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    @property
    def width(self) -> int:
        return self.positional_embedding.shape[1]

    def forward(self, embeddings: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Normalised text features (N, D_embed) of N sequences (N, T, width) ending at ``eot`` (N,).

        Positions after a sequence's EOT are ignored; with ``truncate`` the transformer runs
        on the first ``eot.max() + 1`` positions only, otherwise on the full context.
        """
        length = int(eot.max()) + 1 if self.truncate else self.context_length
        x = embeddings[:, :length]
        if x.shape[1] < length:
            pad = self.token_embedding.weight[PAD_TOKEN].to(x.dtype)
            x = torch.cat([x, pad.expand(x.shape[0], length - x.shape[1], -1)], dim=1)
        x = x + self.positional_embedding[:length].to(x.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
        return F.normalize(x @ self.text_projection.to(x.dtype), dim=-1)


class PromptAssembler(nn.Module):
    """Lays learnable state and context tokens between the frozen [SOS], class and [EOT] embeddings."""

    def __init__(self, token_embedding: nn.Embedding):
        super().__init__()
        self.token_embedding = token_embedding
        self.tokenizer = clip_tokenizer()

    def class_token_ids(self, names) -> list:
        """BPE token ids of each class name (without SOS/EOT)."""
        return [self.tokenizer.encode(name.replace("_", " ")) for name in names]

    def forward(self, states: torch.Tensor, context: torch.Tensor, class_ids: list):
        """Token embeddings (N, T, width) and EOT positions (N,) of ``[SOS] states [class] context [EOT]``.

        ``states`` (N, M, width) and ``context`` (N, M_q, width) are learnable; ``class_ids``
        holds N lists of token ids, possibly of different lengths (then the context and EOT
        move with the class name, and shorter sequences are padded after their EOT).
        """
        count, state_len = states.shape[:2]
        device = states.device
        longest = max(len(name_ids) for name_ids in class_ids)
        lengths = torch.tensor([len(name_ids) for name_ids in class_ids], device=device)
        padded = [list(name_ids) + [PAD_TOKEN] * (longest - len(name_ids)) for name_ids in class_ids]
        ids = torch.tensor(padded, dtype=torch.long, device=device)
        special = torch.tensor(
            [self.tokenizer.sot_token_id, self.tokenizer.eot_token_id, PAD_TOKEN], device=device
        )
        with torch.no_grad():
            frozen = self.token_embedding(torch.cat([special.expand(count, 3), ids], dim=1)).to(states.dtype)
        sos, eot_embedding, pad, names = frozen[:, :1], frozen[:, 1:2], frozen[:, 2:3], frozen[:, 3:]
        # Source layout: [SOS | states | names (padded) | context | EOT | PAD]; gather each output slot.
        source = torch.cat([sos, states, names, context, eot_embedding, pad], dim=1)
        total = 1 + state_len + longest + context.shape[1] + 1
        slot = torch.arange(total, device=device).expand(count, total)
        name_end = (1 + state_len + lengths)[:, None]
        eot = name_end[:, 0] + context.shape[1]
        index = torch.where(slot < name_end, slot, slot + (longest - lengths)[:, None])
        index = torch.where(slot == eot[:, None], total - 1, index)
        index = torch.where(slot > eot[:, None], total, index)
        embeddings = source.gather(1, index[..., None].expand(-1, -1, source.shape[2]))
        return embeddings, eot
