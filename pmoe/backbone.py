"""Frozen CLIP image encoder with feature taps and the V-V attention stream (spec section 1).

The visual tower of an open_clip ``ViT-L-14-336`` runs at 518 px (the 24x24 position grid is
resized to 37x37). Patch features are tapped at blocks ``config.layers`` (1-indexed). With
``vv_attention`` a second token stream runs beside the ordinary one from block ``vv_start``:
``x_vv <- x_vv + VV_b(ln_1_b(x_ori))``, where ``VV_b`` is block b's attention with queries
and keys replaced by its values, and no MLP. Taps read the V-V stream (taps before
``vv_start`` read the ordinary stream).

The encoder returns :class:`VisualFeatures` (what the feature cache stores); everything else
the model reads is derived from them at forward time by :meth:`VisualBackbone.image_features`:
the normalised projected patch features of Eq. 6 and the global feature f_g of Eq. 7, which is
the ordinary stream's final CLS token ``@ proj`` without ``ln_post`` (``"anomalyclip"``, as
AnomalyCLIP computes it) or with it (``"open_clip"``, equal to ``encode_image``).

Weights come from open_clip (``clip_weights="openai"``), from a local file (a state dict or
OpenAI's ``.pt``, see :mod:`pmoe.clip_weights`), or are random (``"random"``: one fixed
backbone for tests and benchmarks). ``pmoe-tiny`` and ``pmoe-tiny-deep`` (24 blocks, as ViT-L)
are tiny CLIP configs for tests.
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
RANDOM_WEIGHTS_SEED = 0  # clip_weights="random" is one fixed backbone, whatever the training seed
open_clip.add_model_config(CLIP_CONFIGS)
NO_WEIGHTS_WARNING = "No pretrained weights loaded"  # open_clip's message for pretrained=None


class VisualFeatures(NamedTuple):
    """What the frozen image encoder gives the rest of the model (and the feature cache)."""

    patch_tokens: torch.Tensor  # (B, L, HW, Dx): ln_post of each tap's patch tokens
    cls_token: torch.Tensor  # (B, Dx): the ordinary stream's final CLS token, before ln_post


class ImageFeatures(NamedTuple):
    """What prompt learners, maps and scores read; derived from VisualFeatures, never cached."""

    tokens: torch.Tensor  # (B, L, HW, Dx): F_x^(l), ln_post of each tap's patch tokens
    global_token: torch.Tensor  # (B, Dx): the global feature before the projection
    patches: torch.Tensor  # (B, L, HW, D): normalize(F_x^(l) @ proj), compared with F_T (Eq. 6)
    global_feature: torch.Tensor  # (B, D): f_g = normalize(global_token @ proj) (Eq. 7)


def load_clip(config) -> nn.Module:
    """The frozen open_clip model of ``config`` (architecture and weights), in eval mode."""
    name, weights = config.clip_model, config.clip_weights
    if name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip architecture {name!r}; use ViT-L-14-336 (paper) or pmoe-tiny.")
    kwargs = {"force_quick_gelu": config.quick_gelu}
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
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


def text_depth(clip_model: str):
    """The number of text transformer blocks of an open_clip architecture (None if open_clip does not know it)."""
    config = open_clip.get_model_config(clip_model) or {}
    return config.get("text_cfg", {}).get("layers")


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
    """The frozen CLIP image tower, returning tap features and the final CLS token."""

    def __init__(self, clip: nn.Module, config):
        super().__init__()
        self.visual = clip.visual
        self.clip_model = config.clip_model
        self.depth = len(self.visual.transformer.resblocks)
        self.layers = self.check_layers(config.layers)
        self.vv_start = config.vv_start if config.vv_attention else None
        self.image_size = config.image_size
        patch = self.visual.patch_size[0]
        if config.image_size % patch:
            raise ConfigError(f"image_size {config.image_size} is not a multiple of the patch size {patch}.")
        if not getattr(self.visual.transformer, "batch_first", True):
            raise ConfigError("open_clip is too old (sequence-first transformers); install open_clip_torch>=2.24.")
        self.grid = config.image_size // patch
        pos = resize_position_embedding(self.visual.positional_embedding.detach(), self.grid, config.pos_embed_interp)
        self.register_buffer("positional_embedding", pos, persistent=False)

    @property
    def width(self) -> int:
        """Dx, the width of the tokens inside the tower (1024 for ViT-L)."""
        return self.visual.class_embedding.shape[0]

    @property
    def embed_width(self) -> int:
        """D, the width of the joint image-text space (768 for ViT-L-14-336)."""
        return self.visual.proj.shape[1]

    def check_layers(self, layers) -> tuple:
        """``layers`` as a tuple of increasing 1-indexed block numbers within the tower."""
        layers = tuple(layers)
        valid = all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers)
        if not layers or not valid or list(layers) != sorted(set(layers)) or layers[0] < 1 or layers[-1] > self.depth:
            raise ConfigError(
                f"layers must be increasing block numbers between 1 and {self.depth} (the blocks of "
                f"{self.clip_model}), got {layers}."
            )
        return layers

    def check_images(self, images: torch.Tensor) -> None:
        size = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
            raise ConfigError(
                f"expected images of shape (B, 3, {size}, {size}) (config.image_size), got {tuple(images.shape)}; "
                f"preprocess with pmoe.data.load_image(path, {size}) or build the model with another image_size."
            )

    def forward(self, images: torch.Tensor, layers=None) -> VisualFeatures:
        """Taps at ``layers`` (1-indexed blocks, increasing; default the config's) and the final CLS token."""
        layers = self.layers if layers is None else self.check_layers(layers)
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
            if block_number in layers:
                tapped = x_vv if x_vv is not None else x
                taps.append(visual.ln_post(tapped[:, 1:]))
        return VisualFeatures(torch.stack(taps, dim=1), x[:, 0].clone())  # a copy frees the final tokens

    def global_token(self, cls_token: torch.Tensor, kind: str) -> torch.Tensor:
        """The global feature before projection: the raw CLS token ("anomalyclip") or its ln_post ("open_clip")."""
        return cls_token if kind == "anomalyclip" else self.visual.ln_post(cls_token)

    def image_features(self, features: VisualFeatures, global_feature: str) -> ImageFeatures:
        """Everything the trainable part reads, in the projection's dtype (``global_feature``: see the config)."""
        dtype = self.visual.proj.dtype
        tokens = features.patch_tokens.to(dtype)
        global_token = self.global_token(features.cls_token.to(dtype), global_feature)
        return ImageFeatures(tokens, global_token, self.project(tokens), self.project(global_token))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map tokens (..., Dx) into the joint space and L2-normalise (..., D)."""
        return F.normalize(tokens @ self.visual.proj.to(tokens.dtype), dim=-1)
