"""Frozen CLIP image encoder with feature taps and the V-V attention stream (spec section 1).

The visual tower of an open_clip ``ViT-L-14-336`` runs at 518 px (the 24x24 position grid is
resized to 37x37). Patch features are tapped at blocks ``config.layers`` (1-indexed). With
``vv_attention`` a second token stream runs beside the ordinary one from block ``vv_start``:
``x_vv <- x_vv + VV_b(ln_1_b(x_ori))``, where ``VV_b`` is block b's attention with queries
and keys replaced by its values, and no MLP. Taps read the V-V stream; the global feature is
the ordinary stream's final CLS token.

Weights come from open_clip (``clip_weights="openai"``), from a local file (a state dict or
OpenAI's ``.pt``, see :mod:`pmoe.clip_weights`), or are random (``"random"``, for tests and
benchmarks). ``pmoe-tiny`` is a tiny CLIP config for tests.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from pmoe.clip_weights import load_weights_file
from pmoe.errors import CheckpointError, ConfigError

CLIP_CONFIGS = Path(__file__).parent / "clip_configs"
open_clip.add_model_config(CLIP_CONFIGS)
NO_WEIGHTS_WARNING = "No pretrained weights loaded"  # open_clip's message for pretrained=None


class VisualFeatures(NamedTuple):
    """What the frozen image encoder gives the rest of the model (and the feature cache)."""

    patch_tokens: torch.Tensor  # (B, L, HW, Dx): ln_post of each tap's patch tokens
    cls_token: torch.Tensor  # (B, Dx): ln_post of the ordinary stream's final CLS token


def load_clip(config) -> nn.Module:
    """The frozen open_clip model of ``config`` (architecture and weights), in eval mode."""
    name, weights = config.clip_model, config.clip_weights
    if name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip architecture {name!r}; use ViT-L-14-336 (paper) or pmoe-tiny.")
    kwargs = {"force_quick_gelu": config.quick_gelu}
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            clip = _create_without_weights(name, **kwargs)
    elif looks_like_path(weights):
        clip = _create_without_weights(name, **kwargs)
        load_weights_file(clip, Path(weights).expanduser(), name)
    else:
        try:
            clip = open_clip.create_model(name, pretrained=weights, **kwargs)
        except Exception as error:  # open_clip raises bare RuntimeErrors for every cause
            raise CheckpointError(
                f"could not obtain the {name} weights {weights!r} through open_clip ({error}). "
                "Without network access, download them on another machine and pass "
                "clip_weights=/path/to/file (OpenAI's .pt, or a state dict: .pt, .bin or .safetensors)."
            ) from error
    return clip.eval().requires_grad_(False)


def looks_like_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or Path(weights).suffix in {".pt", ".pth", ".bin", ".safetensors"}


def _create_without_weights(name: str, **kwargs) -> nn.Module:
    """open_clip's ``name`` randomly initialised, without open_clip's warning that it loaded no
    weights (pmoe wants random weights here, or loads a file next): only that log record is dropped."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NO_WEIGHTS_WARNING)

    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(keep)
    try:
        return open_clip.create_model(name, pretrained=None, **kwargs)
    finally:
        root.removeFilter(keep)


def resize_position_embedding(pos: torch.Tensor, grid: int, mode: str) -> torch.Tensor:
    """Resize a (1 + g*g, W) position embedding to (1 + grid*grid, W), keeping the CLS row."""
    cls_row, grid_rows = pos[:1], pos[1:]
    old = math.isqrt(grid_rows.shape[0])
    if old == grid:
        return pos.clone()
    image = grid_rows.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image.float(), size=(grid, grid), mode=mode, align_corners=False)
    return torch.cat([cls_row, image.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)])


def vv_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Block attention with queries and keys replaced by the values: softmax(v v^T / sqrt(d)) v."""
    batch, tokens, width = x.shape
    heads = attn.num_heads
    v = F.linear(x, attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
    v = v.view(batch, tokens, heads, width // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(v, v, v)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class VisualBackbone(nn.Module):
    """The frozen CLIP image tower, returning tap features and the global token."""

    def __init__(self, clip: nn.Module, config):
        super().__init__()
        self.visual = clip.visual
        self.layers = tuple(config.layers)
        self.vv_start = config.vv_start if config.vv_attention else None
        self.image_size = config.image_size
        patch = self.visual.patch_size[0]
        depth = len(self.visual.transformer.resblocks)
        if max(self.layers) > depth:
            raise ConfigError(f"layers {self.layers} exceed the {depth} blocks of {config.clip_model}.")
        if config.image_size % patch:
            raise ConfigError(f"image_size {config.image_size} is not a multiple of the patch size {patch}.")
        if not getattr(self.visual.transformer, "batch_first", True):
            raise ConfigError("open_clip is too old (sequence-first transformers); install open_clip_torch>=2.24.")
        self.grid = config.image_size // patch
        pos = resize_position_embedding(self.visual.positional_embedding.detach(), self.grid, config.pos_embed_interp)
        self.register_buffer("positional_embedding", pos, persistent=False)

    @property
    def width(self) -> int:
        return self.visual.class_embedding.shape[0]

    def check_images(self, images: torch.Tensor) -> None:
        size = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
            raise ConfigError(
                f"expected images of shape (B, 3, {size}, {size}) (config.image_size), got {tuple(images.shape)}; "
                f"preprocess with pmoe.data.load_image(path, {size}) or build the model with another image_size."
            )

    def forward(self, images: torch.Tensor) -> VisualFeatures:
        self.check_images(images)
        visual = self.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x_vv, taps = None, []
        for block_number, block in enumerate(visual.transformer.resblocks, start=1):
            if block_number == self.vv_start:
                x_vv = x
            if x_vv is not None:
                x_vv = x_vv + block.ls_1(vv_attention(block.attn, block.ln_1(x)))
            x = block(x)
            if block_number in self.layers:
                tapped = x_vv if x_vv is not None else x
                taps.append(visual.ln_post(tapped[:, 1:]))
        return VisualFeatures(torch.stack(taps, dim=1), visual.ln_post(x[:, 0]))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map ln_post tokens (..., Dx) into the joint space and L2-normalise (..., D_embed)."""
        return F.normalize(tokens @ self.visual.proj.to(tokens.dtype), dim=-1)
