"""SegViT: ATM mask semantics, Shrunk down/up-sampling, forward shapes, open vocabulary, loss, checkpoints, FLOPs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

import vocabseg
from vocabseg.errors import CheckpointError, ConfigError
from vocabseg.losses.segvit import ATMCriterion, class_bound_targets
from vocabseg.models import create_model
from vocabseg.models.segvit import MaskingCrossAttention, neighbourhood_mask, query_downsample

TINY = "segvit_tiny_test"
SHRUNK = {"qd_block": 2, "layers": (2, 4)}  # QD at block index 2 of 4; QU reads layers 2 (full) and 4 (half grid)
EMBED = 32


def _model(**overrides):
    torch.manual_seed(0)
    return create_model(TINY, **overrides)


def _text(c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(c, EMBED, generator=g), dim=-1)


# ----------------------------------------------------------------------------------------------- ATM semantics


def _reference_attention(attn: MaskingCrossAttention, queries, memory):
    """Recompute q·kᵀ/√d per head, softmax·v and the projection from the module's weights, independently."""
    b, nq, c = queries.shape
    h, d = attn.heads, c // attn.heads
    q = (queries @ attn.q.weight.T + attn.q.bias).view(b, nq, h, d).permute(0, 2, 1, 3)
    k = (memory @ attn.k.weight.T + attn.k.bias).view(b, -1, h, d).permute(0, 2, 1, 3)
    v = (memory @ attn.v.weight.T + attn.v.bias).view(b, -1, h, d).permute(0, 2, 1, 3)
    logits = torch.einsum("bhqd,bhnd->bhqn", q, k) / math.sqrt(d)
    out = torch.einsum("bhqn,bhnd->bhqd", logits.softmax(-1), v).permute(0, 2, 1, 3).reshape(b, nq, c)
    return logits, out @ attn.proj.weight.T + attn.proj.bias


def test_mask_is_head_mean_of_the_logits_the_attention_used():
    model = _model().eval()
    calls = []
    for stage in model.stages:
        for layer in stage:
            layer.cross_attn.capture = True
            layer.cross_attn.register_forward_hook(lambda mod, args, out: calls.append((mod, args, out)))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 40, 56), _text(4))
        stage_masks = []
        for i, (mod, (queries, memory, _bias), (output, mask)) in enumerate(calls):
            logits, ref_out = _reference_attention(mod, queries, memory)
            assert torch.allclose(mod.captured, logits, atol=1e-5)  # the logits the softmax consumed ...
            assert torch.allclose(output, ref_out, atol=1e-5)  # ... produced this attention output ...
            assert torch.allclose(mask, logits.mean(1), atol=1e-5)  # ... and their head mean is the mask
            if (i + 1) % model.config.decoder_layers == 0:  # last layer of a stage
                stage_masks.append(mask.unflatten(-1, (5, 7)))
    assert len(stage_masks) == 3
    assert torch.allclose(out["pred_masks"], sum(stage_masks), atol=1e-5)  # summed across stages
    assert torch.allclose(out["aux_outputs"][0]["pred_masks"], stage_masks[0], atol=1e-5)
    assert torch.allclose(out["aux_outputs"][1]["pred_masks"], stage_masks[0] + stage_masks[1], atol=1e-5)


def test_key_with_minus_inf_similarity_has_no_influence():
    """A key whose similarity is -inf gets mask sigmoid 0, and neither its content nor anything else about it changes
    the attention output or the other mask values; without the -inf, changing it does change both."""
    torch.manual_seed(0)
    attn = MaskingCrossAttention(dim=8, heads=2, dropout=0.0).eval()
    queries, memory = torch.randn(1, 3, 8), torch.randn(1, 6, 8)
    bias = torch.zeros(1, 1, 1, 6)
    bias[..., 4] = float("-inf")  # key 4 blocked for every query and head
    changed = memory.clone()
    changed[:, 4] = torch.randn(8) * 10
    with torch.no_grad():
        out_a, mask_a = attn(queries, memory, bias)
        out_b, mask_b = attn(queries, changed, bias)
        out_c, mask_c = attn(queries, changed)
        out_d, mask_d = attn(queries, memory)
    assert torch.all(mask_a[..., 4] == float("-inf")) and torch.all(mask_a[..., 4].sigmoid() == 0)
    assert torch.equal(mask_a[..., [0, 1, 2, 3, 5]], mask_b[..., [0, 1, 2, 3, 5]])
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert not torch.allclose(out_c, out_d, atol=1e-3) and not torch.allclose(mask_c[..., 4], mask_d[..., 4])
    # the unblocked similarities are the plain ones, shifted by nothing
    assert torch.allclose(mask_a[..., [0, 1, 2, 3, 5]], mask_d[..., [0, 1, 2, 3, 5]], atol=1e-6)


# ----------------------------------------------------------------------------------------------- Shrunk


def test_query_downsample_halves_the_grid():
    model = _model()
    block = model.clip.visual.transformer.resblocks[0]
    x = torch.randn(2, 1 + 5 * 7, 64)
    y, half = query_downsample(block, x, (5, 7))
    assert half == (3, 4) and y.shape == (2, 1 + 12, 64)
    # a query at stride 2 keeps its own token as the residual: with a zero block it is exactly that token
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
    y0, _ = query_downsample(block, x, (5, 7))
    grid = x[:, 1:].view(2, 5, 7, 64)
    assert torch.equal(y0[:, 1:].view(2, 3, 4, 64), grid[:, ::2, ::2])
    assert torch.equal(y0[:, 0], x[:, 0])


def test_query_downsample_neighbourhood_is_local():
    model = _model()
    block = model.clip.visual.transformer.resblocks[0]
    x = torch.randn(1, 1 + 4 * 6, 64)
    mask = neighbourhood_mask((4, 6), x.device)
    assert mask.shape == (1 + 6, 1 + 24) and mask[0].all() and mask[:, 0].all()
    assert int(mask[1:, 1:].sum()) == 24  # every token belongs to exactly one cell
    far = x.clone()
    far[:, 1 + 3 * 6 + 5] += 3.0 * torch.randn(64)  # token (3, 5): cell (1, 2) = query 1·3 + 2 = 5
    with torch.no_grad():
        a, _ = query_downsample(block, x, (4, 6), neighbourhood=True)
        b, _ = query_downsample(block, far, (4, 6), neighbourhood=True)
    changed = (a - b).abs().amax(-1)[0]  # per output token
    assert changed[1 + 5] > 1e-4 and changed[0] > 1e-4  # its own cell's query and [CLS] see it
    assert torch.all(changed[1:1 + 5] < 1e-6)  # the other queries do not


def test_shrunk_grid_halves_then_is_restored():
    model = _model(**SHRUNK).eval()
    x = torch.randn(1, 3, 70, 98)  # -> 72 x 104 padded, grid 9 x 13
    with torch.no_grad():
        feats, grid = model.backbone_features(F.pad(x, (0, 6, 0, 2)))
    assert grid == (9, 13)
    assert feats[2][1] == (9, 13) and feats[2][0].shape == (1, 9 * 13, 64)  # before QD: full grid
    assert feats[4][1] == (5, 7) and feats[4][0].shape == (1, 5 * 7, 64)  # after QD: half grid
    with torch.no_grad():
        up = model.upsampler([feats[2][0], feats[4][0]], grid)
        out = model(x, _text(5))
    assert up.shape == (1, 9 * 13, model.config.decoder_dim)  # QU: back to the full grid
    assert out["pred_masks"].shape == (1, 5, 9, 13) and out["pred_logits"].shape == (1, 5, 6)
    assert len(out["aux_outputs"]) == model.config.decoder_layers - 1


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("overrides", [{}, {"head": "closed"}, SHRUNK], ids=["open", "closed", "shrunk"])
def test_forward_shapes_at_odd_size(overrides):
    model = _model(**overrides).train()
    c = 6  # = num_classes of the tiny closed head
    out = model(torch.randn(2, 3, 70, 98), _text(c))
    assert out["pred_logits"].shape == (2, c, c + 1)
    assert out["pred_masks"].shape == (2, c, 9, 13)  # ceil(70 / 8), ceil(98 / 8)
    assert all(torch.isfinite(t).all() for t in (out["pred_logits"], out["pred_masks"]))
    loss = out["pred_logits"].mean() + out["pred_masks"].mean()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("clip."))
    assert not model.clip.training


def test_open_vocabulary_any_size_and_order():
    model = _model().eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        for c in (1, 3, 11):
            probs, masks = model.infer(x, _text(c))
            assert probs.shape == (1, c, c) and masks.shape == (1, c, 6, 8)
            assert torch.all(probs.sum(-1) <= 1 + 1e-6)
        text = _text(5)
        perm = torch.tensor([3, 0, 4, 1, 2])
        a, b = model(x, text), model(x, text[perm])
    # queries are bound to classes and carry no order: permuting the vocabulary permutes every output alike
    assert torch.allclose(b["pred_masks"], a["pred_masks"][:, perm], atol=1e-5)
    logits_perm = torch.cat([a["pred_logits"][:, perm][..., perm], a["pred_logits"][:, perm][..., -1:]], dim=-1)
    assert torch.allclose(b["pred_logits"], logits_perm, atol=1e-5)


def test_closed_head_rejects_other_vocabularies():
    model = _model(head="closed")
    with pytest.raises(ConfigError, match="6 training classes"):
        model(torch.randn(1, 3, 32, 32), _text(4))
    with pytest.raises(ConfigError, match="num_classes=4"):
        model.build_criterion(4)


def test_predict_at_odd_size():
    model = _model().eval()
    rgb = np.random.default_rng(0).integers(0, 256, (37, 81, 3), dtype=np.uint8)
    pixels, crop = model.prepare(rgb)
    assert pixels.shape[-2] % 16 == 0 and pixels.shape[-1] % 16 == 0 and crop == (64, 140)
    result = model.predict(rgb, ["one", "two", "three"])
    assert result.labels.shape == (37, 81) and set(np.unique(result.labels)) <= {0, 1, 2}


# ----------------------------------------------------------------------------------------------- loss


def test_loss_terms_on_hand_made_inputs():
    torch.manual_seed(0)
    c = 4
    labels = torch.tensor([[0, 0, 2, 255], [0, 2, 2, 255]])  # classes 0 and 2 present, 2 ignored pixels
    targets = [class_bound_targets(labels, ignore_index=255)]
    assert targets[0]["labels"].tolist() == [0, 2]
    logits = torch.randn(1, c, c + 1)
    masks = torch.randn(1, c, 2, 4)
    crit = ATMCriterion(c)
    losses = crit({"pred_logits": logits, "pred_masks": masks}, targets)
    # CE: query 0 -> class 0, query 2 -> class 2, queries 1 and 3 -> no-object (weight 0.1)
    tgt = torch.tensor([0, c, 2, c])
    w = torch.tensor([1.0, 1, 1, 1, 0.1])
    assert torch.allclose(losses["loss_ce"], F.cross_entropy(logits[0], tgt, weight=w))
    # focal and dice on the two present classes only, over the 6 valid pixels, divided by 2 masks
    valid = (labels != 255).flatten()
    src = masks[0, [0, 2]].flatten(1)[:, valid]
    t = torch.stack([(labels == 0), (labels == 2)]).flatten(1)[:, valid].float()
    p = src.sigmoid()
    ce = F.binary_cross_entropy_with_logits(src, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    focal = ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2).mean(1).sum() / 2
    dice = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum() / 2
    assert torch.allclose(losses["loss_mask"], focal) and torch.allclose(losses["loss_dice"], dice)
    total = crit.weighted_total(losses)
    assert torch.allclose(total, losses["loss_ce"] + 20 * focal + dice)
    # ignored pixels and absent classes' masks do not matter
    other = masks.clone()
    other[0, :, :, 3] += 7.0
    other[0, [1, 3]] -= 3.0
    again = crit({"pred_logits": logits, "pred_masks": other}, targets)
    assert torch.allclose(again["loss_mask"], losses["loss_mask"]) and torch.allclose(again["loss_dice"], dice)


def test_loss_upsamples_masks_and_handles_empty_images():
    crit = ATMCriterion(3)
    masks = torch.zeros(2, 3, 2, 2, requires_grad=True)
    logits = torch.zeros(2, 3, 4, requires_grad=True)
    labels = torch.full((2, 8, 8), 255)
    labels[0, :4] = 1
    targets = [class_bound_targets(lab) for lab in labels]
    losses = crit({"pred_logits": logits, "pred_masks": masks, "aux_outputs": [{"pred_logits": logits,
                                                                                  "pred_masks": masks}]}, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    crit.weighted_total(losses).backward()
    assert masks.grad is not None and logits.grad is not None
    with pytest.raises(ValueError, match="outside"):
        crit({"pred_logits": logits, "pred_masks": masks}, [class_bound_targets(torch.full((4, 4), 5))] * 2)


def test_loss_decreases_under_sgd():
    torch.manual_seed(0)
    c = 3
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, :, 8:] = 1
    labels[1, 8:] = 2
    labels[1, :2] = 255
    targets = [class_bound_targets(lab) for lab in labels]
    logits = torch.zeros(2, c, c + 1, requires_grad=True)
    masks = torch.zeros(2, c, 4, 4, requires_grad=True)
    crit = ATMCriterion(c)
    opt = torch.optim.SGD([logits, masks], lr=2.0)
    history = []
    for _ in range(8):
        total = crit.weighted_total(crit({"pred_logits": logits, "pred_masks": masks}, targets))
        history.append(total.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(b < a for a, b in zip(history, history[1:])) and history[-1] < 0.6 * history[0], history


def test_model_loss_decreases_in_a_few_steps():
    model = _model(dropout=0.0).train()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :, 16:] = 1
    labels[1, 16:] = 2
    text = _text(3)
    crit = model.build_criterion(3)
    targets = model.training_targets(labels, ignore_index=255)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    history = []
    for _ in range(6):
        total = crit.weighted_total(crit(model(images, text), targets))
        history.append(total.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert history[-1] < history[0], history


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("overrides", [{}, SHRUNK], ids=["plain", "shrunk"])
def test_save_load_round_trip(overrides, tmp_path):
    model = _model(**overrides).eval()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "segvit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = vocabseg.load_model(TINY, checkpoint=path, **overrides)
    x, text = torch.randn(1, 3, 40, 48), _text(3)
    with torch.no_grad():
        a, b = model(x, text), loaded(x, text)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_masks"], b["pred_masks"])
    with pytest.raises(CheckpointError, match="missing"):
        vocabseg.load_model(TINY, checkpoint=path, head="closed")


# ----------------------------------------------------------------------------------------------- paper numbers


def _macs(name: str, size: int, classes: int = 150, **overrides) -> float:
    with torch.device("meta"):
        model = create_model(name, head="closed", **overrides).eval()
        x = torch.empty(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2  # torch counts 2 FLOPs per multiply-add; the paper (fvcore) counts 1


@pytest.mark.parametrize("name, size, paper_size, paper, overrides", [
    ("segvit_vit_b_16", 512, 512, 120.9e9, {}),
    # Our L is patch 14: at 560 px it has the paper's 40 x 40 tokens (640 px with patch 16).
    ("segvit_vit_large_14", 560, 640, 637.9e9, {}),
    ("segvit_shrunk_vit_large_14", 560, 640, 373.5e9, {"qu_grid": 40}),
])
def test_flops_match_paper(name, size, paper_size, paper, overrides):
    """The release counts its forward_dummy, which ends with the class x mask einsum at the image size
    (150 x 150 x H x W multiply-adds); our model leaves that to the post-processing, so it is added here."""
    macs = _macs(name, size, **overrides) + 150 * 150 * paper_size * paper_size
    assert abs(macs - paper) / paper < 0.005, macs / 1e9


# ----------------------------------------------------------------------------------------------- engine


class _Halves:
    """Two classes split left/right (a few 32-px images), for a short run of the real trainer."""

    class_names = ["left", "right"]
    ignore_index = 255

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        image = torch.zeros(3, 32, 32, dtype=torch.uint8)
        image[:, :, 16:] = 200
        label = torch.zeros(32, 32, dtype=torch.long)
        label[:, 16:] = 1
        label[:2] = 255
        return {"image": image, "label": label, "index": i, "name": f"img{i}"}


def test_trainer_runs_segvit(tmp_path, monkeypatch):
    import warnings

    from vocabseg.engine import TrainConfig, train

    monkeypatch.setenv("VOCABSEG_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(model=TINY, output_dir=str(tmp_path / "run"), max_iters=3, batch_size=2, lr=1e-3, crop_size=32,
                      log_every=1, checkpoint_every=0, keep_checkpoints=0, eval_every=3, num_workers=0, device="cpu",
                      progress=False, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random CLIP
        result = train(cfg, train_dataset=_Halves(), val_dataset=_Halves())
    assert result["iteration"] == 3 and math.isfinite(result["losses"]["total_loss"])
    assert "mIoU" in result["metrics"]
