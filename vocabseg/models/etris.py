"""ETRIS — Bridger: parameter-efficient referring image segmentation (Xu et al., ICCV 2023).

A sentence in, one mask out. CLIP's image and text towers stay frozen; small **Bridgers** sit after image blocks
4/8/12 and text blocks 4/8/12 of ViT-B/16 and let the towers talk: each one shrinks both towers' tokens to a
64-wide "ladder", lets visual tokens attend to the words and words attend to the visual tokens (plus a small FFN),
widens the result back and adds it to each tower's tokens through a **zero-initialised gate**. At initialisation
the gates are exactly zero, so both towers compute exactly what plain CLIP computes (tested); training opens them.

The decoder then

1. *hierarchical alignment*: projects the visual features of the bridged layers (the tokens after the first
   bridges, and the final tokens through CLIP's ``ln_post``/``proj``) to 512 channels, gates each with the
   sentence, concatenates, fuses with 1×1 and 3×3 convolutions and a coordinate map;
2. *global alignment*: 3 transformer decoder layers (512-d, 8 heads, FFN 512): visual tokens self-attend (2-D sine
   positions) and attend to the word features (1-D sine positions, padding masked);
3. *projector*: upsamples the map ×4 (two ×2 steps, 3×3 convs; 512 → 256 channels) and turns the sentence
   embedding into a dynamic 3×3 kernel + bias (one linear layer: 256·3·3 + 1 outputs), convolved with the map →
   one mask logit map at 1/4 of the input resolution (104 × 104 for 416 px). Sigmoid > 0.35 is the mask.

Training: sigmoid BCE at 1/4 resolution (:mod:`vocabseg.losses.referring`), Adam lr 1e-4 (Bridgers 1e-3, paper),
50 epochs, ×0.1 at epoch 35, 416 px letterboxed inputs, sentences of at most 17 tokens (22 for G-Ref).

Reads top to bottom: config, attention and Bridger, decoder parts, the model, inference helpers, registered
configs, the ``refer`` command.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import CLIP, CLIPConfig, OPENAI_MEAN, config_for
from ..errors import CheckpointError, ConfigError
from .base import OpenVocabModel
from .default import DEFAULT_CLIP_WEIGHTS, WEIGHTS_DIR
from .registry import register_model
from .weights import load_strict

__all__ = ["ETRISConfig", "ETRIS", "Bridger", "Projector", "ReferringResult", "Encoded", "dynamic_conv",
           "letterbox", "letterbox_mask", "refer_command", "trainable_breakdown", "PAPER_TRAINABLE_PARAMS"]

#: Trainable parameters of ETRIS ViT-B/16 reported by the paper (≈ 23.8 M).
PAPER_TRAINABLE_PARAMS = 23.8e6

# ----------------------------------------------------------------------------------------------- config


@dataclass
class ETRISConfig:
    clip: CLIPConfig = field(default_factory=lambda: config_for("ViT-B/16", image_resolution=416))
    bridge_layers: tuple[int, ...] = (4, 8, 12)  # image blocks (1-based) after which a Bridger sits
    text_bridge_layers: tuple[int, ...] = (4, 8, 12)  # the matching text blocks
    ladder_width: int = 64  # Bridger hidden width
    ladder_heads: int = 8
    ladder_ffn: int = 128
    decoder_dim: int = 512
    decoder_heads: int = 8
    decoder_layers: int = 3
    decoder_ffn: int = 512
    decoder_dropout: float = 0.1
    projector_dim: int = 256  # channels of the 1/4-resolution map the dynamic kernel is applied to
    kernel_size: int = 3
    input_size: int = 416  # images are letterboxed (long side resized, padded) to input_size × input_size
    word_len: int = 17  # tokens per sentence incl. start/end (17 RefCOCO/+, 22 G-Ref)
    threshold: float = 0.35
    train_visual_positional: bool = True  # the official code trains CLIP's positional tables (416 px grid)
    train_text_positional: bool = False  # ... and the text one (17 × 512 = 8.7 k); off: the text tower stays frozen


def _check_config(c: ETRISConfig) -> None:
    if not c.clip.is_vit:
        raise ConfigError("ETRIS here needs a CLIP ViT image tower (the ResNet variant is not implemented)")
    n = len(c.bridge_layers)
    if n < 1 or len(c.text_bridge_layers) != n:
        raise ConfigError(f"bridge_layers {c.bridge_layers} and text_bridge_layers {c.text_bridge_layers} must be "
                          "non-empty and of equal length")
    for name, layers, total in (("bridge_layers", c.bridge_layers, c.clip.vision_layers),
                                ("text_bridge_layers", c.text_bridge_layers, c.clip.transformer_layers)):
        if list(layers) != sorted(set(layers)) or layers[0] < 1 or layers[-1] > total:
            raise ConfigError(f"{name} {tuple(layers)} must be increasing block numbers in 1..{total}")
    if c.word_len < 2 or c.word_len > c.clip.context_length:
        raise ConfigError(f"word_len must be in 2..{c.clip.context_length}, got {c.word_len}")
    if c.decoder_dim % 4 or c.decoder_dim % c.decoder_heads or c.ladder_width % c.ladder_heads:
        raise ConfigError("decoder_dim must be divisible by 4 and by decoder_heads; ladder_width by ladder_heads")
    if c.clip.transformer_width % 2:
        raise ConfigError("the text width must be even (1-D sine positions of the words)")
    if c.kernel_size % 2 == 0:
        raise ConfigError(f"kernel_size must be odd, got {c.kernel_size}")
    if c.input_size % c.clip.vision_patch_size:
        raise ConfigError(f"input_size {c.input_size} must be a multiple of the patch size {c.clip.vision_patch_size}")


# ----------------------------------------------------------------------------------------------- attention, Bridger


class Attention(nn.Module):
    """Multi-head attention, batch first, separate q/k/v/out projections; ``key_padding_mask`` True = ignore."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = query.shape
        h = self.heads
        q = self.q_proj(query).view(b, n, h, c // h).transpose(1, 2)
        k = self.k_proj(key).view(b, key.shape[1], h, c // h).transpose(1, 2)
        v = self.v_proj(value).view(b, value.shape[1], h, c // h).transpose(1, 2)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Bridger(nn.Module):
    """One Bridger between image block i and text block j.

    Visual patch tokens [B, N, Cv] and word tokens [B, L, Ct] are each down-projected to the ladder width and added
    to the ladder state of the previous Bridger (the paper's f^{i-1} + F^i; a LayerNorm follows). Visual tokens
    attend to the words (padding masked), words attend to the visual tokens, each side gets a small FFN; the
    results are up-projected and added to the towers' tokens times a gate initialised to zero (per channel), so a
    fresh Bridger changes nothing. Returns the updated tokens and the new ladder state.

    The paper's zoom layer is a (de)convolution with the feature map's stride; for a ViT all strides are 1, so it
    is a 1×1 convolution on the patch grid, i.e. the linear maps here. The [CLS] token is not bridged.
    """

    def __init__(self, vision_width: int, text_width: int, width: int = 64, heads: int = 8, ffn: int = 128):
        super().__init__()
        self.vision_down = nn.Linear(vision_width, width)
        self.text_down = nn.Linear(text_width, width)
        self.vision_norm = nn.LayerNorm(width)
        self.text_norm = nn.LayerNorm(width)
        self.vision_attn = Attention(width, heads)  # visual queries, word keys
        self.text_attn = Attention(width, heads)  # word queries, visual keys
        self.vision_ffn_norm = nn.LayerNorm(width)
        self.text_ffn_norm = nn.LayerNorm(width)
        self.vision_ffn = FeedForward(width, ffn)
        self.text_ffn = FeedForward(width, ffn)
        self.vision_up = nn.Linear(width, vision_width)
        self.text_up = nn.Linear(width, text_width)
        self.vision_gate = nn.Parameter(torch.zeros(vision_width))
        self.text_gate = nn.Parameter(torch.zeros(text_width))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, patches: torch.Tensor, words: torch.Tensor, pad_mask: torch.Tensor | None,
                ladder: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        v = self.vision_down(patches.float())
        t = self.text_down(words.float())
        if ladder is not None:
            v, t = v + ladder[0], t + ladder[1]
        v, t = self.vision_norm(v), self.text_norm(t)
        v, t = v + self.vision_attn(v, t, t, pad_mask), t + self.text_attn(t, v, v)
        v = v + self.vision_ffn(self.vision_ffn_norm(v))
        t = t + self.text_ffn(self.text_ffn_norm(t))
        new_patches = patches + (self.vision_gate * self.vision_up(v)).to(patches.dtype)
        new_words = words + (self.text_gate * self.text_up(t)).to(words.dtype)
        return new_patches, new_words, (v, t)


# ----------------------------------------------------------------------------------------------- decoder


class ConvNormAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU, the official code's ``conv_layer``."""

    def __init__(self, cin: int, cout: int, kernel: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def coordinate_map(b: int, h: int, w: int, device, dtype) -> torch.Tensor:
    """[B, 2, h, w]: x and y in [-1, 1] (CoordConv)."""
    ys = torch.linspace(-1, 1, h, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, w, device=device, dtype=dtype)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y])[None].expand(b, -1, -1, -1)


def sine_positions_1d(length: int, dim: int, device=None) -> torch.Tensor:
    """[length, dim] sine/cosine positions (Transformer)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


def sine_positions_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """[h*w, dim]: the first half of the channels encode x, the second half y (row-major tokens)."""
    half = dim // 2
    px = sine_positions_1d(w, half, device)  # [w, half]
    py = sine_positions_1d(h, half, device)  # [h, half]
    pe = torch.cat([px[None].expand(h, -1, -1), py[:, None].expand(-1, w, -1)], dim=-1)
    return pe.reshape(h * w, dim)


class HierarchicalAlignment(nn.Module):
    """Multi-level visual maps + sentence -> one fused map [B, D, h, w] (the paper's cascaded alignment).

    Each level is projected to D channels (1×1 conv) and multiplied by what cross-attention from its pixels to the
    single sentence token returns. With one key the attention weights are all 1, so that is the value and output
    projections of the (projected) sentence: ``out(value(proj(s)))``, implemented as such — the official code's
    ``nn.MultiheadAttention`` carries query/key projections here that can never receive a gradient; we leave them
    out (see ``docs/referring.md``, parameter count).
    """

    def __init__(self, in_channels: Sequence[int], sentence_dim: int, dim: int):
        super().__init__()
        self.level_proj = nn.ModuleList(ConvNormAct(c, dim, 1) for c in in_channels)
        self.sentence_proj = nn.Linear(sentence_dim, dim)
        self.sentence_value = nn.ModuleList(nn.Linear(dim, dim) for _ in in_channels)
        self.sentence_out = nn.ModuleList(nn.Linear(dim, dim) for _ in in_channels)
        self.aggregate = ConvNormAct(len(in_channels) * dim, dim, 1)
        self.coord = ConvNormAct(dim + 2, dim, 3)
        self.fuse = ConvNormAct(dim, dim, 3)

    def forward(self, levels: Sequence[torch.Tensor], sentence: torch.Tensor) -> torch.Tensor:
        s = self.sentence_proj(sentence)
        size = levels[0].shape[-2:]
        aligned = []
        for f, proj, value, out in zip(levels, self.level_proj, self.sentence_value, self.sentence_out):
            f = proj(f)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            aligned.append(f * out(value(s))[:, :, None, None])
        x = self.aggregate(torch.cat(aligned, dim=1))
        b, _, h, w = x.shape
        x = self.coord(torch.cat([x, coordinate_map(b, h, w, x.device, x.dtype)], dim=1))
        return self.fuse(x)


class DecoderLayer(nn.Module):
    """Pre-norm layer: self-attention of the visual tokens, cross-attention to the words, FFN (official layout:
    an extra LayerNorm on each attention output, a LayerNorm inside the FFN)."""

    def __init__(self, dim: int, heads: int, ffn: int, word_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout=dropout)
        self.self_attn_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, kv_dim=word_dim, dropout=dropout)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.LayerNorm(ffn),
                                 nn.Linear(ffn, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, words: torch.Tensor, word_pos: torch.Tensor,
                pad_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(x)
        q = h + pos
        x = x + self.dropout(self.self_attn_norm(self.self_attn(q, q, h)))
        h = self.norm2(x)
        h = self.cross_attn(h + pos, words + word_pos, words, pad_mask)
        x = x + self.dropout(self.cross_attn_norm(h))
        return x + self.dropout(self.ffn(self.norm3(x)))


class GlobalAlignment(nn.Module):
    """``layers`` decoder layers on the flattened map, then a LayerNorm; [B, D, h, w] in and out."""

    def __init__(self, dim: int, heads: int, ffn: int, layers: int, word_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn, word_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, words: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        pos = sine_positions_2d(h, w, c, x.device).to(x.dtype)[None]
        word_pos = sine_positions_1d(words.shape[1], words.shape[2], x.device).to(words.dtype)[None]
        x = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x, pos, words, word_pos, pad_mask)
        return self.norm(x).transpose(1, 2).reshape(b, c, h, w)


def dynamic_conv(features: torch.Tensor, params: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample convolution: features [B, C, h, w], params [B, C·k·k + 1] (kernel, then bias) -> [B, 1, h, w]."""
    b, c, h, w = features.shape
    expected = c * kernel_size * kernel_size + 1
    if params.shape != (b, expected):
        raise ValueError(f"dynamic kernel parameters must have shape [{b}, {expected}], got {tuple(params.shape)}")
    weight = params[:, :-1].reshape(b, c, kernel_size, kernel_size)
    bias = params[:, -1]
    out = F.conv2d(features.reshape(1, b * c, h, w), weight.to(features.dtype), bias.to(features.dtype),
                   padding=kernel_size // 2, groups=b)
    return out.reshape(b, 1, h, w)


class Projector(nn.Module):
    """Upsample the fused map to 1/4 resolution (×2 steps with 3×3 convs), then apply a kernel made from the
    sentence: ``Linear(sentence) -> out_dim·k·k + 1`` numbers = one k×k conv filter and its bias per sample."""

    def __init__(self, dim: int, out_dim: int, sentence_dim: int, kernel_size: int = 3, upsample_steps: int = 2):
        super().__init__()
        self.kernel_size = kernel_size
        layers: list[nn.Module] = []
        if upsample_steps == 0:
            layers.append(ConvNormAct(dim, out_dim, 3))
        for i in range(upsample_steps):
            last = i == upsample_steps - 1
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       ConvNormAct(dim, out_dim if last else dim, 3)]
        layers.append(nn.Conv2d(out_dim, out_dim, 1))
        self.visual = nn.Sequential(*layers)
        self.kernel = nn.Linear(sentence_dim, out_dim * kernel_size * kernel_size + 1)

    def forward(self, x: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        return dynamic_conv(self.visual(x), self.kernel(sentence), self.kernel_size)


# ----------------------------------------------------------------------------------------------- model


@dataclass
class Encoded:
    """What the bridged towers give the decoder."""

    levels: list[torch.Tensor]  # visual maps [B, C, h, w] after each Bridger (last: ln_post + proj, embed_dim)
    visual_tokens: torch.Tensor  # final image tokens [B, 1 + h*w, width] (before ln_post)
    words: torch.Tensor  # ln_final(text tokens) [B, L, text_width]
    sentence: torch.Tensor  # EOT feature through text_projection [B, embed_dim]
    pad_mask: torch.Tensor  # [B, L] True after the EOT token
    grid: tuple[int, int]


@dataclass
class ReferringResult:
    """One referring prediction at the input image's resolution."""

    mask: np.ndarray  # bool [H, W]: probability > threshold
    probability: np.ndarray  # float32 [H, W]
    sentence: str
    image: np.ndarray | None = field(default=None, repr=False)  # the H×W×3 input, for overlay()
    threshold: float = 0.35

    @property
    def area(self) -> float:
        """Share of the image covered by the mask, in [0, 1]."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def overlay(self, alpha: float = 0.5, legend: bool = True):
        """The mask drawn over the image (PIL image), the sentence in the legend."""
        from ..viz import overlay

        if self.image is None:
            raise ValueError("this result carries no image; pass the image to refer() to draw an overlay")
        labels = np.where(self.mask, 0, 255).astype(np.int64)
        return overlay(self.image, labels, [self.sentence], alpha=alpha, legend=legend)


def read_referring_inputs(images: Sequence[Any], sentences: Sequence[str]) -> list[np.ndarray]:
    """The images of (image, sentence) pairs as H×W×3 uint8 arrays, after checking the pairs: as many sentences as
    images (ValueError) and none empty (a one-line VocabularyError)."""
    from ..errors import VocabularyError
    from ..io import load_image

    if len(images) != len(sentences):
        raise ValueError(f"{len(images)} images but {len(sentences)} sentences")
    for s in sentences:
        if not isinstance(s, str) or not s.strip():
            raise VocabularyError("a referring expression must be a non-empty sentence")
    return [load_image(im) for im in images]


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """H×W×3 uint8 -> float32 [size, size, 3] in 0..255: long side resized to ``size`` (PIL bilinear), padded at the
    bottom/right with CLIP's mean colour (0 after normalisation). Also returns the (h, w) of the image inside."""
    from ..predict import resize_image

    H, W = image.shape[:2]
    scale = size / max(H, W)
    h, w = max(1, min(size, int(round(H * scale)))), max(1, min(size, int(round(W * scale))))
    out = np.empty((size, size, 3), np.float32)
    out[...] = np.asarray(OPENAI_MEAN, np.float32) * 255
    out[:h, :w] = resize_image(np.ascontiguousarray(image), (h, w))
    return out, (h, w)


def letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Bool [H, W] -> bool [size, size], the same geometry as :func:`letterbox` (nearest neighbour, zero padding)."""
    from PIL import Image

    H, W = mask.shape
    scale = size / max(H, W)
    h, w = max(1, min(size, int(round(H * scale)))), max(1, min(size, int(round(W * scale))))
    small = np.asarray(Image.fromarray(np.asarray(mask, np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    out = np.zeros((size, size), bool)
    out[:h, :w] = small
    return out


class SentenceModel(OpenVocabModel):
    """What both ETRIS models (ours and the release) share on the text side: they read one sentence cut at
    ``config.word_len`` tokens, not a class vocabulary."""

    def tokenize(self, sentences: str | Sequence[str]) -> torch.Tensor:
        """Token ids [N, word_len] (as the release's ``tokenize(s, word_len, truncate=True)``: EOT last when cut,
        0 padding), on the model's device."""
        from ..clip.tokenizer import tokenize

        return tokenize(sentences, context_length=self.config.word_len, truncate=True).to(self.device)

    def probability_maps(self, logits: torch.Tensor, infos: Sequence[Any], sizes: Sequence[tuple[int, int]]
                         ) -> list[np.ndarray]:
        """Mask logits [N, 1, h, w] -> probability maps at each image's size; ``infos`` are what ``prepare``
        returned beside each image's pixels (the model's way back from its input to the image)."""
        raise NotImplementedError

    @torch.inference_mode()
    def refer_batch(self, images: Sequence[Any], sentences: Sequence[str], threshold: float | None = None
                    ) -> list[ReferringResult]:
        """Several (image, sentence) pairs in one forward; each result at its image's own resolution."""
        rgbs = read_referring_inputs(images, sentences)
        if not rgbs:
            return []
        threshold = self.config.threshold if threshold is None else float(threshold)
        prepared = [self.prepare(rgb) for rgb in rgbs]
        pixels = torch.cat([p for p, _ in prepared])
        logits = self.forward(pixels, self.tokenize(list(sentences)))["mask_logits"]
        probs = self.probability_maps(logits, [info for _, info in prepared], [rgb.shape[:2] for rgb in rgbs])
        return [ReferringResult(p > threshold, p, s, rgb, threshold) for p, s, rgb in zip(probs, sentences, rgbs)]

    def refer(self, image: Any, sentence: str, threshold: float | None = None) -> ReferringResult:
        """Segment what ``sentence`` refers to in ``image`` (path, PIL image or H×W×3 array)."""
        return self.refer_batch([image], [sentence], threshold)[0]

    def text_embeddings(self, vocabulary):  # noqa: D102 - not a class-vocabulary model
        raise NotImplementedError("ETRIS embeds sentences itself: call model.refer(image, sentence)")

    def predict(self, image, vocabulary, **kwargs):  # noqa: D102
        raise NotImplementedError("ETRIS is a referring model (one sentence -> one mask): use model.refer(image, "
                                  "sentence) or `vocabseg refer IMAGE \"sentence\"`")


class ETRIS(SentenceModel):
    """Frozen CLIP + Bridgers + hierarchical/global alignment decoder + dynamic-kernel projector."""

    precision_scope = "clip"  # bf16 casts the towers only: Bridgers and decoder compute in fp32 (``.float()``)

    def __init__(self, config: ETRISConfig):
        super().__init__()
        _check_config(config)
        self.config = c = config
        self.clip = CLIP(c.clip)
        n = len(c.bridge_layers)
        self.bridgers = nn.ModuleList(
            Bridger(c.clip.vision_width, c.clip.transformer_width, c.ladder_width, c.ladder_heads, c.ladder_ffn)
            for _ in range(n))
        level_channels = [c.clip.vision_width] * (n - 1) + [c.clip.embed_dim]
        self.align = HierarchicalAlignment(level_channels, c.clip.embed_dim, c.decoder_dim)
        self.decoder = GlobalAlignment(c.decoder_dim, c.decoder_heads, c.decoder_ffn, c.decoder_layers,
                                       c.clip.transformer_width, c.decoder_dropout)
        steps = max(0, int(round(math.log2(max(c.clip.vision_patch_size / 4, 1)))))
        self.projector = Projector(c.decoder_dim, c.projector_dim, c.clip.embed_dim, c.kernel_size, steps)
        keep = []
        if c.train_visual_positional:
            keep.append("visual.positional_embedding")
        if c.train_text_positional:
            keep.append("positional_embedding")
        self.freeze_clip(keep=tuple(keep))
        self.register_pixel_statistics()

    # -- towers ----------------------------------------------------------------------------------------------------
    def _text_blocks(self, t: torch.Tensor, start: int, end: int | None, mask: torch.Tensor) -> torch.Tensor:
        for block in self.clip.transformer.resblocks[start:end]:
            t = block(t, mask)
        return t

    def encode(self, pixels: torch.Tensor, tokens: torch.Tensor) -> Encoded:
        """Run both frozen towers with the Bridgers between them. ``pixels`` normalised [B, 3, H, W], ``tokens``
        [B, L] ids (L <= CLIP's context length, EOT = largest id of each row)."""
        c = self.config
        clip, visual = self.clip, self.clip.visual
        if tokens.shape[0] != pixels.shape[0]:
            raise ValueError(f"{tokens.shape[0]} sentences for {pixels.shape[0]} images")
        L = tokens.shape[1]
        if L > clip.positional_embedding.shape[0]:
            raise ValueError(f"{L} tokens exceed CLIP's context length {clip.positional_embedding.shape[0]}")
        x, grid = visual.embed(pixels)
        t = clip.token_embedding(tokens).to(clip.dtype) + clip.positional_embedding[:L].to(clip.dtype)
        causal = torch.full((L, L), float("-inf"), device=t.device, dtype=t.dtype).triu_(1)
        eot = tokens.argmax(dim=-1)
        pad_mask = torch.arange(L, device=tokens.device)[None] > eot[:, None]
        levels: list[torch.Tensor] = []
        ladder = None
        v_at = t_at = 0
        for i, (lv, lt) in enumerate(zip(c.bridge_layers, c.text_bridge_layers)):
            x = visual.run_blocks(x, v_at, lv)
            t = self._text_blocks(t, t_at, lt, causal)
            patches, t, ladder = self.bridgers[i](x[:, 1:], t, pad_mask, ladder)
            x = torch.cat([x[:, :1], patches], dim=1)
            if i < len(c.bridge_layers) - 1:
                levels.append(visual.tokens_to_map(x, grid))
            v_at, t_at = lv, lt
        x = visual.run_blocks(x, v_at, None)
        t = self._text_blocks(t, t_at, None, causal)
        final = visual.head(x[:, 1:])  # [B, h*w, embed_dim]
        levels.append(final.transpose(1, 2).reshape(final.shape[0], -1, grid[0], grid[1]))
        words = clip.ln_final(t)
        sentence = words[torch.arange(words.shape[0], device=words.device), eot] @ clip.text_projection
        return Encoded(levels, x, words, sentence, pad_mask, grid)

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images [B, 3, H, W] (H, W multiples of the patch size) and token ids [B, L] ->
        ``{"mask_logits": [B, 1, H/4, W/4]}``."""
        enc = self.encode(pixels, tokens)
        words = enc.words.float()
        sentence = enc.sentence.float()
        x = self.align([f.float() for f in enc.levels], sentence)
        x = self.decoder(x, words, enc.pad_mask)
        logits = self.projector(x, sentence)
        size = (pixels.shape[-2] // 4, pixels.shape[-1] // 4)
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return {"mask_logits": logits}

    # -- inference -------------------------------------------------------------------------------------------------
    def inference_size(self, height: int, width: int) -> tuple[int, int]:
        """The long side becomes ``input_size`` (the rest of the square is padding)."""
        s = self.config.input_size
        scale = s / max(height, width)
        return max(1, min(s, int(round(height * scale)))), max(1, min(s, int(round(width * scale))))

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """H×W×3 uint8 -> normalised letterboxed batch [1, 3, S, S] and the (h, w) of the image inside it."""
        boxed, hw = letterbox(image, self.config.input_size)
        x = torch.from_numpy(boxed).to(self.device).permute(2, 0, 1)[None]
        return self.normalize_pixels(x), hw

    def probability_maps(self, logits: torch.Tensor, boxes: Sequence[tuple[int, int]],
                         sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Mask logits [N, 1, h, w] -> probabilities at each image's size: to the letterbox, crop (h, w), resize."""
        s = self.config.input_size
        logits = F.interpolate(logits.float(), size=(s, s), mode="bilinear", align_corners=False)
        out = []
        for i, ((h, w), size) in enumerate(zip(boxes, sizes)):
            full = F.interpolate(logits[i:i + 1, :, :h, :w], size=size, mode="bilinear", align_corners=False)
            out.append(full[0, 0].sigmoid().cpu().numpy().astype(np.float32))
        return out

    # -- training hooks ----------------------------------------------------------------------------------------------
    def build_criterion(self, num_classes: int | None = None, dice_weight: float = 0.0):
        """BCE on the 1/4-resolution mask logits, mean over pixels (the paper's loss), plus an optional Dice term."""
        from ..losses.referring import ReferringCriterion

        return ReferringCriterion(dice_weight=dice_weight)

    def training_targets(self, masks: torch.Tensor) -> torch.Tensor:
        """Boolean masks [B, H, W] (at the input resolution) -> float targets [B, 1, H, W]."""
        from ..losses.referring import referring_targets

        return referring_targets(masks)

    def parameter_groups(self, lr: float, bridger_lr: float | None = None) -> list[dict]:
        """Optimizer groups: Bridgers at ``bridger_lr`` (paper: 10× for ViT), everything else trainable at ``lr``."""
        bridger = [p for n, p in self.named_parameters() if p.requires_grad and n.startswith("bridgers.")]
        rest = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("bridgers.")]
        return [{"params": bridger, "lr": lr if bridger_lr is None else bridger_lr, "name": "bridgers"},
                {"params": rest, "lr": lr, "name": "decoder"}]

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], allow_missing_clip: bool = False) -> None:
        """Load our own state dict (``model_final.safetensors`` or a full ``state_dict``), strictly."""
        if any(k.startswith(("module.", "backbone.", "bridger.", "neck.")) for k in state):
            raise CheckpointError("this is an official ETRIS release file (Bridgers without gates); load it with "
                                  "etris_vit_b_16, etris_resnet50 or etris_resnet101 (…_refcocog for RefCOCOg)")
        load_strict(self, state, allow_missing_prefix="clip." if allow_missing_clip else None)


def trainable_breakdown(model: ETRIS) -> dict[str, int]:
    """Trainable parameters per part (bridgers, align, decoder, projector, clip positional tables) and the total."""
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "clip_positional" if name.startswith("clip.") else name.split(".")[0]
            parts[key] = parts.get(key, 0) + p.numel()
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------------------------- registered configs


def _etris_b16() -> ETRISConfig:
    return ETRISConfig()


def _etris_tiny() -> ETRISConfig:
    """A tiny random ETRIS for tests: 4-block CLIP ViT (width 64, patch 8, 64 px) and 4-block text tower (width 32),
    Bridgers after blocks 2/3/4 of both, a 1-layer 32-wide decoder."""
    clip = CLIPConfig(embed_dim=32, image_resolution=64, vision_layers=4, vision_width=64, vision_patch_size=8,
                      context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2,
                      transformer_layers=4)
    return ETRISConfig(clip=clip, bridge_layers=(2, 3, 4), text_bridge_layers=(2, 3, 4), ladder_width=16,
                       ladder_heads=2, ladder_ffn=32, decoder_dim=32, decoder_heads=4, decoder_layers=1,
                       decoder_ffn=32, projector_dim=16, input_size=64, word_len=20)


def _etris_world() -> ETRISConfig:
    """ETRIS on the embedded default's small CLIP (ViT 6 blocks width 192, text 4 blocks width 128): Bridgers after
    image blocks 2/4/6 and text blocks 2/3/4, a 2-layer 128-wide decoder, 128 px letterboxed scenes."""
    from .default import default_clip_config

    return ETRISConfig(clip=default_clip_config(), bridge_layers=(2, 4, 6), text_bridge_layers=(2, 3, 4),
                       ladder_width=64, ladder_heads=4, ladder_ffn=128, decoder_dim=128, decoder_heads=4,
                       decoder_layers=2, decoder_ffn=256, projector_dim=64, input_size=128, word_len=20)


# ``etris_vit_b_16`` itself is the official release architecture (:mod:`vocabseg.models.etris_release`).
@register_model("etris_vit_b_16_gated", "etris",
                _etris_b16(), "our gated-Bridger ETRIS on CLIP ViT-B/16, 416 px (paper sizes; train with vocabseg)",
                task="referring")
def etris_vit_b_16_gated(cfg: ETRISConfig) -> ETRIS:
    return ETRIS(cfg)


# Trained by configs/etris_world_stage1.yaml -> etris_world.yaml -> etris_world_stage3.yaml -> etris_world_stage4.yaml
# (docs/referring.md), bundled without the frozen CLIP by vocabseg.engine.referring.bundle_referring_weights.
ETRIS_WORLD_WEIGHTS = WEIGHTS_DIR / "etris_world.safetensors"


@register_model("etris_world", "etris", _etris_world(),
                "ETRIS on the embedded default's small CLIP, trained on the generated world's referring expressions",
                weights=ETRIS_WORLD_WEIGHTS, task="referring", clip_weights=DEFAULT_CLIP_WEIGHTS)
def etris_world(cfg: ETRISConfig) -> ETRIS:
    return ETRIS(cfg)


@register_model("etris_tiny_test", "etris", _etris_tiny(), "tiny random ETRIS for tests", test_only=True,
                task="referring")
def etris_tiny_test(cfg: ETRISConfig) -> ETRIS:
    return ETRIS(cfg)


# ----------------------------------------------------------------------------------------------- refer command


def refer_command(image: str | os.PathLike, sentence: str, out_dir: str | os.PathLike,
                  model_name: str | None = None, checkpoint: str | os.PathLike | None = None,
                  clip: str | os.PathLike | None = None, device: str = "cpu", threshold: float | None = None,
                  trust_jit: bool = False) -> dict[str, Any]:
    """``vocabseg refer IMAGE "sentence" --out DIR``: writes ``STEM_mask.png`` (0/255) and ``STEM_overlay.png``.

    ``model_name`` None: the model named in the ``model_final.json`` beside ``checkpoint``, else
    ``etris_vit_b_16`` for a checkpoint, else the bundled ``etris_world``. Returns the written paths and the mask's
    share of the image.
    """
    from PIL import Image

    from ..engine.checkpoint import read_final_meta
    from ..io import load_image
    from . import load_model

    if model_name is None:
        model_name = read_final_meta(checkpoint).get("model") or ("etris_vit_b_16" if checkpoint else "etris_world")
    rgb = load_image(image)
    model = load_model(model_name, checkpoint=checkpoint, clip=clip, device=device, trust_jit=trust_jit)
    if not hasattr(model, "refer"):
        raise ConfigError(f"model {model_name!r} is not a referring model; use an etris_* model")
    result = model.refer(rgb, sentence, threshold=threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(str(image)).stem or "image"
    mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    Image.fromarray(result.mask.astype(np.uint8) * 255).save(mask_path)
    result.overlay().save(overlay_path)
    return {"mask": str(mask_path), "overlay": str(overlay_path), "area": result.area, "sentence": sentence,
            "threshold": result.threshold, "model": model_name}
