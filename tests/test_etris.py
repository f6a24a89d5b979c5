"""ETRIS (Bridger): shapes, zero-gate identity with plain CLIP, dynamic kernel, refer(), training, save/load, size."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import vocabseg
from vocabseg.errors import CheckpointError
from vocabseg.models import etris as E
from vocabseg.models import create_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("etris_tiny_test").eval()


def _tokens(model, n=2):
    sentences = ["the red circle", "the biggest striped square left of the blue star!", "a ring on the grass"]
    return model.tokenize(sentences[:n])


# ----------------------------------------------------------------------------------------------- Bridger


def test_bridger_shapes_gate_and_padding():
    torch.manual_seed(0)
    br = E.Bridger(vision_width=64, text_width=32, width=16, heads=2, ffn=32)
    patches, words = torch.randn(2, 49, 64), torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 4:] = True
    v, t, (lv, lt) = br(patches, words, pad)
    assert v.shape == patches.shape and t.shape == words.shape
    assert lv.shape == (2, 49, 16) and lt.shape == (2, 7, 16)
    assert torch.equal(v, patches) and torch.equal(t, words)  # zero gates: nothing changes
    with torch.no_grad():
        br.vision_gate.fill_(1.0)
        br.text_gate.fill_(1.0)
    v, t, _ = br(patches, words, pad, ladder=(lv, lt))
    assert not torch.allclose(v, patches) and not torch.allclose(t, words)
    # visual tokens never see padded word positions
    words2 = words.clone()
    words2[0, 4:] += 5.0
    v2, _, _ = br(patches, words2, pad, ladder=(lv, lt))
    assert torch.allclose(v2[0], v[0], atol=1e-6) and torch.equal(v2[1], v[1])


# ----------------------------------------------------------------------------------------------- identity at init


def _plain_text(clip, tokens):
    L = tokens.shape[1]
    t = clip.token_embedding(tokens) + clip.positional_embedding[:L]
    mask = torch.full((L, L), float("-inf")).triu_(1)
    t = clip.transformer(t, mask)
    words = clip.ln_final(t)
    sentence = words[torch.arange(len(tokens)), tokens.argmax(-1)] @ clip.text_projection
    return words, sentence


def test_zero_gates_leave_both_towers_exactly_equal_to_plain_clip(tiny):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)
    tokens = _tokens(tiny)
    with torch.no_grad():
        enc = tiny.encode(x, tokens)
        visual = tiny.clip.visual
        plain, grid = visual.embed(x)
        plain = visual.run_blocks(plain)
        feats, _ = visual.forward_features(x, [2, 3])
        words, sentence = _plain_text(tiny.clip, tokens)
        assert enc.grid == grid
        assert torch.equal(enc.visual_tokens, plain)
        assert torch.equal(visual.head(enc.visual_tokens[:, 0]), tiny.clip.encode_image(x))
        for level, layer in zip(enc.levels[:-1], (2, 3)):
            assert torch.equal(level, visual.tokens_to_map(feats[layer], grid))
        last = visual.head(plain[:, 1:]).transpose(1, 2).reshape(2, -1, *grid)
        assert torch.equal(enc.levels[-1], last)
        assert torch.equal(enc.words, words) and torch.equal(enc.sentence, sentence)
        # the causal tower: same EOT feature as CLIP's own encode_text (which cuts the sequence at the EOT)
        assert torch.allclose(enc.sentence, tiny.clip.encode_text(tokens), atol=1e-5)
        assert enc.pad_mask.tolist()[0] == [i > int(tokens[0].argmax()) for i in range(tokens.shape[1])]

    # opening the gates makes the Bridgers live in both towers
    torch.manual_seed(2)
    model = create_model("etris_tiny_test").eval()
    with torch.no_grad():
        for b in model.bridgers:
            b.vision_gate.fill_(0.5)
            b.text_gate.fill_(0.5)
        enc2 = model.encode(x, tokens)
        words2, sentence2 = _plain_text(model.clip, tokens)
    assert not torch.allclose(enc2.words, words2) and not torch.allclose(enc2.sentence, sentence2)


# ----------------------------------------------------------------------------------------------- projector


def test_dynamic_kernel_projector_matches_manual_conv():
    torch.manual_seed(0)
    proj = E.Projector(dim=8, out_dim=6, sentence_dim=5, kernel_size=3, upsample_steps=2).eval()
    x, s = torch.randn(3, 8, 4, 5), torch.randn(3, 5)
    out = proj(x, s)
    assert out.shape == (3, 1, 16, 20)
    with torch.no_grad():
        feats = proj.visual(x)
        params = proj.kernel(s)
        for i in range(3):
            w = params[i, :-1].reshape(1, 6, 3, 3)
            manual = F.conv2d(feats[i:i + 1], w, params[i, -1:], padding=1)
            assert torch.allclose(out[i:i + 1], manual, atol=1e-5)
    with pytest.raises(ValueError):
        E.dynamic_conv(feats, params[:, :-1], 3)


def test_forward_shape_quarter_resolution(tiny):
    out = tiny(torch.randn(2, 3, 64, 96), _tokens(tiny))
    assert out["mask_logits"].shape == (2, 1, 16, 24)
    assert torch.isfinite(out["mask_logits"]).all()


# ----------------------------------------------------------------------------------------------- refer


def test_refer_shapes_and_threshold(tiny, monkeypatch):
    rgb = np.random.default_rng(0).integers(0, 256, (37, 81, 3), dtype=np.uint8)
    r = tiny.refer(rgb, "the red circle")
    assert r.mask.shape == (37, 81) and r.mask.dtype == np.bool_
    assert r.probability.shape == (37, 81) and r.probability.dtype == np.float32
    assert np.array_equal(r.mask, r.probability > 0.35) and r.sentence == "the red circle"
    assert tiny.config.threshold == 0.35
    both = tiny.refer_batch([rgb, rgb[:20]], ["the red circle", "a star"])
    assert np.allclose(both[0].probability, r.probability, atol=1e-5) and both[1].mask.shape == (20, 81)

    def constant(p):
        def forward(pixels, tokens):
            logit = math.log(p / (1 - p))
            return {"mask_logits": torch.full((pixels.shape[0], 1, pixels.shape[2] // 4, pixels.shape[3] // 4), logit)}
        return forward

    monkeypatch.setattr(tiny, "forward", constant(0.36))
    assert tiny.refer(rgb, "x").mask.all()
    monkeypatch.setattr(tiny, "forward", constant(0.34))
    assert not tiny.refer(rgb, "x").mask.any()
    assert tiny.refer(rgb, "x", threshold=0.3).mask.all()


def test_letterbox_geometry():
    img = np.zeros((30, 60, 3), np.uint8)
    img[:, :30] = 255
    boxed, (h, w) = E.letterbox(img, 64)
    assert boxed.shape == (64, 64, 3) and (h, w) == (32, 64)
    assert np.allclose(boxed[40, 10], np.array(E.OPENAI_MEAN) * 255)  # padding = mean colour
    mask = np.zeros((30, 60), bool)
    mask[:, :30] = True
    m = E.letterbox_mask(mask, 64)
    assert m.shape == (64, 64) and m[:32, :32].all() and not m[:32, 33:].any() and not m[32:].any()


# ----------------------------------------------------------------------------------------------- training


def _synthetic_batch(n=4, size=64):
    """A white square at a random place; the sentence names its side."""
    rng = np.random.default_rng(0)
    images, masks, sentences = [], [], []
    for i in range(n):
        img = np.full((size, size, 3), 60, np.uint8)
        m = np.zeros((size, size), bool)
        left = i % 2 == 0
        x0 = int(rng.integers(4, 16)) + (0 if left else 36)
        y0 = int(rng.integers(4, 40))
        img[y0:y0 + 20, x0:x0 + 20] = 250
        m[y0:y0 + 20, x0:x0 + 20] = True
        images.append(img)
        masks.append(m)
        sentences.append("the square on the left" if left else "the square on the right")
    return images, masks, sentences


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = create_model("etris_tiny_test").train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, masks, sentences = _synthetic_batch()
    pixels = model.normalize_pixels(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float())
    tokens = model.tokenize(sentences)
    targets = model.training_targets(torch.from_numpy(np.stack(masks)))
    criterion = model.build_criterion()
    opt = torch.optim.Adam(model.parameter_groups(lr=3e-3, bridger_lr=3e-2))
    losses = []
    for _ in range(25):
        loss = criterion.weighted_total(criterion(model(pixels, tokens), targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(b.vision_gate.abs().sum() > 0 for b in model.bridgers)  # the gates opened


def test_criterion_is_mean_bce_at_quarter_resolution():
    from vocabseg.losses.referring import ReferringCriterion

    logits = torch.randn(2, 1, 4, 4)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :8] = True
    crit = ReferringCriterion()
    losses = crit({"mask_logits": logits}, masks)
    target = F.interpolate(masks[:, None].float(), size=(4, 4), mode="nearest")
    assert torch.allclose(losses["loss_bce"], F.binary_cross_entropy_with_logits(logits, target))
    assert torch.allclose(crit.weighted_total(losses), losses["loss_bce"])


def test_criterion_dice_term_hand_computed():
    from vocabseg.losses.referring import ReferringCriterion

    logits = torch.tensor([[[[0.0, 2.0], [-2.0, 0.0]]]])  # [1, 1, 2, 2]
    mask = torch.tensor([[[True, True], [False, False]]])
    crit = ReferringCriterion(dice_weight=0.5)
    losses = crit({"mask_logits": logits}, mask)
    p = logits.sigmoid().flatten()
    t = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert losses["loss_dice"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert crit.weighted_total(losses).item() == pytest.approx(losses["loss_bce"].item() + 0.5 * expected.item(),
                                                               abs=1e-6)
    assert "loss_dice" not in ReferringCriterion()({"mask_logits": logits}, mask)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("etris_tiny_test").eval()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "etris.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = vocabseg.load_model("etris_tiny_test", checkpoint=path)
    x, tokens = torch.randn(1, 3, 64, 64), _tokens(model, 1)
    with torch.no_grad():
        assert torch.equal(model(x, tokens)["mask_logits"], loaded(x, tokens)["mask_logits"])

    out = E.refer_command(_write_png(tmp_path), "the white square", tmp_path / "out", "etris_tiny_test",
                          checkpoint=path)
    mask = np.asarray(Image.open(out["mask"]))
    assert mask.shape == (40, 50) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(out["overlay"]).size[1] >= 40


def _write_png(folder):
    path = folder / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------------------------- size


def test_trainable_parameters_of_vit_b_16_against_paper():
    with torch.device("meta"):
        model = create_model("etris_vit_b_16_gated")
    parts = E.trainable_breakdown(model)
    print("ETRIS ViT-B/16 trainable parameters:", parts)
    total = parts["total"]
    # Frozen: all of CLIP except its visual positional table (resized to the 26×26 grid of 416 px, as trained).
    assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.")] == [
        "clip.visual.positional_embedding"]
    assert parts["clip_positional"] == 677 * 768
    # Paper: ≈ 23.8 M. Ours is within 7 %; the gap is the official code's query/key projections of the three
    # single-key sentence attentions (3 × 2 × (512² + 512), they can never receive a gradient) that we do not
    # build; adding them back lands within 1 % of the paper's figure.
    assert abs(total - E.PAPER_TRAINABLE_PARAMS) / E.PAPER_TRAINABLE_PARAMS < 0.07
    dead_qk = 3 * 2 * (512 * 512 + 512)
    assert abs(total + dead_qk - E.PAPER_TRAINABLE_PARAMS) / E.PAPER_TRAINABLE_PARAMS < 0.01


# ----------------------------------------------------------------------------------------------- engine


def test_train_referring_resumes_exactly_and_evaluates(tmp_path):
    from vocabseg.engine.referring import train_referring

    cfg = dict(model="etris_tiny_test", dataset="world", val_splits=["val", "heldout"], batch_size=4, max_iters=4,
               checkpoint_every=2, log_every=2, verbose=False,
               world={"num_train": 12, "num_val": 3, "seed": 0, "min_size": 64, "max_size": 80})
    full = train_referring({**cfg, "output_dir": str(tmp_path / "a")})
    first = train_referring({**cfg, "output_dir": str(tmp_path / "b"), "max_iters": 2})
    rest = train_referring({**cfg, "output_dir": str(tmp_path / "b")})  # resume: auto
    assert first["iteration"] == 2 and rest["iteration"] == full["iteration"] == 4
    final = [load_file(str(tmp_path / d / "model_final.safetensors")) for d in ("a", "b")]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    train_lines = lambda d: [r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                             if r["type"] == "train"]
    assert train_lines("a") == train_lines("b") and [r["iter"] for r in train_lines("a")] == [2, 4]
    assert rest["losses"]["total_loss"] == full["losses"]["total_loss"]
    assert set(full["metrics"]) == {"val", "heldout", "val (largest-object baseline)",
                                    "heldout (largest-object baseline)"}
    m = full["metrics"]["heldout"]
    assert m["num_items"] == 3 and {"mIoU", "oIoU", "Prec@0.5", "Prec@0.9"} <= set(m)
    loaded = vocabseg.load_model("etris_tiny_test", checkpoint=full["final_weights"])
    assert loaded.refer(np.zeros((20, 30, 3), np.uint8), "the red circle").mask.shape == (20, 30)


def test_evaluate_checkpoint_matches_training_eval_and_applies_thresholds(tmp_path):
    from vocabseg.engine.referring import build_referring_dataset, evaluate_referring_checkpoint, \
        load_referring_config, train_referring

    cfg = dict(model="etris_tiny_test", dataset="world", val_splits=["val"], batch_size=4, max_iters=2,
               log_every=1, verbose=False, output_dir=str(tmp_path / "run"),
               world={"num_train": 8, "num_val": 4, "seed": 0, "min_size": 64, "max_size": 80})
    trained = train_referring(cfg)
    scores = evaluate_referring_checkpoint(cfg, trained["final_weights"], [None, 0.0])
    assert set(scores) == {"val @ model", "val @ 0", "val (largest-object baseline)"}
    for key in ("mIoU", "oIoU", "Prec@0.5"):  # reloaded weights score exactly what the run scored at its end
        assert scores["val @ model"][key] == pytest.approx(trained["metrics"]["val"][key])
    # Threshold 0 keeps every pixel (a sigmoid is > 0): IoU of each item = target area / image area.
    ds = build_referring_dataset(load_referring_config(cfg), "val")
    fractions = [np.asarray(ds[i]["mask"], bool).mean() for i in range(len(ds))]
    assert scores["val @ 0"]["mIoU"] == pytest.approx(100 * np.mean(fractions), rel=1e-5)
    assert scores["val @ 0"]["num_items"] == 4
    # Every pixel overlaps the largest object best, so at threshold 0 the model "picks" what the baseline picks.
    assert scores["val @ 0"]["object_acc"] == pytest.approx(scores["val (largest-object baseline)"]["object_acc"])
    assert sum(v for k, v in scores["val @ 0"].items() if k.startswith("items/")) == 4
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        evaluate_referring_checkpoint(cfg, tmp_path / "missing.safetensors")
    # `refer` without --model takes the model named in model_final.json beside the weights (etris_tiny_test here;
    # the etris_vit_b_16 fallback could not load them)
    out = E.refer_command(_write_png(tmp_path), "the white square", tmp_path / "refer",
                          checkpoint=trained["final_weights"])
    assert np.asarray(Image.open(out["mask"])).shape == (40, 50)


def test_bundled_world_model_loads_and_chooses_better_than_the_largest_object_baseline():
    """The shipped etris_world weights (CLIP-less bundle on the bundled CLIP) load without a warning and, on
    validation scenes of the training world, pick the referred object more often than the baseline does."""
    import warnings

    import vocabseg
    from vocabseg.data.referring_world import ReferringWorldDataset
    from vocabseg.engine.referring import evaluate_referring, largest_object_baseline

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing checkpoint would warn "randomly initialised"
        model = vocabseg.load_model("etris_world")
    ds = ReferringWorldDataset(24, "val", seed=0)
    ours, baseline = evaluate_referring(model, ds), largest_object_baseline(ds)
    assert ours["object_acc"] > baseline["object_acc"] + 10  # measured 45.8 vs 25.0 on these 24 scenes
    assert ours["mIoU"] > baseline["mIoU"]


def test_refer_command_without_model_or_checkpoint_uses_the_bundled_world_model(tmp_path):
    from vocabseg.data.referring_world import ReferringWorldDataset

    item = ReferringWorldDataset(1, "val", seed=0)[0]
    path = tmp_path / "scene.png"
    Image.fromarray(np.ascontiguousarray(item["image"].transpose(1, 2, 0))).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a random model would warn
        out = E.refer_command(path, item["sentence"], tmp_path / "out")
    assert out["model"] == "etris_world"
    mask = np.asarray(Image.open(out["mask"])) > 0
    assert mask.shape == item["mask"].shape and mask.any()
