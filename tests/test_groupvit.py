"""GroupViT: straight-through Gumbel assignment, grouping shapes, caption nouns, zero-shot inference with the
background threshold, contrastive losses by hand, save/load (ours and the release's key layout), a 2-step training."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vocabseg
from vocabseg.engine.groupvit_train import (GroupViTTrainConfig, caption_nouns, collate_caption_nouns,
                                            prompted_nouns, train_groupvit)
from vocabseg.errors import CheckpointError
from vocabseg.losses.contrastive import image_text_contrastive_loss, multi_label_contrastive_loss
from vocabseg.models import create_model
from vocabseg.models import groupvit as gv

NAME = "groupvit_tiny_test"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(NAME).eval()


# ----------------------------------------------------------------------------------------------- assignment


def test_gumbel_straight_through_is_one_hot_forward_with_soft_gradients():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)  # [B, groups, tokens], normalised over dim 1
    gen = torch.Generator().manual_seed(1)
    hard = gv.straight_through_assign(logits, dim=1, hard=True, gumbel=True, tau=1.0, generator=gen)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.detach().sum(dim=1), torch.ones(2, 7))  # exactly one group per token
    weights = torch.randn(2, 5, 7)
    (hard * weights).sum().backward()
    grad = logits.grad.clone()
    assert grad.abs().sum() > 0
    # the backward pass is that of the soft (Gumbel-perturbed) softmax, with the same noise
    logits2 = logits.detach().clone().requires_grad_(True)
    soft = gv.straight_through_assign(logits2, dim=1, hard=False, gumbel=True, tau=1.0,
                                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(hard.detach(), F.one_hot(soft.detach().argmax(1), 5).permute(0, 2, 1).float())
    (soft * weights).sum().backward()
    assert torch.allclose(grad, logits2.grad)


def test_hard_assignment_without_noise_is_argmax():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [1.0, 3.0, -2.0]]])  # [1, 2 groups, 3 tokens]
    out = gv.straight_through_assign(logits, dim=1, hard=True, gumbel=False)
    assert torch.equal(out, torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]]))


def test_grouping_stages_shapes_and_hard_assignments(model):
    cfg = model.config
    x = torch.randn(2, 3, 32, 48)  # 4 x 6 patches of 8
    model.visual.train()
    try:
        tokens, assignments, grid = model.visual(x)
    finally:
        model.visual.eval()
    assert grid == (4, 6)
    assert tokens.shape == (2, cfg.num_output_groups[-1], cfg.width)  # 4 segments of width 32
    (a1, s1), (a2, s2) = assignments
    assert a1.shape == s1.shape == (2, 8, 24)  # 24 patches -> 8 groups
    assert a2.shape == s2.shape == (2, 4, 8)  # 8 segments -> 4 groups
    for a, s in assignments:
        assert torch.equal(a.sum(dim=1), torch.ones_like(a.sum(dim=1)))  # one-hot over groups
        assert torch.allclose(s.sum(dim=1), torch.ones_like(s.sum(dim=1)))
    groups = model.pixel_groups(assignments, grid, (8, 12))
    assert groups.shape == (2, 8, 12) and int(groups.max()) < 4


def test_grouping_config_is_checked():
    with pytest.raises(vocabseg.errors.ConfigError):
        create_model(NAME, num_group_tokens=(8, 4, 2))


# ----------------------------------------------------------------------------------------------- nouns


def test_caption_nouns_use_the_synonym_tables():
    assert caption_nouns("a photo of a spotted red square over water near a brick wall") == ["square", "water",
                                                                                               "wall"]
    assert caption_nouns("a white disc and a big dotted green donut on the lawn") == ["circle", "ring", "grass"]
    # generic "shapes" carry no noun; repeated nouns count once
    assert caption_nouns("a photo of two shapes against the sky: a red star, a blue star") == ["star", "sky"]
    assert caption_nouns("a picture of nothing") == []


def test_prompted_nouns_pick_distinct_nouns_and_pad_with_the_caption():
    rng = np.random.default_rng(0)
    cap = "a red star, a blue circle and a green heart on the beach near a road"
    texts = prompted_nouns(cap, 3, rng)
    assert len(texts) == 3 and len(set(texts)) == 3
    assert all(t.startswith("a photo of a ") and t.endswith(".") for t in texts)
    assert {t[len("a photo of a "):-1] for t in texts} <= {"star", "circle", "heart", "sand", "road"}
    short = prompted_nouns("a red star over water", 3, rng)
    assert sorted(short[:2]) == ["a photo of a star.", "a photo of a water."]
    assert short[2] == "a red star over water"
    assert prompted_nouns("a picture of nothing", 2, rng) == ["a picture of nothing"] * 2
    batch = collate_caption_nouns([(torch.zeros(3, 8, 8), cap, texts), (torch.zeros(3, 8, 8), cap, short)])
    assert batch["captions"].shape == (2, 77) and batch["nouns"].shape == (2, 3, 77)


# ----------------------------------------------------------------------------------------------- losses


def test_image_text_contrastive_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # scale exp(0) = 1, logits = identity: each row's CE = log(1 + e^-1)
    expected = math.log(1 + math.exp(-1))
    assert image_text_contrastive_loss(image, text, 0.0).item() == pytest.approx(expected, abs=1e-6)
    # the scale is clamped at 100
    big = image_text_contrastive_loss(image, text, math.log(1e4)).item()
    assert big == pytest.approx(math.log(1 + math.exp(-100)), abs=1e-6)


def test_multi_label_contrastive_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])  # [B=2, K=2, D=2]
    # logits (scale 1): image0 -> [1, 1, 0, 1], image1 -> [0, 0, 1, 0]; targets 1/2 on own two prompts
    lse0, lse1 = math.log(3 * math.e + 1), math.log(3 + math.e)
    img = ((0.5 * (lse0 - 1) + 0.5 * (lse0 - 1)) + (0.5 * (lse1 - 1) + 0.5 * (lse1 - 0))) / 2
    # per prompt -> images: prompts of image0 (e0, e0), of image1 (e1, e0); logits to images [1,0],[1,0],[0,1],[1,0]
    l2 = math.log(math.e + 1)
    per_label = ((l2 - 1) + (l2 - 1) + (l2 - 1) + (l2 - 0)) / 4
    expected = 0.5 * (img + per_label)
    assert multi_label_contrastive_loss(image, labels, 0.0).item() == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------------- zero-shot


def test_infer_shapes_and_background_rows(model):
    text = model.text_embeddings(["background", "star", "sky"])
    assert torch.equal(text[0], torch.zeros_like(text[0]))
    assert torch.allclose(text[1:].norm(dim=-1), torch.ones(2))
    x = torch.randn(1, 3, 40, 64)
    out = model.infer(x, text)
    assert out.shape == (1, 3, 10, 16)  # mask_stride 4
    assert set(out[0, 0].unique().tolist()) <= {0.0, 1.0}
    assert ((out[0, 1:] >= 0) & (out[0, 1:] <= 1)).all()
    other = create_model(NAME, background_names=())
    other.load_state_dict(model.state_dict())
    assert other.text_embeddings(["background"]).norm() > 0.5  # encoded like any name


def test_background_threshold_behaviour(model, monkeypatch):
    # two groups; group 0 scores 0.9 for class 1, group 1 at most 0.6. Pixels: left half group 0, right group 1.
    scores = torch.tensor([[[0.0, 0.9, 0.05], [0.0, 0.3, 0.6]]])
    groups = torch.zeros(1, 10, 16, dtype=torch.long)
    groups[..., 8:] = 1
    monkeypatch.setattr(model, "group_class_scores", lambda g, i, t: scores[..., scores.shape[-1] - t.shape[0]:])
    monkeypatch.setattr(model, "pixel_groups", lambda *a: groups)
    text = torch.zeros(3, model.config.text.embed_dim)
    text[1, 0] = text[2, 1] = 1.0  # row 0 = background
    x = torch.randn(1, 3, 40, 64)
    out = model.segment(x, text, background_threshold=0.95)  # limit = min(0.95, best group 0.9) = 0.9
    labels = out.argmax(1)[0]
    assert (labels[:, :8] == 1).all() and (labels[:, 8:] == 0).all()
    out = model.segment(x, text, background_threshold=0.5)
    labels = out.argmax(1)[0]
    assert (labels[:, :8] == 1).all() and (labels[:, 8:] == 2).all()
    out = model.segment(x, text[1:], background_threshold=0.95)  # no background row: every pixel gets a class
    assert out.shape[1] == 2 and (out.argmax(1)[0, :, 8:] == 1).all()


def test_predict_with_a_background_name(model):
    rgb = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    seg = model.predict(rgb, ["background", "star", "circle"])
    assert seg.labels.shape == (37, 50) and set(np.unique(seg.labels)) <= {0, 1, 2}


# ----------------------------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip(model, tmp_path):
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "gv.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = vocabseg.load_model(NAME, checkpoint=path)
    x = torch.randn(1, 3, 32, 32)
    text = model.text_embeddings(["star", "sky"])
    assert torch.equal(model.infer(x, text), loaded.infer(x, text))
    assert torch.equal(loaded.text_embeddings(["star", "sky"]), text)


def test_official_key_layout_round_trip(model):
    state = model.state_dict()
    official = gv.vocabseg_to_official(state)
    assert any(k.startswith("img_encoder.layers.0.downsample.assign.q_proj") for k in official)
    assert any(k.startswith("text_projector.linear_hidden.1.running_mean") for k in official)
    assert "text_encoder.transformer.resblocks.0.attn.in_proj_weight" in official
    assert gv.official_to_vocabseg(official).keys() == state.keys()
    other = create_model(NAME)
    other.load_checkpoint_state(official)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match="unknown"):
        gv.official_to_vocabseg({**official, "img_encoder_extra.weight": torch.zeros(1)})


def test_two_training_steps_move_the_weights(tmp_path):
    cfg = GroupViTTrainConfig(output_dir=str(tmp_path / "run"), model=NAME, image_resolution=32, batch_size=4,
                              max_iters=2, warmup_iters=1, log_every=1, checkpoint_every=2, num_workers=0,
                              world_min_size=64, world_max_size=64, eval_samples=0)
    path = train_groupvit(cfg, log=lambda *_: None)
    assert path.is_file() and (tmp_path / "run" / "checkpoint_0000002.pt").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "loss_multi_label" in lines[0]
    trained = vocabseg.load_model(NAME, checkpoint=path)
    torch.manual_seed(cfg.seed)
    fresh = create_model(NAME)  # the run's initial weights
    assert not torch.equal(trained.clip.token_embedding.weight, fresh.clip.token_embedding.weight)  # text trained


class _FixedGroups:
    """A stand-in GroupViT whose final groups are given: enough of the interface grouping_report uses."""

    def __init__(self, groups: torch.Tensor, num_groups: int = 8):
        self.groups = groups
        self.config = type("C", (), {"num_output_groups": (32, num_groups)})()

    def prepare(self, rgb):
        return torch.zeros(1, 3, *rgb.shape[:2]), rgb.shape[:2]

    def encode_image(self, pixels, with_groups=True):
        return None, None, [("hard", "soft")], (1, 1)

    def pixel_groups(self, assignments, grid, size):
        assert assignments == [("hard", "soft")]
        return self.groups[None]


class _OneScene:
    class_names = ["background", "circle"]
    vocabulary = type("V", (), {"ignore_index": 255})()

    def __init__(self):
        label = np.zeros((4, 4), np.int64)
        label[:, 2:] = 1
        label[0, 0] = 255
        self.items = [{"image": np.zeros((4, 4, 3), np.uint8), "label": label}]

    def __iter__(self):
        return iter(self.items)


def test_grouping_report_names_each_group_by_its_majority_class():
    from vocabseg.engine.groupvit_train import grouping_report

    # groups follow the classes (the right half split in two): the oracle namer is perfect
    groups = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]])
    r = grouping_report(_FixedGroups(groups), _OneScene())
    assert r["oracle_mIoU"] == pytest.approx(100.0) and r["groups_per_image"] == 3 and r["num_groups"] == 8
    # one group swallows the object (8 of 15 labelled pixels are the circle: the group is named circle)
    r = grouping_report(_FixedGroups(torch.zeros(4, 4, dtype=torch.long)), _OneScene())
    assert r["groups_per_image"] == 1
    assert r["oracle_IoU"][0] == pytest.approx(0.0) and r["oracle_IoU"][1] == pytest.approx(100 * 8 / 15)
    # hard=True composes the hard assignments (the first of each pair)
    model = _FixedGroups(groups)
    model.pixel_groups = lambda a, g, s: (groups if a == [("hard", "hard")] else groups * 0)[None]
    assert grouping_report(model, _OneScene(), hard=True)["groups_per_image"] == 3
