"""LSeg: pixel-text logits, zero-shot label swap, forward shapes, pixel cross-entropy, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vocabseg
from vocabseg.errors import CheckpointError
from vocabseg.losses.pixel import IGNORE, PixelCrossEntropy, pixel_targets
from vocabseg.models import create_model
from vocabseg.models.lseg import SpatialRegularization

TINY = "lseg_tiny_test"
EMBED = 32


def _model(**overrides):
    torch.manual_seed(0)
    return create_model(TINY, **overrides)


def _text(c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(c, EMBED, generator=g), dim=-1)


def test_logits_are_temperature_times_cosine():
    model = _model().eval()
    assert math.isclose(model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    assert model.logit_scale.requires_grad
    x = torch.randn(2, 3, 48, 64)
    text = torch.randn(5, EMBED) * 3  # not normalised: the model normalises both sides
    with torch.no_grad():
        logits = model(x, text)["logits"]
        pix = model.pixel_embeddings(x)  # [B, D, h, w]
    assert pix.shape == (2, EMBED, 48, 64)  # 8 x the token grid = full size for patch 8
    p = pix.permute(0, 2, 3, 1).reshape(-1, EMBED).double()
    p = p / p.norm(dim=1, keepdim=True)
    t = text.double() / text.double().norm(dim=1, keepdim=True)
    expected = (1 / 0.07) * (p @ t.T)  # [B*h*w, C]
    got = logits.permute(0, 2, 3, 1).reshape(-1, 5).double()
    assert torch.allclose(got, expected, atol=1e-4)
    assert got.abs().max() <= 1 / 0.07 + 1e-3
    with torch.no_grad():
        model.logit_scale.fill_(0.0)  # temperature 1
        again = model(x, text)["logits"].permute(0, 2, 3, 1).reshape(-1, 5).double()
        assert torch.allclose(again, expected * 0.07, atol=1e-5)


@pytest.mark.parametrize("spatial_reg", [None, "depthwise"])
def test_zero_shot_label_swap(spatial_reg):
    """New labels give a new C; a class's logits do not depend on which other labels are asked for."""
    model = _model(spatial_reg=spatial_reg).eval()
    x = torch.randn(1, 3, 40, 56)
    a, b = _text(3, seed=1), _text(7, seed=2)
    mixed = torch.cat([b[:2], a[1:2]])  # a's second class among new ones
    with torch.no_grad():
        la, lb, lm = (model(x, t)["logits"] for t in (a, b, mixed))
    assert la.shape == (1, 3, 40, 56) and lb.shape == (1, 7, 40, 56)
    assert torch.allclose(lm[:, 2], la[:, 1], atol=1e-5) and torch.allclose(lm[:, :2], lb[:, :2], atol=1e-5)
    assert torch.equal(model.infer(x, b), lb)


@pytest.mark.parametrize("readout", ["project", "add", "ignore"])
def test_forward_shapes_at_odd_size(readout):
    model = _model(readout=readout).train()
    out = model(torch.randn(2, 3, 70, 98), _text(4))["logits"]  # padded to 72 x 104, grid 9 x 13 (odd)
    assert out.shape == (2, 4, 72, 104) and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("clip."))
    assert model.reassemble[0].to_features.weight.grad is not None and model.logit_scale.grad is not None
    assert not model.clip.training


def test_spatial_regularization_blocks():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7)
    for kind in ("depthwise", "bottleneck"):
        reg = SpatialRegularization(kind, depth=2, activation="lrelu")
        y = reg(x)
        assert y.shape == x.shape
        assert reg(torch.randn(1, 11, 6, 7)).shape == (1, 11, 6, 7)  # any number of classes
    reg = SpatialRegularization("depthwise", depth=1, activation="relu")
    with torch.no_grad():
        reg.conv.weight.zero_()
        reg.conv.weight[..., 1, 1] = 1.0
        reg.conv.bias.zero_()
    assert torch.allclose(reg(x), x)  # identity kernel, last block without activation


def test_predict_at_odd_size():
    model = _model().eval()
    rgb = np.random.default_rng(0).integers(0, 256, (37, 81, 3), dtype=np.uint8)
    result = model.predict(rgb, ["one", "two", "three"])
    assert result.labels.shape == (37, 81) and set(np.unique(result.labels)) <= {0, 1, 2}


# ----------------------------------------------------------------------------------------------- loss


def test_pixel_cross_entropy_with_ignore():
    torch.manual_seed(0)
    labels = torch.tensor([[[0, 1, 255], [2, 255, 1]]])
    targets = pixel_targets(labels, ignore_index=255)
    assert targets.tolist() == [[[0, 1, IGNORE], [2, IGNORE, 1]]]
    logits = torch.randn(1, 3, 2, 3)
    crit = PixelCrossEntropy(3)
    loss = crit({"logits": logits}, targets)["loss_ce"]
    valid = labels[0] != 255
    manual = -torch.log_softmax(logits[0], dim=0).permute(1, 2, 0)[valid].gather(1, labels[0][valid][:, None]).mean()
    assert torch.allclose(loss, manual)
    # ignored pixels do not matter
    other = logits.clone()
    other[..., 0, 2] += 10
    assert torch.allclose(crit(other, targets)["loss_ce"], loss)
    # 255 stays a class when the dataset ignores something else
    assert pixel_targets(torch.tensor([[[255, 7]]]), ignore_index=7).tolist() == [[[255, IGNORE]]]


def test_pixel_cross_entropy_upsamples_and_edge_cases():
    crit = PixelCrossEntropy(2)
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    loss = crit({"logits": logits}, pixel_targets(labels))["loss_ce"]
    assert torch.allclose(loss, torch.tensor(math.log(2)))
    all_ignored = crit({"logits": logits}, pixel_targets(torch.full((1, 8, 8), 255)))["loss_ce"]
    assert all_ignored.item() == 0.0
    all_ignored.backward()
    assert logits.grad is not None
    with pytest.raises(ValueError, match="outside"):
        crit({"logits": logits}, pixel_targets(torch.full((1, 4, 4), 5)))
    assert torch.allclose(crit.weighted_total({"loss_ce": loss}), loss)


def test_model_loss_decreases_in_a_few_steps():
    model = _model().train()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :, 16:] = 1
    labels[1, 16:] = 2
    labels[0, :4] = 255
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


def test_save_load_round_trip(tmp_path):
    model = _model(spatial_reg="bottleneck").train()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
        model(torch.randn(2, 3, 32, 32), _text(3))  # moves the BatchNorm running statistics
    model.eval()
    assert not torch.equal(model.fusion[0].unit.bn1.running_mean, torch.zeros(16))
    path = tmp_path / "lseg.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = vocabseg.load_model(TINY, checkpoint=path, spatial_reg="bottleneck")
    x, text = torch.randn(1, 3, 40, 48), _text(4)
    with torch.no_grad():
        assert torch.equal(model(x, text)["logits"], loaded(x, text)["logits"])
    with pytest.raises(CheckpointError, match="unexpected"):
        vocabseg.load_model(TINY, checkpoint=path)  # the spatial-regularisation kernel has nowhere to go


def test_trainable_parameters():
    model = _model()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and not any(n.startswith("clip.") for n in names)
    fine_tuned = _model(train_image_encoder=True)
    names = {n for n, p in fine_tuned.named_parameters() if p.requires_grad}
    assert "clip.visual.transformer.resblocks.3.attn.in_proj_weight" in names
    assert not any(n.startswith("clip.visual.ln_post") or n == "clip.visual.proj" or n.startswith("clip.transformer")
                   for n in names)  # unused by LSeg, and the text tower stays frozen


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


def test_trainer_runs_lseg(tmp_path, monkeypatch):
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
