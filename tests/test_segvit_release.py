"""SegViT as released (zbwxp/SegVit): the mmcv file loads unchanged and gives the official ``seg_logit``.

The release file is written here, by this test, in the release's exact layout (mmcv ``save_checkpoint``:
``{meta, state_dict, optimizer}``, numpy scalars in ``meta``, mmseg key names listed by :func:`_release_keys`
from mmseg's/ATM's naming rules, not from our key map) with random weights at test size. It is checked against:

- ``tests/data/segvit_release_official.npz``: ``seg_logit`` rows computed by the official code itself on the file
  :func:`_write_release` writes (seed 0): zbwxp/SegVit@763137e ``decode_heads/atm_head.py`` in mmsegmentation
  0.24.0 (``EncoderDecoder.slide_inference``, ``VisionTransformer``, the config's test pipeline with mmcv 1.5.0
  ``imrescale`` on opencv-python-headless 5.1; Shrunk: ``backbone/vit_shrink.py`` + ``decode_heads/tpn_atm_head.py``
  with the ``configs/segvit/shrink`` config), run outside the project on the tiny configs of
  ``segvit_release_tiny_test`` / ``segvit_release_shrunk_tiny_test`` (scratch scripts
  ``official_run.py --tiny --load``; not in the repo); the key order of ``_release_keys`` is that of the files
  mmcv's ``save_checkpoint`` wrote there;
- an independent re-computation of the official steps from the release tensors (:func:`_official_seg_logit`).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vocabseg
from vocabseg.data.datasets import load_class_names
from vocabseg.data.transforms import cv2_resize_bilinear_uint8
from vocabseg.errors import CheckpointError, VocabularyError
from vocabseg.models import create_model, get_config
from vocabseg.models.segvit_release import release_resize_size, segvit_from_release, window_starts

FIXTURE = Path(__file__).parent / "data" / "segvit_release_official.npz"
TINY = "segvit_release_tiny_test"
SHRUNK = "segvit_release_shrunk_tiny_test"
ADE = load_class_names("ade150")


# ----------------------------------------------------------------------------------------------- the release file


def _release_keys(width: int, depth: int, grid: int, stages: int, layers: int, dim: int, classes: int,
                  shrunk: bool = False) -> "OrderedDict[str, tuple[int, ...]]":
    """Key -> shape of a SegViT release state_dict, in mmcv's order (mmseg VisionTransformer + ATMHead; Shrunk:
    TPNATMHead = torch TransformerDecoder stages + a learnt query grid, and its ATMSingleHead under ``atm.``)."""
    keys: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    b = "backbone."
    keys[b + "cls_token"] = (1, 1, width)
    keys[b + "pos_embed"] = (1, grid * grid + 1, width)
    keys[b + "patch_embed.projection.weight"] = (width, 3, 16, 16)
    keys[b + "patch_embed.projection.bias"] = (width,)
    for i in range(depth):
        p = f"{b}layers.{i}."
        keys[p + "ln1.weight"] = keys[p + "ln1.bias"] = (width,)
        keys[p + "attn.attn.in_proj_weight"] = (3 * width, width)
        keys[p + "attn.attn.in_proj_bias"] = (3 * width,)
        keys[p + "attn.attn.out_proj.weight"] = (width, width)
        keys[p + "attn.attn.out_proj.bias"] = (width,)
        keys[p + "ln2.weight"] = keys[p + "ln2.bias"] = (width,)
        keys[p + "ffn.layers.0.0.weight"] = (4 * width, width)
        keys[p + "ffn.layers.0.0.bias"] = (4 * width,)
        keys[p + "ffn.layers.1.weight"] = (width, 4 * width)
        keys[p + "ffn.layers.1.bias"] = (width,)
    def decoder(p: str, torch_layer: bool) -> None:
        keys[p + "self_attn.in_proj_weight"] = (3 * dim, dim)
        keys[p + "self_attn.in_proj_bias"] = (3 * dim,)
        keys[p + "self_attn.out_proj.weight"] = (dim, dim)
        keys[p + "self_attn.out_proj.bias"] = (dim,)
        if torch_layer:  # nn.TransformerDecoderLayer's own cross-attention
            keys[p + "multihead_attn.in_proj_weight"] = (3 * dim, dim)
            keys[p + "multihead_attn.in_proj_bias"] = (3 * dim,)
            keys[p + "multihead_attn.out_proj.weight"] = (dim, dim)
            keys[p + "multihead_attn.out_proj.bias"] = (dim,)
        keys[p + "linear1.weight"] = (4 * dim, dim)
        keys[p + "linear1.bias"] = (4 * dim,)
        keys[p + "linear2.weight"] = (dim, 4 * dim)
        keys[p + "linear2.bias"] = (dim,)
        for n in (1, 2, 3):
            keys[f"{p}norm{n}.weight"] = keys[f"{p}norm{n}.bias"] = (dim,)
        if not torch_layer:  # ATM's Attention replaces it (q, k, v, proj)
            for n in ("q", "k", "v", "proj"):
                keys[f"{p}multihead_attn.{n}.weight"] = (dim, dim)
                keys[f"{p}multihead_attn.{n}.bias"] = (dim,)

    h = "decode_head."
    keys[h + "loss_decode.criterion.empty_weight"] = (classes + 1,)  # mmseg's BaseDecodeHead registers it first
    for s in range(1, stages + 1):
        keys[f"{h}input_proj_{s}.weight"] = (dim, width)
        keys[f"{h}input_proj_{s}.bias"] = (dim,)
        keys[f"{h}proj_norm_{s}.weight"] = keys[f"{h}proj_norm_{s}.bias"] = (dim,)
        for j in range(layers):
            decoder(f"{h}decoder_{s}.layers.{j}.", torch_layer=shrunk)
    if shrunk:
        keys[h + "q.weight"] = (grid * grid, dim)
        h = "decode_head.atm."
        keys[h + "loss_decode.criterion.empty_weight"] = (classes + 1,)
        for j in range(layers):
            decoder(f"{h}decoder_1.layers.{j}.", torch_layer=False)
    keys[h + "q.weight"] = (classes, dim)
    keys[h + "class_embed.weight"] = (classes + 1, dim)
    keys[h + "class_embed.bias"] = (classes + 1,)
    return keys


TINY_KEYS = dict(width=64, depth=4, grid=4, stages=2, layers=2, dim=32, classes=150)


def _release_state(seed: int = 0, **sizes) -> "OrderedDict[str, torch.Tensor]":
    """Random weights shaped like a trained head, so that labels vary over the image: unit-scale activations,
    norms near 1, decoder residual branches damped (each class query stays itself), query/key projections of
    the mask attention enlarged (masks vary in space), and class c's classifier row along query c."""
    g = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in _release_keys(**(sizes or TINY_KEYS)).items():
        r = torch.randn(shape, generator=g)
        if key.endswith("empty_weight"):
            v = torch.ones(shape)
        elif ("ln" in key.rsplit(".", 2)[-2] or "norm" in key) and key.endswith("weight"):
            v = 1 + 0.1 * r
        elif key.endswith(("bias", "cls_token", "pos_embed")):
            v = 0.1 * r
        elif key in ("decode_head.q.weight", "decode_head.atm.q.weight"):
            v = r
        else:
            v = r / math.sqrt(math.prod(shape[1:]))
            if key.endswith(("multihead_attn.q.weight", "multihead_attn.k.weight")):
                v = 3 * v
            elif key.endswith(("self_attn.out_proj.weight", "multihead_attn.proj.weight", "linear2.weight")):
                v = 0.3 * v
        state[key] = v.float().contiguous()
    h = "decode_head.atm." if "decode_head.atm.q.weight" in state else "decode_head."
    q = state[h + "q.weight"]
    state[h + "class_embed.weight"][: q.shape[0]] = (q - q.mean(1, keepdim=True)) / q.std(1, keepdim=True)
    return state


def _write_release(path: Path, state: dict | None = None, meta_extra: dict | None = None) -> Path:
    """An mmcv ``save_checkpoint`` file: ``meta`` (config text, CLASSES, numpy seed), ``state_dict``,
    ``optimizer`` (AdamW's state_dict shape)."""
    state = _release_state() if state is None else state
    meta = {"mmseg_version": "0.24.0", "config": "model = dict(type='EncoderDecoder', ...)",
            "CLASSES": tuple(ADE), "seed": np.int64(0), "mmcv_version": "1.4.4", "time": "Fri Jul  1 2022"}
    meta.update(meta_extra or {})
    optimizer = {"state": {0: {"step": 160000, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                 "param_groups": [{"lr": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                                   "amsgrad": False, "params": [0]}]}
    torch.save({"meta": meta, "state_dict": state, "optimizer": optimizer}, path)
    return path


@pytest.fixture(scope="module")
def release_file(tmp_path_factory) -> Path:
    return _write_release(tmp_path_factory.mktemp("segvit") / "ade_tiny.pth")


@pytest.fixture(scope="module")
def model(release_file):
    return vocabseg.load_model(TINY, checkpoint=release_file)


@pytest.fixture(scope="module")
def shrunk_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("segvit") / "ade_shrunk_tiny.pth"
    return vocabseg.load_model(SHRUNK, checkpoint=_write_release(path, _release_state(**TINY_KEYS, shrunk=True)))


# ----------------------------------------------------------------------------------------------- the official steps


def _official_seg_logit(state: dict[str, torch.Tensor], image: np.ndarray, cfg) -> torch.Tensor:
    """The official test path written out from the release tensors (independent of our modules)."""
    h, w = image.shape[:2]
    s = min(cfg.image_scale[0] / max(h, w), cfg.image_scale[1] / min(h, w))
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    img = cv2_resize_bilinear_uint8(image, (nh, nw)) if (nh, nw) != (h, w) else image
    x = torch.from_numpy((img.astype(np.float32) - 127.5) / 127.5).permute(2, 0, 1)[None]
    crop, stride = cfg.crop, cfg.stride
    preds = torch.zeros(1, 150, nh, nw)
    count = torch.zeros(1, 1, nh, nw)
    for hi in range(max(nh - crop + stride - 1, 0) // stride + 1):
        for wi in range(max(nw - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(hi * stride + crop, nh), min(wi * stride + crop, nw)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out = _official_window(state, x[:, :, y1:y2, x1:x2], cfg)
            preds += F.pad(out, (x1, nw - x2, y1, nh - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return F.interpolate(preds / count, size=(h, w), mode="bilinear", align_corners=False)[0]


def _official_window(sd: dict[str, torch.Tensor], x: torch.Tensor, cfg) -> torch.Tensor:
    width, heads = cfg.vit.width, cfg.vit.heads
    t = F.conv2d(x, sd["backbone.patch_embed.projection.weight"], sd["backbone.patch_embed.projection.bias"],
                 stride=16)
    gh, gw = t.shape[-2:]
    t = torch.cat([sd["backbone.cls_token"], t.flatten(2).transpose(1, 2)], 1) + sd["backbone.pos_embed"]
    t = t[:, 1:]  # with_cls_token=False
    feats = []
    for i in range(cfg.vit.depth):
        p = f"backbone.layers.{i}."
        y = F.layer_norm(t, (width,), sd[p + "ln1.weight"], sd[p + "ln1.bias"], 1e-6).transpose(0, 1)
        a = F.multi_head_attention_forward(y, y, y, width, heads, sd[p + "attn.attn.in_proj_weight"],
                                           sd[p + "attn.attn.in_proj_bias"], None, None, False, 0.0,
                                           sd[p + "attn.attn.out_proj.weight"], sd[p + "attn.attn.out_proj.bias"],
                                           need_weights=False)[0]
        t = t + a.transpose(0, 1)
        y = F.layer_norm(t, (width,), sd[p + "ln2.weight"], sd[p + "ln2.bias"], 1e-6)
        y = F.gelu(F.linear(y, sd[p + "ffn.layers.0.0.weight"], sd[p + "ffn.layers.0.0.bias"]))
        t = t + F.linear(y, sd[p + "ffn.layers.1.weight"], sd[p + "ffn.layers.1.bias"])
        if i in cfg.out_indices:
            feats.append(t)
    dim, dh = cfg.embed_dims, cfg.decoder_heads
    q = sd["decode_head.q.weight"][None]
    masks = 0
    for s, f in enumerate(feats[::-1], start=1):  # decoder_1 takes the deepest features
        hp = "decode_head."
        m = F.layer_norm(F.linear(f, sd[f"{hp}input_proj_{s}.weight"], sd[f"{hp}input_proj_{s}.bias"]), (dim,),
                         sd[f"{hp}proj_norm_{s}.weight"], sd[f"{hp}proj_norm_{s}.bias"])
        for j in range(cfg.decoder_layers):
            p = f"{hp}decoder_{s}.layers.{j}."
            y = q.transpose(0, 1)
            a = F.multi_head_attention_forward(y, y, y, dim, dh, sd[p + "self_attn.in_proj_weight"],
                                               sd[p + "self_attn.in_proj_bias"], None, None, False, 0.0,
                                               sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"],
                                               need_weights=False)[0].transpose(0, 1)
            q = F.layer_norm(q + a, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
            lin = {n: F.linear(z, sd[f"{p}multihead_attn.{n}.weight"], sd[f"{p}multihead_attn.{n}.bias"])
                   .reshape(1, -1, dh, dim // dh).transpose(1, 2) for n, z in (("q", q), ("k", m), ("v", m))}
            logits = lin["q"] @ lin["k"].transpose(-2, -1) * (dim // dh) ** -0.5
            att = (logits.softmax(-1) @ lin["v"]).transpose(1, 2).reshape(1, -1, dim)
            att = F.linear(att, sd[p + "multihead_attn.proj.weight"], sd[p + "multihead_attn.proj.bias"])
            q = F.layer_norm(q + att, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
            ff = F.linear(F.relu(F.linear(q, sd[p + "linear1.weight"], sd[p + "linear1.bias"])),
                          sd[p + "linear2.weight"], sd[p + "linear2.bias"])
            q = F.layer_norm(q + ff, (dim,), sd[p + "norm3.weight"], sd[p + "norm3.bias"])
        masks = masks + logits.mean(1).reshape(1, -1, gh, gw)
    cls = F.linear(q, sd["decode_head.class_embed.weight"], sd["decode_head.class_embed.bias"]).softmax(-1)[..., :-1]
    masks = F.interpolate(masks, size=(cfg.crop, cfg.crop), mode="bilinear", align_corners=False).sigmoid()
    return torch.einsum("bqc,bqhw->bchw", cls, masks)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([np.sin(y * r.uniform(0.05, 0.3) + x * r.uniform(0.05, 0.3) + r.uniform(0, 6))
                    for _ in range(3)], -1)
    return ((img + 1) * 120 + r.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", ["plain", "shrunk"])
def test_matches_official_code_fixture(variant, model, shrunk_model):
    """Numbers computed by the official code on this test's own release files (see module docstring): a 64x80
    image (2 windows, no resize) and a 50x70 one (resized to 64x90)."""
    ref = np.load(FIXTURE)
    model = model if variant == "plain" else shrunk_model
    for key in (("a", "b") if variant == "plain" else ("c", "d")):
        image, rows = ref[f"{key}_image"], ref[f"{key}_rows"]
        logits, labels = ref[f"{key}_logits"], ref[f"{key}_labels"]
        names = [ADE[i] for i in rows]
        result = model.predict(image, vocabulary=names)
        assert result.logits.shape == logits.shape
        diff = np.abs(result.logits - logits)
        assert diff.max() < 1e-4, (key, diff.max())
        full = model.predict(image, vocabulary=ADE)
        assert (full.labels == labels).mean() >= 0.999


@pytest.mark.parametrize("size", [(96, 64), (50, 70), (90, 45)])  # 2 windows; resized; resized, 3 windows
def test_matches_independent_official_steps(model, size):
    state = _release_state()
    image = _image(*size, seed=size[0] * 7 + size[1])
    ref = _official_seg_logit(state, image, get_config(TINY)).numpy()
    order = np.random.default_rng(size[1]).permutation(150)[:23]
    for idx in (np.arange(150), order[::-1]):
        result = model.predict(image, vocabulary=[ADE[i] for i in idx])
        assert result.logits.shape == (len(idx),) + size
        assert np.abs(result.logits - ref[idx]).max() < 1e-4
        assert (result.labels == ref[idx].argmax(0)).mean() >= 0.999
        assert result.vocabulary == [ADE[i] for i in idx]


def test_official_resize_and_windows():
    assert release_resize_size(480, 640, (2048, 640)) == (640, 853)
    assert release_resize_size(640, 1000, (2048, 640)) == (640, 1000)
    assert release_resize_size(100, 1000, (2048, 640)) == (205, 2048)  # long side capped
    assert release_resize_size(100, 1000, (2048, 512), min_size=512) == (512, 5120)  # min_size: short side fixed
    assert release_resize_size(375, 500, (520, 520), min_size=480) == (520, 693)
    assert window_starts(640, 640, 608) == [0]
    assert window_starts(853, 640, 608) == [0, 213]
    assert window_starts(2048, 640, 608) == [0, 608, 1216, 1408]


def test_elongated_image_is_padded_not_failed(model):
    """The official head reshapes a window's grid as a square and fails below the crop size; ours pads."""
    result = model.predict(_image(20, 200, 1), vocabulary=["wall", "sky"])
    assert result.logits.shape == (2, 20, 200) and np.isfinite(result.logits).all()


def test_vocabulary_names_and_errors(model):
    result = model.predict(_image(64, 64, 2), vocabulary="sky, road, wall")  # "road" is a synonym of "road, route"
    assert result.vocabulary == ["sky", "road", "wall"]
    ref = model.predict(_image(64, 64, 2), vocabulary=["sky", "road, route", "wall"])
    np.testing.assert_array_equal(result.logits, ref.logits)
    with pytest.raises(VocabularyError) as e:
        model.predict(_image(64, 64, 2), vocabulary=["sky", "red circle"])
    msg = str(e.value)
    assert "'red circle'" in msg and "ade150.txt" in msg and "class_names" in msg and "\n" not in msg
    assert model.class_names == ADE
    # mmseg's own names of the release's classes (its files' meta CLASSES) are accepted too
    assert model.text_embeddings(["windowpane", "window", "ashcan"]).tolist() == [8, 8, 138]


def test_loads_without_copying(release_file):
    """Tensors are assigned, not copied: a memory-mapped release is never held twice."""
    from vocabseg.clip.load import read_state_dict

    state = read_state_dict(release_file)
    m = create_model(TINY)
    m.load_checkpoint_state(state)
    assert m.backbone.pos_embed.data_ptr() == state["backbone.pos_embed"].data_ptr()
    assert m.head.queries.data_ptr() == state["decode_head.q.weight"].data_ptr()


def test_full_size_layout_matches_release():
    """ade_54.6.pth: 506 tensors, 344.3 M values; every one maps onto the registered model (meta device); the
    COCO-Stuff, Context and Shrunk layouts too."""
    keys = _release_keys(width=1024, depth=24, grid=40, stages=3, layers=3, dim=512, classes=150)
    assert len(keys) == 506 and abs(sum(math.prod(s) for s in keys.values()) - 344.3e6) < 0.05e6
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in keys.items()}
        model = create_model("segvit_vit_large_16_ade")
    own = model.state_dict()
    mapped = segvit_from_release(state, model.config)
    assert sorted(mapped) == sorted(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    for name, grid, classes in (("segvit_vit_large_16_coco_stuff", 32, 171),
                                ("segvit_vit_large_16_pascal_context", 30, 60)):
        keys = _release_keys(width=1024, depth=24, grid=grid, stages=3, layers=3, dim=512, classes=classes)
        with torch.device("meta"):
            state = {k: torch.empty(s) for k, s in keys.items()}
            m = create_model(name)
        mapped = segvit_from_release(state, m.config)
        own = m.state_dict()
        assert sorted(mapped) == sorted(own) and all(mapped[k].shape == own[k].shape for k in own)
        assert len(m.class_names) == classes
    # ade_shrunk_53.9.pth: TPN (2 stages, 1,600 grid queries) + ATM under decode_head.atm: 480 tensors, 344.6 M
    keys = _release_keys(width=1024, depth=24, grid=40, stages=2, layers=3, dim=512, classes=150, shrunk=True)
    assert len(keys) == 480 and abs(sum(math.prod(s) for s in keys.values()) - 344.6e6) < 0.05e6
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in keys.items()}
        m = create_model("segvit_vit_large_16_ade_shrunk")
    mapped, own = segvit_from_release(state, m.config), m.state_dict()
    assert sorted(mapped) == sorted(own) and all(mapped[k].shape == own[k].shape for k in own)
    with pytest.raises(CheckpointError, match="Shrunk"):  # a Shrunk file given to the plain model
        segvit_from_release(state, get_config("segvit_vit_large_16_ade"))


def test_wrong_files_are_one_line_errors(tmp_path, release_file):
    # another variant: a COCO-Stuff-171 release into the ADE model
    coco = _write_release(tmp_path / "coco.pth", _release_state(**{**TINY_KEYS, "classes": 171}))
    with pytest.raises(CheckpointError) as e:
        vocabseg.load_model(TINY, checkpoint=coco)
    assert str(coco) in str(e.value) and "171 classes" in str(e.value) and "\n" not in str(e.value)
    # another family: a SAN-like file
    san = tmp_path / "san.pth"
    torch.save({"model": {"side_adapter_network.vit_model.pos_embed": torch.zeros(1, 4, 8),
                          "clip_visual_extractor.conv1.weight": torch.zeros(8, 3, 16, 16)}}, san)
    with pytest.raises(CheckpointError) as e:
        vocabseg.load_model(TINY, checkpoint=san)
    assert str(san) in str(e.value) and "\n" not in str(e.value)
    # truncated
    cut = tmp_path / "cut.pth"
    cut.write_bytes(release_file.read_bytes()[: release_file.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        vocabseg.load_model(TINY, checkpoint=cut)
    assert str(cut) in str(e.value) and "\n" not in str(e.value)


def test_hostile_pickle_in_meta_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = _write_release(tmp_path / "evil.pth", meta_extra={"hook": Evil()})
    with pytest.raises(CheckpointError) as e:
        vocabseg.load_model(TINY, checkpoint=path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
