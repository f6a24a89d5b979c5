"""Model outputs -> per-pixel class scores at the input resolution, computed in bands of rows.

A 1,000-name vocabulary on a 2,560×1,440 image would be a 14.7 GB score volume; labels never need it whole. Scores
are produced band by band (memory ∝ classes × band × width), each band reduced to labels and confidences, and the
full [C, H, W] volume is only built when a caller asks for it.

Resizing follows ``F.interpolate(mode="bilinear", align_corners=False)`` exactly (separable linear weights), so a
band equals the same rows of a whole-image interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Budget for one band's class-score tensor (classes × rows × width floats).
BAND_BYTES = 64 * 2 ** 20


def linear_indices(in_size: int, out_size: int, start: int = 0, stop: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (i0, i1) and weight of i1 for output positions ``start..stop`` (PyTorch bilinear rule)."""
    stop = out_size if stop is None else stop
    scale = in_size / out_size
    dst = torch.arange(start, stop, dtype=torch.float64)
    src = ((dst + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, (src - i0).float()


def resize_axis(x: torch.Tensor, axis: int, out_size: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Linear resize of one axis of ``x`` to ``out_size``, returning only outputs ``start..stop``."""
    in_size = x.shape[axis]
    stop = out_size if stop is None else stop
    if in_size == out_size:
        return x.narrow(axis, start, stop - start)
    if axis == x.ndim - 1 and x.ndim == 3:
        # the last axis: F.interpolate's own linear kernel (same rule, much faster than gathering columns)
        out = F.interpolate(x, size=out_size, mode="linear", align_corners=False)
        return out[..., start:stop] if (start, stop) != (0, out_size) else out
    i0, i1, w = linear_indices(in_size, out_size, start, stop)
    shape = [1] * x.ndim
    shape[axis] = -1
    w = w.to(x.dtype).view(shape)
    return x.index_select(axis, i0) * (1 - w) + x.index_select(axis, i1) * w


@dataclass
class MaskScores:
    """Mask-classification output (SAN and friends) and the geometry needed to bring it to the input image.

    ``mask_logits`` [Q, h, w] live on the padded network input (``padded`` = (Hp, Wp)); the image occupies the
    top-left ``crop`` = (hc, wc) of it and is reported at ``out`` = (H, W). Scores [C, H, W] =
    Σ_q class_probs[q, c] · sigmoid(mask_q) with masks resized to the padded size, cropped, then resized to the
    output (the official SAN order).
    """

    class_probs: torch.Tensor  # [Q, C]
    mask_logits: torch.Tensor  # [Q, h, w]
    padded: tuple[int, int]
    crop: tuple[int, int]
    out: tuple[int, int]

    @property
    def num_classes(self) -> int:
        return self.class_probs.shape[1]

    def mask_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Mask probabilities sigmoid(mask) [Q, r1 - r0, W] for output rows r0..r1 (official resize order)."""
        (hp, wp), (hc, wc), (ho, wo) = self.padded, self.crop, self.out
        # rows of the cropped, padded-size map needed for these output rows
        if hc == ho:
            a0, a1 = r0, r1
        else:
            i0, i1, _ = linear_indices(hc, ho, r0, r1)
            a0, a1 = int(i0.min()), int(i1.max()) + 1
        m = resize_axis(self.mask_logits, 1, hp, a0, a1)  # [Q, a1-a0, w]
        m = resize_axis(m, 2, wp, 0, wc)  # [Q, a1-a0, wc]
        if hc != ho:
            i0, i1, w = linear_indices(hc, ho, r0, r1)
            w = w.view(1, -1, 1).to(m.dtype)
            m = m[:, i0 - a0] * (1 - w) + m[:, i1 - a0] * w
        if wc != wo:
            m = resize_axis(m, 2, wo)
        return m.sigmoid()

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Scores [C, r1 - r0, W] for output rows r0..r1."""
        return torch.einsum("qc,qhw->chw", self.class_probs, self.mask_rows(r0, r1))

    def best_rows(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Arg-max class and its score for rows r0..r1, without scoring every class at every pixel.

        score_c(x) = Σ_q P[q,c]·σ_q(x) ≤ U_c · max_q σ_q(x) with U_c = Σ_q P[q,c]. The classes with the largest U are
        scored everywhere; the others only at pixels where that bound says they could still win. Exact (up to ties),
        and a 1,000-name vocabulary costs about what a few dozen names do.
        """
        m = self.mask_rows(r0, r1)  # [Q, b, W]
        probs = self.class_probs
        n = probs.shape[1]
        k = min(n, max(8, probs.shape[0] // 2))
        if n <= 2 * k:
            scores = torch.einsum("qc,qhw->chw", probs, m)
            best, idx = scores.max(dim=0)
            return idx, best
        upper = probs.sum(dim=0)  # U_c
        order = torch.argsort(upper, descending=True)
        top, rest = order[:k], order[k:]
        best, idx = torch.einsum("qc,qhw->chw", probs[:, top], m).max(dim=0)
        labels = top[idx]
        bound = upper[rest[0]] * m.amax(dim=0)  # no class outside `top` can score more than this at a pixel
        need = best < bound
        if bool(need.any()):
            sub = m[:, need]  # [Q, N]
            rest_best, rest_idx = (probs[:, rest].t() @ sub).max(dim=0)
            wins = rest_best > best[need]
            sel_best, sel_lab = best[need], labels[need]
            sel_best[wins], sel_lab[wins] = rest_best[wins], rest[rest_idx[wins]]
            best[need], labels[need] = sel_best, sel_lab
        return labels, best


@dataclass
class DenseScores:
    """Dense per-pixel class logits [C, h, w] covering ``crop`` of a padded input (LSeg-style models)."""

    logits: torch.Tensor  # [C, h, w]
    padded: tuple[int, int]
    crop: tuple[int, int]
    out: tuple[int, int]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[0]

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        (hp, wp), (hc, wc), (ho, wo) = self.padded, self.crop, self.out
        m = resize_axis(self.logits, 1, hp, 0, hc)
        m = resize_axis(m, 2, wp, 0, wc)
        m = resize_axis(m, 1, ho, r0, r1)
        return resize_axis(m, 2, wo)


def band_height(num_classes: int, width: int, extra_channels: int = 0) -> int:
    per_row = (num_classes + extra_channels) * width * 4
    return max(1, BAND_BYTES // max(per_row, 1))


@torch.inference_mode()
def labels_and_confidence(scores: MaskScores | DenseScores) -> tuple[np.ndarray, np.ndarray]:
    """Arg-max labels [H, W] (int32) and the winning score [H, W] (float32), band by band."""
    ho, wo = scores.out
    labels = np.empty((ho, wo), dtype=np.int32)
    conf = np.empty((ho, wo), dtype=np.float32)
    extra = scores.class_probs.shape[0] if isinstance(scores, MaskScores) else 0
    step = band_height(scores.num_classes, wo, extra)
    for r0 in range(0, ho, step):
        r1 = min(ho, r0 + step)
        if isinstance(scores, MaskScores):
            idx, best = scores.best_rows(r0, r1)
        else:
            best, idx = scores.rows(r0, r1).max(dim=0)
        labels[r0:r1] = idx.cpu().numpy()
        conf[r0:r1] = best.float().cpu().numpy()
    return labels, conf


@torch.inference_mode()
def full_scores(scores: MaskScores | DenseScores) -> np.ndarray:
    """The whole [C, H, W] float32 score volume (large for big vocabularies at full resolution)."""
    ho, wo = scores.out
    out = np.empty((scores.num_classes, ho, wo), dtype=np.float32)
    step = band_height(scores.num_classes, wo)
    for r0 in range(0, ho, step):
        r1 = min(ho, r0 + step)
        out[:, r0:r1] = scores.rows(r0, r1).float().cpu().numpy()
    return out
