"""Training losses (spec 5, Eq. 4, 5 and 8).

L_total = BCE(s, c) + L_seg + L_balance + L_decouple (Eq. 8), where L_seg is Focal (gamma 2, over the
[normal, abnormal] channels against the one-hot mask) + Dice(P_abnormal, m) + Dice(P_normal, 1-m),
applied to each tapped layer's maps and summed (``seg_loss_on="per_layer"``), or to the
combined map M (``"combined"``), times ``seg_loss_weight`` (1; AnomalyCLIP's lam). With
``image_score="global"`` (s = p_g) the BCE is computed from p_g's logit, so it keeps its
gradient where p_g rounds to 0 or 1 (tau' = 0.01 saturates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def focal_loss(probs: torch.Tensor, masks: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean over pixels of -(1 - p_t)^gamma log p_t, for probs (B, 2, H, W) and masks (B, H, W)."""
    p_true = torch.where(masks > 0.5, probs[:, 1], probs[:, 0]).clamp(EPS, 1.0)
    return (-((1 - p_true) ** gamma) * p_true.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float) -> torch.Tensor:
    """Batch mean of 1 - (2 sum(p m) + smooth) / (sum(p) + sum(m) + smooth), for (B, H, W) inputs."""
    prob, target = prob.flatten(1), target.flatten(1)
    overlap = (prob * target).sum(dim=1)
    return (1 - (2 * overlap + smooth) / (prob.sum(dim=1) + target.sum(dim=1) + smooth)).mean()


def segmentation_losses(layer_maps: torch.Tensor, masks: torch.Tensor, config) -> dict:
    """Focal and Dice terms, summed over layers (or on the combined map)."""
    if config.seg_loss_on == "combined":
        abnormal = layer_maps[:, :, 1].mean(dim=1)
        layer_maps = torch.stack([1 - abnormal, abnormal], dim=1)[:, None]
    focal = dice = layer_maps.new_zeros(())
    for layer in range(layer_maps.shape[1]):
        probs = layer_maps[:, layer]
        focal = focal + focal_loss(probs, masks, config.focal_gamma)
        dice = dice + dice_loss(probs[:, 1], masks, config.dice_smooth)
        dice = dice + dice_loss(probs[:, 0], 1 - masks, config.dice_smooth)
    return {"focal": focal, "dice": dice}


def balance_loss(probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 4: alpha * sum over routers of E * sum_j (mean_i p_ij)^2, for probs (B, ..., E).

    Every axis between the batch and the experts indexes one router (layer x state); a
    perfectly uniform router contributes exactly alpha.
    """
    experts = probs.shape[-1]
    usage = probs.mean(dim=0).reshape(-1, experts)
    return alpha * (experts * (usage ** 2).sum(dim=-1)).sum()


def decouple_loss(pools, beta: float) -> torch.Tensor:
    """Eq. 5: beta * sum over pools of ||S_hat S_hat^T - I_E||_F^2, S_hat = normalised expert means."""
    total = None
    for experts in pools:
        s_hat = F.normalize(experts.mean(dim=1), dim=-1)
        gram = s_hat @ s_hat.T
        term = ((gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)) ** 2).sum()
        total = term if total is None else total + term
    return beta * total if total is not None else torch.zeros(())


def classification_loss(outputs: dict, labels: torch.Tensor, image_score: str) -> torch.Tensor:
    """L_cls = BCE(s, c): from p_g's logit when s = p_g, else on s kept inside (0, 1)."""
    if image_score == "global":
        logit = outputs["global_logit"]
        return F.binary_cross_entropy_with_logits(logit, labels.to(logit.dtype))
    score = outputs["score"].clamp(EPS, 1 - EPS)
    return F.binary_cross_entropy(score, labels.to(score.dtype))


def total_loss(outputs: dict, masks: torch.Tensor, labels: torch.Tensor, *, expert_pools, config) -> dict:
    """Every term of Eq. 8 (``loss`` is their sum): cls, focal, dice, seg, balance, decouple.

    ``seg`` is ``config.seg_loss_weight * (focal + dice)``; ``focal`` and ``dice`` are unweighted.

    ``masks``: (B, H, W) or (B, 1, H, W) in {0, 1}; ``labels``: (B,) in {0, 1}.
    """
    masks = masks.reshape(outputs["anomaly_map"].shape).to(outputs["layer_maps"].dtype)
    terms = {"cls": classification_loss(outputs, labels, config.image_score)}
    terms.update(segmentation_losses(outputs["layer_maps"], masks, config))
    terms["seg"] = config.seg_loss_weight * (terms["focal"] + terms["dice"])
    routing = outputs["routing"]
    device = masks.device
    terms["balance"] = balance_loss(routing["probs"], config.alpha) if routing else torch.zeros((), device=device)
    terms["decouple"] = decouple_loss(expert_pools, config.beta).to(device)
    terms["loss"] = terms["cls"] + terms["seg"] + terms["balance"] + terms["decouple"]
    return terms
