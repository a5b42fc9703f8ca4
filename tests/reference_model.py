"""Slow, obviously correct model references written out from the definitions, for the model tests.

None of them calls pmoe: the AnomalyCLIP image forward (ordinary and V-V streams) with the
attention written head by head, their text path with deep tokens and a prompt_learner state
dict laid out as their train.py saves it, a bilinear resize written from the align_corners=False
formula, and the trainable-parameter count derived from a config.
"""

from __future__ import annotations

import math

import numpy as np
import open_clip
import torch

N_CTX, DEPTH, DEEP_LEN = 12, 9, 4  # AnomalyCLIP's setting (test.sh: --n_ctx 12 --depth 9 --t_n_ctx 4)


def attention_heads(x, block, use_values_only: bool):
    """Block attention written head by head: softmax(q k^T / sqrt(d)) v, then the output projection.

    With ``use_values_only`` the queries and keys are the values (AnomalyCLIP's V-V attention).
    """
    batch, tokens, width = x.shape
    heads = block.attn.num_heads
    weight, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
    q, k, v = (
        (x @ weight[i * width:(i + 1) * width].T + bias[i * width:(i + 1) * width]).view(batch, tokens, heads, -1)
        for i in range(3)
    )
    if use_values_only:
        q, k = v, v
    mixed = []
    for head in range(heads):
        scores = q[:, :, head] @ k[:, :, head].transpose(1, 2) / math.sqrt(width // heads)
        mixed.append(scores.softmax(dim=-1) @ v[:, :, head])
    return block.attn.out_proj(torch.cat(mixed, dim=-1))


@torch.no_grad()
def anomalyclip_visual(visual, images, taps, vv_start):
    """AnomalyCLIP's image forward on an open_clip visual tower at its native resolution.

    Ordinary stream: x <- x + Attn(ln_1 x); x <- x + MLP(ln_2 x). From block ``vv_start`` on a
    second stream starts from the block's input and adds the V-V attention of ln_1 of the
    ordinary stream, with no MLP. Returns copies of the tapped stream (V-V where it runs, else
    ordinary) after each block of ``taps`` (1-indexed), and the final ordinary stream.
    """
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    x_vv, copies = None, {}
    for number, block in enumerate(visual.transformer.resblocks, start=1):
        normed = block.ln_1(x)
        if number == vv_start:
            x_vv = x.clone()
        if x_vv is not None:
            x_vv = x_vv + attention_heads(normed, block, use_values_only=True)
        x = x + attention_heads(normed, block, use_values_only=False)
        x = x + block.mlp(block.ln_2(x))
        if number in taps:
            copies[number] = (x_vv if x_vv is not None else x).clone()
    return [copies[number] for number in taps], x


def bilinear_resize(grid: np.ndarray, size: int) -> np.ndarray:
    """Resize a (g, g) array to (size, size): source coordinate (i + 0.5) * g / size - 0.5,
    clamped at 0, interpolated linearly between its two neighbours (the last pixel repeats)."""
    g = grid.shape[0]

    def axis():
        source = np.maximum((np.arange(size) + 0.5) * g / size - 0.5, 0.0)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, g - 1)
        return low, high, source - low

    r0, r1, fr = axis()
    c0, c1, fc = axis()
    top = grid[r0][:, c0] * (1 - fc) + grid[r0][:, c1] * fc
    bottom = grid[r1][:, c0] * (1 - fc) + grid[r1][:, c1] * fc
    return top * (1 - fr)[:, None] + bottom * fr[:, None]


def trainable_parameters(config, token_width: int, text_width: int) -> int:
    """The trainable parameters of a per-layer VGMoP model with separate attention and pools.

    Per tapped layer and state: queries N_q x D, W_K and W_V (token_width x D, no bias), a router
    Linear(D, hidden) + Linear(hidden, E) with biases, an expert pool E x M_s x D; plus Q_ctx.
    """
    d, hidden, experts = text_width, config.router_hidden, config.num_experts
    attention = config.num_queries * d + 2 * token_width * d
    router = d * hidden + hidden + hidden * experts + experts
    pools = experts * (config.normal_len + config.abnormal_len) * d
    return config.num_layers * (2 * attention + 2 * router + pools) + config.ctx_len * d


def their_texts(class_name="object"):
    """Their two prompt texts: one "X" per learnable context vector, then the (damaged) object."""
    placeholders = " ".join(["X"] * N_CTX)
    return [f"{placeholders} {class_name}.", f"{placeholders} damaged {class_name}."]


def reference_features(clip, prefix, context, suffix, deep, token_ids):
    """Their text path written out on the full 77 tokens: no insertion before block 1, then
    deep set ``counter`` overwrites positions 1..len before each following block while sets last."""
    x = torch.cat([prefix, context, suffix], dim=1) + clip.positional_embedding
    counter = 0
    for layer, block in enumerate(clip.transformer.resblocks):
        if layer > 0 and counter < len(deep):
            x = x.clone()
            x[:, 1:1 + deep[counter].shape[0]] = deep[counter]
            counter += 1
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    pooled = x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)] @ clip.text_projection
    return pooled / pooled.norm(dim=-1, keepdim=True)


def their_state(clip, width=64, depth=DEPTH, dtype=torch.float32, seed=0):
    """A prompt_learner state dict as their train.py saves it, with random learnable tensors."""
    generator = torch.Generator().manual_seed(seed)
    tokens = open_clip.tokenize(their_texts()).to(torch.int32)
    with torch.no_grad():
        embedded = clip.token_embedding(tokens.long())
    state = {}
    for row, name in enumerate(["pos", "neg"]):
        state[f"ctx_{name}"] = torch.randn(1, 1, N_CTX, width, generator=generator)
        state[f"token_prefix_{name}"] = embedded[row, :1][None, None].clone()
        state[f"token_suffix_{name}"] = embedded[row, 1 + N_CTX:][None, None].clone()
        state[f"tokenized_prompts_{name}"] = tokens[row][None, None].clone()
    for index in range(depth - 1):
        state[f"compound_prompts_text.{index}"] = torch.randn(DEEP_LEN, width, generator=generator)
        state[f"compound_prompt_projections.{index}.weight"] = torch.randn(896, width, generator=generator)
        state[f"compound_prompt_projections.{index}.bias"] = torch.randn(896, generator=generator)
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
