"""Training losses.

This package holds the mask-classification losses that train SAN (the Mask2Former recipe):

* :mod:`vocabseg.losses.mask`: per-mask dice, sigmoid BCE and sigmoid focal losses, their
  pairwise matching-cost forms, and point sampling (uniform and uncertainty-based);
* :mod:`vocabseg.losses.matcher`: :class:`HungarianMatcher`, the query-to-segment assignment;
* :mod:`vocabseg.losses.criterion`: :class:`SetCriterion` (CE + BCE + dice with deep
  supervision) and :func:`targets_from_semantic` to build set targets from a label map.

Other models' losses go beside these files, one module per family, reusing the pieces above
where they fit: SegViT's focal + dice losses on masks bound to classes (no matching), LSeg's
per-pixel cross-entropy over text-embedding logits, contrastive image–text losses (GroupViT),
and CLIMS's CLIP-guided activation losses.
"""

from .criterion import SetCriterion, targets_from_semantic
from .mask import (
    dense_points,
    dice_loss,
    logit_uncertainty,
    pairwise_bce_cost,
    pairwise_dice_cost,
    point_sample,
    sample_points_by_uncertainty,
    sigmoid_bce_loss,
    sigmoid_focal_loss,
)
from .matcher import HungarianMatcher

__all__ = [
    "HungarianMatcher",
    "SetCriterion",
    "targets_from_semantic",
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
