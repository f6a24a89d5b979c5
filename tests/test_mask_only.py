"""Mask-only targets: objects whose class is never taught, but whose masks SAN learns (``mask_only_classes``).

A target label ``>= K`` has no class cost in the Hungarian matcher and its query is left out of ``loss_ce``; the
trainer drops those classes from the text vocabulary and remaps their label ids to K, K+1, ... (train) or to
ignore (validation). Without such labels every loss is bit-identical to the plain criterion.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_engine import ShapesDataset, _one_thread, _text_cache  # noqa: F401 (autouse fixtures)

from vocabseg.engine import TrainConfig, train
from vocabseg.engine.distributed import DistInfo
from vocabseg.engine.trainer import SegmentationFamily, mask_only_remap
from vocabseg.errors import ConfigError
from vocabseg.losses import HungarianMatcher, SetCriterion, targets_from_semantic
from vocabseg.losses.mask import dense_points, pairwise_bce_cost, pairwise_dice_cost, point_sample

WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def _criterion(k: int, num_points: int | None = None) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    return SetCriterion(num_classes=k, matcher=matcher, weight_dict=WEIGHTS, no_object_weight=0.1,
                        num_points=num_points, oversample_ratio=3.0, importance_sample_ratio=0.75)


def _ce(row: list[float], c: int) -> float:
    return -row[c] + math.log(sum(math.exp(v) for v in row))


# ---------------------------------------------------------------------------------------------------- matcher


def test_matcher_cost_of_mask_only_target_has_no_class_term() -> None:
    torch.manual_seed(0)
    k, q_n = 3, 5
    logits = torch.randn(q_n, k + 1) * 3
    pred = torch.randn(q_n, 8, 8) * 4
    masks = torch.rand(3, 8, 8) > 0.5
    with_class = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=None)
    masks_only = HungarianMatcher(cost_class=0.0, cost_mask=5.0, cost_dice=5.0, num_points=None)
    # targets 1 and 2 are mask-only (K and K + 4), target 0 is taught class 1
    cost = with_class.cost_matrix(logits, pred, torch.tensor([1, k, k + 4]), masks)
    plain = masks_only.cost_matrix(logits, pred, torch.tensor([1, 1, 1]), masks)
    taught = with_class.cost_matrix(logits, pred, torch.tensor([1, 1, 1]), masks)
    torch.testing.assert_close(cost[:, 1:], plain[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(cost[:, :1], taught[:, :1], rtol=0, atol=0)
    # and the class term really is there for a taught target
    assert not torch.allclose(taught[:, :1], plain[:, :1])


def test_matcher_assigns_mask_only_target_by_mask_even_against_class_scores() -> None:
    k = 2
    target = {"labels": torch.tensor([k]), "masks": torch.zeros(1, 8, 8, dtype=torch.bool)}
    target["masks"][0, :, :4] = True
    pred = torch.full((1, 2, 8, 8), -10.0)
    pred[0, 0, :, :4] = 10.0  # query 0 predicts the mask
    pred[0, 1, :, 4:] = 10.0
    logits = torch.tensor([[[-5.0, -5.0, 5.0], [9.0, 9.0, -9.0]]])  # query 1 is very sure of a class
    (pi, ti), = HungarianMatcher(cost_class=50.0, num_points=None)({"pred_logits": logits, "pred_masks": pred},
                                                                 [target])
    assert pi.tolist() == [0] and ti.tolist() == [0]


# ---------------------------------------------------------------------------------------------------- criterion


def _taught_and_mask_only_case() -> tuple[int, dict, torch.Tensor, list[list[float]]]:
    """K = 2; target 0: taught class 1 (left half), target 1: mask-only (label K, right half); queries 0 and 1
    match them by mask, query 2 matches nothing; class logits ``rows`` (K + 1 columns)."""
    k = 2
    target = {"labels": torch.tensor([1, k]), "masks": torch.zeros(2, 4, 4, dtype=torch.bool)}
    target["masks"][0, :, :2] = True
    target["masks"][1, :, 2:] = True
    pred = torch.full((1, 3, 4, 4), -10.0)
    pred[0, 0, :, :2] = 10.0  # query 0 -> target 0
    pred[0, 1, :, 2:] = 10.0  # query 1 -> target 1 (mask-only)
    pred[0, 2, :2] = 10.0  # query 2 matches nothing
    return k, target, pred, [[0.2, 1.0, -0.3], [0.5, -0.2, 0.1], [-1.0, 0.3, 0.8]]


def test_ce_leaves_out_queries_matched_to_mask_only_targets_hand_computed() -> None:
    k, target, pred, rows = _taught_and_mask_only_case()
    logits = torch.tensor([rows])
    crit = _criterion(k)
    (pi, ti), = crit.matcher({"pred_logits": logits, "pred_masks": pred}, [target])
    assert dict(zip(pi.tolist(), ti.tolist())) == {0: 0, 1: 1}
    losses = crit({"pred_logits": logits, "pred_masks": pred}, [target])
    # query 1 targets neither a class nor no-object: only queries 0 (class 1) and 2 (no-object, weight 0.1) count
    expected = (1.0 * _ce(rows[0], 1) + 0.1 * _ce(rows[2], 2)) / (1.0 + 0.1)
    assert losses["loss_ce"].item() == pytest.approx(expected, abs=1e-6)
    # the mask losses see the mask-only target as any other: identical to teaching it as class 0
    taught = dict(target, labels=torch.tensor([1, 0]))
    as_class = crit({"pred_logits": logits, "pred_masks": pred}, [taught])
    assert losses["loss_mask"].item() == as_class["loss_mask"].item()
    assert losses["loss_dice"].item() == as_class["loss_dice"].item()


def test_objectness_term_teaches_mask_only_queries_to_be_objects_hand_computed() -> None:
    k, target, pred, rows = _taught_and_mask_only_case()
    logits = torch.tensor([rows], requires_grad=True)
    crit = _criterion(k)
    crit.mask_only_objectness = 0.5
    losses = crit({"pred_logits": logits, "pred_masks": pred}, [target])
    p_object = sum(math.exp(v) for v in rows[1][:k]) / sum(math.exp(v) for v in rows[1])
    expected = (1.0 * _ce(rows[0], 1) + 0.5 * -math.log(p_object) + 0.1 * _ce(rows[2], 2)) / (1.0 + 0.5 + 0.1)
    assert losses["loss_ce"].item() == pytest.approx(expected, abs=1e-6)
    losses["loss_ce"].backward()
    g = logits.grad[0, 1]
    # the mask-only query is pushed away from "no object" and towards both classes alike (in proportion to p)
    assert g[-1] > 0 and g[0] < 0 and g[1] < 0
    p = torch.tensor(rows[1]).softmax(-1)
    assert (g[0] / g[1]).item() == pytest.approx((p[0] / p[1]).item(), rel=1e-5)
    # weight 0: the plain mask-only CE (query 1 left out)
    crit.mask_only_objectness = 0.0
    plain = crit({"pred_logits": logits, "pred_masks": pred}, [target])["loss_ce"].item()
    assert plain == pytest.approx((1.0 * _ce(rows[0], 1) + 0.1 * _ce(rows[2], 2)) / 1.1, abs=1e-6)


def test_ce_of_all_mask_only_queries_is_zero_with_gradient() -> None:
    k = 2
    target = {"labels": torch.tensor([k, k + 1]), "masks": torch.zeros(2, 4, 4, dtype=torch.bool)}
    target["masks"][0, :, :2] = True
    target["masks"][1, :, 2:] = True
    logits = torch.randn(1, 2, k + 1, requires_grad=True)
    pred = torch.randn(1, 2, 4, 4, requires_grad=True)
    losses = _criterion(k)({"pred_logits": logits, "pred_masks": pred}, [target])
    assert losses["loss_ce"].item() == 0.0
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def _reference_losses(crit: SetCriterion, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
    """The criterion as it was before mask-only targets (class cost and CE copied from the old code)."""

    def cost_matrix(pred_logits, pred_masks, labels, masks):
        m = crit.matcher
        prob = pred_logits.float().softmax(-1)
        cost_class = -prob[:, labels]
        pred, tgt = pred_masks.float(), masks.float()
        if m.num_points is None:
            pred_pts, tgt_pts = dense_points(pred, tgt)
        else:
            coords = torch.rand(1, m.num_points, 2)
            tgt_pts = point_sample(tgt.unsqueeze(1), coords.expand(tgt.shape[0], -1, -1))[:, 0]
            pred_pts = point_sample(pred.unsqueeze(1), coords.expand(pred.shape[0], -1, -1))[:, 0]
        return (m.cost_class * cost_class + m.cost_mask * pairwise_bce_cost(pred_pts, tgt_pts)
                + m.cost_dice * pairwise_dice_cost(pred_pts, tgt_pts))

    def loss_labels(outputs, targets, indices):
        logits = outputs["pred_logits"].float()
        target_classes = torch.full(logits.shape[:2], crit.num_classes, dtype=torch.int64)
        for b, ((pred_idx, tgt_idx), target) in enumerate(zip(indices, targets)):
            if pred_idx.numel():
                target_classes[b, pred_idx] = target["labels"][tgt_idx]
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, weight=crit.empty_weight)}

    orig_cost, orig_labels = crit.matcher.cost_matrix, crit.loss_labels
    crit.matcher.cost_matrix, crit.loss_labels = cost_matrix, loss_labels
    try:
        return crit(outputs, targets)
    finally:
        crit.matcher.cost_matrix, crit.loss_labels = orig_cost, orig_labels


@pytest.mark.parametrize("num_points", [None, 500])
def test_no_mask_only_targets_gives_bit_identical_losses(num_points) -> None:
    k, q_n = 5, 7
    torch.manual_seed(11)
    label_maps = torch.randint(0, k, (2, 4, 4)).repeat_interleave(4, 1).repeat_interleave(4, 2)
    label_maps[0, :2] = 255
    targets = [targets_from_semantic(m) for m in label_maps]
    outputs = {"pred_logits": torch.randn(2, q_n, k + 1) * 2, "pred_masks": torch.randn(2, q_n, 16, 16) * 3}
    outputs["aux_outputs"] = [{"pred_logits": torch.randn(2, q_n, k + 1), "pred_masks": torch.randn(2, q_n, 8, 8)}]
    crit = _criterion(k, num_points)
    torch.manual_seed(5)
    new = crit(outputs, targets)
    torch.manual_seed(5)
    old = _reference_losses(crit, outputs, targets)
    assert set(new) == set(old)
    for key in new:
        assert torch.equal(new[key], old[key]), key


# ---------------------------------------------------------------------------------------------------- trainer


class _Dataset(ShapesDataset):
    """Sky over grass, a red square (taught) and a pink circle (mask-only) per 48-px image."""

    class_names = ["sky", "pink circle", "grass", "sand", "red square"]
    ignore_index = 255

    def __init__(self, n: int = 4, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(n):
            img = np.zeros((48, 48, 3), np.uint8)
            lab = np.zeros((48, 48), np.int64)
            img[:24], lab[:24] = (90, 150, 240), 0
            img[24:], lab[24:] = (40, 180, 60), 2
            img[40:], lab[40:] = (220, 200, 150), 3
            y, x = rng.integers(2, 20, 2)
            img[y:y + 12, x:x + 12], lab[y:y + 12, x:x + 12] = (220, 30, 30), 4
            img[30:38, 30:38], lab[30:38, 30:38] = (250, 140, 195), 1
            lab[0, 0] = 255
            self.items.append((img, lab))



def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(model="san_tiny_test", output_dir=str(tmp_path / "run"), max_iters=2, batch_size=2, lr=1e-3,
                crop_size=48, log_every=1, checkpoint_every=0, eval_every=0, num_workers=0, device="cpu",
                progress=False, seed=3, mask_only_classes=["sand", "pink circle"])
    base.update(kw)
    return TrainConfig(**base)


def test_remap_gives_taught_vocabulary_and_label_ids(tmp_path) -> None:
    taught, lut = mask_only_remap(_Dataset.class_names, ["sand", "pink circle", "sand"], 255)
    assert taught == ["sky", "grass", "red square"]
    assert lut[[0, 1, 2, 3, 4, 255]].tolist() == [0, 3, 1, 4, 2, 255]  # mask-only: K=3, 4 in dataset order
    _, val_lut = mask_only_remap(_Dataset.class_names, ["sand", "pink circle"], 255, keep_mask_only=False)
    assert val_lut[[0, 1, 2, 3, 4, 255]].tolist() == [0, 255, 1, 255, 2, 255]

    family = SegmentationFamily(_config(tmp_path), train_dataset=_Dataset(), val_dataset=_Dataset(seed=1),
                                transform=None)
    family.prepare(DistInfo())
    assert family.class_names == ["sky", "grass", "red square"]
    assert family.train_ds.class_names == family.val_ds.class_names == ["sky", "grass", "red square"]
    raw = _Dataset()[0]["label"]
    train_label = family.train_ds[0]["label"]
    assert train_label.dtype == torch.int64
    assert torch.equal(train_label, torch.from_numpy(lut)[raw])
    assert sorted(train_label.unique().tolist()) == [0, 1, 2, 3, 4, 255]
    val_raw, val_label = _Dataset(seed=1)[0]["label"], family.val_ds[0]["label"]
    assert torch.equal(val_label, torch.from_numpy(val_lut)[val_raw])
    assert sorted(val_label.unique().tolist()) == [0, 1, 2, 255]
    # the training targets: taught ids < K, mask-only ids K and K + 1
    from vocabseg.losses import targets_from_semantic as tfs

    assert tfs(train_label)["labels"].tolist() == [0, 1, 2, 3, 4]


def test_unknown_mask_only_class_is_a_one_line_config_error(tmp_path) -> None:
    family = SegmentationFamily(_config(tmp_path, mask_only_classes=["sand", "pink sqaure"]),
                                train_dataset=_Dataset(), transform=None)
    with pytest.raises(ConfigError, match="pink sqaure") as info:
        family.prepare(DistInfo())
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="every class"):
        mask_only_remap(["a", "b"], ["a", "b"], 255)


def test_mask_only_objectness_reaches_the_criterion_and_needs_mask_only_classes(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # randomly initialised CLIP
        family = SegmentationFamily(_config(tmp_path, mask_only_objectness=0.5), train_dataset=_Dataset(),
                                    transform=None)
        family.prepare(DistInfo())
        family.build_model(torch.device("cpu"))
        assert family.criterion.mask_only_objectness == 0.5
        alone = SegmentationFamily(_config(tmp_path, mask_only_classes=[], mask_only_objectness=0.5),
                                   train_dataset=_Dataset(), transform=None)
        alone.prepare(DistInfo())
        with pytest.raises(ConfigError, match="mask_only_objectness needs mask_only_classes"):
            alone.build_model(torch.device("cpu"))
    with pytest.raises(ConfigError, match="mask_only_objectness must be 0 or more"):
        TrainConfig(mask_only_objectness=-1.0).validate()


def test_training_with_mask_only_classes_runs_and_evaluates_taught_classes(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # randomly initialised CLIP
        result = train(_config(tmp_path, eval_every=2, val_split="val"), train_dataset=_Dataset(),
                       val_dataset=_Dataset(2, seed=1), transform=None)
    assert result["iteration"] == 2
    assert result["losses"] and all(math.isfinite(float(v)) for v in result["losses"].values())
    assert result["metrics"]["num_classes"] == 3  # evaluated on the taught classes only
