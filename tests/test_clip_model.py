"""CLIP model shapes and the dense-prediction entry points (features, blocks with masks, stages), plus preprocessing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vocabseg.clip as vc
from vocabseg.clip.model import CLIPConfig
from vocabseg.clip.transforms import normalize
from vocabseg.errors import ImageError

TINY_VIT = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=64, vision_patch_size=8,
                      context_length=77, vocab_size=1000, transformer_width=64, transformer_heads=2,
                      transformer_layers=2, vision_heads=2)
TINY_RN = CLIPConfig(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16,
                     vision_patch_size=None, context_length=77, vocab_size=1000, transformer_width=64,
                     transformer_heads=2, transformer_layers=1)
SOT, EOT = 998, 999  # the tiny vocabulary's last two ids play <start_of_text> / <end_of_text>


def make_tokens(eot_positions: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(eot_positions), 77, dtype=torch.long)
    for i, e in enumerate(eot_positions):
        tokens[i, 0] = SOT
        tokens[i, 1:e] = torch.randint(1, SOT, (e - 1,), generator=g)
        tokens[i, e] = EOT
    return tokens


@pytest.fixture(scope="module")
def vit() -> vc.CLIP:
    torch.manual_seed(0)
    return vc.build_clip(TINY_VIT).eval()


@pytest.fixture(scope="module")
def rn() -> vc.CLIP:
    torch.manual_seed(1)
    return vc.build_clip(TINY_RN).eval()


# ----------------------------------------------------------------------------------------------- sizes


def test_vit_b16_parameter_and_tensor_counts():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = vc.build_clip("ViT-B/16")
    assert sum(p.numel() for p in model.parameters()) == 149_620_737
    assert len(model.state_dict()) == 302
    assert model.state_dict()["visual.positional_embedding"].shape == (197, 768)


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RN], ids=["vit", "resnet"])
def test_encode_shapes(cfg):
    torch.manual_seed(0)
    model = vc.build_clip(cfg).eval()
    images = torch.randn(3, 3, cfg.image_resolution, cfg.image_resolution)
    tokens = make_tokens([4, 9])
    with torch.no_grad():
        assert model.encode_image(images).shape == (3, 32)
        assert model.encode_text(tokens).shape == (2, 32)
        per_image, per_text = model(images, tokens)
    assert per_image.shape == (3, 2) and torch.equal(per_text, per_image.t())
    with torch.no_grad():
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
    assert torch.allclose(per_image, model.logit_scale.exp() * img @ txt.t(), atol=1e-5)


# ----------------------------------------------------------------------------------------------- text tower


def reference_encode_text(model: vc.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """OpenAI's text tower written out by hand over all 77 positions (no cut at EOT)."""
    n, length = tokens.shape
    heads = model.config.transformer_heads
    x = model.token_embedding.weight[tokens] + model.positional_embedding  # [N, 77, C]
    c = x.shape[-1]
    d = c // heads
    causal = torch.full((length, length), float("-inf")).triu(1)
    for blk in model.transformer.resblocks:
        h = F.layer_norm(x, (c,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
        q, k, v = (h @ blk.attn.in_proj_weight.t() + blk.attn.in_proj_bias).split(c, dim=-1)
        q, k, v = (t.reshape(n, length, heads, d).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(n, length, c)
        x = x + o @ blk.attn.out_proj.weight.t() + blk.attn.out_proj.bias
        h = F.layer_norm(x, (c,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
        h = h @ blk.mlp.c_fc.weight.t() + blk.mlp.c_fc.bias
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ blk.mlp.c_proj.weight.t() + blk.mlp.c_proj.bias
    x = F.layer_norm(x, (c,), model.ln_final.weight, model.ln_final.bias, model.ln_final.eps)
    return x[torch.arange(n), tokens.argmax(dim=-1)] @ model.text_projection


def test_encode_text_cut_at_eot_equals_full_sequence(vit):
    tokens = make_tokens([3, 11, 25, 76])
    with torch.no_grad():
        fast = vit.encode_text(tokens)
        full = reference_encode_text(vit, tokens)
        alone = torch.cat([vit.encode_text(tokens[i:i + 1]) for i in range(len(tokens))])
    assert torch.allclose(fast, full, atol=1e-5)
    assert torch.allclose(fast, alone, atol=1e-5)  # batch padding does not leak into shorter prompts


# ----------------------------------------------------------------------------------------------- ViT


def test_positional_embedding_identity_at_native_grid_and_resized_elsewhere(vit):
    visual = vit.visual
    native = visual.positional_embedding_for((4, 4))  # 32 px / patch 8
    assert torch.equal(native, visual.positional_embedding)
    resized = visual.positional_embedding_for((6, 5))
    assert resized.shape == (1 + 30, 64)
    assert torch.equal(resized[0], visual.positional_embedding[0])  # [CLS] is not part of the grid


def test_vit_runs_at_other_resolutions(vit):
    with torch.no_grad():
        for size in ((48, 48), (40, 56)):
            out = vit.encode_image(torch.randn(2, 3, *size))
            assert out.shape == (2, 32) and torch.isfinite(out).all()
            feats, grid = vit.visual.forward_features(torch.randn(1, 3, *size), layers=(1,))
            assert grid == (size[0] // 8, size[1] // 8)
            assert feats[1].shape == (1, 1 + grid[0] * grid[1], 64)


def test_forward_features_equal_block_by_block(vit):
    visual = vit.visual
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, grid = visual.forward_features(images, layers=(0, 1, 3))
        x, grid2 = visual.embed(images)
        manual = {0: x}
        for i, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x)
            manual[i] = x
        assert grid == grid2 == (4, 4)
        assert sorted(feats) == [0, 1, 3]
        for k in feats:
            assert torch.equal(feats[k], manual[k])
        # the pieces compose into encode_image
        assert torch.allclose(visual.head(feats[3][:, 0]), vit.encode_image(images), atol=1e-6)
        # run_blocks continues from any layer
        assert torch.allclose(visual.run_blocks(feats[1], start=1), manual[3], atol=1e-6)
        fmap = visual.tokens_to_map(feats[3], grid)
    assert fmap.shape == (2, 64, 4, 4)
    assert torch.equal(fmap[:, :, 1, 2], feats[3][:, 1 + 1 * 4 + 2])


def test_run_blocks_mask_isolates_a_blocked_token(vit):
    visual = vit.visual
    torch.manual_seed(3)
    length, j = 17, 5
    x = torch.randn(1, length, 64)
    x2 = x.clone()
    x2[:, j] += torch.randn(64)  # change only token j
    mask = torch.zeros(length, length)
    mask[:, j] = float("-inf")  # nobody attends to token j ...
    mask[j, j] = 0.0  # ... except itself
    others = [i for i in range(length) if i != j]
    with torch.no_grad():
        a, b = visual.run_blocks(x, attn_mask=mask), visual.run_blocks(x2, attn_mask=mask)
        assert torch.allclose(a[:, others], b[:, others], atol=1e-6)
        assert not torch.allclose(a[:, j], b[:, j], atol=1e-3)
        # without the mask the change spreads to every token
        u, v = visual.run_blocks(x), visual.run_blocks(x2)
        assert (u[:, others] - v[:, others]).abs().amax(dim=-1).min() > 1e-4
        # a per-head mask [B, heads, L, L] with the same rows acts the same
        per_head = mask.expand(1, visual.heads, length, length)
        assert torch.allclose(visual.run_blocks(x, attn_mask=per_head), a, atol=1e-6)
        # blocking j in one head only lets it through the other
        partial = per_head.clone()
        partial[:, 1] = 0.0
        c, d = visual.run_blocks(x, attn_mask=partial), visual.run_blocks(x2, attn_mask=partial)
        assert not torch.allclose(c[:, others], d[:, others], atol=1e-4)


# ----------------------------------------------------------------------------------------------- ResNet


def test_resnet_stage_strides_and_channels(rn):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = rn.visual.forward_stages(images)
    expected = {"stem": (16, 4), "layer1": (64, 4), "layer2": (128, 8), "layer3": (256, 16), "layer4": (512, 32)}
    assert list(feats) == list(expected)
    for name, (channels, stride) in expected.items():
        assert feats[name].shape == (2, channels, 64 // stride, 64 // stride), name
    with torch.no_grad():
        assert torch.equal(rn.visual.attnpool(feats["layer4"]), rn.encode_image(images))
        # other resolutions: the attention pool's positional embedding is resized
        assert rn.encode_image(torch.randn(1, 3, 96, 96)).shape == (1, 32)


# ----------------------------------------------------------------------------------------------- preprocessing


def test_preprocess_square_image_is_only_normalised():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = vc.preprocess(img, resolution=32)
    mean = torch.tensor(vc.OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(vc.OPENAI_STD).view(3, 1, 1)
    expected = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - mean) / std
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    assert torch.allclose(out, expected, atol=1e-6)


def test_preprocess_crops_the_centre_of_a_tall_image():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)  # short side already 32: no resize
    out = vc.preprocess(img, resolution=32)
    assert torch.allclose(out, vc.preprocess(img[16:48], resolution=32), atol=0)


@pytest.mark.parametrize("h, w, r", [(64, 128, 32), (33, 50, 20), (50, 33, 20)])
def test_preprocess_resizes_short_side_bicubic_then_crops(h, w, r):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    new_w, new_h = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    resized = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BICUBIC))
    top, left = int(round((new_h - r) / 2)), int(round((new_w - r) / 2))
    expected = normalize(resized[top:top + r, left:left + r])
    assert torch.allclose(vc.preprocess(img, resolution=r), expected, atol=1e-6)


def test_preprocess_inputs_and_model_resolution(tmp_path, vit):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    a = vc.preprocess(img, resolution=24)
    assert torch.equal(a, vc.preprocess(path, resolution=24))
    assert torch.equal(a, vc.preprocess(str(path), resolution=24))
    assert torch.equal(a, vc.preprocess(Image.fromarray(img), resolution=24))
    assert vc.preprocess(img, model=vit).shape == (3, 32, 32)
    assert vc.preprocess(img).shape == (3, 224, 224)


def test_preprocess_unreadable_image_is_a_user_error(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError):
        vc.preprocess(bad)


def test_normalize_layouts_and_dtypes():
    rng = np.random.default_rng(4)
    batch = rng.integers(0, 256, (2, 8, 9, 3), dtype=np.uint8)  # channels last, uint8
    out = normalize(batch)
    floats = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    assert out.shape == (2, 3, 8, 9)
    assert torch.allclose(out, normalize(floats), atol=1e-6)
    mean = torch.tensor(vc.OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(vc.OPENAI_STD).view(1, 3, 1, 1)
    assert torch.allclose(out, (floats - mean) / std, atol=1e-6)
    with pytest.raises(ImageError):
        normalize(torch.zeros(2, 4, 5, 5))
