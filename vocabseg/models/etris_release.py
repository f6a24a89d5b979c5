"""ETRIS release files (kkakkkka/ETRIS ``best_model.pth``), loaded unchanged, with the official test path.

The released architecture differs from our own ETRIS (:mod:`vocabseg.models.etris`, trained here with gated
Bridgers): its Bridger has no gates and the interaction is multiplicative (``x * attn(x, other)``, ``InteractorT``)
for ViT, a small post-norm transformer layer (``Interactor``) for the ResNets; its "zoom" layers are
(de)convolutions with BatchNorm and ReLU; its hierarchical neck takes the sentence through three single-key
attentions; ResNet releases replace CLIP's attention pooling by a dense one (no [CLS] query, a ``connect``
1×1 conv + BN residual, ReLU). The decoder (:class:`~vocabseg.models.etris.GlobalAlignment`) and the projector
(:class:`~vocabseg.models.etris.Projector`) are the same maths as ours and are reused, with a key map.

The official inference (``utils/dataset.py``, ``engine/engine.py:inference``) is reproduced step by step:
an affine letterbox to 416 × 416 (scale = min(416/h, 416/w), centred) by ``cv2.warpAffine`` INTER_CUBIC with CLIP's
mean colour as border, on uint8; /255 then CLIP mean/std; ``tokenize(sentence, word_len, truncate=True)``; sigmoid
of the 104 × 104 logits; bicubic ``align_corners=True`` to 416; the inverse ``warpAffine`` (INTER_CUBIC, border 0) to
the image's size; mask = probability > 0.35. The warps are a numpy port of OpenCV 4.x (below), so no OpenCV is needed.

Reads top to bottom: the OpenCV port, config, release modules, the model, the release key map, registered names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import CLIP, CLIPConfig, OPENAI_MEAN, OPENAI_STD, config_for
from ..errors import CheckpointError, ConfigError
from .etris import GlobalAlignment, Projector, SentenceModel
from .registry import register_model
from .weights import load_strict

__all__ = ["ETRISReleaseConfig", "ETRISRelease", "etris_from_release", "etris_to_release", "cv_get_affine_transform",
           "cv_warp_affine_cubic", "letterbox_matrices", "RELEASE_TRAINABLE_PARAMS"]

#: Trainable parameters of the ViT-B/16 release (its backbone positional tables included), paper: 23.8 M.
RELEASE_TRAINABLE_PARAMS = 23_829_313

# ----------------------------------------------------------------------------------------------- OpenCV 4.x port
#
# cv2.warpAffine(src, M, dsize, flags=INTER_CUBIC) of OpenCV 4.x (modules/imgproc/src/imgwarp.cpp), for uint8 and
# float32 images: M is inverted in double precision; destination pixel (x, y) maps to source coordinates in fixed
# point (AB_BITS = 10, then 1/32 pixel: INTER_BITS = 5), rounded to nearest (ties to even, cvRound); the 4×4 cubic
# weights (A = -0.75) are tabulated per 1/32 offset in float32, products of the 1-D weights, and for uint8 turned
# into int16 with 15 fractional bits (their sum corrected to exactly 1 << 15); uint8 results are
# (sum + 2^14) >> 15, saturated. Source pixels outside the image read the border value. OpenCV 5 computes these
# warps differently (no 1/32 quantisation): the ETRIS results come from OpenCV 4.

_AB_BITS, _INTER_BITS = 10, 5
_TAB = 1 << _INTER_BITS
_COEF_BITS = 15


def _cubic_1d(x: np.float32) -> list[np.float32]:
    """OpenCV's ``interpolateCubic`` in float32, operation by operation."""
    f = np.float32
    a = f(-0.75)
    one = f(1)
    c0 = ((a * (x + one) - f(5) * a) * (x + one) + f(8) * a) * (x + one) - f(4) * a
    c1 = ((a + f(2)) * x - (a + f(3))) * x * x + one
    c2 = ((a + f(2)) * (one - x) - (a + f(3))) * (one - x) * (one - x) + one
    c3 = one - c0 - c1 - c2
    return [f(c0), f(c1), f(c2), f(c3)]


@lru_cache(maxsize=None)
def _cubic_tables() -> tuple[np.ndarray, np.ndarray]:
    """(float32 [1024, 4, 4], int16-valued int64 [1024, 4, 4]) weight tables indexed by ``ay * 32 + ax``."""
    scale = np.float32(1.0) / np.float32(_TAB)
    one_d = [_cubic_1d(np.float32(i) * scale) for i in range(_TAB)]
    ftab = np.zeros((_TAB * _TAB, 4, 4), np.float32)
    itab = np.zeros((_TAB * _TAB, 4, 4), np.int64)
    for i in range(_TAB):
        for j in range(_TAB):
            k = i * _TAB + j
            for k1 in range(4):
                for k2 in range(4):
                    v = np.float32(one_d[i][k1] * one_d[j][k2])
                    ftab[k, k1, k2] = v
                    itab[k, k1, k2] = int(np.clip(np.rint(np.float32(v * np.float32(1 << _COEF_BITS))), -32768, 32767))
            diff = int(itab[k].sum()) - (1 << _COEF_BITS)
            if diff:
                m1 = m2 = M1 = M2 = 2  # smallest / largest of the central 2×2, first found wins
                for k1 in (2, 3):
                    for k2 in (2, 3):
                        if itab[k, k1, k2] < itab[k, m1, m2]:
                            m1, m2 = k1, k2
                        elif itab[k, k1, k2] > itab[k, M1, M2]:
                            M1, M2 = k1, k2
                if diff < 0:
                    itab[k, M1, M2] -= diff
                else:
                    itab[k, m1, m2] -= diff
    return ftab, itab


def _lu_solve(a: list[list[float]], b: list[float]) -> list[float]:
    """OpenCV's ``LUImpl``: Gaussian elimination with partial pivoting, then back-substitution, in double precision
    (bit-exact against ``cv2.getAffineTransform`` of OpenCV 4.10-4.14 on 600 letterbox systems)."""
    m = len(b)
    a = [row[:] for row in a]
    b = b[:]
    for i in range(m):
        k = i
        for j in range(i + 1, m):
            if abs(a[j][i]) > abs(a[k][i]):
                k = j
        if a[k][i] == 0:
            raise ValueError("singular affine system")
        if k != i:
            a[i], a[k] = a[k], a[i]
            b[i], b[k] = b[k], b[i]
        d = -1.0 / a[i][i]
        for j in range(i + 1, m):
            alpha = a[j][i] * d
            for c in range(i + 1, m):
                a[j][c] += alpha * a[i][c]
            b[j] += alpha * b[i]
    for i in range(m - 1, -1, -1):
        s = b[i]
        for c in range(i + 1, m):
            s -= a[i][c] * b[c]
        b[i] = s / a[i][i]
    return b


def cv_get_affine_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``cv2.getAffineTransform`` (3 float32 point pairs -> [2, 3] float64), solved as OpenCV does (6×6 LU)."""
    src = np.asarray(src, np.float32).astype(np.float64)
    dst = np.asarray(dst, np.float32).astype(np.float64)
    a = [[0.0] * 6 for _ in range(6)]
    b = [0.0] * 6
    for i in range(3):
        a[2 * i][0:3] = [src[i, 0], src[i, 1], 1.0]
        a[2 * i + 1][3:6] = [src[i, 0], src[i, 1], 1.0]
        b[2 * i], b[2 * i + 1] = dst[i, 0], dst[i, 1]
    return np.array(_lu_solve(a, b), np.float64).reshape(2, 3)


def letterbox_matrices(height: int, width: int, size: int = 416) -> tuple[np.ndarray, np.ndarray]:
    """The official ``getTransformMat``: image -> centred ``size`` square (scale = min(size/h, size/w)) and back."""
    scale = min(size / height, size / width)
    new_h, new_w = height * scale, width * scale
    bx, by = (size - new_w) / 2.0, (size - new_h) / 2.0
    src = np.array([[0, 0], [width, 0], [0, height]], np.float32)
    dst = np.array([[bx, by], [new_w + bx, by], [bx, new_h + by]], np.float32)
    return cv_get_affine_transform(src, dst), cv_get_affine_transform(dst, src)


def _warp_coordinates(matrix: np.ndarray, out_h: int, out_w: int) -> tuple[np.ndarray, ...]:
    """Integer source positions (x0, y0: [out_h, out_w]) and 1/32 fractions (ax, ay) of OpenCV's affine remap."""
    m = _invert_affine(matrix)
    scale = float(1 << _AB_BITS)
    xs = np.arange(out_w, dtype=np.float64)
    ys = np.arange(out_h, dtype=np.float64)
    adelta = np.rint(m[0] * xs * scale).astype(np.int64)
    bdelta = np.rint(m[3] * xs * scale).astype(np.int64)
    round_delta = (1 << _AB_BITS) // _TAB // 2
    x0 = np.rint((m[1] * ys + m[2]) * scale).astype(np.int64) + round_delta
    y0 = np.rint((m[4] * ys + m[5]) * scale).astype(np.int64) + round_delta
    shift = _AB_BITS - _INTER_BITS
    X = (x0[:, None] + adelta[None, :]) >> shift
    Y = (y0[:, None] + bdelta[None, :]) >> shift
    return (np.clip(X >> _INTER_BITS, -32768, 32767), np.clip(Y >> _INTER_BITS, -32768, 32767),
            X & (_TAB - 1), Y & (_TAB - 1))


def _invert_affine(matrix: np.ndarray) -> list[float]:
    """warpAffine's own inversion of M (double precision, as OpenCV writes it)."""
    m = [float(v) for v in np.asarray(matrix, np.float64).reshape(6)]
    d = m[0] * m[4] - m[1] * m[3]
    d = 1.0 / d if d != 0 else 0.0
    a11, a22 = m[4] * d, m[0] * d
    m[0], m[1], m[3], m[4] = a11, m[1] * -d, m[3] * -d, a22
    b1 = -m[0] * m[2] - m[1] * m[5]
    b2 = -m[3] * m[2] - m[4] * m[5]
    m[2], m[5] = b1, b2
    return m


def _warp_cubic_opencv5(img: np.ndarray, matrix: np.ndarray, out_h: int, out_w: int, cval: np.ndarray
                        ) -> np.ndarray:
    """OpenCV 5's warpAffine INTER_CUBIC: unquantised float32 source coordinates, float32 cubic weights of the
    fraction, rows weighted then summed, rounded to nearest. Measured against opencv-python-headless 5.1.0: equal on
    all but 3e-5 of the pixels of noise images (those off by one grey level), float maps within 3e-6."""
    f = np.float32
    m = _invert_affine(matrix)
    ys, xs = np.mgrid[0:out_h, 0:out_w]
    xs, ys = xs.astype(f), ys.astype(f)
    sx = f(m[0]) * xs + f(m[1]) * ys + f(m[2])
    sy = f(m[3]) * xs + f(m[4]) * ys + f(m[5])
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    wx, wy = _cubic_1d((sx - x0).astype(f)), _cubic_1d((sy - y0).astype(f))
    h, w, cn = img.shape
    src = img.astype(f)
    acc = np.zeros((out_h, out_w, cn), f)
    for i in range(4):
        yy = y0 - 1 + i
        row = np.zeros((out_h, out_w, cn), f)
        for j in range(4):
            xx = x0 - 1 + j
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            vals = np.where(inside[..., None], src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], cval.astype(f))
            row = row + vals * wx[j][..., None]
        acc = acc + row * wy[i][..., None]
    if img.dtype == np.uint8:
        return np.clip(np.rint(acc), 0, 255).astype(np.uint8)
    return acc


def cv_warp_affine_cubic(image: np.ndarray, matrix: np.ndarray, dsize: tuple[int, int],
                         border: Sequence[float] | float = 0.0, opencv: int = 4) -> np.ndarray:
    """``cv2.warpAffine(image, matrix, dsize=(w, h), flags=INTER_CUBIC, borderMode=BORDER_CONSTANT, borderValue)``
    of OpenCV 4.x for uint8 or float32 images ([H, W] or [H, W, C]), bit-exact for uint8. ``opencv=5``: what
    OpenCV 5 computes instead (see :func:`_warp_cubic_opencv5`)."""
    out_w, out_h = int(dsize[0]), int(dsize[1])
    img = np.asarray(image)
    if img.dtype not in (np.uint8, np.float32):
        raise TypeError(f"cv_warp_affine_cubic handles uint8 and float32 images, got {img.dtype}")
    squeeze = img.ndim == 2
    if squeeze:
        img = img[:, :, None]
    h, w, cn = img.shape
    border = [float(border)] * cn if np.isscalar(border) else [float(v) for v in border][:cn]
    border += [0.0] * (cn - len(border))
    if img.dtype == np.uint8:
        cval = np.array([min(255, max(0, int(np.rint(v)))) for v in border], np.int64)
    else:
        cval = np.array(border, np.float32)
    if opencv == 5:
        out = _warp_cubic_opencv5(img, matrix, out_h, out_w, cval)
        return out[:, :, 0] if squeeze else out
    if opencv != 4:
        raise ValueError(f"opencv must be 4 or 5, got {opencv}")
    sx, sy, ax, ay = _warp_coordinates(matrix, out_h, out_w)
    ftab, itab = _cubic_tables()
    idx = ay * _TAB + ax  # [out_h, out_w]
    integer = img.dtype == np.uint8
    weights = itab[idx] if integer else ftab[idx]  # [out_h, out_w, 4, 4]
    acc = np.zeros((out_h, out_w, cn), np.int64 if integer else np.float32)
    src = img.astype(np.int64) if integer else img
    for i in range(4):
        yy = sy - 1 + i
        yin = (yy >= 0) & (yy < h)
        row = np.zeros((out_h, out_w, cn), acc.dtype)
        for j in range(4):
            xx = sx - 1 + j
            inside = yin & (xx >= 0) & (xx < w)
            vals = np.where(inside[..., None], src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], cval)
            row = row + vals * weights[:, :, i, j][..., None]
        acc = acc + row
    if integer:
        out = np.clip((acc + (1 << (_COEF_BITS - 1))) >> _COEF_BITS, 0, 255).astype(np.uint8)
    else:
        out = acc.astype(np.float32)
    return out[:, :, 0] if squeeze else out


# ----------------------------------------------------------------------------------------------- config


def _mean_border() -> tuple[float, float, float]:
    return tuple(m * 255 for m in OPENAI_MEAN)


@dataclass
class ETRISReleaseConfig:
    """The released ETRIS (``config/<dataset>/bridge_{v16,r50,r101}.yaml``) and its test-time settings."""

    clip: CLIPConfig = field(default_factory=lambda: config_for("ViT-B/16", image_resolution=416))
    bridge_every: int = 4  # a Bridger after every 4th text block (and image block / ResNet stage 2, 3, 4)
    ladder_width: int = 64  # ``ladder_dim``
    ladder_heads: int = 8  # ``nhead`` (4 for the ResNets)
    ladder_ffn: int = 128  # FFN width of the ResNet Bridger's interactor
    strides: tuple[int, int, int] = (1, 1, 1)  # ``stride``: zoom (de)conv strides of the Bridger and the neck
    neck_in: tuple[int, int, int] = (768, 768, 512)  # ``fpn_in``
    neck_dim: int = 512  # ``fpn_out[1]`` = ``vis_dim``
    neck_heads: int = 8
    decoder_layers: int = 3
    decoder_heads: int = 8
    decoder_ffn: int = 512
    decoder_dropout: float = 0.1
    projector_dim: int = 256  # ``vis_dim // 2``
    kernel_size: int = 3
    # -- test path (utils/dataset.py, engine/engine.py:inference)
    input_size: int = 416
    word_len: int = 17  # RefCOCO/RefCOCO+ 17, RefCOCOg 22: not stored in the file, it changes the outputs
    threshold: float = 0.35
    border: tuple[float, float, float] = field(default_factory=_mean_border)  # warpAffine borderValue (CLIP mean)
    clip_probability: bool = False  # the official map is not clipped (about -0.07..1.09); True clips to [0, 1]
    # whose cv2.warpAffine the two warps reproduce: 4 (OpenCV 4.x, what the released numbers were computed with),
    # 5 (OpenCV 5.x, e.g. today's pip opencv-python), 0 (the installed cv2's major version, else 4)
    opencv: int = 4

    @property
    def is_vit(self) -> bool:
        return self.clip.is_vit

    @property
    def stages(self) -> int:
        return self.clip.transformer_layers // self.bridge_every

    @property
    def ladder_in(self) -> tuple[int, ...]:
        """Image channels at the Bridgers: the ViT width, or the ResNet's layer2/3/4 widths."""
        c = self.clip
        return (c.vision_width,) * self.stages if c.is_vit else (c.vision_width * 8, c.vision_width * 16,
                                                                 c.vision_width * 32)


def _check_config(c: ETRISReleaseConfig) -> None:
    if c.clip.transformer_layers % c.bridge_every or c.stages != 3:
        raise ConfigError(f"the ETRIS release has 3 Bridgers: text layers {c.clip.transformer_layers} must be "
                          f"3 × bridge_every ({c.bridge_every})")
    if c.is_vit and c.clip.vision_layers != c.clip.transformer_layers:
        raise ConfigError("the ViT release runs image and text blocks in lockstep: equal layer counts needed")
    if c.word_len < 2 or c.word_len > c.clip.context_length:
        raise ConfigError(f"word_len must be in 2..{c.clip.context_length}, got {c.word_len}")


# ----------------------------------------------------------------------------------------------- release modules


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
                 transposed: bool = False) -> nn.Sequential:
    """The official ``conv_layer`` / ``deconv_layer``: (transposed) conv without bias, BatchNorm, ReLU.
    ``nn.ConvTranspose2d`` keeps the release's [in, out, k, k] weights as they are stored."""
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(cin, cout, kernel, stride, padding, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttentionProduct(nn.Module):
    """``x * attention(x, memory)`` (the release's ``InteractorT``): sequence-first [N, B, C] tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return x * self.multihead_attn(x, memory, memory, need_weights=False)[0]


class PostNormInteractor(nn.Module):
    """The ResNet Bridger's ``Interactor``: post-norm self-attention, cross-attention to the other tower, ReLU FFN;
    sequence-first [N, B, C]."""

    def __init__(self, dim: int, heads: int, ffn: int = 128, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x, x, x, need_weights=False)[0]))
        x = self.norm2(x + self.dropout(self.multihead_attn(x, memory, memory, need_weights=False)[0]))
        return self.norm3(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class ReleaseBridger(nn.Module):
    """The released Bridger (``Bridger_ViT`` / ``Bridger_RN``): no gates. At stage i the image map is zoomed to the
    ladder width (a conv of stride s, or a transposed conv for the last stage), the words by a linear layer; from the
    second stage on, each is added to the previous stage's ladder tokens and layer-normed; the two sides interact,
    are zoomed back and added to the towers."""

    def __init__(self, image_widths: Sequence[int], text_width: int, width: int, heads: int,
                 strides: Sequence[int], vit: bool, ffn: int = 128):
        super().__init__()
        n = len(image_widths)
        self.zoom_in, self.zoom_out = nn.ModuleList(), nn.ModuleList()
        self.linear1, self.linear2 = nn.ModuleList(), nn.ModuleList()
        self.fusion_v, self.fusion_t = nn.ModuleList(), nn.ModuleList()
        self.ln_v, self.ln_t = nn.ModuleList(), nn.ModuleList()
        for i, (c, s) in enumerate(zip(image_widths, strides)):
            last = i == n - 1
            if vit:  # (de)conv + BN + ReLU
                self.zoom_in.append(conv_bn_relu(c, width, s, s, transposed=last))
                self.zoom_out.append(conv_bn_relu(width, c, s, s, transposed=not last))
                self.fusion_v.append(AttentionProduct(width, heads))
                self.fusion_t.append(AttentionProduct(width, heads))
            else:  # plain (de)convs
                self.zoom_in.append((nn.ConvTranspose2d if last else nn.Conv2d)(c, width, s, s, bias=False))
                self.zoom_out.append((nn.Conv2d if last else nn.ConvTranspose2d)(width, c, s, s, bias=False))
                self.fusion_v.append(PostNormInteractor(width, heads, ffn))
                self.fusion_t.append(PostNormInteractor(width, heads, ffn))
            self.linear1.append(nn.Linear(text_width, width))
            self.linear2.append(nn.Linear(width, text_width))
            if not last:
                self.ln_v.append(nn.LayerNorm(width))
                self.ln_t.append(nn.LayerNorm(width))

    def forward(self, stage: int, image: torch.Tensor, words: torch.Tensor,
                ladder: tuple[torch.Tensor, torch.Tensor] | None):
        """image [B, C, H, W], words [B, L, Ct] -> (image residual [B, C, H, W], word residual [B, L, Ct], ladder)."""
        v = self.zoom_in[stage](image)
        t = self.linear1[stage](words).transpose(0, 1)  # [L, B, w]
        b, c, h, w = v.shape
        v = v.flatten(2).permute(2, 0, 1)  # [HW, B, w]
        if stage > 0:
            v, t = self.ln_v[stage - 1](v + ladder[0]), self.ln_t[stage - 1](t + ladder[1])
        ladder = (v, t)
        v, t = self.fusion_v[stage](v, t), self.fusion_t[stage](t, v)
        v = self.zoom_out[stage](v.permute(1, 2, 0).reshape(b, c, h, w))
        return v, self.linear2[stage](t).transpose(0, 1), ladder


class CoordConv(nn.Module):
    """x and y coordinates in [-1, 1] appended as two channels, then conv 3×3 + BN + ReLU (official layout)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = conv_bn_relu(cin + 2, cout, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .etris import coordinate_map

        b, _, h, w = x.shape
        return self.conv1(torch.cat([x, coordinate_map(b, h, w, x.device, x.dtype)], dim=1))


class ReleaseNeck(nn.Module):
    """The released hierarchical alignment (``HA``): three levels projected to one grid (stride-s conv, 1×1 conv,
    stride-s transposed conv), each multiplied by its attention to the projected sentence, concatenated, fused."""

    def __init__(self, in_channels: Sequence[int], sentence_dim: int, dim: int, heads: int,
                 strides: Sequence[int]):
        super().__init__()
        self.fusion3 = AttentionProduct(dim, heads)
        self.fusion4 = AttentionProduct(dim, heads)
        self.fusion5 = AttentionProduct(dim, heads)
        self.txt_proj = nn.Linear(sentence_dim, dim)
        self.f3_proj = conv_bn_relu(in_channels[0], dim, strides[0], strides[0])
        self.f4_proj = conv_bn_relu(in_channels[1], dim, strides[1], strides[1])
        self.f5_proj = conv_bn_relu(in_channels[2], dim, strides[2], strides[2], transposed=True)
        self.aggr = conv_bn_relu(3 * dim, dim, 1)
        self.coordconv = nn.Sequential(CoordConv(dim, dim), conv_bn_relu(dim, dim, 3, 1, 1))

    def forward(self, levels: Sequence[torch.Tensor], sentence: torch.Tensor) -> torch.Tensor:
        txt = self.txt_proj(sentence)[None]  # [1, B, D]
        fused = []
        for f, proj, fusion in zip(levels, (self.f3_proj, self.f4_proj, self.f5_proj),
                                   (self.fusion3, self.fusion4, self.fusion5)):
            f = proj(f)
            b, c, h, w = f.shape
            f = fusion(f.flatten(2).permute(2, 0, 1), txt)
            fused.append(f.permute(1, 2, 0).reshape(b, c, h, w))
        return self.coordconv(self.aggr(torch.cat(fused, dim=1)))


class DenseAttentionPool(nn.Module):
    """The ResNet releases' attention pooling: every position attends to all positions (no [CLS]/mean query; the
    positional table's [CLS] row is unused, the grid is resized bicubically to the map), plus a ``connect``
    1×1 conv + BN residual and a ReLU. [B, C, H, W] -> [B, output_dim, H, W]."""

    def __init__(self, spacial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = heads
        self.connect = nn.Sequential(nn.Conv2d(embed_dim, output_dim, 1, bias=False), nn.BatchNorm2d(output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..clip.model import resize_grid_embedding

        b, c, h, w = x.shape
        res = self.connect(x)
        pe = resize_grid_embedding(self.positional_embedding[1:], (h, w))  # [h*w, C]
        t = x.flatten(2).transpose(1, 2) + pe.to(x.dtype)  # [B, HW, C]
        heads, d = self.num_heads, c // self.num_heads
        q = self.q_proj(t).view(b, -1, heads, d).transpose(1, 2)
        k = self.k_proj(t).view(b, -1, heads, d).transpose(1, 2)
        v = self.v_proj(t).view(b, -1, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        out = self.c_proj(out).transpose(1, 2).reshape(b, -1, h, w)
        return F.relu(out + res)


# ----------------------------------------------------------------------------------------------- model


class ETRISRelease(SentenceModel):
    """The released ETRIS: frozen CLIP (positional tables trained), gate-less Bridgers, ``HA`` neck, ``GA`` decoder,
    dynamic-kernel projector; ``refer`` runs the official test path."""

    def __init__(self, config: ETRISReleaseConfig):
        super().__init__()
        _check_config(config)
        self.config = c = config
        self.clip = CLIP(c.clip)
        if not c.is_vit:
            cc = c.clip
            self.clip.visual.attnpool = DenseAttentionPool(cc.image_resolution // 32, cc.vision_width * 32,
                                                           cc.resolved_vision_heads, cc.embed_dim)
        self.bridger = ReleaseBridger(c.ladder_in, c.clip.transformer_width, c.ladder_width, c.ladder_heads,
                                      c.strides, c.is_vit, c.ladder_ffn)
        self.neck = ReleaseNeck(c.neck_in, c.clip.embed_dim, c.neck_dim, c.neck_heads, c.strides)
        self.decoder = GlobalAlignment(c.neck_dim, c.decoder_heads, c.decoder_ffn, c.decoder_layers,
                                       c.clip.transformer_width, c.decoder_dropout)
        self.projector = Projector(c.neck_dim, c.projector_dim, c.clip.embed_dim, c.kernel_size, 2)
        self.freeze_clip(keep=tuple(n for n, _ in self.clip.named_parameters() if "positional_embedding" in n))
        self.register_buffer("image_mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)

    # -- towers with the Bridgers ----------------------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor, tokens: torch.Tensor
               ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Normalised images [B, 3, S, S], ids [B, L] -> (3 visual maps, words [B, L, Ct], sentence [B, D])."""
        c, clip = self.config, self.clip
        L = tokens.shape[1]
        t = clip.token_embedding(tokens).to(clip.dtype) + clip.positional_embedding[:L].to(clip.dtype)
        causal = torch.full((L, L), float("-inf"), device=t.device, dtype=t.dtype).triu_(1)
        text_blocks = clip.transformer.resblocks
        levels: list[torch.Tensor] = []
        ladder = None
        if c.is_vit:
            visual = clip.visual
            x, grid = visual.embed(pixels)
        else:
            visual = clip.visual
            x = visual.layer1(visual.stem(pixels))
            stages = (visual.layer2, visual.layer3, visual.layer4)
        for stage in range(c.stages):
            lo, hi = stage * c.bridge_every, (stage + 1) * c.bridge_every
            for block in text_blocks[lo:hi]:
                t = block(t, causal)
            if c.is_vit:
                x = visual.run_blocks(x, lo, hi)
                image = visual.tokens_to_map(x, grid)
            else:
                image = x = stages[stage](x)
            dv, dt, ladder = self.bridger(stage, image, t, ladder)
            t = t + dt
            if c.is_vit:
                x = torch.cat([x[:, :1], x[:, 1:] + dv.flatten(2).transpose(1, 2).to(x.dtype)], dim=1)
                if stage < c.stages - 1:
                    levels.append(visual.tokens_to_map(x, grid))
            else:
                x = x + dv
                if stage < c.stages - 1:
                    levels.append(x)
        if c.is_vit:
            final = visual.head(x[:, 1:])  # ln_post + proj on the patch tokens [B, h*w, D]
            levels.append(final.transpose(1, 2).reshape(final.shape[0], -1, grid[0], grid[1]))
        else:
            levels.append(visual.attnpool(x))
        words = clip.ln_final(t)
        sentence = words[torch.arange(words.shape[0], device=words.device), tokens.argmax(dim=-1)]
        return levels, words, sentence @ clip.text_projection

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images [B, 3, S, S] and ids [B, word_len] -> ``{"mask_logits": [B, 1, S/4, S/4]}``."""
        levels, words, sentence = self.encode(pixels, tokens)
        pad_mask = tokens == 0  # the release masks id 0 (also "!") in the decoder's cross-attention
        x = self.neck(levels, sentence)
        x = self.decoder(x, words, pad_mask)
        return {"mask_logits": self.projector(x, sentence)}

    # -- the official test path ------------------------------------------------------------------------------------
    @property
    def opencv(self) -> int:
        """The OpenCV major version whose warps are reproduced (resolves ``opencv=0``)."""
        v = self.config.opencv
        if v == 0:
            try:
                import cv2  # optional: only read for its version

                return 5 if int(str(cv2.__version__).split(".")[0]) >= 5 else 4
            except Exception:  # noqa: BLE001 - not installed or unusable: the releases' OpenCV
                return 4
        if v not in (4, 5):
            raise ConfigError(f"opencv must be 4, 5 or 0 (follow the installed cv2), got {v}")
        return v

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """H×W×3 uint8 RGB -> normalised [1, 3, S, S] (centred cubic letterbox, mean-colour border) and the inverse
        matrix that maps the S×S prediction back to the image."""
        s = self.config.input_size
        mat, inv = letterbox_matrices(image.shape[0], image.shape[1], s)
        boxed = cv_warp_affine_cubic(np.ascontiguousarray(image, np.uint8), mat, (s, s), self.config.border,
                                     self.opencv)
        x = torch.from_numpy(boxed).to(self.device).permute(2, 0, 1)[None].float()
        return (x / 255.0 - self.image_mean) / self.image_std, inv

    def probability_maps(self, logits: torch.Tensor, inverses: Sequence[np.ndarray],
                         sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """[B, 1, S/4, S/4] logits -> per image float32 [H, W]: sigmoid, bicubic (align_corners) to S, inverse warp."""
        s = self.config.input_size
        prob = torch.sigmoid(logits.float())
        prob = F.interpolate(prob, size=(s, s), mode="bicubic", align_corners=True)
        out = []
        for i, (inv, (h, w)) in enumerate(zip(inverses, sizes)):
            p = cv_warp_affine_cubic(prob[i, 0].cpu().numpy().astype(np.float32), inv, (w, h), 0.0,
                                     self.opencv)
            out.append(np.clip(p, 0.0, 1.0) if self.config.clip_probability else p)
        return out

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], allow_missing_clip: bool = False) -> None:
        """The release file (``module.``-prefixed or not) or our own names, strictly."""
        load_strict(self, etris_from_release(state, self.config),
                    allow_missing_prefix="clip." if allow_missing_clip else None)


# ----------------------------------------------------------------------------------------------- release key map

_ATTN_SPLIT = ("q_proj", "k_proj", "v_proj")


def _release_variant(state: Mapping[str, torch.Tensor]) -> str:
    """Which release a (prefix-free) release state dict is: "vit_b_16", "resnet50", "resnet101" or "other"."""
    if "backbone.visual.proj" in state:
        return "vit_b_16" if state["backbone.visual.proj"].shape[0] == 768 else "vit(other)"
    blocks = {k.split(".")[3] for k in state if k.startswith("backbone.visual.layer3.")}
    return {6: "resnet50", 23: "resnet101"}.get(len(blocks), "resnet(other)")


def _expected_variant(config: ETRISReleaseConfig) -> str:
    c = config.clip
    if c.is_vit:
        return "vit_b_16" if c.vision_width == 768 and c.vision_patch_size == 16 else "vit(other)"
    return {6: "resnet50", 23: "resnet101"}.get(c.vision_layers[2], "resnet(other)")


def etris_from_release(state: Mapping[str, torch.Tensor], config: ETRISReleaseConfig | None = None
                       ) -> dict[str, torch.Tensor]:
    """Release names (``module.`` already stripped or not) -> ours; a state dict in our names passes unchanged.

    ``backbone.*`` -> ``clip.*``; ``proj.vis``/``proj.txt`` -> ``projector.visual``/``projector.kernel``; the
    decoder's ``nn.MultiheadAttention`` packed ``in_proj_weight``/``in_proj_bias`` -> q/k/v projections and
    ``multihead_attn`` -> ``cross_attn``. Bridger and neck keep their names (their transposed convolutions are
    ``nn.ConvTranspose2d`` here too, so the [in, out, k, k] weights load as stored). Raises a one-line
    :class:`CheckpointError` for another family's file or another ETRIS variant.
    """
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    if any(k.startswith(("clip.", "projector.")) for k in state) and not any(k.startswith("backbone.") for k in state):
        if any(k.startswith(("bridgers.", "align.")) for k in state):
            raise CheckpointError("this is a vocabseg-trained ETRIS with gated Bridgers (etris_world, "
                                  "etris_vit_b_16_gated), not the release architecture; load it with that model")
        return dict(state)
    if not (any(k.startswith("backbone.") for k in state) and any(k.startswith("bridger.") for k in state)):
        shown = ", ".join(list(state)[:3])
        raise CheckpointError(f"not an ETRIS release: expected module.backbone.*, module.bridger.*, module.neck.*, "
                              f"module.decoder.*, module.proj.* tensors (found e.g. {shown})")
    if config is not None:
        found, wanted = _release_variant(state), _expected_variant(config)
        if found != wanted:
            names = {"vit_b_16": "etris_vit_b_16", "resnet50": "etris_resnet50", "resnet101": "etris_resnet101"}
            hint = f"; load it with {names[found]}" if found in names else ""
            raise CheckpointError(f"this is the ETRIS {found} release, not {wanted}{hint}")
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("backbone."):
            out["clip." + k[9:]] = v
        elif k.startswith("proj.vis."):
            out["projector.visual." + k[9:]] = v
        elif k.startswith("proj.txt."):
            out["projector.kernel." + k[9:]] = v
        elif k.startswith("decoder.layers."):
            k = k.replace(".multihead_attn.", ".cross_attn.")
            stem, _, leaf = k.rpartition(".")
            if leaf in ("in_proj_weight", "in_proj_bias"):
                for name, part in zip(_ATTN_SPLIT, v.chunk(3, dim=0)):
                    out[f"{stem}.{name}.{'weight' if leaf == 'in_proj_weight' else 'bias'}"] = part
            else:
                out[k] = v
        else:
            out[k] = v
    return out


def etris_to_release(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the release's names with ``module.`` (the inverse of :func:`etris_from_release`; for tests/export)."""
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith("clip."):
            out["backbone." + k[5:]] = v
        elif k.startswith("projector.visual."):
            out["proj.vis." + k[17:]] = v
        elif k.startswith("projector.kernel."):
            out["proj.txt." + k[17:]] = v
        elif k.startswith("decoder.layers.") and any(f".{n}." in k for n in _ATTN_SPLIT):
            stem, name, leaf = k.rsplit(".", 2)
            packed.setdefault(f"{stem}.in_proj_{leaf}", {})[name] = v
        else:
            out[k] = v
    for key, parts in packed.items():
        out[key.replace(".cross_attn.", ".multihead_attn.")] = torch.cat([parts[n] for n in _ATTN_SPLIT], dim=0)
    for k in [k for k in out if ".cross_attn." in k]:
        out[k.replace(".cross_attn.", ".multihead_attn.")] = out.pop(k)
    return {"module." + k: v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- registered names


def _vit_b16(word_len: int = 17) -> ETRISReleaseConfig:
    return ETRISReleaseConfig(word_len=word_len)


def _resnet(arch: str, word_len: int = 17) -> ETRISReleaseConfig:
    clip = config_for(arch)  # 224-px attention-pool table [50, 2048], resized to the 13×13 map at run time
    return ETRISReleaseConfig(clip=clip, ladder_heads=4, strides=(2, 1, 2),
                              neck_in=(clip.vision_width * 8, clip.vision_width * 16, clip.embed_dim),
                              word_len=word_len)


def _vit_tiny() -> ETRISReleaseConfig:
    """The release layout at reduced widths: ViT (width 64, 12 blocks, patch 16, 64 px), text 12 blocks of width 32
    (2 heads), Bridgers after blocks 4/8/12 as released; small neck/decoder/projector."""
    clip = CLIPConfig(embed_dim=32, image_resolution=64, vision_layers=12, vision_width=64, vision_patch_size=16,
                      context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2,
                      transformer_layers=12)
    return ETRISReleaseConfig(clip=clip, ladder_width=16, ladder_heads=2, neck_in=(64, 64, 32), neck_dim=32,
                              neck_heads=4, decoder_layers=1, decoder_heads=4, decoder_ffn=32, projector_dim=16,
                              input_size=64, word_len=9)


def _resnet_tiny() -> ETRISReleaseConfig:
    """The ResNet release layout at reduced widths: ModifiedResNet (1, 1, 1, 1) of width 8 (4 pooling heads), text
    12 blocks of width 32, 64 px; a 3×3 pooling table resized to the 2×2 map, as the release resizes 7×7 to 13×13."""
    clip = CLIPConfig(embed_dim=32, image_resolution=96, vision_layers=(1, 1, 1, 1), vision_width=8,
                      vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=32,
                      transformer_heads=2, transformer_layers=12, vision_heads=4)
    return ETRISReleaseConfig(clip=clip, ladder_width=16, ladder_heads=2, strides=(2, 1, 2), neck_in=(64, 128, 32),
                              neck_dim=32, neck_heads=4, decoder_layers=1, decoder_heads=4, decoder_ffn=32,
                              projector_dim=16, input_size=64, word_len=9)


_RELEASES = [
    ("etris_vit_b_16", lambda: _vit_b16(17), "ViT-B/16", "RefCOCO / RefCOCO+"),
    ("etris_vit_b_16_refcocog", lambda: _vit_b16(22), "ViT-B/16", "RefCOCOg (word_len 22)"),
    ("etris_resnet50", lambda: _resnet("RN50", 17), "ResNet-50", "RefCOCO / RefCOCO+"),
    ("etris_resnet50_refcocog", lambda: _resnet("RN50", 22), "ResNet-50", "RefCOCOg (word_len 22)"),
    ("etris_resnet101", lambda: _resnet("RN101", 17), "ResNet-101", "RefCOCO / RefCOCO+"),
    ("etris_resnet101_refcocog", lambda: _resnet("RN101", 22), "ResNet-101", "RefCOCOg (word_len 22)"),
]


def _register_release(name: str, make, arch: str, data: str) -> None:
    @register_model(name, "etris_release", make(),
                    f"ETRIS release (kkakkkka/ETRIS best_model.pth), CLIP {arch}, {data}; official 416-px test path",
                    task="referring")
    def build(cfg: ETRISReleaseConfig) -> ETRISRelease:
        return ETRISRelease(cfg)


for _args in _RELEASES:
    _register_release(*_args)


@register_model("etris_release_vit_tiny_test", "etris_release", _vit_tiny(), "tiny ETRIS release layout (ViT)",
                test_only=True, task="referring")
def etris_release_vit_tiny_test(cfg: ETRISReleaseConfig) -> ETRISRelease:
    return ETRISRelease(cfg)


@register_model("etris_release_resnet_tiny_test", "etris_release", _resnet_tiny(),
                "tiny ETRIS release layout (ResNet)", test_only=True, task="referring")
def etris_release_resnet_tiny_test(cfg: ETRISReleaseConfig) -> ETRISRelease:
    return ETRISRelease(cfg)
