"""Referring-segmentation loss: one mask logit map per (image, sentence), binary cross-entropy at its resolution.

ETRIS (Xu et al., ICCV 2023) trains with plain sigmoid BCE, averaged over every pixel of the 1/4-resolution map
(104 × 104 for a 416 px input), against the ground-truth mask resized to that map with nearest-neighbour
sampling. :class:`ReferringCriterion` does exactly that and follows the interface of the other criteria
(:class:`~vocabseg.losses.base.Criterion`: ``criterion(outputs, targets) -> dict of unweighted losses`` and
:meth:`weighted_total`). An optional dice term (weight 0 by default, i.e. off, as in the paper) is there for
experiments.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Criterion
from .mask import dice_loss

__all__ = ["ReferringCriterion", "resize_mask_targets", "referring_targets"]


def referring_targets(masks: Tensor | list) -> Tensor:
    """Boolean/0-1 masks [B, H, W] (or a list of [H, W]) -> float targets [B, 1, H, W]."""
    if isinstance(masks, (list, tuple)):
        masks = torch.stack([torch.as_tensor(m) for m in masks])
    masks = torch.as_tensor(masks)
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"referring targets must have shape [B, H, W] or [B, 1, H, W], got {tuple(masks.shape)}")
    return masks.float()


def resize_mask_targets(targets: Tensor, size: tuple[int, int]) -> Tensor:
    """Float targets [B, 1, H, W] -> [B, 1, h, w] by nearest-neighbour sampling (what the official code does)."""
    if tuple(targets.shape[-2:]) == tuple(size):
        return targets
    return F.interpolate(targets, size=size, mode="nearest")


class ReferringCriterion(Criterion):
    """``{"loss_bce": mean BCE over all pixels}`` (+ ``"loss_dice"`` when its weight is non-zero).

    ``outputs["mask_logits"]`` [B, 1, h, w]; ``targets`` float masks [B, 1, H, W] (see :func:`referring_targets`),
    resized to (h, w) with nearest-neighbour sampling.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 0.0) -> None:
        super().__init__()
        self.weight_dict = {"loss_bce": float(bce_weight)}
        if dice_weight:
            self.weight_dict["loss_dice"] = float(dice_weight)

    def forward(self, outputs: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        logits = outputs["mask_logits"]
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ValueError(f"mask_logits must have shape [B, 1, h, w], got {tuple(logits.shape)}")
        targets = referring_targets(targets).to(device=logits.device)
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(f"{targets.shape[0]} target masks for a batch of {logits.shape[0]}")
        targets = resize_mask_targets(targets, tuple(logits.shape[-2:])).to(logits.dtype)
        losses = {"loss_bce": F.binary_cross_entropy_with_logits(logits.float(), targets.float())}
        if "loss_dice" in self.weight_dict:
            losses["loss_dice"] = dice_loss(logits.float(), targets.float())  # mean over the batch's masks
        return losses
