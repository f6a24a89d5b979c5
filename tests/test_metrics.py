"""Tests for vocabseg.metrics against hand-computed examples and a slow independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vocabseg.errors import DatasetError
from vocabseg.metrics import ConfusionMatrix, ReferringMeter, referring_metrics, segmentation_metrics

KEYS = ("mIoU", "fwIoU", "mACC", "pACC")


def reference_metrics(preds, gts, k, ignore):
    """Per-class loops over pixel sets, written independently of the confusion-matrix code."""
    pred = np.concatenate([np.ravel(p) for p in preds])
    gt = np.concatenate([np.ravel(g) for g in gts])
    valid = gt != ignore
    iou, acc, freq = [], [], []
    for c in range(k):
        g = (gt == c) & valid
        p = (pred == c) & valid
        if g.sum() == 0:
            iou.append(math.nan)
            acc.append(math.nan)
            freq.append(0.0)
            continue
        inter = int((g & p).sum())
        iou.append(inter / int((g | p).sum()))
        acc.append(inter / int(g.sum()))
        freq.append(g.sum() / valid.sum())
    iou_a, acc_a = np.array(iou), np.array(acc)
    has = ~np.isnan(iou_a)
    correct = sum(int(((gt == c) & (pred == c) & valid).sum()) for c in range(k))
    return {
        "mIoU": 100 * iou_a[has].mean(),
        "mACC": 100 * acc_a[has].mean(),
        "pACC": 100 * correct / valid.sum(),
        "fwIoU": 100 * sum(f * i for f, i in zip(freq, iou) if not math.isnan(i)),
        "IoU": [100 * v for v in iou],
        "ACC": [100 * v for v in acc],
    }


def assert_same(m, ref):
    for key in KEYS:
        assert m[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    np.testing.assert_allclose(m["IoU"], ref["IoU"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(m["ACC"], ref["ACC"], rtol=1e-12, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# semantic segmentation
# ---------------------------------------------------------------------------------------------


def test_hand_computed_example():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 0, 1]])  # last pixel ignored whatever is predicted
    m = segmentation_metrics(pred, gt, num_classes=2)
    # class 0: gt 4 px, tp 3, predicted-as-0 = 4 -> IoU 3/5, ACC 3/4
    # class 1: gt 3 px, tp 2, predicted-as-1 = 3 -> IoU 2/4, ACC 2/3
    assert m["IoU"] == pytest.approx([60.0, 50.0])
    assert m["ACC"] == pytest.approx([75.0, 200 / 3])
    assert m["mIoU"] == pytest.approx(55.0)
    assert m["mACC"] == pytest.approx((75.0 + 200 / 3) / 2)
    assert m["pACC"] == pytest.approx(500 / 7)
    assert m["fwIoU"] == pytest.approx(4 / 7 * 60 + 3 / 7 * 50)
    assert all(isinstance(m[k], float) for k in KEYS)


def test_perfect_prediction_scores_100():
    gt = np.random.default_rng(0).integers(0, 5, size=(9, 11))
    m = segmentation_metrics(gt, gt, num_classes=5)
    assert all(m[k] == pytest.approx(100.0) for k in KEYS)


def test_class_only_predicted_is_nan_but_hurts_the_true_class():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # class 2 has no ground truth
    m = segmentation_metrics(pred, gt, num_classes=3)
    assert math.isnan(m["IoU"][2]) and math.isnan(m["ACC"][2])
    assert m["IoU"][:2] == pytest.approx([50.0, 100.0])
    assert m["mIoU"] == pytest.approx(75.0)  # mean over classes 0 and 1 only
    assert m["mACC"] == pytest.approx(75.0)
    assert m["pACC"] == pytest.approx(75.0)


def test_predictions_outside_the_class_range_are_wrong():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 7, 1, -3])
    m = segmentation_metrics(pred, gt, num_classes=2)
    assert m["IoU"] == pytest.approx([50.0, 50.0])
    assert m["ACC"] == pytest.approx([50.0, 50.0])
    assert m["pACC"] == pytest.approx(50.0)
    # A prediction equal to the ignore value on a valid pixel is wrong too.
    m = segmentation_metrics(np.array([255, 0]), np.array([0, 0]), num_classes=2)
    assert m["ACC"][0] == pytest.approx(50.0)


def test_ignored_pixels_do_not_count_whatever_is_predicted():
    gt = np.array([0, 1, 255, 255])
    a = segmentation_metrics(np.array([0, 1, 0, 0]), gt, num_classes=2)
    b = segmentation_metrics(np.array([0, 1, 1, 9]), gt, num_classes=2)
    assert a == b
    assert a["mIoU"] == pytest.approx(100.0)
    c = segmentation_metrics(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 1]), num_classes=2, ignore_index=None)
    assert c["pACC"] == pytest.approx(50.0)
    d = segmentation_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), num_classes=2, ignore_index=0)
    assert math.isnan(d["IoU"][0]) and d["IoU"][1] == pytest.approx(100.0)


@pytest.mark.parametrize("seed", range(5))
def test_random_arrays_match_independent_computation(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    gt = rng.integers(0, k, size=(23, 17))
    gt[rng.random(gt.shape) < 0.15] = 255
    gt[gt == k - 1] = 0  # the last class never appears in the ground truth
    pred = rng.integers(-1, k + 2, size=gt.shape)  # includes out-of-range predictions
    pred = np.where(rng.random(gt.shape) < 0.5, np.where(gt == 255, 0, gt), pred)
    m = segmentation_metrics(pred, gt, k)
    assert_same(m, reference_metrics([pred], [gt], k, 255))
    assert math.isnan(m["IoU"][k - 1])


def test_list_inputs_streaming_and_merge_equal_batch():
    rng = np.random.default_rng(42)
    k = 6
    shapes = [(5, 7), (8, 3), (4, 4)]
    gts = [rng.integers(0, k, size=s).astype(np.uint8) for s in shapes]  # uint8 must not overflow
    preds = [rng.integers(0, k, size=s).astype(np.uint8) for s in shapes]
    for g in gts:
        g[0, 0] = 255
    m_list = segmentation_metrics(preds, gts, k)
    assert_same(m_list, reference_metrics(preds, gts, k, 255))
    cm = ConfusionMatrix(k)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    assert cm.compute() == m_list
    a, b = ConfusionMatrix(k), ConfusionMatrix(k)
    a.update(preds[0], gts[0])
    b.update(preds[1], gts[1])
    b.update(preds[2], gts[2])
    assert a.merge(b).compute() == m_list
    batch = segmentation_metrics(np.stack([preds[2]] * 2), np.stack([gts[2]] * 2), k)
    assert_same(batch, reference_metrics([preds[2]] * 2, [gts[2]] * 2, k, 255))
    cm.reset()
    assert int(cm.matrix.sum()) == 0


def test_confusion_matrix_layout():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 1, 5]), np.array([0, 0, 2, 2]))
    expected = np.zeros((3, 4), np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[2, 1] = 1
    expected[2, 3] = 1  # prediction 5 goes to the 'other' column
    np.testing.assert_array_equal(cm.matrix, expected)


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    gt = torch.tensor([[0, 1], [1, 1]])
    pred = torch.tensor([[0, 1], [0, 1]])
    m = segmentation_metrics(pred, gt, 2)
    assert m == segmentation_metrics(pred.numpy(), gt.numpy(), 2)
    assert m["pACC"] == pytest.approx(75.0)


def test_all_ignored_gives_nan_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = segmentation_metrics(np.zeros((2, 2), int), np.full((2, 2), 255), 3)
    assert all(math.isnan(m[k]) for k in KEYS)
    assert all(math.isnan(v) for v in m["IoU"])


def test_semantic_errors():
    with pytest.raises(DatasetError, match="shape"):
        segmentation_metrics(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(DatasetError, match="label 5"):
        segmentation_metrics(np.zeros(3, int), np.array([0, 5, 1]), 2)
    with pytest.raises(DatasetError):
        segmentation_metrics([np.zeros(2, int)], [np.zeros(2, int)] * 2, 2)
    with pytest.raises(ValueError):
        segmentation_metrics(np.zeros(3), np.zeros(3, int), 2)  # float predictions (e.g. logits)
    with pytest.raises(ValueError):
        ConfusionMatrix(0)
    with pytest.raises(ValueError):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))


# ---------------------------------------------------------------------------------------------
# referring segmentation
# ---------------------------------------------------------------------------------------------


def test_referring_hand_computed():
    gt1 = np.array([1, 1, 1, 1, 0, 0], bool)
    p1 = np.array([1, 1, 1, 0, 1, 0], bool)  # I=3, U=5 -> 0.6
    gt2 = np.array([1, 1, 0, 0, 0, 0], bool)
    p2 = np.array([1, 1, 0, 0, 0, 0], bool)  # I=2, U=2 -> 1.0
    gt3 = np.array([0, 0, 1, 1, 1, 1], bool)
    p3 = np.array([1, 0, 0, 0, 0, 0], bool)  # I=0, U=5 -> 0.0
    m = referring_metrics([p1, p2, p3], [gt1, gt2, gt3])
    assert m["mIoU"] == pytest.approx(100 * 1.6 / 3)
    assert m["oIoU"] == pytest.approx(100 * 5 / 12)
    assert m["Prec@0.5"] == pytest.approx(200 / 3)
    assert m["Prec@0.6"] == pytest.approx(200 / 3)  # IoU exactly 0.6 counts as >= 0.6
    assert m["Prec@0.7"] == pytest.approx(100 / 3)
    assert m["Prec@0.8"] == pytest.approx(100 / 3)
    assert m["Prec@0.9"] == pytest.approx(100 / 3)
    assert set(m) == {"mIoU", "oIoU", "Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9"}


def test_referring_empty_targets():
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    m = referring_metrics([empty, full], [empty, empty])  # right "no target", then a false alarm
    assert m["mIoU"] == pytest.approx(50.0)
    assert m["oIoU"] == pytest.approx(0.0)
    assert m["Prec@0.9"] == pytest.approx(50.0)
    assert referring_metrics([empty], [empty])["oIoU"] == pytest.approx(100.0)


def test_referring_meter_streams_and_merges():
    rng = np.random.default_rng(3)
    preds = [rng.random((6, 5)) < 0.5 for _ in range(7)]
    gts = [rng.random((6, 5)) < 0.5 for _ in range(7)]
    batch = referring_metrics(preds, gts, thresholds=(0.25, 0.5))
    assert set(batch) == {"mIoU", "oIoU", "Prec@0.25", "Prec@0.5"}
    a, b = ReferringMeter((0.25, 0.5)), ReferringMeter((0.25, 0.5))
    for i, (p, g) in enumerate(zip(preds, gts)):
        (a if i < 3 else b).update(p, g)
    assert len(a) == 3
    assert a.merge(b).compute() == batch
    ious = [(p & g).sum() / (p | g).sum() for p, g in zip(preds, gts)]
    assert batch["mIoU"] == pytest.approx(100 * np.mean(ious))
    assert batch["Prec@0.25"] == pytest.approx(100 * np.mean([i >= 0.25 for i in ious]))
    inter = sum(int((p & g).sum()) for p, g in zip(preds, gts))
    union = sum(int((p | g).sum()) for p, g in zip(preds, gts))
    assert batch["oIoU"] == pytest.approx(100 * inter / union)


def test_referring_errors_and_empty_meter():
    assert all(math.isnan(v) for v in ReferringMeter().compute().values())
    m = ReferringMeter()
    m.update(np.array([0, 1]), np.array([1, 1]))  # 0/1 integers are accepted as masks
    assert m.compute()["mIoU"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="threshold"):
        m.update(np.array([0.2, 0.9]), np.array([1, 1], bool))
    with pytest.raises(DatasetError):
        m.update(np.zeros(2, bool), np.zeros(3, bool))
    with pytest.raises(DatasetError):
        referring_metrics([np.zeros(2, bool)], [])
