"""Image–text contrastive losses of GroupViT (Xu et al., CVPR 2022, sec. 3.2).

* :func:`image_text_contrastive_loss`: CLIP's symmetric InfoNCE over a batch of (image, caption) pairs.
* :func:`multi_label_contrastive_loss`: each image is also paired with K prompted nouns of its caption
  ("a photo of a {noun}."); image -> texts uses a soft target spread evenly over the image's K prompts, each
  prompt -> images a one-hot target on its image (the release's ``multi_label_loss``).
* :class:`GroupViTLoss`: both, weighted, from :meth:`vocabseg.models.groupvit.GroupViT.contrastive_outputs`.

Logit scales are exponentiated and clamped at 100, as in the release. Single-process batches only (the release
gathers the other GPUs' features as negatives; ``vocabseg.engine.groupvit_train`` runs in one process).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Criterion

__all__ = ["image_text_contrastive_loss", "multi_label_contrastive_loss", "GroupViTLoss", "clamped_scale"]


def clamped_scale(log_scale: Tensor | float, max_scale: float = 100.0) -> Tensor:
    """exp(log_scale) clamped at ``max_scale``."""
    return torch.as_tensor(log_scale).exp().clamp(max=max_scale)


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of -sum(target * log_softmax(logits))."""
    return -(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def image_text_contrastive_loss(image: Tensor, text: Tensor, log_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE: image i matches caption i. ``image``, ``text`` [B, D] (normalised here)."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = clamped_scale(log_scale) * image @ text.t()  # [B, B]
    target = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def multi_label_contrastive_loss(image: Tensor, labels: Tensor, log_scale: Tensor | float) -> Tensor:
    """Image [B, D] against the K prompted nouns of every caption, ``labels`` [B, K, D] (normalised here).

    Image -> all B·K prompts: target 1/K on its own K prompts. Prompt -> all B images: target its image.
    Loss = mean of the two soft cross-entropies.
    """
    b, k, _ = labels.shape
    image, labels = F.normalize(image, dim=-1), F.normalize(labels, dim=-1).reshape(b * k, -1)
    logits = clamped_scale(log_scale) * image @ labels.t()  # [B, B*K]
    owner = torch.arange(b, device=image.device).repeat_interleave(k)  # prompt j belongs to image owner[j]
    per_image = (owner[None, :] == torch.arange(b, device=image.device)[:, None]).to(logits.dtype) / k
    per_label = F.one_hot(owner, b).to(logits.dtype)
    return 0.5 * (_soft_cross_entropy(logits, per_image) + _soft_cross_entropy(logits.t(), per_label))


class GroupViTLoss(Criterion):
    """``forward(outputs)`` -> {"loss_itc", "loss_multi_label"} from ``GroupViT.contrastive_outputs``;
    :meth:`weighted_total` (from :class:`~vocabseg.losses.base.Criterion`) applies ``weight_dict``."""

    def __init__(self, multi_label_weight: float = 1.0, share_temperature: bool = False):
        super().__init__()
        self.weight_dict = {"loss_itc": 1.0, "loss_multi_label": float(multi_label_weight)}
        self.share_temperature = share_temperature

    def forward(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        image, text = outputs["image"].float(), outputs["text"].float()
        losses = {"loss_itc": image_text_contrastive_loss(image, text, outputs["logit_scale"].float())}
        if outputs.get("nouns") is not None and self.weight_dict["loss_multi_label"]:
            key = "logit_scale" if self.share_temperature else "multi_label_logit_scale"
            losses["loss_multi_label"] = multi_label_contrastive_loss(image, outputs["nouns"].float(),
                                                                      outputs[key].float())
        return losses
