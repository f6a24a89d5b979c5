"""SegViT's ATM loss (Zhang et al., NeurIPS 2022): CE 1 + focal 20 + dice 1, queries bound to classes.

SegViT has one query per class, so there is no Hungarian matching: query ``c`` is "matched" to the segment of
class ``c`` when that class is present in the image, and otherwise targets "no object". Per image:

* ``loss_ce``: cross-entropy of every query's logits ``[C + 1]`` against its own class id when the class is
  present, else against the no-object index ``C`` (class weight ``no_object_weight`` = 0.1, as in the release);
* ``loss_mask``: sigmoid focal loss (α 0.25, γ 2) and ``loss_dice``: dice, on the masks of the present classes
  only, upsampled (bilinear) to the label resolution and normalised by the number of present classes in the
  batch (all-reduced across processes).

Ignored pixels (``ignore_index``) are left out of the mask losses. The release code counts them as negatives of
every class mask; we drop them because an "ignore" label says nothing about any class (documented deviation).
Deep supervision: every entry of ``outputs["aux_outputs"]`` gets the same losses with a ``_i`` suffix, weighted
like the final ones (the release's ``aux_weight_dict``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Criterion

from .criterion import _reduce_num_masks
from .mask import dice_loss, sigmoid_focal_loss

__all__ = ["ATMCriterion", "class_bound_targets", "SEGVIT_LOSS_WEIGHTS"]

SEGVIT_LOSS_WEIGHTS = {"loss_ce": 1.0, "loss_mask": 20.0, "loss_dice": 1.0}


def class_bound_targets(label_map: Tensor, ignore_index: int = 255) -> dict[str, Tensor]:
    """Semantic labels ``[H, W]`` -> ``{"labels": int64 [N], "masks": bool [N, H, W], "valid": bool [H, W]}``.

    ``labels`` are the present classes in ascending order (query ``labels[i]`` owns ``masks[i]``); ``valid`` is
    False on ignored pixels.
    """
    if label_map.dim() != 2:
        raise ValueError(f"label_map must be [H, W], got shape {tuple(label_map.shape)}")
    label_map = label_map.long()
    valid = label_map != ignore_index
    labels = torch.unique(label_map[valid])
    masks = label_map.unsqueeze(0) == labels[:, None, None]
    return {"labels": labels, "masks": masks, "valid": valid}


class ATMCriterion(Criterion):
    """The ATM loss with the same contract as :class:`vocabseg.losses.SetCriterion`.

    ``forward(outputs, targets)`` takes ``outputs = {"pred_logits": [B, C, C+1], "pred_masks": [B, C, h, w],
    "aux_outputs": [...]}`` and the per-image dicts of :func:`class_bound_targets`; it returns unweighted losses.
    :meth:`weighted_total` combines them with ``weight_dict``.
    """

    empty_weight: Tensor

    def __init__(self, num_classes: int, weight_dict: Mapping[str, float] | None = None,
                 no_object_weight: float = 0.1, focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.weight_dict = dict(SEGVIT_LOSS_WEIGHTS if weight_dict is None else weight_dict)
        self.no_object_weight = float(no_object_weight)
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    # ------------------------------------------------------------------ pieces
    def _check(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> None:
        logits = outputs["pred_logits"]
        b, q, k = logits.shape
        if q != self.num_classes or k != self.num_classes + 1:
            n = self.num_classes
            raise ValueError(f"pred_logits is [B, {q}, {k}]; SegViT binds one query to each of the {n} classes, "
                             f"so it must be [B, {n}, {n + 1}]")
        if len(targets) != b:
            raise ValueError(f"got {len(targets)} targets for a batch of {b}")
        for t in targets:
            if t["labels"].numel() and int(t["labels"].max()) >= self.num_classes:
                raise ValueError(f"label {int(t['labels'].max())} is outside the {self.num_classes} classes "
                                 f"(check ignore_index and the dataset's class list)")

    def loss_labels(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        logits = outputs["pred_logits"].float()  # [B, C, C+1]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, t in enumerate(targets):
            labels = t["labels"].to(logits.device)
            target_classes[b, labels] = labels  # query c -> class c when present, else no-object
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.empty_weight.to(logits.device))
        return {"loss_ce": loss}

    def loss_masks(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]],
                   num_masks: float) -> dict[str, Tensor]:
        pred_masks: Tensor = outputs["pred_masks"]
        focal: Tensor | None = None
        dice: Tensor | None = None
        for b, t in enumerate(targets):
            labels = t["labels"].to(pred_masks.device)
            if labels.numel() == 0:
                continue
            tgt = t["masks"].to(pred_masks.device)
            src = pred_masks[b, labels].float()  # [N, h, w] (only the present classes are upsampled)
            if src.shape[-2:] != tgt.shape[-2:]:
                src = F.interpolate(src[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            valid = t.get("valid")
            if valid is not None:
                keep = valid.to(pred_masks.device).flatten()
                src, tgt = src.flatten(1)[:, keep], tgt.flatten(1)[:, keep]
            if src.shape[-1] == 0:
                continue
            tgt = tgt.float()
            f = sigmoid_focal_loss(src, tgt, num_masks, alpha=self.focal_alpha, gamma=self.focal_gamma)
            d = dice_loss(src, tgt, num_masks)
            focal = f if focal is None else focal + f
            dice = d if dice is None else dice + d
        if focal is None or dice is None:
            zero = pred_masks.sum() * 0.0  # keeps the graph so backward() still works
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        return {"loss_mask": focal, "loss_dice": dice}

    # ------------------------------------------------------------------ driver
    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        self._check(outputs, targets)
        num_masks = _reduce_num_masks(sum(len(t["labels"]) for t in targets), outputs["pred_logits"].device)
        losses = {**self.loss_labels(outputs, targets), **self.loss_masks(outputs, targets, num_masks)}
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            aux_losses = {**self.loss_labels(aux, targets), **self.loss_masks(aux, targets, num_masks)}
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, weight_dict={self.weight_dict}, "
                f"no_object_weight={self.no_object_weight}, focal_alpha={self.focal_alpha}, "
                f"focal_gamma={self.focal_gamma}")
