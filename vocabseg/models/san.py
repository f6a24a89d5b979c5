"""SAN — Side Adapter Network (Xu et al., CVPR 2023, arXiv 2302.12242).

A small side ViT sees the image at full resolution; a frozen CLIP ViT sees it at a lower resolution (asymmetric
input). CLIP features after ``ln_pre`` and a few blocks are added into the side network. From the side network's
last blocks, 100 queries give mask proposals (query · pixel embedding) and per-head attention biases. The last CLIP
blocks then run once more with 100 [SOS] tokens (copies of [CLS]) whose attention to the patches is steered by the
biases; each [SOS] output, through CLIP's head, is the CLIP embedding of one mask and is classified against text
embeddings of any vocabulary plus a learnt background embedding.

Reads top to bottom: side-network parts, the side network, the recognition mask, the model, the official key map,
registered configs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import CLIP, CLIPConfig, config_for
from ..errors import CheckpointError
from .base import OpenVocabModel
from .registry import register_model
from .weights import load_strict, rename_key

# ----------------------------------------------------------------------------------------------- config


@dataclass
class SANConfig:
    clip: CLIPConfig = field(default_factory=lambda: config_for("ViT-B/16"))
    clip_scale: float = 0.5  # CLIP sees the (padded) image resized by this factor
    fusion_map: tuple[tuple[int, int], ...] = ((0, 0), (3, 1), (6, 2), (9, 3))  # (CLIP layer, side position)
    rec_start: int = 9  # CLIP blocks rec_start.. run with the [SOS] tokens
    side_width: int = 240
    side_depth: int = 8
    side_heads: int = 6
    side_patch: int = 16
    side_mlp_ratio: float = 4.0
    side_image_size: int = 640  # the side network's positional embedding grid = side_image_size / side_patch
    num_queries: int = 100
    embed_channels: int = 256
    mlp_channels: int = 256
    mlp_layers: int = 3
    deep_supervision: tuple[int, ...] = (7, 8)  # side blocks (1-based) whose output is decoded while training
    sos_mask_value: float = -100.0
    train_num_points: int = 12544  # points per mask for matching and mask losses (Mask2Former/SAN recipe)
    closed_set_classes: int = 0  # > 0: a closed-set baseline with learnt class embeddings instead of text
    templates: str = "vild"
    short_side: int = 640  # inference resize: short side, capped so the long side stays <= max_side
    max_side: int = 2560
    size_divisibility: int = 32
    text_tower: str = "clip"  # "minilm": a LiTCLIP (frozen MiniLM text tower; clip.embed_dim must be 384)
    # > 0: also classify each mask proposal by CLIP on a crop of it and mix the two class distributions
    # geometrically with this weight on the crop (mask_crop_ensemble). Off for the official models (SAN itself has
    # no such step); the embedded default uses it because its 96-px CLIP sees a small object as a few patches.
    mask_crop_ensemble: float = 0.0
    # The crop weight for the names SAN's own classifier never learnt (FC-CLIP's in- and out-of-vocabulary ensemble):
    # a vocabulary name whose text embedding is none of ``trained_class_names``' gets max(weight, this). SAN gives
    # such a class ~0 (a white arrow, of a colour its training left unnamed, is "yellow star" 0.8 to it), and the
    # geometric mix lets that ~0 veto the crop. Off (0) or no trained names: one weight for all
    mask_crop_ensemble_unseen: float = 0.0
    trained_class_names: tuple[str, ...] = ()
    # What the crop shows outside its mask: "mask_mean" paints it with the mask's own mean colour (an object's crop
    # becomes its colour alone), "surround_mean" with the mean of the crop's other pixels (the object's outline on
    # its surroundings, for a CLIP that knows shapes).
    mask_crop_fill: str = "mask_mean"
    # > 0: the crop's class distribution takes this share (geometrically) from a second crop whose outside is
    # "neutral" (the normalisation's mean colour): the mask's own colours in its own shape. A flat crop of a blue
    # hexagon on sky is blue, so "sky"; the neutral one shows a blue hexagon. Flat crops keep the colours right
    mask_crop_neutral_share: float = 0.0
    # > 1: before the crop ensemble, split every mask proposal into connected pieces (split_mask_components): its
    # mask_split_parts - 1 pieces holding the highest logits, and the rest. Each piece is cropped and classified on
    # its own, so one proposal covering two separate objects (two shapes of one colour) can name them apart. The
    # pieces keep the proposal's class distribution as their SAN side of the ensemble. Off (1) for official models.
    mask_split_parts: int = 1
    # max-pool passes that spread a piece's label over its pixels (a piece wider than this, in mask cells, is cut)
    mask_split_iterations: int = 128
    # a proposal is split only when its other pieces together hold at least this share of its first piece's area
    # (two objects); specks and holes leave it whole
    mask_split_min_ratio: float = 0.0
    # split at most this many proposals per image, those with the largest object share (0: every one)
    mask_split_max: int = 0
    # crop weight of the ensemble for the pieces of a proposal that did split: SAN's class distribution describes
    # the whole proposal (both objects), so a piece is named mostly by its own crop
    mask_split_crop_weight: float = 1.0
    # and its crop distribution takes this share from an outline crop (the piece's shape on its surroundings; a
    # piece is one object, and its shape is what tells it from its twin; the shape-tuned CLIP learnt shapes on such
    # crops), the rest from the flat crop (its colour). 0: flat crops only
    mask_split_outline: float = 0.5
    # subtracted from the "no object" logit at inference: a proposal SAN recognises but doubts (an object of a colour
    # it was never taught to name: trained as nothing until v4) keeps more of its mass. 0 for the official models
    no_object_bias: float = 0.0
    # > 0: a proposal this confident in its top class (after the crop ensemble) is cut out of every proposal of
    # another class that covers it and is at least 1 / nested_cut_area_ratio times its area (cut_nested_proposals).
    # Sums over proposals let two large "wall" masks that also cover a red star outweigh the star's own confident
    # mask; cut, the star's pixels are the star's. 0: off
    nested_cut_confidence: float = 0.0
    nested_cut_area_ratio: float = 0.5


CROP_FILLS = ("mask_mean", "surround_mean", "neutral")


def mask_crops(pixels: torch.Tensor, mask_logits: torch.Tensor, size: int, context: float = 0.15,
               margin: float = 4.0, fill: str = "mask_mean") -> tuple[torch.Tensor, torch.Tensor]:
    """One square crop per mask proposal, around its foreground box with ``context`` and ``margin`` px to spare.

    pixels [B, 3, H, W] (normalised), mask_logits [B, Q, h, w] -> crops [B*Q, 3, size, size] in which the pixels
    outside the mask take one flat colour, and ``present`` [B, Q] (masks with any foreground; the others' crops are
    meaningless). ``fill="mask_mean"``: the mask's mean colour (a crop shows one object's colour, or one background
    with the objects on it painted over); ``"surround_mean"``: the mean of the crop's pixels outside the mask (the
    mask's outline stays visible); ``"neutral"``: zero, the normalisation's mean colour (the mask's own pixels in
    its own shape).
    Written with tensor operations only (bilinear sampling on a computed grid), so it traces into ONNX.
    """
    b, q, h, w = mask_logits.shape
    height, width = pixels.shape[-2], pixels.shape[-1]
    fg = mask_logits > 0
    present = fg.flatten(2).any(-1)
    rows = torch.arange(h, device=pixels.device, dtype=torch.float32).view(h, 1)
    cols = torch.arange(w, device=pixels.device, dtype=torch.float32).view(1, w)
    big = torch.tensor(1e9, device=pixels.device)
    y0 = torch.where(fg, rows, big).amin((-2, -1))
    y1 = torch.where(fg, rows + 1, -big).amax((-2, -1))
    x0 = torch.where(fg, cols, big).amin((-2, -1))
    x1 = torch.where(fg, cols + 1, -big).amax((-2, -1))
    y0, y1 = torch.where(present, y0, 0.0), torch.where(present, y1, float(h))
    x0, x1 = torch.where(present, x0, 0.0), torch.where(present, x1, float(w))
    sy, sx = height / h, width / w  # mask cell -> pixels
    cy, cx = (y0 + y1) * (sy / 2), (x0 + x1) * (sx / 2)
    half = torch.maximum((y1 - y0) * sy, (x1 - x0) * sx) * ((1 + context) / 2) + margin
    # output pixel centres in [-1, 1] -> input coordinates (align_corners=False convention)
    t = (torch.arange(size, device=pixels.device, dtype=torch.float32) + 0.5) / size * 2 - 1
    gx = (cx.view(b * q, 1, 1) + half.view(b * q, 1, 1) * t.view(1, 1, size)) / width * 2 - 1
    gy = (cy.view(b * q, 1, 1) + half.view(b * q, 1, 1) * t.view(1, size, 1)) / height * 2 - 1
    grid = torch.stack([gx.expand(b * q, size, size), gy.expand(b * q, size, size)], dim=-1)
    source = pixels.unsqueeze(1).expand(b, q, *pixels.shape[1:]).reshape(b * q, *pixels.shape[1:])
    crops = F.grid_sample(source.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = F.grid_sample(mask_logits.reshape(b * q, 1, h, w).float(), grid, mode="bilinear",
                           padding_mode="border", align_corners=False) > 0
    if fill not in CROP_FILLS:
        raise ValueError(f"unknown crop fill {fill!r}; use one of {CROP_FILLS}")
    if fill == "neutral":
        return torch.where(inside, crops, torch.zeros((), device=crops.device)), present
    painted = inside if fill == "mask_mean" else ~inside
    count = painted.sum((2, 3)).clamp_min(1)
    mean = (crops * painted).sum((2, 3)) / count
    crops = torch.where(inside, crops, mean[:, :, None, None])
    return crops, present


def crop_log_probs(clip: nn.Module, pixels: torch.Tensor, mask_logits: torch.Tensor, text_embeddings: torch.Tensor,
                   fill: str = "mask_mean", select: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's zero-shot log-distribution over the classes on each mask's crop (:func:`mask_crops`) [B, Q, C], and
    which masks have any foreground [B, Q]. ``select`` [B, Q]: the masks whose distribution is needed; in eager
    mode only those (and only those with foreground) are cropped and encoded, the others' rows are zeros."""
    b, q = mask_logits.shape[:2]
    text = F.normalize(text_embeddings.float(), dim=-1)
    scale = clip.logit_scale.exp().float()
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # static shapes: every mask
        crops, present = mask_crops(pixels, mask_logits, clip.visual.input_resolution, fill=fill)
        emb = F.normalize(clip.encode_image(crops.to(pixels.dtype)).float(), dim=-1)
        return (scale * emb @ text.t()).log_softmax(-1).view(b, q, -1), present
    present = (mask_logits > 0).flatten(2).any(-1)
    wanted = present if select is None else present & select
    out = torch.zeros(b, q, text.shape[0], device=mask_logits.device)
    for i in range(b):
        idx = wanted[i].nonzero().flatten()
        if idx.numel() == 0:
            continue
        crops, _ = mask_crops(pixels[i:i + 1], mask_logits[i:i + 1, idx], clip.visual.input_resolution, fill=fill)
        emb = F.normalize(clip.encode_image(crops.to(pixels.dtype)).float(), dim=-1)
        out[i, idx] = (scale * emb @ text.t()).log_softmax(-1)
    return out, present


def mask_crop_ensemble(clip: nn.Module, pixels: torch.Tensor, probs: torch.Tensor, mask_logits: torch.Tensor,
                       text_embeddings: torch.Tensor, weight: float | torch.Tensor, fill: str = "mask_mean",
                       outline: torch.Tensor | None = None, outline_share: float = 0.5,
                       neutral_share: float = 0.0) -> torch.Tensor:
    """Mix each mask's class distribution with CLIP's zero-shot distribution on the mask's crop (:func:`mask_crops`):
    p ∝ p_mask^(1-weight) · p_crop^weight over the classes, keeping the mask's total (its "no object" share).
    ``weight``: one number, or one per mask [B, Q, 1]. ``outline`` [B, Q]: masks whose crop distribution also
    takes, with ``outline_share``, the distribution on an outline crop ("surround_mean": the mask's shape on its
    surroundings), geometrically; every mask's takes ``neutral_share`` from a "neutral" crop first."""
    crop, present = crop_log_probs(clip, pixels, mask_logits, text_embeddings, fill)
    if neutral_share > 0:
        neutral, _ = crop_log_probs(clip, pixels, mask_logits, text_embeddings, "neutral")
        crop = ((1 - neutral_share) * crop + neutral_share * neutral).log_softmax(-1)
    if outline is not None:
        shape, _ = crop_log_probs(clip, pixels, mask_logits, text_embeddings, "surround_mean", select=outline)
        both = ((1 - outline_share) * crop + outline_share * shape).log_softmax(-1)
        crop = torch.where(outline.unsqueeze(-1), both, crop)
    total = probs.sum(-1, keepdim=True)
    mixed = ((1 - weight) * probs.clamp_min(1e-8).log() + weight * crop).softmax(-1)
    return torch.where(present.unsqueeze(-1), mixed * total, probs)


def split_mask_components(mask_logits: torch.Tensor, parts: int, iterations: int = 128,
                          outside: float = -20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each mask proposal into connected pieces (8-connected foreground, logit > 0).

    mask_logits [B, Q, h, w] -> (pieces [B, Q * parts, h, w], kept [B, Q * parts]). Piece k < parts - 1 of a mask is
    the connected component holding the mask's highest logit among the pixels not yet taken, with a one-cell ring
    around it (its soft edge) and ``outside`` elsewhere; the last piece is everything else of the mask (other
    components and the far background). ``kept`` is False for pieces without foreground, which must not count. A
    mask without foreground stays whole in its first piece. Tensor operations only (max-pool label propagation, a
    fixed number of passes under tracing), so it exports to ONNX.
    """
    b, q, h, w = mask_logits.shape
    logits = mask_logits.reshape(b * q, 1, h, w)
    fg = logits > 0
    index = torch.arange(1, h * w + 1, device=logits.device, dtype=torch.float32).view(1, 1, h, w)
    label = torch.where(fg, index, torch.zeros((), device=logits.device))
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    for _ in range(iterations):  # every foreground pixel ends with the largest index of its component
        grown = torch.where(fg, F.max_pool2d(label, 3, 1, 1), label)
        if not tracing and torch.equal(grown, label):
            break
        label = grown
    neg = torch.tensor(outside, device=logits.device, dtype=logits.dtype)
    free = fg
    taken = torch.zeros_like(fg)
    pieces, kept = [], []
    for _ in range(parts - 1):
        peak = torch.where(free, logits, torch.full_like(logits, -1e9)).flatten(1).argmax(1, keepdim=True)
        has = free.flatten(1).gather(1, peak)  # [N, 1]
        component = (label == label.flatten(1).gather(1, peak).view(-1, 1, 1, 1)) & has.view(-1, 1, 1, 1)
        ring = F.max_pool2d(component.float(), 3, 1, 1) > 0
        pieces.append(torch.where(ring, logits, neg))
        kept.append(has.view(-1))
        free, taken = free & ~component, taken | ring
    rest = torch.where(taken, neg, logits)
    pieces.append(rest)
    kept.append((rest > 0).flatten(1).any(1))
    whole = ~fg.flatten(1).any(1)  # no foreground at all: the first piece is the mask itself
    pieces[0] = torch.where(whole.view(-1, 1, 1, 1), logits, pieces[0])
    kept[0] = kept[0] | whole
    out = torch.stack(pieces, dim=1).view(b, q * parts, h, w)
    return out, torch.stack(kept, dim=1).view(b, q * parts)


def _proposals_to_split(pieces: torch.Tensor, probs: torch.Tensor, cfg: SANConfig) -> torch.Tensor:
    """Which proposals split [B, Q, 1], from their pieces [B, Q, parts, h, w] and class probabilities [B, Q, C]:
    those whose other pieces hold an object (``mask_split_min_ratio`` of the first piece's area, not specks or a
    hole), at most ``mask_split_max`` of them, by object share."""
    q = pieces.shape[1]
    area = (pieces > 0).flatten(3).sum(-1).float()  # [B, Q, parts]
    others = area[..., 1:].sum(-1, keepdim=True)
    did_split = (others > 0) & (others >= cfg.mask_split_min_ratio * area[..., :1])
    if cfg.mask_split_max > 0:  # each split costs crops
        # rank = proposals ahead: a larger share (rounded to 0.001, so that float rounding cannot reorder near-equal
        # ones), or the same and a lower index; torch and onnxruntime choose alike, unlike a sort
        share = torch.round(probs.sum(-1) * 1000)
        share = torch.where(did_split.squeeze(-1), share, torch.full_like(share, -1.0))
        order = torch.arange(q, device=share.device)
        ahead = (share.unsqueeze(1) > share.unsqueeze(2)) | ((share.unsqueeze(1) == share.unsqueeze(2))
                                                              & (order.view(1, q) < order.view(q, 1)))
        did_split = did_split & (ahead.sum(-1) < cfg.mask_split_max).unsqueeze(-1)
    return did_split


def object_probs(logits: torch.Tensor, cfg: SANConfig) -> torch.Tensor:
    """Class logits [B, Q, C + 1] (the last "no object") -> class probabilities [B, Q, C], the no-object logit
    lowered by ``cfg.no_object_bias`` first."""
    logits = logits.float()
    if cfg.no_object_bias:
        bias = torch.zeros(logits.shape[-1], device=logits.device)
        bias[-1] = cfg.no_object_bias
        logits = logits - bias
    return logits.softmax(-1)[..., :-1]


def cut_nested_proposals(probs: torch.Tensor, mask_logits: torch.Tensor, min_confidence: float,
                         min_cover: float = 0.5, max_area_ratio: float = 0.5) -> torch.Tensor:
    """Cut confident small proposals out of the larger proposals of other classes that cover them.

    probs [B, Q, C], mask_logits [B, Q, h, w] -> mask logits with σ_b(x) · Π_s (1 - σ_s(x)) for every proposal b and
    every proposal s nested in it: s is confident (its top class probability ≥ ``min_confidence``), names another
    class than b, is at most ``max_area_ratio`` of b's (soft) area and lies at least ``min_cover`` inside b. A
    background mask that SAN drew over an object then no longer adds up against the object's own mask. Tensor
    operations only (traces into ONNX).
    """
    b, q, h, w = mask_logits.shape
    logits = mask_logits.flatten(2)
    sig = logits.sigmoid()  # [B, Q, N]
    area = sig.sum(-1)  # [B, Q]
    cover = (sig @ sig.transpose(1, 2)) / area.clamp_min(1e-6).unsqueeze(1)  # [B, b, s]: share of s inside b
    confidence, top = probs.max(-1)
    nested = ((cover >= min_cover)
              & (area.unsqueeze(2) * max_area_ratio >= area.unsqueeze(1))
              & (top.unsqueeze(2) != top.unsqueeze(1))
              & (confidence >= min_confidence).unsqueeze(1))
    keep = torch.log1p(-sig.clamp(max=1 - 1e-6))  # log(1 - σ_s)
    log_cut = F.logsigmoid(logits) + nested.to(sig.dtype) @ keep  # log of the cut σ_b
    cut = log_cut.exp().clamp(max=1 - 1e-6)
    was_cut = nested.any(-1, keepdim=True)  # the others keep their logits exactly
    return torch.where(was_cut, log_cut - torch.log1p(-cut), logits).view(b, q, h, w)


def unseen_classes(model: nn.Module, text_embeddings: torch.Tensor) -> torch.Tensor | None:
    """[C] True for the vocabulary classes SAN's classifier never learnt: text embeddings that match none of
    ``config.trained_class_names``' (cosine < 0.999; the names' embeddings are computed once per model and cached).
    None when the config names no trained classes or sets no separate weight for them."""
    cfg = model.config
    if cfg.mask_crop_ensemble_unseen <= 0 or not cfg.trained_class_names:
        return None
    cache = model.__dict__.setdefault("_trained_text_cache", {})
    key = (cfg.trained_class_names, str(text_embeddings.device))
    if key not in cache:  # computed outside tracing (the ONNX exporter probes the model first): a constant there
        cache[key] = F.normalize(model.text_embeddings(list(cfg.trained_class_names)).float(), dim=-1).clone()
    similarity = F.normalize(text_embeddings.float(), dim=-1) @ cache[key].to(text_embeddings.device).t()
    return similarity.amax(-1) < 0.999


def refine_proposals(model: nn.Module, pixels: torch.Tensor, probs: torch.Tensor, mask_logits: torch.Tensor,
                     text_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The default's steps after SAN's own inference, per its config: split proposals into connected pieces, the
    crop ensemble (a larger crop weight for the classes SAN never learnt), then cut confident proposals out of the
    larger ones covering them. (probs [B, Q, C], mask_logits [B, Q, h, w]) -> the same for the (possibly more)
    proposals."""
    cfg = model.config
    weight: float | torch.Tensor = cfg.mask_crop_ensemble
    outline = None
    if cfg.mask_split_parts > 1:
        parts = cfg.mask_split_parts
        b, q, h, w = mask_logits.shape
        pieces, kept = split_mask_components(mask_logits, parts, cfg.mask_split_iterations)
        pieces, kept = pieces.view(b, q, parts, h, w), kept.view(b, q, parts)
        did_split = _proposals_to_split(pieces, probs, cfg)  # [B, Q, 1]
        first_only = torch.arange(parts, device=kept.device) == 0
        whole = torch.where(first_only.view(parts, 1, 1), mask_logits.unsqueeze(2), torch.tensor(-20.0))
        mask_logits = torch.where(did_split.unsqueeze(-1).unsqueeze(-1), pieces, whole).view(b, q * parts, h, w)
        kept = ((did_split & kept) | (~did_split & first_only)).view(b, q * parts)  # (no bool Where in onnxruntime)
        probs = probs.repeat_interleave(parts, dim=1) * kept.unsqueeze(-1).to(probs.dtype)
        split_weight = torch.tensor(cfg.mask_split_crop_weight, device=probs.device)
        weight = torch.where(did_split, split_weight, torch.tensor(float(weight), device=probs.device))
        weight = weight.repeat_interleave(parts, dim=1)
        if cfg.mask_split_outline > 0:
            outline = did_split.squeeze(-1).repeat_interleave(parts, dim=1)
    if cfg.mask_crop_ensemble > 0:
        unseen = unseen_classes(model, text_embeddings)
        if unseen is not None:  # one weight per class: [B, Q, C] from [B, Q, 1] (split) or one number
            if not torch.is_tensor(weight):
                weight = torch.tensor(float(weight), device=probs.device).view(1, 1, 1)
            weight = torch.where(unseen.view(1, 1, -1), weight.clamp_min(cfg.mask_crop_ensemble_unseen), weight)
        probs = mask_crop_ensemble(model.clip, pixels, probs, mask_logits, text_embeddings, weight,
                                   cfg.mask_crop_fill, outline, cfg.mask_split_outline, cfg.mask_crop_neutral_share)
    if cfg.nested_cut_confidence > 0:
        mask_logits = cut_nested_proposals(probs, mask_logits, cfg.nested_cut_confidence,
                                           max_area_ratio=cfg.nested_cut_area_ratio)
    return probs, mask_logits


def build_clip_for(config: SANConfig) -> nn.Module:
    """The CLIP a SAN runs on: ``CLIP(config.clip)``, or a :class:`~vocabseg.clip.sentence.LiTCLIP` (same image
    tower, frozen MiniLM text tower) when ``config.text_tower == "minilm"``."""
    if config.text_tower == "clip":
        return CLIP(config.clip)
    if config.text_tower == "minilm":
        from ..clip.sentence import LiTCLIP

        return LiTCLIP(config.clip)
    from ..errors import ConfigError

    raise ConfigError(f"unknown text_tower {config.text_tower!r} for SAN; use 'clip' or 'minilm'.")


# ----------------------------------------------------------------------------------------------- side network


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # [B, C, h, w]
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class SideAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, width * 3)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SideMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SideBlock(nn.Module):
    """Pre-norm ViT block (timm layout: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2; LayerNorm eps 1e-6)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = SideAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = SideMlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Fusion(nn.Module):
    """Adds a CLIP feature map (LayerNorm2d → 1×1 conv → bilinear resize) to the side network's patch tokens."""

    def __init__(self, clip_width: int, side_width: int):
        super().__init__()
        self.norm = LayerNorm2d(clip_width)
        self.proj = nn.Conv2d(clip_width, side_width, 1)

    def forward(self, tokens: torch.Tensor, clip_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        feat = self.proj(self.norm(clip_map))  # [B, C_side, hc, wc]
        if feat.shape[-2:] != grid:
            feat = F.interpolate(feat, size=grid, mode="bilinear", align_corners=False)
        return tokens + feat.flatten(2).transpose(1, 2)


class MLP(nn.Module):
    """``layers`` affine maps with ReLU between; 1×1 convolutions when ``dense`` (applied to [B, C, H, W])."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int, dense: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        make = (lambda i, o: nn.Conv2d(i, o, 1)) if dense else nn.Linear
        self.layers = nn.ModuleList(make(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Queries and pixels → mask proposals [B, Q, h, w] and attention biases [B, heads, Q, h, w]."""

    def __init__(self, width: int, clip_heads: int, embed: int, hidden: int, layers: int):
        super().__init__()
        self.clip_heads, self.embed = clip_heads, embed
        self.query_mlp = MLP(width, hidden, embed, layers)
        self.pixel_mlp = MLP(width, hidden, embed, layers, dense=True)
        self.bias_mlp = MLP(width, hidden, embed * clip_heads, layers, dense=True)
        self.bias_scale = nn.Linear(1, 1)  # learnt rescaling of the attention bias (RESCALE_ATTN_BIAS)

    def forward(self, queries: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.query_mlp(queries)  # [B, Q, E]
        masks = torch.einsum("bqc,bchw->bqhw", q, self.pixel_mlp(pixels))
        b, _, h, w = pixels.shape
        bias_feat = self.bias_mlp(pixels).view(b, self.clip_heads, self.embed, h, w)
        bias = torch.einsum("bqc,bnchw->bnqhw", q, bias_feat)
        bias = bias * self.bias_scale.weight[0, 0] + self.bias_scale.bias[0]  # Linear(1, 1) on each value
        return masks, bias


class SideAdapterNetwork(nn.Module):
    """The side ViT: queries + patch tokens, CLIP features fused in, masks/biases decoded at chosen blocks."""

    def __init__(self, cfg: SANConfig):
        super().__init__()
        c = cfg
        grid = c.side_image_size // c.side_patch
        self.patch_embed = PatchEmbed(c.side_patch, c.side_width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, c.side_width))
        self.query_embed = nn.Parameter(torch.zeros(1, c.num_queries, c.side_width))
        self.query_pos_embed = nn.Parameter(torch.zeros(1, c.num_queries, c.side_width))
        self.blocks = nn.ModuleList(SideBlock(c.side_width, c.side_heads, c.side_mlp_ratio) for _ in range(c.side_depth))
        self.fusions = nn.ModuleDict({str(pos): Fusion(c.clip.vision_width, c.side_width) for _, pos in c.fusion_map})
        self.decoder = MaskDecoder(c.side_width, c.clip.resolved_vision_heads, c.embed_channels, c.mlp_channels,
                                   c.mlp_layers)
        self.fusion_source = {pos: layer for layer, pos in c.fusion_map}
        self.deep_supervision = tuple(c.deep_supervision)
        for p in (self.pos_embed, self.query_embed, self.query_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(_init_linear)

    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        from ..clip.model import resize_grid_embedding

        return resize_grid_embedding(self.pos_embed[0], grid)[None]  # [1, h*w, C]

    def _fuse(self, position: int, x: torch.Tensor, clip_maps: dict[int, torch.Tensor], grid, n_queries: int):
        if position not in self.fusion_source:
            return x
        patches = self.fusions[str(position)](x[:, n_queries:], clip_maps[self.fusion_source[position]], grid)
        return torch.cat([x[:, :n_queries], patches], dim=1)

    def forward(self, images: torch.Tensor, clip_maps: dict[int, torch.Tensor], decode_all: bool
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Returns [(masks [B,Q,h,w], biases [B,heads,Q,h,w])] for each supervised block (only the last if not decode_all)."""
        x, grid = self.patch_embed(images)
        b, nq = x.shape[0], self.query_embed.shape[1]
        pos = torch.cat([self.query_pos_embed, self.positional_embedding(grid)], dim=1)
        x = torch.cat([self.query_embed.expand(b, -1, -1), x], dim=1) + pos
        x = self._fuse(0, x, clip_maps, grid, nq)
        wanted = self.deep_supervision if decode_all else self.deep_supervision[-1:]
        outputs = []
        for i, block in enumerate(self.blocks, start=1):
            x = self._fuse(i, block(x), clip_maps, grid, nq)
            if i in wanted:
                pixels = x[:, nq:].transpose(1, 2).reshape(b, -1, grid[0], grid[1])
                outputs.append(self.decoder(x[:, :nq], pixels))
            if i < len(self.blocks):
                x = x + pos  # the side ViT re-adds positional embeddings after every block
        return outputs


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------- recognition


def recognition_mask(bias: torch.Tensor, grid: tuple[int, int], blocked: float = -100.0) -> torch.Tensor:
    """Additive attention mask for the sequence [SOS_1..SOS_Q, CLS, patches] from biases [B, heads, Q, h, w].

    A [SOS] token attends to itself and to the patches (through the bias, max-pooled to CLIP's grid), never to
    other [SOS] tokens or to [CLS]; [CLS] and patches never attend to [SOS] tokens, so CLIP's own features are
    unchanged by the extra tokens.
    """
    b, heads, q = bias.shape[:3]
    bias = F.adaptive_max_pool2d(bias.flatten(1, 2), grid).view(b, heads, q, grid[0] * grid[1])
    n = q + 1 + grid[0] * grid[1]
    mask = bias.new_zeros(b, heads, n, n)
    mask[..., :q] = blocked  # nobody attends to SOS tokens ...
    idx = torch.arange(q, device=bias.device)
    mask[..., idx, idx] = 0.0  # ... except each SOS to itself
    mask[..., :q, q] = blocked  # SOS tokens do not see CLS
    mask[..., :q, q + 1:] = bias
    return mask


# ----------------------------------------------------------------------------------------------- model


class SAN(OpenVocabModel):
    def __init__(self, config: SANConfig):
        super().__init__()
        if not config.clip.is_vit:
            raise ValueError("SAN needs a CLIP ViT image tower")
        self.config = config
        self.clip = build_clip_for(config)
        self.side = SideAdapterNetwork(config)
        self.bg_embed = nn.Parameter(torch.randn(1, config.clip.embed_dim) * config.clip.embed_dim ** -0.5)
        if config.closed_set_classes:
            # Baseline for the open-vocabulary experiments: the same network, but its classes are learnt vectors,
            # so it can only ever name the classes it was trained on.
            self.class_embed = nn.Parameter(torch.randn(config.closed_set_classes, config.clip.embed_dim) * 0.02)
        # Trainable: side network, CLIP's visual positional embedding, background embedding (paper: 8.4 M for B/16).
        self.freeze_clip(keep=("visual.positional_embedding",))
        self.register_pixel_statistics()

    # -- pieces ------------------------------------------------------------------------------------------------
    def clip_features(self, images: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor, tuple[int, int]]:
        """CLIP's feature part on the down-scaled image: maps for fusion and the tokens entering recognition."""
        small = F.interpolate(images, scale_factor=self.config.clip_scale, mode="bilinear", align_corners=False)
        layers = sorted({layer for layer, _ in self.config.fusion_map} | {self.config.rec_start})
        feats, grid = self.clip.visual.forward_features(small, layers, end=self.config.rec_start)
        maps = {layer: self.clip.visual.tokens_to_map(feats[layer], grid) for layer, _ in self.config.fusion_map}
        return maps, feats[self.config.rec_start], grid

    def recognize(self, tokens: torch.Tensor, bias: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Run CLIP's last blocks with [SOS] tokens under the attention biases -> mask embeddings [B, Q, D], L2-normed."""
        q = bias.shape[2]
        sos = tokens[:, :1].expand(-1, q, -1)
        x = torch.cat([sos, tokens], dim=1)
        mask = recognition_mask(bias, grid, self.config.sos_mask_value)
        x = self.clip.visual.run_blocks(x, self.config.rec_start, None, attn_mask=mask)
        return F.normalize(self.clip.visual.head(x[:, :q]), dim=-1)

    def classifier(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """[C, D] class embeddings + the normalised background embedding -> [C+1, D].

        A closed-set model ignores the text and uses its learnt class embeddings.
        """
        if self.config.closed_set_classes:
            text_embeddings = F.normalize(self.class_embed, dim=-1)
        return torch.cat([text_embeddings.to(self.bg_embed.dtype), F.normalize(self.bg_embed, dim=-1)], dim=0)

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> dict:
        """Normalised images [B, 3, H, W] (H, W multiples of 32) and text embeddings [C, D].

        Returns ``pred_logits`` [B, Q, C+1] (background last) and ``pred_masks`` [B, Q, H/16, W/16] (mask logits);
        in training mode also ``aux_outputs`` for the earlier supervised block (deep supervision).
        """
        clip_maps, rec_tokens, clip_grid = self.clip_features(images)
        decoded = self.side(images, clip_maps, decode_all=self.training)
        classes = self.classifier(text_embeddings)  # [C+1, D]
        scale = self.clip.logit_scale.exp()
        outs = []
        for masks, bias in decoded:
            emb = self.recognize(rec_tokens, bias, clip_grid)
            outs.append({"pred_logits": scale * emb @ classes.t(), "pred_masks": masks})
        result = dict(outs[-1])
        result["aux_outputs"] = outs[:-1]
        return result

    # -- inference helpers used by the Predictor ------------------------------------------------------------------
    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval forward -> (class probabilities [B, Q, C] without background, mask logits [B, Q, h, w])."""
        out = self.forward(pixels, text_embeddings)
        probs = object_probs(out["pred_logits"], self.config)
        probs, masks = refine_proposals(self, pixels, probs, out["pred_masks"].float(), text_embeddings)
        return probs, masks

    # -- training hooks used by the engine ----------------------------------------------------------------------
    def build_criterion(self, num_classes: int):
        """SAN's loss: Hungarian matching (class 2 / BCE 5 / dice 5 on 12,544 points), CE 2 with no-object 0.1."""
        from ..losses import HungarianMatcher, SetCriterion

        points = self.config.train_num_points
        matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=points)
        return SetCriterion(num_classes=num_classes, matcher=matcher,
                            weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}, no_object_weight=0.1,
                            num_points=points, oversample_ratio=3.0, importance_sample_ratio=0.75)

    def training_targets(self, labels: torch.Tensor, ignore_index: int = 255) -> list[dict]:
        """Semantic label maps [B, H, W] -> per-image {labels, masks} (one mask per present class)."""
        from ..losses import targets_from_semantic

        return [targets_from_semantic(lab, ignore_index=ignore_index) for lab in labels]

    # -- checkpoints -------------------------------------------------------------------------------------------
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], allow_missing_clip: bool = False) -> None:
        """Load our own or the official SAN key layout (detected by its prefixes), failing by name on mismatch."""
        if any(k.startswith(("side_adapter_network.", "clip_visual_extractor.", "ov_classifier.")) for k in state):
            state = official_to_vocabseg(state, self.config.rec_start)
        load_strict(self, state, allow_missing_prefix="clip." if allow_missing_clip else None)
        self.__dict__.pop("_trained_text_cache", None)  # unseen_classes' embeddings came from the old weights


# ----------------------------------------------------------------------------------------------- official key map

# Official name (regex) -> our name. Every tensor of the release file is covered or explicitly ignored.
_SIDE = r"side_adapter_network\."
_KEY_MAP: list[tuple[str, str]] = [
    (_SIDE + r"vit_model\.patch_embed\.proj\.", "side.patch_embed.proj."),
    (_SIDE + r"vit_model\.pos_embed$", "side.pos_embed"),
    (_SIDE + r"vit_model\.blocks\.", "side.blocks."),
    (_SIDE + r"query_embed$", "side.query_embed"),
    (_SIDE + r"query_pos_embed$", "side.query_pos_embed"),
    (_SIDE + r"fusion_layers\.layer_(\d+)\.input_proj\.0\.", r"side.fusions.\1.norm."),
    (_SIDE + r"fusion_layers\.layer_(\d+)\.input_proj\.1\.", r"side.fusions.\1.proj."),
    (_SIDE + r"mask_decoder\.query_mlp\.", "side.decoder.query_mlp."),
    (_SIDE + r"mask_decoder\.pix_mlp\.", "side.decoder.pixel_mlp."),
    (_SIDE + r"mask_decoder\.attn_mlp\.", "side.decoder.bias_mlp."),
    (_SIDE + r"mask_decoder\.bias_scaling\.", "side.decoder.bias_scale."),
    (r"clip_visual_extractor\.resblocks\.", "clip.visual.transformer.resblocks."),
    (r"clip_visual_extractor\.", "clip.visual."),
    (r"clip_rec_head\.(ln_post\.|proj$)", r"clip.visual.\1"),
    (r"ov_classifier\.bg_embed$", "bg_embed"),
    (r"ov_classifier\.", "clip."),
]
_IGNORED = (r"criterion\.empty_weight$", r"ov_classifier\.attn_mask$")


def official_to_vocabseg(state: dict[str, torch.Tensor], rec_start: int) -> dict[str, torch.Tensor]:
    """Rename a SAN release state dict (``side_adapter_network.*``, ``clip_rec_head.*``, ...) to our names.

    ``clip_rec_head.resblocks.i`` is CLIP block ``rec_start + i``; unknown keys raise a CheckpointError by name.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if any(re.match(p, key) for p in _IGNORED):
            continue
        m = re.match(r"clip_rec_head\.resblocks\.(\d+)\.(.*)", key)
        if m:
            out[f"clip.visual.transformer.resblocks.{int(m.group(1)) + rec_start}.{m.group(2)}"] = value
            continue
        name = rename_key(key, _KEY_MAP)
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    if unknown:
        raise CheckpointError(f"{len(unknown)} unknown tensors in the SAN checkpoint, e.g. {', '.join(unknown[:3])}")
    return out


def vocabseg_to_official(state: dict[str, torch.Tensor], rec_start: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_vocabseg` (used by tests and by ``export --format official``)."""
    out: dict[str, torch.Tensor] = {}
    inverse = [
        (r"side\.patch_embed\.proj\.", "side_adapter_network.vit_model.patch_embed.proj."),
        (r"side\.pos_embed$", "side_adapter_network.vit_model.pos_embed"),
        (r"side\.blocks\.", "side_adapter_network.vit_model.blocks."),
        (r"side\.query_embed$", "side_adapter_network.query_embed"),
        (r"side\.query_pos_embed$", "side_adapter_network.query_pos_embed"),
        (r"side\.fusions\.(\d+)\.norm\.", r"side_adapter_network.fusion_layers.layer_\1.input_proj.0."),
        (r"side\.fusions\.(\d+)\.proj\.", r"side_adapter_network.fusion_layers.layer_\1.input_proj.1."),
        (r"side\.decoder\.query_mlp\.", "side_adapter_network.mask_decoder.query_mlp."),
        (r"side\.decoder\.pixel_mlp\.", "side_adapter_network.mask_decoder.pix_mlp."),
        (r"side\.decoder\.bias_mlp\.", "side_adapter_network.mask_decoder.attn_mlp."),
        (r"side\.decoder\.bias_scale\.", "side_adapter_network.mask_decoder.bias_scaling."),
        (r"bg_embed$", "ov_classifier.bg_embed"),
        (r"clip\.visual\.(ln_post\.|proj$)", r"clip_rec_head.\1"),
        (r"clip\.visual\.(conv1\.|class_embedding$|positional_embedding$|ln_pre\.)", r"clip_visual_extractor.\1"),
        (r"clip\.(token_embedding\.|positional_embedding$|transformer\.|ln_final\.|text_projection$|logit_scale$)",
         r"ov_classifier.\1"),
    ]
    for key, value in state.items():
        m = re.match(r"clip\.visual\.transformer\.resblocks\.(\d+)\.(.*)", key)
        if m:
            i = int(m.group(1))
            name = (f"clip_rec_head.resblocks.{i - rec_start}.{m.group(2)}" if i >= rec_start
                    else f"clip_visual_extractor.resblocks.{i}.{m.group(2)}")
            out[name] = value
            continue
        name = rename_key(key, inverse)
        if name is None:
            raise KeyError(f"no official name for {key}")
        out[name] = value
    return out


# ----------------------------------------------------------------------------------------------- registered configs


def _san_b16() -> SANConfig:
    return SANConfig()


def _san_l14() -> SANConfig:
    # ViT-L/14 release (configs/san_clip_vit_large_res4_coco.yaml): CLIP ViT-L/14-336 (577 positions, its 24x24
    # table resized to the image's grid at run time), CLIP at 0.7 x resolution, fusion from blocks 6/12/18,
    # recognition from block 18.
    return SANConfig(clip=config_for("ViT-L/14@336px"), clip_scale=0.7, fusion_map=((0, 0), (6, 1), (12, 2), (18, 3)),
                     rec_start=18)


def _san_tiny() -> SANConfig:
    """A few-hundred-k-parameter SAN for tests: 4-block CLIP ViT (width 64), 2-block side network."""
    clip = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
                      context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2,
                      transformer_layers=2)
    return SANConfig(clip=clip, clip_scale=0.5, fusion_map=((0, 0), (1, 1), (2, 2)), rec_start=3, side_width=48,
                     side_depth=3, side_heads=2, side_patch=8, side_image_size=64, num_queries=8, embed_channels=32,
                     mlp_channels=32, deep_supervision=(2, 3), short_side=64, max_side=256, size_divisibility=16)


@register_model("san_vit_b_16", "san", _san_b16(), "SAN with CLIP ViT-B/16 (paper config; load the release .pth)")
def san_vit_b_16(cfg: SANConfig) -> SAN:
    return SAN(cfg)


@register_model("san_vit_large_14", "san", _san_l14(),
                "SAN with CLIP ViT-L/14-336 (paper config; load the release .pth)")
def san_vit_large_14(cfg: SANConfig) -> SAN:
    return SAN(cfg)


@register_model("san_tiny_test", "san", _san_tiny(), "tiny random SAN for tests", test_only=True)
def san_tiny_test(cfg: SANConfig) -> SAN:
    return SAN(cfg)
