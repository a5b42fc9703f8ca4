"""Anomaly maps and image score (spec 4, Eq. 6-7) and the evaluation-time Gaussian smoothing.

Per layer: P^(l) = softmax(F_x^(l) . F_T^(l)^T / tau) over {normal, abnormal}, reshaped to the
patch grid and bilinearly upsampled to the input size. M combines the layers' abnormal
probabilities (mean by default). The image score is s = (max(M) + p_g) / 2 (Eq. 7) or p_g alone
(``image_score="global"``), with p_g = softmax(f_g . F_T^(last)^T / tau')[abnormal], computed
as the sigmoid of the difference of the two logits (the same value; BCE on that logit keeps
its gradient where p_g rounds to 0 or 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_probability_maps(patches: torch.Tensor, text: torch.Tensor, tau: float, size: int) -> torch.Tensor:
    """Two-state probability maps (B, L, 2, size, size).

    ``patches``: normalised patch features (B, L, HW, D); ``text``: normalised prompt features
    (B, L, 2, D) ordered [normal, abnormal].
    """
    batch, layers, tokens, _ = patches.shape
    grid = math.isqrt(tokens)
    probs = (torch.einsum("blpd,blsd->blsp", patches, text) / tau).softmax(dim=2)
    probs = probs.reshape(batch * layers, 2, grid, grid)
    probs = F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False)
    return probs.reshape(batch, layers, 2, size, size)


def combine_layers(layer_maps: torch.Tensor, reduce: str) -> torch.Tensor:
    """M (B, H, W) from the abnormal channel of the layer maps (B, L, 2, H, W) (Eq. 6)."""
    abnormal = layer_maps[:, :, 1]
    return abnormal.mean(dim=1) if reduce == "mean" else abnormal.sum(dim=1)


def global_logit(global_feature: torch.Tensor, text: torch.Tensor, tau_global: float) -> torch.Tensor:
    """Logit of p_g (B,): (f_g . t_abnormal - f_g . t_normal) / tau' for f_g (B, D) and prompts (B, 2, D)."""
    logits = torch.einsum("bd,bsd->bs", global_feature, text) / tau_global
    return logits[:, 1] - logits[:, 0]


def image_score(anomaly_map: torch.Tensor, global_prob: torch.Tensor, mode: str) -> torch.Tensor:
    """s (B,): Eq. 7, (max(M) + p_g) / 2, for ``mode="eq7"``; p_g for ``"global"``."""
    if mode == "global":
        return global_prob
    return (anomaly_map.flatten(1).amax(dim=1) + global_prob) / 2


def gaussian_kernel(sigma: float, truncate: float = 4.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def reflect_indices(size: int, radius: int, device=None) -> torch.Tensor:
    """Source indices of a 'reflect' (d c b a | a b c d | d c b a) padding by ``radius``."""
    index = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(index >= size, 2 * size - 1 - index, index)


def gaussian_smooth(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian filter of maps (B, H, W), equal to scipy.ndimage.gaussian_filter (reflect)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma, truncate, maps.dtype, maps.device)
    radius = kernel.shape[0] // 2
    height, width = maps.shape[-2:]
    x = maps[:, reflect_indices(height, radius, maps.device)][:, :, reflect_indices(width, radius, maps.device)]
    x = F.conv2d(x[:, None], kernel.view(1, 1, -1, 1))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x[:, 0]
