"""Set criterion for mask classification (Mask2Former recipe, used to train SAN).

After Hungarian matching, each image contributes

* ``loss_ce``: cross-entropy over all queries; matched queries target their segment's class,
  the rest target "no object" (index K), whose class weight is ``no_object_weight``;
* ``loss_mask``: sigmoid BCE and ``loss_dice``: dice, on matched (prediction, target) pairs
  only, evaluated at points chosen by uncertainty-based importance sampling and normalised by
  the number of target masks in the whole batch (all-reduced across processes).

A target label ``>= num_classes`` marks a *mask-only* target: an object whose class is not
taught (``mask_only_classes`` of the training config). The matcher gives it no class cost, the
query matched to it is left out of ``loss_ce`` (it targets neither a class nor "no object"),
and its mask counts in ``loss_mask``/``loss_dice`` like any other. With ``mask_only_objectness`` = a > 0 that query
also learns that it *is* an object, whatever its class: its term in ``loss_ce`` is −log(1 − p_no-object) with
weight a (no class is favoured; a model that was taught "no object" for such objects unlearns it).

Deep supervision repeats all of it, with its own matching, for every entry of
``outputs["aux_outputs"]`` and reports the keys with a ``_i`` suffix.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Criterion

from .mask import dense_points, dice_loss, point_sample, sample_points_by_uncertainty, sigmoid_bce_loss
from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "targets_from_semantic"]

_IGNORE = -100  # F.cross_entropy's default ignore_index: queries matched to mask-only targets



def targets_from_semantic(label_map: Tensor, ignore_index: int = 255) -> dict[str, Tensor]:
    """Turn a semantic label map ``[H, W]`` into set targets: one binary mask per class present.

    Returns ``{"labels": int64 [N], "masks": bool [N, H, W]}`` with labels in ascending order;
    pixels equal to ``ignore_index`` belong to no mask (so they only count as background).
    """
    if label_map.dim() != 2:
        raise ValueError(f"label_map must be [H, W], got shape {tuple(label_map.shape)}")
    label_map = label_map.long()
    labels = torch.unique(label_map)
    labels = labels[labels != ignore_index]
    masks = label_map.unsqueeze(0) == labels[:, None, None]
    return {"labels": labels, "masks": masks}


def _reduce_num_masks(count: int, device: torch.device) -> float:
    """Average number of target masks per process (≥ 1), so every process normalises alike."""
    num = torch.as_tensor([float(count)], dtype=torch.float32, device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        world_size = dist.get_world_size()
    return max(num.item() / world_size, 1.0)


class SetCriterion(Criterion):
    """Losses for a mask-classification model: Hungarian matching, then CE + BCE + dice.

    ``forward`` returns unweighted losses; :meth:`weighted_total` combines them with
    ``weight_dict`` (aux keys ``loss_x_i`` use the weight of ``loss_x``). ``num_points=None``
    evaluates mask losses on every target pixel instead of sampled points.
    """

    empty_weight: Tensor
    supports_mask_only = True  # labels >= num_classes are mask-only targets (the trainer's mask_only_classes)

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        no_object_weight: float = 0.1,
        num_points: int | None = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        losses: Sequence[str] = ("labels", "masks"),
        mask_only_objectness: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        unknown = set(losses) - {"labels", "masks"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; choose from 'labels', 'masks'")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.no_object_weight = float(no_object_weight)
        self.num_points = num_points
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.losses = tuple(losses)
        self.mask_only_objectness = float(mask_only_objectness)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    # ------------------------------------------------------------------ individual losses
    def loss_labels(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]], indices: list[tuple[Tensor, Tensor]]
    ) -> dict[str, Tensor]:
        """Weighted CE over all queries; unmatched queries target the no-object class K.

        Queries matched to mask-only targets (label ``>= K``) are left out (``ignore_index``), or, with
        ``mask_only_objectness`` a > 0, take −log(1 − p_no-object) with weight a in the same weighted mean."""
        logits: Tensor = outputs["pred_logits"].float()
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"pred_logits has {logits.shape[-1]} classes, expected num_classes + 1 = {self.num_classes + 1}"
            )
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        mask_only = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
        for b, ((pred_idx, tgt_idx), target) in enumerate(zip(indices, targets)):
            if pred_idx.numel():
                labels = target["labels"].to(logits.device)
                pred_idx = pred_idx.to(logits.device)
                matched = labels[tgt_idx.to(logits.device)]
                target_classes[b, pred_idx] = matched
                mask_only[b, pred_idx] = matched >= self.num_classes
        weight = self.empty_weight.to(logits.device)
        if mask_only.any():
            if self.mask_only_objectness > 0:
                return {"loss_ce": self._ce_with_objectness(logits, target_classes, mask_only, weight)}
            # queries matched to mask-only targets learn no class: neither theirs nor "no object"
            if bool(mask_only.all()):  # nothing left to classify: a zero that keeps the graph
                return {"loss_ce": logits.sum() * 0.0}
            target_classes = target_classes.masked_fill(mask_only, _IGNORE)
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=weight, ignore_index=_IGNORE)
        return {"loss_ce": loss}

    def _ce_with_objectness(self, logits: Tensor, target_classes: Tensor, mask_only: Tensor, weight: Tensor) -> Tensor:
        """The weighted CE mean with the mask-only queries' term −log(1 − p_no-object) (weight
        ``mask_only_objectness``) instead of a class's."""
        log_probs = logits.log_softmax(-1)
        classes = target_classes.clamp_max(self.num_classes)  # mask-only ids >= K: their row is replaced below
        ce = -log_probs.gather(-1, classes.unsqueeze(-1)).squeeze(-1)
        w = weight[classes]
        log_object = torch.log1p(-log_probs[..., -1].exp().clamp_max(1 - 1e-6))  # log(1 - p_no-object)
        ce = torch.where(mask_only, -log_object, ce)
        w = torch.where(mask_only, torch.full_like(w, self.mask_only_objectness), w)
        return (w * ce).sum() / w.sum()

    def loss_masks(
        self,
        outputs: Mapping[str, Any],
        targets: Sequence[Mapping[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_masks: float,
    ) -> dict[str, Tensor]:
        """BCE and dice on matched pairs, at uncertainty-sampled points (or all pixels)."""
        pred_masks: Tensor = outputs["pred_masks"]
        pred_list: list[Tensor] = []
        tgt_list: list[Tensor] = []
        for b, ((pred_idx, tgt_idx), target) in enumerate(zip(indices, targets)):
            if pred_idx.numel() == 0:
                continue
            src = pred_masks[b, pred_idx.to(pred_masks.device)].float()  # [M, h, w]
            tgt = target["masks"][tgt_idx.to(target["masks"].device)].to(device=src.device, dtype=torch.float32)
            if self.num_points is None:
                src_pts, tgt_pts = dense_points(src, tgt)
            else:
                # Targets keep their own resolution: the same normalised points index both.
                coords = sample_points_by_uncertainty(
                    src.unsqueeze(1), self.num_points, self.oversample_ratio, self.importance_sample_ratio
                )
                with torch.no_grad():
                    tgt_pts = point_sample(tgt.unsqueeze(1), coords)[:, 0]
                src_pts = point_sample(src.unsqueeze(1), coords)[:, 0]
            pred_list.append(src_pts)
            tgt_list.append(tgt_pts)

        if not pred_list:
            zero = pred_masks.sum() * 0.0  # keeps the graph so backward() still works
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        if self.num_points is None:
            # Images may differ in resolution, so sum per image instead of concatenating.
            loss_mask = sum(sigmoid_bce_loss(p, t, num_masks) for p, t in zip(pred_list, tgt_list))
            loss_dice = sum(dice_loss(p, t, num_masks) for p, t in zip(pred_list, tgt_list))
        else:
            src_all, tgt_all = torch.cat(pred_list), torch.cat(tgt_list)
            loss_mask = sigmoid_bce_loss(src_all, tgt_all, num_masks)
            loss_dice = dice_loss(src_all, tgt_all, num_masks)
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}  # type: ignore[dict-item]

    # ------------------------------------------------------------------ driver
    def _losses_for(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]], num_masks: float
    ) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        losses: dict[str, Tensor] = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(outputs, targets, indices))
        if "masks" in self.losses:
            losses.update(self.loss_masks(outputs, targets, indices, num_masks))
        return losses

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Unweighted losses for the final output and, suffixed ``_i``, for each aux output."""
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}")
        num_masks = _reduce_num_masks(sum(len(t["labels"]) for t in targets), outputs["pred_logits"].device)
        losses = self._losses_for(outputs, targets, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            for key, value in self._losses_for(aux, targets, num_masks).items():
                losses[f"{key}_{i}"] = value
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weight_dict={self.weight_dict}, "
            f"no_object_weight={self.no_object_weight}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, importance_sample_ratio={self.importance_sample_ratio}, "
            f"losses={self.losses}"
        )
