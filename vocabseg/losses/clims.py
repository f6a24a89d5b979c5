"""CLIMS losses (Xie et al., CVPR 2022, arXiv 2203.02668, sec. 3; seed 001): a frozen CLIP judges masked images.

For every (image n, class k) with label y_nk = 1, the sigmoid activation map P_k masks the image: foreground
X·P_k and background X·(1 − P_k). With s(a, b) the cosine similarity of CLIP embeddings:

* OTM  = −mean log s(X·P_k, "a photo of {k}.")          foreground matches its class text
* BTM  = −mean log (1 − s(X·(1−P_k), "a photo of {k}."))  background does not
* CBS  = −sum_{n,k,l} [s_l > τ] log (1 − s_l),  s_l = s(X·P_k, "a photo of {bg word l of class k}.")
* REG  = mean of P over classes, pixels and images         area regulariser
* total = α OTM + β BTM + γ CBS + δ REG (α 10, β 24, γ 1, δ 0.2 on VOC).
* optional CLS = multi-label soft margin of the spatially averaged logits vs the image labels (``loss_cls``, only
  when it has a weight): the CAM baseline the release starts from, for a network trained from scratch.

Reductions follow the release (``clip_loss.py`` / ``train_clims.py``): means over the positive pairs for OTM/BTM,
similarities clamped to [1e-4, 0.9999]; CBS a *sum* over pairs and words of those above τ = 0.26 (the paper has no
threshold); REG the mean of all maps of all classes. The release masks the images after ImageNet normalisation and
feeds them to CLIP as they are; here the pixels are taken back to RGB and normalised with CLIP's own statistics
first (masked-out pixels then equal CLIP's mean colour, as the release's equal ImageNet's).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Criterion

__all__ = ["otm_loss", "btm_loss", "cbs_loss", "reg_loss", "image_labels_from_maps", "background_word_table",
           "CLIMSLoss", "CLIMS_WEIGHTS", "VOC_BACKGROUND_WORDS"]

CLIMS_WEIGHTS = {"loss_otm": 10.0, "loss_btm": 24.0, "loss_cbs": 1.0, "loss_reg": 0.2}
# Co-occurring background words of the release for VOC (one list shared by all classes).
VOC_BACKGROUND_WORDS: tuple[str, ...] = ("tree", "river", "sea", "lake", "water", "railway", "railroad", "track",
                                         "stone", "rocks")
_EPS = 1e-4


def _clamp(s: Tensor) -> Tensor:
    return s.clamp(_EPS, 1.0 - _EPS)


def otm_loss(sim: Tensor) -> Tensor:
    """Object region–text matching: −mean log s over the positive pairs' foreground similarities ``sim`` [P]."""
    return -torch.log(_clamp(sim)).mean()


def btm_loss(sim: Tensor) -> Tensor:
    """Background region–text matching: −mean log(1 − s) over the positive pairs' background similarities."""
    return -torch.log(1.0 - _clamp(sim)).mean()


def cbs_loss(sim: Tensor, valid: Tensor | None = None, threshold: float | None = 0.26) -> Tensor:
    """Co-occurring background suppression: −sum over [P, L] of log(1 − s), for the words that apply to the
    pair's class (``valid`` [P, L]) and whose similarity exceeds ``threshold`` (None: all)."""
    keep = torch.ones_like(sim, dtype=torch.bool) if valid is None else valid.bool()
    if threshold is not None:
        keep = keep & (sim > threshold)
    return -(torch.log(1.0 - sim.clamp(max=1.0 - _EPS)) * keep.to(sim.dtype)).sum()


def reg_loss(cams: Tensor) -> Tensor:
    """Area regulariser: mean activation of all maps [B, K, h, w] (1/K Σ_k mean_hw P_k, averaged over images)."""
    return cams.mean()


def image_labels_from_maps(labels: Tensor, num_classes: int, ignore_index: int = 255, min_pixels: int = 1
                           ) -> Tensor:
    """Label maps [B, H, W] -> multi-hot image-level labels [B, K]: classes with at least ``min_pixels`` pixels."""
    b = labels.shape[0]
    flat = labels.reshape(b, -1)
    valid = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    index = torch.where(valid, flat, torch.full_like(flat, num_classes))
    counts = torch.zeros(b, num_classes + 1, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    return (counts[:, :num_classes] >= min_pixels).float()


def background_word_table(class_names: Sequence[str] | None, num_classes: int, shared: Sequence[str] = (),
                          class_words: Mapping[str, Sequence[str]] | None = None
                          ) -> tuple[list[str], Tensor]:
    """The background words and a [K, L] bool table "word l suppresses class k".

    ``shared`` words apply to every class (the release's one list per data set), ``class_words[name]`` to that
    class only (the paper's per-class lists, e.g. ``{"train": ["railroad"]}``; needs ``class_names``). A word is
    never suppressed for the class of the same name.
    """
    class_words = dict(class_words or {})
    words = list(dict.fromkeys([*shared, *(w for ws in class_words.values() for w in ws)]))
    table = torch.zeros(num_classes, len(words), dtype=torch.bool)
    for k in range(num_classes):
        name = class_names[k] if class_names is not None else None
        own = set(class_words.get(name, ())) if name is not None else set()
        for i, w in enumerate(words):
            applies = w in shared or w in own
            table[k, i] = applies and (name is None or w.strip().lower() != name.strip().lower())
    return words, table


class CLIMSLoss(Criterion):
    """The four CLIMS losses from the CAM network's outputs and a frozen CLIP image encoder.

    ``encode_image``: CLIP's image tower (normalised images [N, 3, S, S] -> [N, D]); ``clip_resolution`` S.
    ``pixel_mean/std`` ([3], 0..255 scale): how the CAM network's inputs are normalised; ``clip_mean/std``
    ([3], 0..1 scale): CLIP's. ``background_text`` [L, D]: embeddings of the background prompts, ``background_mask``
    [K, L] which of them apply to class k (:func:`background_word_table`).

    ``forward(outputs, targets)``: ``outputs`` holds ``cams`` [B, K, h, w] (sigmoid maps), ``pixels`` [B, 3, H, W]
    (the network's input) and ``text`` [K, D] (the classes' prompt embeddings); ``targets`` multi-hot [B, K] or
    ``{"labels": maps [B, H, W], "ignore_index": i}``. Returns ``loss_otm, loss_btm, loss_cbs, loss_reg``.
    """

    def __init__(self, encode_image: Callable[[Tensor], Tensor], clip_resolution: int, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], clip_mean: Sequence[float], clip_std: Sequence[float],
                 background_text: Tensor | None = None, background_mask: Tensor | None = None,
                 weight_dict: Mapping[str, float] | None = None, cbs_threshold: float | None = 0.26,
                 min_label_pixels: int = 1):
        super().__init__()
        self.encode_image = encode_image  # a bound method, not a submodule: the criterion owns no CLIP weights
        self.clip_resolution = int(clip_resolution)
        self.register_buffer("pixel_mean", torch.as_tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.as_tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("clip_mean", torch.as_tensor(clip_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.as_tensor(clip_std, dtype=torch.float32).view(1, 3, 1, 1))
        bg = background_text if background_text is not None else torch.zeros(0, 1)
        self.register_buffer("background_text", F.normalize(bg.float(), dim=-1) if bg.numel() else bg.float())
        self.register_buffer("background_mask", background_mask.bool() if background_mask is not None
                             else torch.ones(0, bg.shape[0], dtype=torch.bool))
        self.weight_dict = dict(CLIMS_WEIGHTS if weight_dict is None else weight_dict)
        self.cbs_threshold = cbs_threshold
        self.min_label_pixels = min_label_pixels

    def to_clip_pixels(self, pixels: Tensor) -> Tensor:
        """The network's normalised input -> CLIP-normalised, at CLIP's resolution."""
        rgb = (pixels * self.pixel_std + self.pixel_mean) / 255.0
        x = (rgb - self.clip_mean) / self.clip_std
        return _resize(x, self.clip_resolution)

    def image_labels(self, targets, num_classes: int) -> Tensor:
        if isinstance(targets, Mapping):
            return image_labels_from_maps(targets["labels"], num_classes, targets.get("ignore_index", 255),
                                          self.min_label_pixels)
        return targets.float()

    def forward(self, outputs: Mapping[str, Tensor], targets) -> dict[str, Tensor]:
        cams, text = outputs["cams"].float(), F.normalize(outputs["text"].float(), dim=-1)
        b, k = cams.shape[:2]
        y = self.image_labels(targets, k).to(cams.device)
        losses = {"loss_reg": reg_loss(cams)}
        if "loss_cls" in self.weight_dict:  # CAM-baseline classification: averaged logits vs the image labels
            losses["loss_cls"] = F.multilabel_soft_margin_loss(outputs["logits"].float().mean((2, 3)), y)
        pairs = y.nonzero()  # [P, 2] (image, class)
        if pairs.shape[0] == 0:  # no labelled class in the batch (e.g. crops of ignored pixels only)
            zero = cams.sum() * 0.0
            return {"loss_otm": zero, "loss_btm": zero, "loss_cbs": zero, **losses}
        images = self.to_clip_pixels(outputs["pixels"].float())  # [B, 3, S, S]
        maps = _resize(cams, self.clip_resolution)  # [B, K, S, S]
        n, c = pairs[:, 0], pairs[:, 1]
        m = maps[n, c][:, None]  # [P, 1, S, S]
        fg = F.normalize(self.encode_image(images[n] * m).float(), dim=-1)  # [P, D]
        bg = F.normalize(self.encode_image(images[n] * (1.0 - m)).float(), dim=-1)
        losses["loss_otm"] = otm_loss((fg * text[c]).sum(-1))
        losses["loss_btm"] = btm_loss((bg * text[c]).sum(-1))
        if self.background_text.shape[0]:
            sim = fg @ self.background_text.t()  # [P, L]
            valid = self.background_mask[c] if self.background_mask.shape[0] == k else None
            losses["loss_cbs"] = cbs_loss(sim, valid, self.cbs_threshold)
        else:
            losses["loss_cbs"] = fg.sum() * 0.0
        return losses


def _resize(x: Tensor, size: int) -> Tensor:
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
