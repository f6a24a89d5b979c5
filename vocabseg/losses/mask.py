"""Per-mask losses, pairwise matching costs and point sampling for mask classification.

Mask2Former-style models (SAN here) supervise their binary mask logits not on every pixel
but on a set of sampled points: uniformly random points for the matching cost and
uncertainty-biased points for the loss. Everything in this module works on flattened
"point" tensors of shape ``[N, P]`` (N masks, P points); :func:`point_sample` produces them.

Coordinates are normalised to ``[0, 1]`` and ordered ``(x, y)``: ``x`` runs along the width
(last dimension) and ``y`` along the height, as in :func:`torch.nn.functional.grid_sample`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dice_loss",
    "sigmoid_bce_loss",
    "sigmoid_focal_loss",
    "pairwise_dice_cost",
    "pairwise_bce_cost",
    "point_sample",
    "sample_points_by_uncertainty",
    "logit_uncertainty",
    "dense_points",
]


def _normaliser(num_masks: float | Tensor | None, n: int) -> float | Tensor:
    """Divisor for a sum over masks: the given count, or the number of rows (at least 1)."""
    if num_masks is None:
        return float(max(n, 1))
    return num_masks


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float | Tensor | None = None) -> Tensor:
    """Soft dice loss ``1 - (2·Σσ(x)t + 1) / (Σσ(x) + Σt + 1)`` per mask, summed and divided by ``num_masks``.

    ``inputs`` are mask logits ``[N, P]`` (or ``[N, ...]``, flattened), ``targets`` the same shape
    with values in ``[0, 1]``. ``num_masks`` defaults to ``N`` (i.e. the mean over masks); the
    criterion passes the batch-wide target count so that every mask weighs the same.
    """
    probs = inputs.sigmoid().flatten(1)
    targets = targets.flatten(1).to(probs.dtype)
    numerator = 2.0 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return loss.sum() / _normaliser(num_masks, inputs.shape[0])


def sigmoid_bce_loss(inputs: Tensor, targets: Tensor, num_masks: float | Tensor | None = None) -> Tensor:
    """Binary cross-entropy with logits, averaged over points, summed over masks / ``num_masks``."""
    inputs = inputs.flatten(1)
    targets = targets.flatten(1).to(inputs.dtype)
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / _normaliser(num_masks, inputs.shape[0])


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    num_masks: float | Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017), averaged over points, summed over masks / ``num_masks``.

    Per element: ``α_t · (1 - p_t)^γ · BCE(x, t)`` with ``p_t = p·t + (1-p)(1-t)`` and
    ``α_t = α·t + (1-α)(1-t)``; a negative ``alpha`` disables the α weighting. It down-weights
    easy points, which SegViT-style heads use instead of plain BCE.
    """
    inputs = inputs.flatten(1)
    targets = targets.flatten(1).to(inputs.dtype)
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
        loss = alpha_t * loss
    return loss.mean(1).sum() / _normaliser(num_masks, inputs.shape[0])


def pairwise_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Dice loss between every prediction and every target: ``[Q, P] × [N, P] -> [Q, N]``.

    Used as a matching cost; same formula as :func:`dice_loss` without the reduction.
    """
    probs = inputs.sigmoid().flatten(1)
    targets = targets.flatten(1).to(probs.dtype)
    numerator = 2.0 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def pairwise_bce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Point-averaged sigmoid BCE between every prediction and every target: ``[Q, P] × [N, P] -> [Q, N]``.

    BCE is linear in the target, so ``BCE(x, t) = t·BCE(x, 1) + (1-t)·BCE(x, 0)`` and the
    whole matrix is two matrix products (also exact for soft, interpolated targets).
    """
    inputs = inputs.flatten(1)
    targets = targets.flatten(1).to(inputs.dtype)
    num_points = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    cost = pos @ targets.T + neg @ (1.0 - targets).T
    return cost / max(num_points, 1)


def point_sample(inputs: Tensor, point_coords: Tensor, **kwargs) -> Tensor:
    """Bilinearly sample ``inputs`` at normalised points.

    ``inputs`` is ``[N, C, H, W]`` (or ``[N, H, W]``, treated as ``C = 1``); ``point_coords`` is
    ``[N, P, 2]`` with ``(x, y)`` in ``[0, 1]``. Returns ``[N, C, P]`` (or ``[N, P]`` for 3-D
    input). Uses ``grid_sample`` with ``align_corners=False`` so ``0`` and ``1`` are the outer
    pixel edges and a pixel centre ``(i + 0.5) / W`` returns that pixel exactly. Extra keyword
    arguments go to ``grid_sample`` (default zero padding, as in Mask2Former).
    """
    squeeze_channel = inputs.dim() == 3
    if squeeze_channel:
        inputs = inputs.unsqueeze(1)
    if point_coords.dim() != 3 or point_coords.shape[-1] != 2:
        raise ValueError(f"point_coords must be [N, P, 2], got {tuple(point_coords.shape)}")
    grid = 2.0 * point_coords.to(inputs.dtype).unsqueeze(2) - 1.0  # [N, P, 1, 2]
    kwargs.setdefault("align_corners", False)
    out = F.grid_sample(inputs, grid, **kwargs).squeeze(3)  # [N, C, P]
    return out.squeeze(1) if squeeze_channel else out


def logit_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of a binary logit: ``-|logit|`` (highest where the prediction is 0.5)."""
    return -logits.abs()


def sample_points_by_uncertainty(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    uncertainty_fn: Callable[[Tensor], Tensor] = logit_uncertainty,
) -> Tensor:
    """Pick ``num_points`` points per mask, biased towards where the prediction is uncertain.

    Follows PointRend / Mask2Former: draw ``oversample_ratio · num_points`` uniform points,
    evaluate the (interpolated) logits there, keep the ``importance_sample_ratio · num_points``
    with the highest ``uncertainty_fn`` and fill the rest with fresh uniform points. This puts
    the loss where it matters (mask boundaries) at a fixed cost. ``logits`` is ``[N, 1, H, W]``
    or ``[N, H, W]``; returns ``[N, num_points, 2]`` normalised ``(x, y)`` coordinates with the
    importance points first. No gradient flows through the selection.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    if logits.dim() == 3:
        logits = logits.unsqueeze(1)
    logits = logits.detach()
    num_masks = logits.shape[0]
    device = logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain

    coords = torch.rand(num_masks, num_sampled, 2, device=device, dtype=logits.dtype)
    uncertainties = uncertainty_fn(point_sample(logits, coords))  # [N, 1, S]
    if uncertainties.dim() == 3:
        uncertainties = uncertainties[:, 0]
    top = torch.topk(uncertainties, k=num_uncertain, dim=1).indices  # [N, U]
    chosen = torch.gather(coords, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        extra = torch.rand(num_masks, num_random, 2, device=device, dtype=logits.dtype)
        chosen = torch.cat([chosen, extra], dim=1)
    return chosen


def dense_points(pred_masks: Tensor, target_masks: Tensor) -> tuple[Tensor, Tensor]:
    """Use every target pixel as a point: ``([N, h, w], [M, H, W]) -> ([N, H·W], [M, H·W])``.

    The "``num_points=None``" mode of the matcher and criterion: predictions are resized
    bilinearly (``align_corners=False``) to the target resolution, so costs and losses are exact
    per-pixel values; handy for small images and for checking the point-sampled path.
    """
    size = target_masks.shape[-2:]
    pred = pred_masks.unsqueeze(1)
    if pred.shape[-2:] != size:
        pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
    return pred.flatten(1), target_masks.flatten(1).to(pred.dtype)
