"""Segmentation metrics: semantic (mIoU & co.) and referring (per-expression masks).

Semantic metrics follow the definitions of detectron2's ``SemSegEvaluator`` so numbers are comparable
with published results: a confusion matrix is accumulated over all pixels whose ground truth is not
``ignore_index``, and a class enters the means only if it has ground-truth pixels. Everything is
returned in percent. Both metric families stream (:class:`ConfusionMatrix`, :class:`ReferringMeter`)
so a dataset can be evaluated without keeping its predictions, and merge for distributed evaluation.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from vocabseg.errors import DatasetError

__all__ = ["ConfusionMatrix", "ReferringMeter", "referring_metrics", "segmentation_metrics"]


def _to_numpy(x: Any) -> np.ndarray:
    """Accept numpy arrays, nested lists and torch tensors (on any device) without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _int_array(x: Any, what: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.dtype == np.bool_:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must be an integer array of class indices, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


class ConfusionMatrix:
    """Streaming confusion matrix for semantic segmentation.

    ``matrix[g, p]`` counts valid pixels of ground-truth class ``g`` predicted as ``p``; the extra
    last column ``p == num_classes`` collects predictions outside ``[0, num_classes)`` (always wrong).
    Pixels whose ground truth equals ``ignore_index`` (``None``: no ignore value) are not counted.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def reset(self) -> None:
        """Forget all counted pixels."""
        self.matrix[:] = 0

    def update(self, pred: Any, gt: Any) -> None:
        """Add one prediction / ground-truth pair (any equal shapes, e.g. H×W or a batch N×H×W)."""
        pred = _int_array(pred, "pred")
        gt = _int_array(gt, "gt")
        if pred.shape != gt.shape:
            raise DatasetError(f"Prediction has shape {pred.shape} but its ground truth has shape {gt.shape}.")
        k = self.num_classes
        gt = gt.reshape(-1)
        pred = pred.reshape(-1)
        if self.ignore_index is not None:
            keep = gt != self.ignore_index
            gt, pred = gt[keep], pred[keep]
        if gt.size == 0:
            return
        if gt.min() < 0 or gt.max() >= k:
            bad = int(gt[(gt < 0) | (gt >= k)][0])
            raise DatasetError(
                f"Ground truth contains label {bad}, which is neither a class in [0, {k}) nor the ignore "
                f"index {self.ignore_index}; check num_classes and ignore_index for this dataset."
            )
        pred = np.where((pred < 0) | (pred >= k), k, pred)
        counts = np.bincount(gt * (k + 1) + pred, minlength=k * (k + 1))
        self.matrix += counts.reshape(k, k + 1)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add the counts of ``other`` (e.g. from another process) into this matrix; returns self."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge another ConfusionMatrix, got {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a matrix for {other.num_classes} classes / ignore {other.ignore_index} into one "
                f"for {self.num_classes} classes / ignore {self.ignore_index}"
            )
        self.matrix += other.matrix
        return self

    def compute(self) -> dict[str, Any]:
        """Return ``mIoU, fwIoU, mACC, pACC`` (floats) and per-class ``IoU, ACC`` (lists), in percent.

        Per-class values are NaN for classes without ground-truth pixels, and those classes are left
        out of the means. Pixels of a class taken by a wrongly predicted class (even one with no
        ground truth anywhere) still lower the true class's IoU and accuracy. With no valid pixel at
        all every value is NaN.
        """
        k = self.num_classes
        m = self.matrix.astype(np.float64)
        tp = np.diag(m[:, :k])
        gt_count = m.sum(axis=1)
        pred_count = m[:, :k].sum(axis=0)
        total = gt_count.sum()
        has_gt = gt_count > 0
        acc = np.full(k, np.nan)
        iou = np.full(k, np.nan)
        acc[has_gt] = tp[has_gt] / gt_count[has_gt]
        union = gt_count + pred_count - tp
        iou[has_gt] = tp[has_gt] / union[has_gt]
        if total > 0:
            miou = float(iou[has_gt].mean())
            macc = float(acc[has_gt].mean())
            pacc = float(tp.sum() / total)
            fwiou = float(np.sum(gt_count[has_gt] / total * iou[has_gt]))
        else:
            miou = macc = pacc = fwiou = math.nan
        return {
            "mIoU": 100 * miou,
            "fwIoU": 100 * fwiou,
            "mACC": 100 * macc,
            "pACC": 100 * pacc,
            "IoU": (100 * iou).tolist(),
            "ACC": (100 * acc).tolist(),
        }


def segmentation_metrics(
    pred: Any, gt: Any, num_classes: int, ignore_index: int | None = 255
) -> dict[str, Any]:
    """Semantic segmentation metrics (percent) for one prediction or a list of them.

    ``pred`` and ``gt`` are integer arrays of equal shape, or equally long lists/tuples of such arrays
    (each pair may have its own shape). See :meth:`ConfusionMatrix.compute` for the returned keys.
    """
    cm = ConfusionMatrix(num_classes, ignore_index)
    if isinstance(pred, (list, tuple)) or isinstance(gt, (list, tuple)):
        if not isinstance(pred, (list, tuple)) or not isinstance(gt, (list, tuple)):
            raise ValueError("pred and gt must both be arrays or both be lists of arrays")
        if len(pred) != len(gt):
            raise DatasetError(f"Got {len(pred)} predictions but {len(gt)} ground-truth maps.")
        for p, g in zip(pred, gt):
            cm.update(p, g)
    else:
        cm.update(pred, gt)
    return cm.compute()


# --------------------------------------------------------------------------------------------
# referring segmentation
# --------------------------------------------------------------------------------------------


def _mask(x: Any, what: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.dtype == np.bool_:
        return a
    if np.issubdtype(a.dtype, np.integer) and (a.size == 0 or (a.min() >= 0 and a.max() <= 1)):
        return a.astype(bool)
    raise ValueError(
        f"{what} must be a boolean mask (or 0/1 integers), got dtype {a.dtype}; threshold probabilities first"
    )


def _threshold_key(t: float) -> str:
    return f"Prec@{t:g}"


class ReferringMeter:
    """Streaming referring-segmentation metrics: one boolean mask pair per :meth:`update`.

    Only the intersection and union of each sample are kept. A sample whose ground truth and
    prediction are both empty (a "no target" expression answered correctly) has IoU 1, because the
    model did exactly the right thing; one with an empty ground truth but a non-empty prediction has
    IoU 0. Such samples add nothing to oIoU's sums.
    """

    def __init__(self, thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9)) -> None:
        thresholds = tuple(float(t) for t in thresholds)
        if any(not 0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must lie in [0, 1], got {thresholds}")
        self.thresholds = thresholds
        self.intersections: list[int] = []
        self.unions: list[int] = []

    def reset(self) -> None:
        """Forget all samples."""
        self.intersections.clear()
        self.unions.clear()

    def __len__(self) -> int:
        return len(self.intersections)

    def update(self, pred: Any, gt: Any) -> None:
        """Add one sample: predicted and ground-truth masks of equal shape."""
        p = _mask(pred, "pred")
        g = _mask(gt, "gt")
        if p.shape != g.shape:
            raise DatasetError(f"Predicted mask has shape {p.shape} but its ground truth has shape {g.shape}.")
        self.intersections.append(int(np.count_nonzero(p & g)))
        self.unions.append(int(np.count_nonzero(p | g)))

    def merge(self, other: "ReferringMeter") -> "ReferringMeter":
        """Append the samples of ``other`` (e.g. from another process); returns self."""
        if not isinstance(other, ReferringMeter):
            raise TypeError(f"can only merge another ReferringMeter, got {type(other).__name__}")
        if other.thresholds != self.thresholds:
            raise ValueError(f"cannot merge meters with thresholds {other.thresholds} and {self.thresholds}")
        self.intersections.extend(other.intersections)
        self.unions.extend(other.unions)
        return self

    def per_sample_iou(self) -> np.ndarray:
        """IoU of each sample so far, in [0, 1] (1 for an empty prediction of an empty target)."""
        inter = np.asarray(self.intersections, dtype=np.float64)
        union = np.asarray(self.unions, dtype=np.float64)
        iou = np.ones_like(inter)
        nonempty = union > 0
        iou[nonempty] = inter[nonempty] / union[nonempty]
        return iou

    def compute(self) -> dict[str, float]:
        """Return ``mIoU`` (mean per-sample IoU), ``oIoU`` (total intersection / total union) and
        ``Prec@t`` (share of samples with IoU >= t) for each threshold, all in percent; NaN when no
        sample was added. oIoU is 100 when every union is empty (all samples correctly empty)."""
        out: dict[str, float] = {}
        if not self.intersections:
            out["mIoU"] = out["oIoU"] = math.nan
            for t in self.thresholds:
                out[_threshold_key(t)] = math.nan
            return out
        iou = self.per_sample_iou()
        total_union = sum(self.unions)
        out["mIoU"] = 100 * float(iou.mean())
        out["oIoU"] = 100 * (sum(self.intersections) / total_union) if total_union > 0 else 100.0
        for t in self.thresholds:
            out[_threshold_key(t)] = 100 * float(np.mean(iou >= t))
        return out


def referring_metrics(
    preds: Iterable[Any], gts: Iterable[Any], thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9)
) -> dict[str, float]:
    """Referring segmentation metrics (percent) for lists of boolean masks; see :class:`ReferringMeter`."""
    preds, gts = list(preds), list(gts)
    if len(preds) != len(gts):
        raise DatasetError(f"Got {len(preds)} predicted masks but {len(gts)} ground-truth masks.")
    meter = ReferringMeter(thresholds)
    for p, g in zip(preds, gts):
        meter.update(p, g)
    return meter.compute()
