"""Hungarian matching between predicted (class, mask) pairs and ground-truth segments.

Mask classification predicts a fixed set of Q queries per image; the loss needs a one-to-one
assignment of queries to the N_i ground-truth segments. Following Mask2Former (and SAN, which
reuses it) the assignment minimises, per image,

    cost_class · (−softmax prob of the target class)
    + cost_mask · (sigmoid BCE averaged over points)
    + cost_dice · (dice loss 1 − (2·Σσ(p)t + 1) / (Σσ(p) + Σt + 1))

where the mask terms are evaluated on one set of uniformly random points per image, shared by
every prediction and target, or on every target pixel when ``num_points`` is ``None``.

A target label ``>= K`` (the logits have K + 1 columns, the last being "no object") is *mask-only*: an object whose
class is not taught. Its class cost is 0, so only the mask terms decide which query it gets.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .mask import dense_points, pairwise_bce_cost, pairwise_dice_cost, point_sample

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to targets under the Mask2Former cost.

    Calling it returns, for each image, ``(pred_idx, tgt_idx)``: two int64 CPU tensors of
    length ``min(Q, N_i)`` (sorted by ``pred_idx``) saying query ``pred_idx[j]`` is matched to
    target ``tgt_idx[j]``. Runs without gradients.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int | None = 12544,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one of cost_class, cost_mask, cost_dice must be non-zero")
        if num_points is not None and num_points < 1:
            raise ValueError(f"num_points must be a positive int or None, got {num_points}")
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.num_points = num_points

    def cost_matrix(self, pred_logits: Tensor, pred_masks: Tensor, labels: Tensor, masks: Tensor) -> Tensor:
        """Cost ``[Q, N]`` for one image from ``[Q, K+1]`` logits, ``[Q, h, w]`` mask logits and N targets.

        Columns of mask-only targets (label ``>= K``) have no class term."""
        with torch.autocast(device_type=pred_masks.device.type, enabled=False):
            prob = pred_logits.float().softmax(-1)
            labels = labels.to(prob.device)
            num_classes = prob.shape[-1] - 1
            # mask-only targets (label >= K): no class cost, only the mask terms below
            cost_class = -prob[:, labels.clamp(max=num_classes - 1)]
            cost_class = cost_class.masked_fill((labels >= num_classes).unsqueeze(0), 0.0)

            pred = pred_masks.float()
            tgt = masks.to(device=pred.device, dtype=torch.float32)
            if self.num_points is None:
                pred_pts, tgt_pts = dense_points(pred, tgt)
            else:
                # One set of random points for this image, shared by all predictions and targets.
                coords = torch.rand(1, self.num_points, 2, device=pred.device)
                tgt_pts = point_sample(tgt.unsqueeze(1), coords.expand(tgt.shape[0], -1, -1))[:, 0]
                pred_pts = point_sample(pred.unsqueeze(1), coords.expand(pred.shape[0], -1, -1))[:, 0]
            cost_mask = pairwise_bce_cost(pred_pts, tgt_pts)
            cost_dice = pairwise_dice_cost(pred_pts, tgt_pts)
        return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match ``outputs`` (``pred_logits [B,Q,K+1]``, ``pred_masks [B,Q,h,w]``) to per-image ``targets``."""
        from scipy.optimize import linear_sum_assignment  # here, not at import: scipy.optimize costs ~0.5 s to load

        pred_logits: Tensor = outputs["pred_logits"]
        pred_masks: Tensor = outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {pred_logits.shape[0]} predictions")
        indices: list[tuple[Tensor, Tensor]] = []
        for b, target in enumerate(targets):
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(pred_logits[b], pred_masks[b], labels, target["masks"])
            cost = cost.cpu()
            if not torch.isfinite(cost).all():
                raise ValueError("matching cost contains NaN or inf; check the predicted logits")
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )
