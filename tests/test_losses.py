"""Tests for the mask-classification losses (matcher, criterion, point sampling)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from vocabseg.losses import (
    HungarianMatcher,
    SetCriterion,
    dice_loss,
    pairwise_bce_cost,
    pairwise_dice_cost,
    point_sample,
    sample_points_by_uncertainty,
    sigmoid_bce_loss,
    sigmoid_focal_loss,
    targets_from_semantic,
)
from vocabseg.losses.criterion import _reduce_num_masks

WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------- per-mask losses
def test_dice_loss_hand_computed() -> None:
    x = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])  # sigmoid: [.5, .75], [.75, .5]
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    d0 = 1 - (2 * 0.5 + 1) / (1.25 + 1 + 1)
    d1 = 1 - (2 * 1.25 + 1) / (1.25 + 2 + 1)
    assert dice_loss(x, t).item() == pytest.approx((d0 + d1) / 2, abs=1e-6)
    assert dice_loss(x, t, num_masks=4.0).item() == pytest.approx((d0 + d1) / 4, abs=1e-6)
    assert dice_loss(x[:1], t[:1]).item() == pytest.approx(d0, abs=1e-6)


def test_sigmoid_bce_loss_hand_computed() -> None:
    x = torch.tensor([[0.0, math.log(3.0)]])
    t = torch.tensor([[1.0, 0.0]])
    # BCE(0, 1) = ln 2; BCE(ln 3, 0) = -ln(1 - 0.75) = ln 4; mean over the 2 points.
    expected = (math.log(2.0) + math.log(4.0)) / 2
    assert sigmoid_bce_loss(x, t).item() == pytest.approx(expected, abs=1e-6)
    assert sigmoid_bce_loss(x, t, num_masks=2.0).item() == pytest.approx(expected / 2, abs=1e-6)
    # boolean targets are accepted
    assert sigmoid_bce_loss(x, t.bool()).item() == pytest.approx(expected, abs=1e-6)


def test_sigmoid_focal_loss_hand_computed() -> None:
    x = torch.tensor([[0.0, math.log(3.0)]])
    t = torch.tensor([[1.0, 0.0]])
    # point 0: p=.5, t=1 -> p_t=.5, alpha_t=.25; point 1: p=.75, t=0 -> p_t=.25, alpha_t=.75
    f0 = 0.25 * (1 - 0.5) ** 2 * math.log(2.0)
    f1 = 0.75 * (1 - 0.25) ** 2 * math.log(4.0)
    assert sigmoid_focal_loss(x, t).item() == pytest.approx((f0 + f1) / 2, abs=1e-6)
    # gamma = 3, no alpha
    g = ((0.5**3) * math.log(2.0) + (0.75**3) * math.log(4.0)) / 2
    assert sigmoid_focal_loss(x, t, alpha=-1, gamma=3.0).item() == pytest.approx(g, abs=1e-6)
    # gamma = 0 without alpha is plain BCE
    y = torch.randn(3, 7)
    s = (torch.rand(3, 7) > 0.5).float()
    assert torch.allclose(sigmoid_focal_loss(y, s, alpha=-1, gamma=0.0), sigmoid_bce_loss(y, s), atol=1e-6)


def test_pairwise_costs_equal_per_pair_losses() -> None:
    pred = torch.randn(4, 30)
    tgt = (torch.rand(3, 30) > 0.5).float()
    tgt[2] = torch.rand(30)  # soft targets (as produced by bilinear sampling) are handled too
    bce = pairwise_bce_cost(pred, tgt)
    dice = pairwise_dice_cost(pred, tgt)
    assert bce.shape == dice.shape == (4, 3)
    for q in range(4):
        for n in range(3):
            assert bce[q, n].item() == pytest.approx(sigmoid_bce_loss(pred[q : q + 1], tgt[n : n + 1]).item(), abs=1e-5)
            assert dice[q, n].item() == pytest.approx(dice_loss(pred[q : q + 1], tgt[n : n + 1]).item(), abs=1e-5)


# ---------------------------------------------------------------------------- point sampling
def test_point_sample_pixel_centres_and_axes() -> None:
    img = torch.arange(12.0).reshape(1, 3, 4)  # H=3, W=4
    # pixel (row r, col c) has centre x=(c+.5)/W, y=(r+.5)/H
    rc = [(0, 0), (0, 3), (2, 1), (1, 2)]
    coords = torch.tensor([[[(c + 0.5) / 4, (r + 0.5) / 3] for r, c in rc]])
    out = point_sample(img, coords)
    assert out.shape == (1, 4)
    assert out[0].tolist() == pytest.approx([img[0, r, c].item() for r, c in rc], abs=1e-5)
    # halfway between two horizontal neighbours: their mean (bilinear)
    mid = torch.tensor([[[1.0 / 4, 0.5 / 3]]])  # between col 0 and col 1 of row 0
    assert point_sample(img, mid).item() == pytest.approx(0.5, abs=1e-5)
    # 4-D input keeps a channel dimension
    out4 = point_sample(img.unsqueeze(1).repeat(1, 2, 1, 1), coords)
    assert out4.shape == (1, 2, 4)


def test_sample_points_by_uncertainty_picks_low_magnitude_band() -> None:
    # |logit| is 0 in the middle half of the columns and 10 elsewhere: the uncertain band.
    logits = torch.full((2, 1, 32, 32), 10.0)
    logits[0, :, :, 8:24] = 0.0
    logits[1, :, 8:24, :] = 0.0  # second mask: band along the other axis
    logits[1, :, :8, :] = -10.0
    n, ratio = 64, 0.75
    coords = sample_points_by_uncertainty(logits, n, oversample_ratio=3.0, importance_sample_ratio=ratio)
    assert coords.shape == (2, n, 2)
    assert coords.min() >= 0 and coords.max() <= 1
    k = int(ratio * n)
    # importance points lie in the band (a pixel of margin for bilinear blending)...
    x0, y1 = coords[0, :k, 0], coords[1, :k, 1]
    lo, hi = 8 / 32 - 1 / 32, 24 / 32 + 1 / 32
    assert ((x0 >= lo) & (x0 <= hi)).all()
    assert ((y1 >= lo) & (y1 <= hi)).all()
    # ...and where the logit actually is ~0, i.e. more uncertain than anything outside
    vals = point_sample(logits, coords)[:, 0, :k]
    assert vals.abs().max() < 5.0
    # the remaining points are uniform, so some fall outside the band (P(all inside) = 2^-16)
    x_rest = coords[0, k:, 0]
    assert ((x_rest < 0.25) | (x_rest > 0.75)).any()


def test_sample_points_without_importance_is_uniform_over_image() -> None:
    logits = torch.zeros(1, 1, 8, 8)
    logits[..., :4] = 10.0  # left half certain
    coords = sample_points_by_uncertainty(logits, 4000, oversample_ratio=1.0, importance_sample_ratio=0.0)
    frac_left = (coords[0, :, 0] < 0.5).float().mean().item()
    assert frac_left == pytest.approx(0.5, abs=0.05)
    coords = sample_points_by_uncertainty(logits, 4000, oversample_ratio=3.0, importance_sample_ratio=1.0)
    frac_left = (coords[0, :, 0] < 0.5).float().mean().item()
    assert frac_left < 0.05


# ---------------------------------------------------------------------------- matcher
def _reference_cost(logits: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask2Former matching cost written out pair by pair on all pixels (no shared code)."""
    q_n, t_n = pred.shape[0], masks.shape[0]
    prob = torch.exp(logits.double()) / torch.exp(logits.double()).sum(-1, keepdim=True)
    cost = torch.zeros(q_n, t_n, dtype=torch.float64)
    for q in range(q_n):
        p = pred[q].double().flatten()
        s = 1.0 / (1.0 + torch.exp(-p))
        for n in range(t_n):
            t = masks[n].double().flatten()
            bce = -(t * torch.log(s) + (1 - t) * torch.log(1 - s)).mean()
            dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
            cost[q, n] = 2.0 * -prob[q, labels[n]] + 5.0 * bce + 5.0 * dice
    return cost


def _brute_force(cost: torch.Tensor) -> tuple[float, set[tuple[int, int]]]:
    q_n, t_n = cost.shape
    best, best_pairs = math.inf, set()
    if t_n <= q_n:
        for perm in itertools.permutations(range(q_n), t_n):
            total = sum(cost[perm[n], n].item() for n in range(t_n))
            if total < best:
                best, best_pairs = total, {(perm[n], n) for n in range(t_n)}
    else:
        for perm in itertools.permutations(range(t_n), q_n):
            total = sum(cost[q, perm[q]].item() for q in range(q_n))
            if total < best:
                best, best_pairs = total, {(q, perm[q]) for q in range(q_n)}
    return best, best_pairs


@pytest.mark.parametrize("q_n,t_n", [(1, 1), (3, 2), (4, 4), (5, 3), (5, 4), (2, 3)])
def test_matcher_matches_brute_force(q_n: int, t_n: int) -> None:
    k, h, w = 4, 5, 6
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=None)
    for trial in range(5):
        torch.manual_seed(100 * q_n + 10 * t_n + trial)
        logits = torch.randn(2, q_n, k + 1) * 2
        pred = torch.randn(2, q_n, h, w) * 3
        targets = [
            {"labels": torch.randint(0, k, (t_n,)), "masks": torch.rand(t_n, h, w) > 0.5} for _ in range(2)
        ]
        indices = matcher({"pred_logits": logits, "pred_masks": pred}, targets)
        for b, (pi, ti) in enumerate(indices):
            cost = _reference_cost(logits[b], pred[b], targets[b]["labels"], targets[b]["masks"])
            best, best_pairs = _brute_force(cost)
            assert pi.dtype == ti.dtype == torch.int64
            assert len(pi) == len(ti) == min(q_n, t_n)
            got = sum(cost[p, t].item() for p, t in zip(pi.tolist(), ti.tolist()))
            assert got == pytest.approx(best, abs=1e-5)
            assert set(zip(pi.tolist(), ti.tolist())) == best_pairs


def test_matcher_point_sampled_recovers_permutation_at_other_resolution() -> None:
    # 4 block-shaped targets at 64x64, predictions at 16x16 (blocks align with 4x4 cells).
    k = 5
    label_map = torch.zeros(64, 64, dtype=torch.long)
    label_map[:32, 32:] = 1
    label_map[32:, :32] = 2
    label_map[32:, 32:] = 4
    target = targets_from_semantic(label_map)
    small = F.interpolate(target["masks"].float()[None], size=(16, 16), mode="nearest")[0]
    perm = torch.tensor([3, 0, 5, 1])  # query perm[i] predicts target i
    q_n = 6
    pred = torch.full((q_n, 16, 16), -8.0)
    logits = torch.zeros(q_n, k + 1)  # class scores carry no information: masks must decide
    for i, q in enumerate(perm.tolist()):
        pred[q] = small[i] * 16 - 8
    matcher = HungarianMatcher(num_points=12544)
    (pi, ti), = matcher({"pred_logits": logits[None], "pred_masks": pred[None]}, [target])
    assert dict(zip(ti.tolist(), pi.tolist())) == {i: q for i, q in enumerate(perm.tolist())}


def test_matcher_handles_image_without_targets() -> None:
    matcher = HungarianMatcher(num_points=100)
    outputs = {"pred_logits": torch.randn(2, 3, 4), "pred_masks": torch.randn(2, 3, 8, 8)}
    targets = [
        {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)},
        {"labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8, dtype=torch.bool)},
    ]
    (p0, t0), (p1, t1) = matcher(outputs, targets)
    assert p0.numel() == t0.numel() == 0
    assert p1.numel() == t1.numel() == 1 and t1.item() == 0


# ---------------------------------------------------------------------------- targets
def test_targets_from_semantic() -> None:
    label_map = torch.tensor([[0, 0, 3, 255], [7, 3, 3, 255], [7, 7, 0, 0]])
    t = targets_from_semantic(label_map, ignore_index=255)
    assert t["labels"].tolist() == [0, 3, 7]
    assert t["labels"].dtype == torch.int64
    assert t["masks"].dtype == torch.bool and t["masks"].shape == (3, 3, 4)
    assert t["masks"][0].int().tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]
    assert t["masks"][1].int().tolist() == [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert t["masks"][2].int().tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert not t["masks"][:, :, 3][:, :2].any()  # ignored pixels are in no mask
    empty = targets_from_semantic(torch.full((2, 2), 255))
    assert empty["labels"].numel() == 0 and empty["masks"].shape == (0, 2, 2)


# ---------------------------------------------------------------------------- criterion
def _criterion(k: int, num_points: int | None = 2000) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    return SetCriterion(
        num_classes=k,
        matcher=matcher,
        weight_dict=WEIGHTS,
        no_object_weight=0.1,
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )


def _scene(k: int = 5, q_n: int = 6, size: int = 16, scale: float = 20.0):
    """One image with 3 segments and predictions that reproduce them exactly."""
    label_map = torch.zeros(size, size, dtype=torch.long)
    label_map[: size // 2, size // 2 :] = 2
    label_map[size // 2 :, :] = 4
    target = targets_from_semantic(label_map)
    pred = torch.full((q_n, size, size), -scale)
    logits = torch.full((q_n, k + 1), -5.0)
    logits[:, k] = 5.0
    for i, q in enumerate([4, 1, 2]):
        pred[q] = target["masks"][i].float() * 2 * scale - scale
        logits[q] = -5.0
        logits[q, target["labels"][i]] = 5.0
    return logits, pred, target


def test_criterion_perfect_predictions_dense() -> None:
    logits, pred, target = _scene()
    crit = _criterion(5, num_points=None)
    losses = crit({"pred_logits": logits[None], "pred_masks": pred[None], "aux_outputs": []}, [target])
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    assert losses["loss_mask"].item() < 1e-6
    assert losses["loss_dice"].item() < 1e-6
    assert losses["loss_ce"].item() < 1e-3
    # shuffling which query predicts which mask must not matter (matching is a set operation)
    shuffle = torch.tensor([5, 3, 0, 4, 2, 1])
    again = crit({"pred_logits": logits[shuffle][None], "pred_masks": pred[shuffle][None]}, [target])
    assert again["loss_mask"].item() < 1e-6 and again["loss_ce"].item() < 1e-3


def test_criterion_perfect_predictions_point_sampled_much_lower_than_wrong() -> None:
    logits, pred, target = _scene(size=32)
    crit = _criterion(5, num_points=3000)
    good = crit({"pred_logits": logits[None], "pred_masks": pred[None]}, [target])
    # a wrong prediction: every mask inverted
    bad = crit({"pred_logits": logits[None], "pred_masks": -pred[None]}, [target])
    # importance points concentrate on boundaries, where interpolated targets are soft, so
    # the perfect loss is not 0, but it must be far below the wrong one
    assert good["loss_mask"].item() < 0.2 * bad["loss_mask"].item()
    assert good["loss_dice"].item() < 0.3 * bad["loss_dice"].item()
    assert good["loss_dice"].item() < 0.1
    # with uniform points only a few land near boundaries, so the perfect loss is smaller still;
    # this shows the criterion really samples where the prediction is uncertain
    uniform = _criterion(5, num_points=3000)
    uniform.importance_sample_ratio = 0.0
    good_uniform = uniform({"pred_logits": logits[None], "pred_masks": pred[None]}, [target])
    assert good_uniform["loss_mask"].item() < 0.5 * good["loss_mask"].item()


def test_criterion_no_object_weighting_hand_computed() -> None:
    k = 2
    target = {"labels": torch.tensor([1]), "masks": torch.zeros(1, 4, 4, dtype=torch.uint8)}
    target["masks"][0, :, :2] = 1
    pred = torch.full((1, 3, 4, 4), -10.0)
    pred[0, 0, :, :2] = 10.0  # query 0 predicts the segment
    pred[0, 1:, :, 2:] = 10.0  # queries 1, 2 predict the complement
    rows = [[0.2, 1.0, -0.3], [0.5, -0.2, 0.1], [-1.0, 0.3, 0.8]]
    logits = torch.tensor([rows])
    crit = _criterion(k, num_points=None)
    assert crit.empty_weight.tolist() == pytest.approx([1.0, 1.0, 0.1])
    (pi, ti), = crit.matcher({"pred_logits": logits, "pred_masks": pred}, [target])
    assert pi.tolist() == [0] and ti.tolist() == [0]

    def ce(row: list[float], c: int) -> float:
        return -row[c] + math.log(sum(math.exp(v) for v in row))

    expected = (1.0 * ce(rows[0], 1) + 0.1 * ce(rows[1], 2) + 0.1 * ce(rows[2], 2)) / (1.0 + 0.1 + 0.1)
    losses = crit({"pred_logits": logits, "pred_masks": pred}, [target])
    assert losses["loss_ce"].item() == pytest.approx(expected, abs=1e-5)


def test_criterion_gradients_flow_and_aux_keys() -> None:
    k, q_n = 4, 5
    logits = torch.randn(2, q_n, k + 1, requires_grad=True)
    masks = torch.randn(2, q_n, 8, 8, requires_grad=True)
    aux = [
        {"pred_logits": torch.randn(2, q_n, k + 1, requires_grad=True), "pred_masks": torch.randn(2, q_n, 8, 8, requires_grad=True)}
        for _ in range(2)
    ]
    label_maps = [torch.randint(0, k, (32, 32)), torch.randint(0, k, (24, 40))]  # other resolutions
    targets = [targets_from_semantic(m) for m in label_maps]
    crit = _criterion(k, num_points=500)
    losses = crit({"pred_logits": logits, "pred_masks": masks, "aux_outputs": aux}, targets)
    expected_keys = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert set(losses) == expected_keys
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v)
    total = crit.weighted_total(losses)
    manual = sum(WEIGHTS[key.rsplit("_", 1)[0] if key[-1].isdigit() else key] * v for key, v in losses.items())
    assert total.item() == pytest.approx(manual.item(), rel=1e-6)
    total.backward(retain_graph=True)
    for t in [logits, masks] + [a[x] for a in aux for x in ("pred_logits", "pred_masks")]:
        assert t.grad is not None and t.grad.abs().sum() > 0
    # aux losses come from the aux predictions only
    logits.grad = None
    losses["loss_mask_1"].backward()
    assert logits.grad is None and masks.grad.abs().sum() > 0
    assert aux[1]["pred_masks"].grad.abs().sum() > 0


def test_weighted_total_skips_unweighted_and_rejects_none() -> None:
    crit = SetCriterion(3, HungarianMatcher(), weight_dict={"loss_ce": 2.0})
    losses = {"loss_ce": torch.tensor(1.5), "loss_ce_0": torch.tensor(0.5), "loss_dice": torch.tensor(9.0)}
    assert crit.weighted_total(losses).item() == pytest.approx(4.0)
    with pytest.raises(ValueError):
        crit.weighted_total({"loss_dice": torch.tensor(1.0)})


@pytest.mark.parametrize("num_points", [None, 300])
def test_criterion_images_without_targets(num_points: int | None) -> None:
    k, q_n = 3, 4
    logits = torch.randn(2, q_n, k + 1, requires_grad=True)
    masks = torch.randn(2, q_n, 8, 8, requires_grad=True)
    none = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16, dtype=torch.bool)}
    crit = _criterion(k, num_points=num_points)
    losses = crit({"pred_logits": logits, "pred_masks": masks, "aux_outputs": [{"pred_logits": logits, "pred_masks": masks}]}, [none, none])
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    assert losses["loss_mask"].requires_grad and losses["loss_dice_0"].requires_grad
    # every query targets no-object, so CE is the plain mean of -log p(no-object)
    expected = -F.log_softmax(logits.detach(), -1)[..., k].mean()
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), abs=1e-5)
    crit.weighted_total(losses).backward()
    assert logits.grad.abs().sum() > 0
    assert masks.grad is not None and masks.grad.abs().sum() == 0

    # mixed batch: mask losses come from the image that has targets
    one = targets_from_semantic(torch.randint(0, k, (16, 16)))
    mixed = crit({"pred_logits": logits.detach(), "pred_masks": masks.detach()}, [none, one])
    assert mixed["loss_mask"].item() > 0 and mixed["loss_dice"].item() > 0


def test_criterion_normalises_by_batch_mask_count() -> None:
    # Dense mode is deterministic: the batch loss is the mask-count-weighted mean of the
    # per-image losses (each image alone is normalised by its own count).
    k, q_n = 4, 5
    torch.manual_seed(3)
    logits = torch.randn(2, q_n, k + 1)
    masks = torch.randn(2, q_n, 8, 8)
    t0 = targets_from_semantic(torch.tensor([[0, 1], [0, 1]]).repeat_interleave(4, 0).repeat_interleave(4, 1))
    t1 = targets_from_semantic(torch.arange(4).reshape(2, 2).repeat_interleave(4, 0).repeat_interleave(4, 1))
    n0, n1 = len(t0["labels"]), len(t1["labels"])
    assert (n0, n1) == (2, 4)
    crit = _criterion(k, num_points=None)
    both = crit({"pred_logits": logits, "pred_masks": masks}, [t0, t1])
    a = crit({"pred_logits": logits[:1], "pred_masks": masks[:1]}, [t0])
    b = crit({"pred_logits": logits[1:], "pred_masks": masks[1:]}, [t1])
    for key in ("loss_mask", "loss_dice"):
        expected = (n0 * a[key] + n1 * b[key]) / (n0 + n1)
        assert both[key].item() == pytest.approx(expected.item(), rel=1e-5)


def test_num_masks_under_single_process_group(tmp_path) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    assert _reduce_num_masks(0, torch.device("cpu")) == 1.0
    assert _reduce_num_masks(6, torch.device("cpu")) == 6.0
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert _reduce_num_masks(6, torch.device("cpu")) == 6.0
    finally:
        dist.destroy_process_group()
