"""Visually-Guided Mixture of Prompts (VGMoP, paper Fig. 4, Eq. 2-3) and the static baselines.

For one tapped layer and each state s in {normal, abnormal}:

- learnable queries q attend to the (HW+1) visual tokens F_x (Eq. 2), O = Attn(q, F_x W_K, F_x W_V);
- the routing vector r = mean(O) goes through the router G (Linear-ReLU-Linear) to logits z;
- p = softmax(z) feeds the balance loss (Eq. 4); the top-k logits give w = softmax(z_top);
- S_agg = sum_i w_i s_top,i over the selected experts of the state's pool (Eq. 3).

Only the selected experts enter S_agg, so unselected experts receive no task gradient.
Ablation switches (Table 5): ``share_attention`` (one query/attention module for both states)
and ``share_pool`` (one expert pool for both states; its experts have max(M_n, M_a) tokens and
the normal state uses the first M_n of them) [decision].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

STATES = ("normal", "abnormal")
INIT_STD = 0.02


class Routing(NamedTuple):
    """One router's decision for a batch."""

    indices: torch.Tensor  # (B, k) selected experts, by decreasing logit
    weights: torch.Tensor  # (B, k) softmax over the selected logits, w
    probs: torch.Tensor  # (B, E) softmax over all logits, p


class QueryAttention(nn.Module):
    """Eq. 2: learnable state queries attend to the visual tokens; returns r = mean(O)."""

    def __init__(self, visual_width: int, dim: int, num_queries: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the text width {dim} is not divisible by num_heads={num_heads}")
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * INIT_STD)
        self.key = nn.Linear(visual_width, dim, bias=False)  # W_K
        self.value = nn.Linear(visual_width, dim, bias=False)  # W_V
        self.num_heads = num_heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        heads = self.num_heads

        def split(x):
            return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        queries = split(self.queries.expand(batch, -1, -1).to(tokens.dtype))
        out = F.scaled_dot_product_attention(queries, split(self.key(tokens)), split(self.value(tokens)))
        return out.transpose(1, 2).flatten(2).mean(dim=1)  # O: (B, N_q, D) -> r: (B, D)


class Router(nn.Module):
    """The image-gated router G: Linear-ReLU-Linear from r to the E expert logits z."""

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.net(r)


def route(logits: torch.Tensor, top_k: int) -> Routing:
    """Sparse top-k gating: w = softmax over the k largest logits; p = softmax over all."""
    top = logits.topk(top_k, dim=-1)
    return Routing(top.indices, top.values.softmax(dim=-1), logits.softmax(dim=-1))


def aggregate(experts: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Eq. 3: S_agg = sum_i w_i s_top,i, for experts (E, M, D) -> (B, M, D)."""
    return torch.einsum("bk,bkmd->bmd", routing.weights.to(experts.dtype), experts[routing.indices])


class VGMoP(nn.Module):
    """One layer's VGMoP for both states: queries, routers and expert pools."""

    def __init__(self, config, visual_width: int, dim: int):
        super().__init__()
        self.top_k = config.top_k
        self.lengths = {"normal": config.normal_len, "abnormal": config.abnormal_len}
        attention_names = ("shared",) if config.share_attention else STATES
        self.attention = nn.ModuleDict({
            name: QueryAttention(visual_width, dim, config.num_queries, config.num_heads)
            for name in attention_names
        })
        self.router = nn.ModuleDict({s: Router(dim, config.router_hidden, config.num_experts) for s in STATES})
        pool_lengths = {"shared": max(self.lengths.values())} if config.share_pool else self.lengths
        self.experts = nn.ParameterDict({
            name: nn.Parameter(torch.randn(config.num_experts, length, dim) * INIT_STD)
            for name, length in pool_lengths.items()
        })

    def pool(self, state: str) -> torch.Tensor:
        return self.experts["shared"] if "shared" in self.experts else self.experts[state]

    def forward(self, tokens: torch.Tensor) -> dict:
        """For visual tokens (B, HW+1, Dx): {state: (S_agg (B, M_s, D), Routing)}."""
        shared_r = self.attention["shared"](tokens) if "shared" in self.attention else None
        out = {}
        for state in STATES:
            r = shared_r if shared_r is not None else self.attention[state](tokens)
            routing = route(self.router[state](r), self.top_k)
            out[state] = (aggregate(self.pool(state), routing)[:, : self.lengths[state]], routing)
        return out


class StaticPrompts(nn.Module):
    """Table 2 baselines: learnable prompts per state with no visual input.

    ``num_prompts=1`` is the single static prompt pair; more prompts form the static
    ensemble, whose text features are averaged by the model.
    """

    def __init__(self, config, dim: int, num_prompts: int):
        super().__init__()
        self.lengths = {"normal": config.normal_len, "abnormal": config.abnormal_len}
        self.experts = nn.ParameterDict({
            state: nn.Parameter(torch.randn(num_prompts, length, dim) * INIT_STD)
            for state, length in self.lengths.items()
        })

    def forward(self) -> dict:
        """{state: (prompts (P, M_s, D), None)}: every prompt, no routing."""
        return {state: (self.experts[state], None) for state in STATES}
