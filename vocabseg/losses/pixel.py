"""Per-pixel cross-entropy over dense class logits (LSeg: pixel embedding · text embedding, Li et al. ICLR 2022).

LSeg trains with a plain pixel-wise cross-entropy against the label map. Our LSeg returns logits at the decoder's
resolution (1/2 of the input for patch-16 ViTs); they are upsampled bilinearly to the label size here, the way
the release upsamples them (×2) before its loss. Ignored pixels never count. The label map handed to the
criterion comes from :func:`pixel_targets`, which maps the dataset's ``ignore_index`` to :data:`IGNORE`, so the
criterion does not need to know the dataset's convention (and a class id equal to 255 stays a class when the
dataset ignores something else).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Criterion

__all__ = ["PixelCrossEntropy", "pixel_targets", "IGNORE"]

IGNORE = -100  # F.cross_entropy's default ignore index


def pixel_targets(labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Label maps ``[B, H, W]`` -> int64 ``[B, H, W]`` with ignored pixels set to :data:`IGNORE`."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {tuple(labels.shape)}")
    labels = labels.long()
    return torch.where(labels == ignore_index, torch.full_like(labels, IGNORE), labels)


class PixelCrossEntropy(Criterion):
    """Pixel-wise CE. ``forward(outputs, targets)``: ``outputs`` is ``{"logits": [B, C, h, w]}`` (or the tensor),
    ``targets`` the output of :func:`pixel_targets`. Returns ``{"loss_ce": ...}``; :meth:`weighted_total` applies
    ``weight_dict`` (same contract as :class:`vocabseg.losses.SetCriterion`)."""

    def __init__(self, num_classes: int | None = None, weight_dict: Mapping[str, float] | None = None,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weight_dict = dict({"loss_ce": 1.0} if weight_dict is None else weight_dict)
        self.align_corners = align_corners

    def forward(self, outputs: Mapping[str, Any] | Tensor, targets: Tensor) -> dict[str, Tensor]:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs
        if logits.dim() != 4 or targets.dim() != 3 or logits.shape[0] != targets.shape[0]:
            raise ValueError(f"expected logits [B, C, h, w] and labels [B, H, W], got {tuple(logits.shape)} and "
                             f"{tuple(targets.shape)}")
        c = logits.shape[1]
        if self.num_classes is not None and c != self.num_classes:
            raise ValueError(f"logits have {c} classes, the criterion was built for {self.num_classes}")
        targets = targets.to(logits.device).long()
        valid = targets != IGNORE
        if bool(((targets < 0) & valid).any()) or bool((targets[valid] >= c).any()):
            raise ValueError(f"labels outside 0..{c - 1} that are not ignored (check ignore_index and the class list)")
        logits = logits.float()
        if logits.shape[-2:] != targets.shape[-2:]:
            logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        if not bool(valid.any()):
            return {"loss_ce": logits.sum() * 0.0}  # all ignored: zero, graph kept (CE's mean would be NaN)
        return {"loss_ce": F.cross_entropy(logits, targets, ignore_index=IGNORE)}

