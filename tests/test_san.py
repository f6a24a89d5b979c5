"""SAN: paper numbers, official checkpoint layout, attention-bias semantics, forward shapes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vocabseg
from vocabseg.errors import CheckpointError
from vocabseg.models import create_model, get_config
from vocabseg.models.san import official_to_vocabseg, recognition_mask, vocabseg_to_official

KEYS_TSV = Path(__file__).parent / "data" / "san_vit_b_16.keys.tsv"


def _meta_model(name: str):
    with torch.device("meta"):
        return create_model(name)


def test_trainable_parameters_match_paper():
    model = _meta_model("san_vit_b_16")
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert abs(trainable - 8.4e6) / 8.4e6 < 0.01, trainable
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "clip.visual.positional_embedding" in names and "bg_embed" in names
    assert all(n.startswith(("side.", "bg_embed", "clip.visual.positional_embedding")) for n in names)
    large = sum(p.numel() for p in _meta_model("san_vit_large_14").trainable_parameters())
    # The official large model's count (its code, its config): side network + 16-head bias MLP + 1024-wide fusions
    # + CLIP ViT-L/14-336's 577 x 1024 positions + background embedding; the paper's 9.3 M.
    assert large == 9_321_650, large


def test_flops_at_640_match_paper():
    model = _meta_model("san_vit_b_16").eval()
    with torch.device("meta"):
        x, text = torch.empty(1, 3, 640, 640), torch.empty(171, 512)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, text)
    macs = counter.get_total_flops() / 2  # torch counts 2 FLOPs per multiply-add; the paper (fvcore) counts 1
    assert abs(macs - 64.3e9) / 64.3e9 < 0.03, macs


def _official_reference_keys() -> dict[str, list[int]]:
    out = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        out[key] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return out


def test_key_map_covers_release_layout_exactly():
    reference = _official_reference_keys()
    assert len(reference) == 442
    model = _meta_model("san_vit_b_16")
    ours = vocabseg_to_official(model.state_dict(), rec_start=9)
    ignored = {"criterion.empty_weight", "ov_classifier.attn_mask"}
    assert set(ours) == set(reference) - ignored
    for key, value in ours.items():
        if key == "clip_visual_extractor.positional_embedding":
            continue  # the release stores CLIP's 224-px table; ours too (197 x 768)
        assert list(value.shape) == reference[key], key
    # and the forward map inverts it
    back = official_to_vocabseg({k: v for k, v in ours.items()}, rec_start=9)
    assert set(back) == set(model.state_dict())


def _write_official(model, path: Path, extra: dict | None = None) -> None:
    state = vocabseg_to_official({k: v.clone() for k, v in model.state_dict().items()}, model.config.rec_start)
    state["criterion.empty_weight"] = torch.ones(172)
    state["ov_classifier.attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
    state.update(extra or {})
    torch.save({"model": state, "iteration": 59999}, path)


def test_official_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    src = create_model("san_tiny_test").eval()
    for p in src.parameters():  # make every tensor distinctive
        p.data.normal_(0, 0.05)
    path = tmp_path / "san_tiny.pth"
    _write_official(src, path)
    loaded = vocabseg.load_model("san_tiny_test", checkpoint=path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randn(1, 3, 64, 96)
    text = F.normalize(torch.randn(4, 32), dim=-1)
    with torch.no_grad():
        a, b = src(x, text), loaded(x, text)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_masks"], b["pred_masks"])


def test_official_checkpoint_errors(tmp_path):
    src = create_model("san_tiny_test")
    bad = tmp_path / "bad.pth"
    _write_official(src, bad, extra={"side_adapter_network.unknown_thing": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unknown_thing"):
        vocabseg.load_model("san_tiny_test", checkpoint=bad)
    state = vocabseg_to_official(src.state_dict(), src.config.rec_start)
    del state["side_adapter_network.query_embed"]
    missing = tmp_path / "missing.pth"
    torch.save({"model": state}, missing)
    with pytest.raises(CheckpointError, match="missing") as err:
        vocabseg.load_model("san_tiny_test", checkpoint=missing)
    assert "missing.pth" in str(err.value) and "\n" not in str(err.value)
    wrong = tmp_path / "wrong_model.pth"
    _write_official(src, wrong)
    with pytest.raises(CheckpointError, match="shape"):
        vocabseg.load_model("san_vit_b_16", checkpoint=wrong)


def test_positional_table_of_release_is_resized(tmp_path):
    """The release stores CLIP's 224-px table; a model built for another grid resizes it on load."""
    src = create_model("san_tiny_test")
    state = vocabseg_to_official(src.state_dict(), src.config.rec_start)
    pe = state["clip_visual_extractor.positional_embedding"]  # [1 + 4*4, C]
    bigger = torch.cat([pe[:1], F.interpolate(pe[1:].T.reshape(1, -1, 4, 4), size=(6, 6), mode="bilinear").reshape(pe.shape[1], -1).T])
    state["clip_visual_extractor.positional_embedding"] = bigger
    path = tmp_path / "pe.pth"
    torch.save({"model": state}, path)
    loaded = vocabseg.load_model("san_tiny_test", checkpoint=path)
    assert loaded.clip.visual.positional_embedding.shape == pe.shape
    assert torch.equal(loaded.clip.visual.positional_embedding[0], bigger[0])


def test_large_release_loads_its_336_px_grid_without_resizing(tmp_path, monkeypatch):
    """SAN-L/14 runs on CLIP ViT-L/14-336: a random file in the release layout (586 tensors, 436.7 M values, fp32,
    a 24 x 24 + 1 positional table) loads strictly, every tensor as written, and nothing is resized on the way."""
    import vocabseg.models.weights as weights

    official = vocabseg_to_official(_meta_model("san_vit_large_14").state_dict(), rec_start=18)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.empty(v.shape).normal_(0, 0.02, generator=gen) for k, v in official.items()}
    state["criterion.empty_weight"] = torch.ones(172)
    state["ov_classifier.attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
    assert len(state) == 586 and abs(sum(v.numel() for v in state.values()) - 436.7e6) < 0.05e6
    assert state["clip_visual_extractor.positional_embedding"].shape == (577, 1024)
    path = tmp_path / "san_vit_large_14.pth"
    torch.save({"model": state}, path)
    expected = {k: state[k] for k in ("clip_visual_extractor.positional_embedding",
                                      "side_adapter_network.vit_model.pos_embed", "clip_rec_head.proj")}
    del state

    def no_resizing(key, value, shape):
        raise AssertionError(f"{key} was resized from {tuple(value.shape)} to {tuple(shape)}")

    monkeypatch.setattr(weights, "_resize_positional", no_resizing)
    model = vocabseg.load_model("san_vit_large_14", checkpoint=path)
    path.unlink()
    assert model.clip.config.image_resolution == 336 and model.clip.visual.positional_embedding.shape == (577, 1024)
    assert torch.equal(model.clip.visual.positional_embedding, expected["clip_visual_extractor.positional_embedding"])
    assert torch.equal(model.side.pos_embed, expected["side_adapter_network.vit_model.pos_embed"])
    assert torch.equal(model.clip.visual.proj, expected["clip_rec_head.proj"])


def test_large_clip_input_is_the_padded_image_at_0_7():
    """The official large model resizes the padded image by scale_factor 0.7 in fp32: 640 x 864 -> 448 x 604,
    a 32 x 43 grid of ViT-L/14 patches (recomputing the size, or resizing in double, gives other numbers)."""
    config = get_config("san_vit_large_14")
    assert config.clip_scale == 0.7 and config.rec_start == 18
    assert config.fusion_map == ((0, 0), (6, 1), (12, 2), (18, 3))
    model = _meta_model("san_vit_large_14").eval()
    with torch.device("meta"):
        maps, rec_tokens, grid = model.clip_features(torch.empty(1, 3, 640, 864))
    assert grid == (32, 43) and rec_tokens.shape == (1, 1 + 32 * 43, 1024)
    assert sorted(maps) == [0, 6, 12, 18] and all(m.shape == (1, 1024, 32, 43) for m in maps.values())


def test_recognition_mask_semantics():
    b, heads, q, grid = 2, 3, 4, (2, 3)
    bias = torch.randn(b, heads, q, 4, 6)
    mask = recognition_mask(bias, grid)
    n = q + 1 + 6
    assert mask.shape == (b, heads, n, n)
    pooled = F.max_pool2d(bias.flatten(1, 2), 2).view(b, heads, q, 6)
    for i in range(q):
        row = mask[:, :, i]
        assert torch.all(row[..., i] == 0)  # itself
        others = [j for j in range(q) if j != i]
        assert torch.all(row[..., others] == -100)  # other SOS tokens
        assert torch.all(row[..., q] == -100)  # not [CLS]
        assert torch.equal(row[..., q + 1:], pooled[:, :, i])  # patches, through the pooled bias
    assert torch.all(mask[:, :, q:, :q] == -100)  # CLS and patches never see SOS tokens
    assert torch.all(mask[:, :, q:, q:] == 0)


def test_sos_tokens_do_not_change_clip_features():
    """Running the recognition blocks with [SOS] tokens leaves the [CLS]/patch outputs exactly as plain CLIP's."""
    torch.manual_seed(0)
    model = create_model("san_tiny_test").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, tokens, grid = model.clip_features(x)
        plain = model.clip.visual.run_blocks(tokens, model.config.rec_start)
        q = 5
        bias = torch.randn(1, model.clip.visual.heads, q, 8, 8)
        seq = torch.cat([tokens[:, :1].expand(-1, q, -1), tokens], dim=1)
        steered = model.clip.visual.run_blocks(seq, model.config.rec_start, attn_mask=recognition_mask(bias, grid))
    assert torch.allclose(steered[:, q:], plain, atol=1e-5)
    # and the bias matters for the SOS outputs
    with torch.no_grad():
        other = model.clip.visual.run_blocks(seq, model.config.rec_start, attn_mask=recognition_mask(-bias, grid))
    assert not torch.allclose(other[:, :q], steered[:, :q], atol=1e-4)


def test_blocked_patch_does_not_influence_sos():
    torch.manual_seed(1)
    model = create_model("san_tiny_test").eval()
    with torch.no_grad():
        _, tokens, grid = model.clip_features(torch.randn(1, 3, 64, 64))
        bias = torch.zeros(1, model.clip.visual.heads, 1, grid[0], grid[1])
        bias[..., 0, 0] = -1e4  # query 0 must ignore patch (0, 0)
        emb1 = model.recognize(tokens, bias, grid)
        changed = tokens.clone()
        changed[:, 1] += 5.0  # perturb patch (0, 0) ... only in the last recognition block's input
        # a single recognition block makes the influence exact: compare with rec blocks limited to one
        model.config.rec_start = model.clip.visual.num_layers - 1
        emb_a = model.recognize(tokens, bias, grid)
        emb_b = model.recognize(changed, bias, grid)
    assert torch.allclose(emb_a, emb_b, atol=1e-5)
    assert emb1.shape == (1, 1, model.config.clip.embed_dim)


@pytest.mark.parametrize("size", [(64, 64), (80, 112), (48, 160)])
def test_forward_shapes_train_and_eval(size):
    model = create_model("san_tiny_test")
    text = F.normalize(torch.randn(7, 32), dim=-1)
    x = torch.randn(2, 3, *size)
    model.train()
    out = model(x, text)
    q = model.config.num_queries
    assert out["pred_logits"].shape == (2, q, 8)
    assert out["pred_masks"].shape == (2, q, size[0] // 8, size[1] // 8)
    assert len(out["aux_outputs"]) == len(model.config.deep_supervision) - 1
    assert not model.clip.training  # frozen CLIP stays in eval mode
    model.eval()
    with torch.no_grad():
        out = model(x, text)
    assert out["aux_outputs"] == []
    assert torch.isfinite(out["pred_logits"]).all()


def test_gradients_only_reach_trainable_parameters():
    model = create_model("san_tiny_test").train()
    out = model(torch.randn(1, 3, 64, 64), F.normalize(torch.randn(3, 32), dim=-1))
    loss = out["pred_logits"].square().mean() + out["pred_masks"].square().mean() + sum(
        a["pred_logits"].square().mean() for a in out["aux_outputs"])
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


def test_mask_crops_frame_the_mask_and_paint_the_rest_with_its_mean():
    from vocabseg.models.san import mask_crops

    pixels = torch.zeros(1, 3, 64, 96)
    pixels[:, 0, 8:24, 60:80] = 2.0      # a red-ish block (channel 0) at rows 8..24, cols 60..80
    pixels[:, 2, 40:60, 4:30] = -1.5     # another block elsewhere
    logits = torch.full((1, 3, 16, 24), -5.0)
    logits[0, 0, 2:6, 15:20] = 5.0       # mask cells = pixels rows 8..24, cols 60..80
    logits[0, 1] = 5.0                   # everything
    crops, present = mask_crops(pixels, logits, 32)
    assert crops.shape == (3, 3, 32, 32)
    assert present.tolist() == [[True, True, False]]
    # first crop: the block fills it, the margin around the block is painted with the block's own colour
    assert torch.allclose(crops[0, 0], torch.full((32, 32), 2.0), atol=1e-4)
    assert crops[0, 2].abs().max() < 1e-4
    # second crop: the whole image (both blocks present)
    assert crops[1, 0].max() > 1.9 and crops[1, 2].min() < -1.4


def test_surround_fill_keeps_the_masks_outline_on_its_surroundings():
    from vocabseg.models.san import mask_crops

    pixels = torch.zeros(1, 3, 64, 64)
    pixels[:, 2] = -1.0                  # a "blue" field
    pixels[:, 0, 16:48, 16:48] = 2.0     # a "red" square on it, no blue
    pixels[:, 2, 16:48, 16:48] = 0.0
    logits = torch.full((1, 1, 16, 16), -5.0)
    logits[0, 0, 4:12, 4:12] = 5.0       # the square
    crops, _ = mask_crops(pixels, logits, 32, fill="surround_mean")
    red, blue = crops[0, 0], crops[0, 2]
    assert red[16, 16] > 1.9 and blue[16, 16].abs() < 1e-4     # inside: the square as it is
    # outside: about the field's colour (a little of the square's edge, sampled bilinearly, enters the mean)
    assert red[0, 0].abs() < 0.3 and blue[0, 0] < -0.8
    same, _ = mask_crops(pixels, logits, 32)                  # default fill: the square's own colour everywhere
    assert same[0, 0, 0, 0] > 1.9
    with pytest.raises(ValueError, match="crop fill"):
        mask_crops(pixels, logits, 32, fill="zeros")


def test_no_object_bias_lowers_the_no_object_share_and_keeps_the_class_ratios():
    from vocabseg.models.san import SANConfig, object_probs

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)  # 3 classes + "no object"
    plain = object_probs(logits, SANConfig())
    assert torch.allclose(plain, logits.softmax(-1)[..., :-1])
    biased = object_probs(logits, SANConfig(no_object_bias=3.0))
    assert (biased.sum(-1) > plain.sum(-1)).all()             # every proposal keeps more of its mass
    assert torch.allclose(biased / biased.sum(-1, keepdim=True), plain / plain.sum(-1, keepdim=True), atol=1e-6)
    # the same as a no-object logit 3 lower
    lowered = logits.clone()
    lowered[..., -1] -= 3.0
    assert torch.allclose(biased, lowered.softmax(-1)[..., :-1])


def _tiny_crop_clip():
    """A randomly initialised CLIP (seed 0) with 32-px crops."""
    from vocabseg.clip.model import CLIP, CLIPConfig

    torch.manual_seed(0)
    return CLIP(CLIPConfig(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64,
                           vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=32,
                           transformer_heads=1, transformer_layers=1)).eval()


def test_mask_crop_ensemble_moves_a_mask_to_the_crop_class_and_keeps_its_total():
    from vocabseg.models.san import mask_crop_ensemble, mask_crops

    clip = _tiny_crop_clip()
    pixels = torch.randn(1, 3, 64, 64)
    logits = torch.full((1, 2, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0
    with torch.no_grad():
        emb = F.normalize(clip.encode_image(mask_crops(pixels, logits, 32)[0][:1]), dim=-1)
    text = torch.cat([emb, -emb, F.normalize(torch.randn(1, 16), dim=-1)])  # class 0 is what the crop shows
    probs = torch.tensor([[[0.1, 0.6, 0.1], [0.2, 0.2, 0.2]]])
    with torch.no_grad():
        mixed = mask_crop_ensemble(clip, pixels, probs, logits, text, 0.7)
    assert mixed[0, 0].argmax() == 0 and torch.isclose(mixed[0, 0].sum(), torch.tensor(0.8))
    assert torch.equal(mixed[0, 1], probs[0, 1])  # an empty mask keeps its distribution
    with torch.no_grad():  # weight 0: the mask's own distribution
        assert torch.allclose(mask_crop_ensemble(clip, pixels, probs, logits, text, 0.0), probs, atol=1e-6)


def test_neutral_crop_share_names_a_mask_by_its_own_shape_on_neutral_grey():
    """A flat crop of the mask is one colour; the neutral crop keeps the mask's own pixels on zeros (the
    normalisation's mean colour). With share 1 the ensemble follows the neutral crop alone."""
    from vocabseg.models.san import mask_crop_ensemble, mask_crops

    pixels = torch.randn(1, 3, 64, 64)
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[0, 0, 1:3, 1:3] = 5.0
    crops, _ = mask_crops(pixels, logits, 32, fill="neutral")
    # the crop's centre is the mask's (its own pixels), its corner outside (zeros)
    assert crops[0, :, 16, 16].abs().sum() > 0 and torch.equal(crops[0, :, 0, 0], torch.zeros(3))
    clip = _tiny_crop_clip()
    with torch.no_grad():
        flat = F.normalize(clip.encode_image(mask_crops(pixels, logits, 32)[0]), dim=-1)
        neutral = F.normalize(clip.encode_image(crops), dim=-1)
        text = torch.cat([flat, neutral])  # class 0: what the flat crop shows, class 1: the neutral one
        probs = torch.tensor([[[0.45, 0.45]]])
        assert mask_crop_ensemble(clip, pixels, probs, logits, text, 1.0)[0, 0].argmax() == 0
        both = mask_crop_ensemble(clip, pixels, probs, logits, text, 1.0, neutral_share=1.0)
    assert both[0, 0].argmax() == 1 and torch.isclose(both[0, 0].sum(), torch.tensor(0.9))


def test_split_mask_components_gives_each_connected_piece_its_own_mask():
    from vocabseg.models.san import split_mask_components

    logits = torch.full((1, 3, 8, 12), -4.0)
    logits[0, 0, 1:4, 1:4] = 2.0            # mask 0: two blobs, the right one holds the peak
    logits[0, 0, 4:7, 7:11] = 3.0
    logits[0, 1, 1:7, 1:3] = 1.0            # mask 1: one U-shaped blob (connected only through its bottom row)
    logits[0, 1, 5:7, 1:10] = 1.0
    logits[0, 1, 1:7, 8:10] = 1.0
    pieces, kept = split_mask_components(logits, parts=2)    # mask 2: no foreground at all
    assert pieces.shape == (1, 6, 8, 12) and kept.tolist() == [[True, True, True, False, True, False]]
    first, rest = pieces[0, 0] > 0, pieces[0, 1] > 0
    assert first[4:7, 7:11].all() and first.sum() == 12      # the peak's blob only
    assert rest[1:4, 1:4].all() and rest.sum() == 9          # the other blob
    assert torch.equal(pieces[0, 0, 3, 6], torch.tensor(-4.0))   # its one-cell ring keeps the soft edge
    assert pieces[0, 0, 0, 0] == -20.0 and pieces[0, 1, 5, 8] == -20.0  # far background / the taken piece
    assert torch.equal(pieces[0, 2] > 0, logits[0, 1] > 0)   # the U stays one piece (labels spread around it)
    assert torch.equal(pieces[0, 4], logits[0, 2])           # an empty mask stays whole in its first piece
    three, kept3 = split_mask_components(logits, parts=3)
    assert kept3[0, :3].tolist() == [True, True, False]      # two blobs: the third piece is empty


def test_split_proposals_name_two_separate_objects_of_one_proposal_apart():
    from types import SimpleNamespace

    from vocabseg.models.san import SANConfig, mask_crops, refine_proposals, split_mask_components

    clip = _tiny_crop_clip()
    pixels = torch.randn(1, 3, 64, 128)
    logits = torch.full((1, 1, 4, 8), -5.0)
    logits[0, 0, 1:3, 1:3] = 4.0   # left object (the peak)
    logits[0, 0, 1:3, 5:7] = 3.0   # right object, same proposal
    pieces, _ = split_mask_components(logits, 2)
    with torch.no_grad():  # class k = what piece k's crops (flat and outline) show; class 2 = neither
        emb = sum(F.normalize(clip.encode_image(mask_crops(pixels, pieces, 32, fill=fill)[0]), dim=-1)
                  for fill in ("mask_mean", "surround_mean"))
    emb = F.normalize(emb, dim=-1)
    text = torch.cat([emb, -emb.sum(0, keepdim=True)])
    probs = torch.tensor([[[0.3, 0.3, 0.2]]])
    model = SimpleNamespace(clip=clip, config=SANConfig(mask_crop_ensemble=0.7, mask_split_parts=2))
    with torch.no_grad():
        split_probs, split_masks = refine_proposals(model, pixels, probs, logits, text)
        model.config = SANConfig(mask_crop_ensemble=0.7)
        whole_probs, whole_masks = refine_proposals(model, pixels, probs, logits, text)
    assert split_probs.shape == (1, 2, 3) and torch.equal(split_masks, pieces)
    assert split_probs[0, 0].argmax() == 0 and split_probs[0, 1].argmax() == 1
    assert torch.allclose(split_probs.sum(-1), torch.tensor(0.8))  # each piece keeps the proposal's total
    assert whole_probs.shape == (1, 1, 3) and torch.equal(whole_masks, logits)


def test_split_limits_keep_small_pieces_and_low_share_proposals_whole():
    from types import SimpleNamespace

    from vocabseg.models.san import SANConfig, refine_proposals

    logits = torch.full((1, 2, 6, 12), -5.0)
    logits[0, :, 1:5, 1:5] = 4.0    # both proposals: a 16-cell object ...
    logits[0, 0, 2:4, 8:10] = 3.0   # ... and a 4-cell one (proposal 0)
    logits[0, 1, 2, 8] = 3.0        # ... or a 1-cell speck (proposal 1)
    probs = torch.tensor([[[0.5, 0.3], [0.2, 0.1]]])
    text = torch.eye(2, 16)

    def run(**kw):
        model = SimpleNamespace(clip=_tiny_crop_clip(), config=SANConfig(mask_crop_ensemble=0.0, mask_split_parts=2,
                                                                         **kw))
        with torch.no_grad():
            return refine_proposals(model, torch.randn(1, 3, 48, 96), probs, logits, text)

    out_probs, masks = run()
    assert masks.shape == (1, 4, 6, 12) and (out_probs.sum(-1) > 0).tolist() == [[True, True, True, True]]
    out_probs, masks = run(mask_split_min_ratio=0.2)   # the speck (1/16 of the object) does not split proposal 1
    assert (out_probs.sum(-1) > 0).tolist() == [[True, True, True, False]]
    assert torch.equal(masks[0, 2], logits[0, 1]) and (masks[0, 3] <= 0).all()
    out_probs, masks = run(mask_split_max=1)           # only the proposal with the larger object share splits
    assert (out_probs.sum(-1) > 0).tolist() == [[True, True, True, False]]
    assert torch.equal(out_probs[0, 2], probs[0, 1]) and torch.equal(masks[0, 2], logits[0, 1])


def test_nested_cut_gives_a_confident_object_its_pixels_inside_a_larger_background_mask():
    from vocabseg.models.san import cut_nested_proposals
    from vocabseg.postprocess import MaskScores

    logits = torch.full((1, 4, 8, 8), -8.0)
    logits[0, 0] = 6.0                  # "wall", drawn over everything, the star included
    logits[0, 1] = 6.0                  # a second "wall" proposal alike
    logits[0, 2, 2:5, 2:5] = 6.0        # the star's own proposal, 9 cells
    logits[0, 3, 5:7, 5:7] = 6.0        # a doubtful "star" proposal over the wall
    probs = torch.tensor([[[0.97, 0.0], [0.95, 0.0], [0.0, 0.9], [0.3, 0.4]]])  # classes: wall, star
    scores = MaskScores(probs[0], logits[0], (8, 8), (8, 8), (8, 8))
    assert (scores.rows(0, 8).argmax(0)[2:5, 2:5] == 0).all()  # the two wall masks outweigh the star's own
    cut = cut_nested_proposals(probs, logits, 0.8)
    labels = MaskScores(probs[0], cut[0], (8, 8), (8, 8), (8, 8)).rows(0, 8).argmax(0)
    assert (labels[2:5, 2:5] == 1).all() and (labels[5:7, 5:7] == 0).all() and (labels[0] == 0).all()
    assert (cut[0, 0, 2:5, 2:5] < -5).all()
    assert torch.allclose(cut[0, 0, 0].sigmoid(), logits[0, 0, 0].sigmoid(), atol=1e-3)
    assert torch.equal(cut[0, 2:], logits[0, 2:])  # the star and the doubtful proposal: untouched
    assert torch.equal(cut_nested_proposals(probs, logits, 0.99), logits)  # nothing that confident
    assert torch.equal(cut_nested_proposals(probs, logits, 0.8, max_area_ratio=0.1), logits)  # 9/64 cells: too large
    same = probs.clone()
    same[0, 2] = torch.tensor([0.9, 0.0])  # a small proposal of the wall's own class cuts nothing
    assert torch.equal(cut_nested_proposals(same, logits, 0.8), logits)
    # a confident proposal half the size of the larger one, or mostly outside it, is not nested
    half = torch.full((1, 2, 4, 4), -8.0)
    half[0, 0, :, :2] = 6.0
    half[0, 1, :, 1:3] = 6.0
    assert torch.allclose(cut_nested_proposals(torch.tensor([[[0.9, 0.0], [0.0, 0.9]]]), half, 0.8), half)


def test_unseen_classes_take_the_larger_crop_weight():
    """FC-CLIP-style ensemble: a vocabulary class whose embedding is none of the trained names' takes
    ``mask_crop_ensemble_unseen`` as its crop weight; the trained ones keep ``mask_crop_ensemble``."""
    from dataclasses import replace
    from types import SimpleNamespace

    from vocabseg.models.san import SANConfig, crop_log_probs, refine_proposals, unseen_classes

    torch.manual_seed(0)
    table = {name: F.normalize(torch.randn(16), dim=0) for name in ("red star", "blue ring", "white arrow")}
    calls = []

    def text_embeddings(names):
        calls.append(list(names))
        return torch.stack([table[n] for n in names])

    cfg = SANConfig(mask_crop_ensemble=0.5, mask_crop_ensemble_unseen=0.95,
                    trained_class_names=("red star", "blue ring"))
    model = SimpleNamespace(clip=_tiny_crop_clip(), config=cfg, text_embeddings=text_embeddings)
    vocab = text_embeddings(["blue ring", "white arrow", "red star"])
    calls.clear()
    assert unseen_classes(model, vocab).tolist() == [False, True, False]
    assert unseen_classes(model, vocab * 2).tolist() == [False, True, False]  # by direction, not length
    assert calls == [["red star", "blue ring"]]  # the trained names are encoded once per model
    for off in (replace(cfg, mask_crop_ensemble_unseen=0.0), replace(cfg, trained_class_names=())):
        assert unseen_classes(SimpleNamespace(config=off, text_embeddings=text_embeddings), vocab) is None

    pixels, logits = torch.randn(1, 3, 64, 64), torch.full((1, 2, 4, 4), -5.0)
    logits[0, 0, :2, :2], logits[0, 1, 2:, 2:] = 4.0, 4.0
    probs = torch.tensor([[[0.7, 0.05, 0.15], [0.2, 0.3, 0.4]]])
    with torch.no_grad():
        out, _ = refine_proposals(model, pixels, probs, logits, vocab)
        crop, _ = crop_log_probs(model.clip, pixels, logits, vocab, "mask_mean")
    weight = torch.tensor([0.5, 0.95, 0.5])
    expected = ((1 - weight) * probs.log() + weight * crop).softmax(-1) * probs.sum(-1, keepdim=True)
    assert torch.allclose(out, expected, atol=1e-5)
    model.config = replace(cfg, mask_crop_ensemble_unseen=0.0)
    with torch.no_grad():
        plain, _ = refine_proposals(model, pixels, probs, logits, vocab)
    assert torch.allclose(plain, (0.5 * probs.log() + 0.5 * crop).softmax(-1) * probs.sum(-1, keepdim=True), atol=1e-5)
