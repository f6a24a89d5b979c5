"""LSeg as released (isl-org/lang-seg ``demo_e200.ckpt``): the Lightning file's exact layout, loading it through
``load_model``, and the official single-scale and multi-scale evaluation against an independent re-computation.

Release files are written here by our own code in the release's layout: a PyTorch-Lightning 1.4 container
(``epoch``, ``global_step``, ``pytorch-lightning_version``, ``state_dict``, ``callbacks`` keyed by the
``ModelCheckpoint`` class, ``optimizer_states``, ``lr_schedulers``), every tensor under ``net.``, CLIP's conv/linear/
attention weights, ``text_projection`` and ``visual.proj`` in fp16, BatchNorm counters in int64 — at toy widths
(``lseg_release_tiny_test``). ``data/lseg_vit_large_16.keys.tsv`` lists the 730 tensors (name, shape, dtype) of the
official ``LSegNet(backbone="clip_vitl16_384")`` state dict, dumped from the official code (lang-seg
modules/models/lseg_net.py with timm 0.4.12 and OpenAI CLIP's ``convert_weights``, as ``clip.load(device="cuda")``
leaves it).

The reference (``_official_*`` below) re-computes the official steps from the release-named tensors with plain
torch functions: timm's ViT blocks, ``forward_flex``'s positional resize, the hooks, ``act_postprocess``,
``refinenet`` blocks, ``head1``, the normalised product, ``output_conv``; CLIP's text tower at the full 77 tokens;
``LSeg_MultiEvalModule``'s scales, windows and flips. It shares no module with vocabseg.
"""

from __future__ import annotations

import collections
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vocabseg
from vocabseg.clip import tokenize
from vocabseg.clip.model import CLIP
from vocabseg.errors import CheckpointError
from vocabseg.models import create_model, get_config
from vocabseg.models.lseg_release import _DROPPED, release_to_vocabseg, vocabseg_to_release

KEYS_TSV = Path(__file__).parent / "data" / "lseg_vit_large_16.keys.tsv"
TINY = "lseg_release_tiny_test"
RELEASE = dict(geometry="release")  # the tiny config's default geometry is the generic one

# OpenAI's convert_weights: conv/linear weights and biases, attention projections, text_projection, visual.proj
_FP16 = re.compile(r"net\.clip_pretrained\..*(attn\.in_proj_(weight|bias)|attn\.out_proj\.(weight|bias)"
                   r"|mlp\.c_(fc|proj)\.(weight|bias)|conv1\.weight|text_projection|visual\.proj)$")


# ----------------------------------------------------------------------------------------------- writing releases


def release_state(model) -> dict[str, torch.Tensor]:
    """The full release ``state_dict`` of ``model``'s weights: ours renamed, plus what LSeg never uses (CLIP's
    image tower, timm's head and final norm) at random, with the release's dtypes."""
    c = model.config
    state = vocabseg_to_release({k: v.detach().clone() for k, v in model.state_dict().items()})
    device = next(model.parameters()).device
    with torch.device(device):
        visual = CLIP(c.clip).visual.state_dict()
        width = c.encoder.width
        extra = {"net.pretrained.model.norm.weight": torch.ones(width), "net.pretrained.model.norm.bias": torch.zeros(width),
                 "net.pretrained.model.head.weight": torch.randn(1000, width) * 0.01,
                 "net.pretrained.model.head.bias": torch.zeros(1000)}
    state.update({f"net.clip_pretrained.visual.{k}": v for k, v in visual.items()})
    state.update(extra)
    return {k: (v.half() if _FP16.match(k) else v) for k, v in state.items()}


def _fake_lightning(monkeypatch):
    """A ModelCheckpoint class pickled under Lightning's module name (Lightning itself is not installed)."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = cls
    return names, cls


def write_release(path: Path, state: dict[str, torch.Tensor], monkeypatch) -> Path:
    """A PyTorch-Lightning 1.4 checkpoint as LSegModule's trainer saves it (no hyper_parameters)."""
    names, checkpoint_cls = _fake_lightning(monkeypatch)
    ordered = collections.OrderedDict(state)
    torch.save({
        "epoch": 199, "global_step": 123400, "pytorch-lightning_version": "1.4.9", "state_dict": ordered,
        "callbacks": {checkpoint_cls: {"monitor": "val_acc_epoch", "best_model_score": torch.tensor(0.81),
                                       "best_model_path": "checkpoints/demo/epoch=199.ckpt", "current_score": None,
                                       "dirpath": "checkpoints/demo"}},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}},
                              "param_groups": [{"lr": 0.0, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}]}],
        "lr_schedulers": [{"last_epoch": 200, "base_lrs": [0.004], "_last_lr": [0.0], "lr_lambdas": [None]}],
    }, path)
    for name in names:  # a user loading the file has no Lightning
        monkeypatch.delitem(sys.modules, name)
    return path


def _random_tiny():
    torch.manual_seed(0)
    model = create_model(TINY, **RELEASE).eval()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith("running_var"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                p.normal_(0, 0.1)
            elif p.is_floating_point():
                p.normal_(0, 0.5 if p.ndim == 1 else 0.2)
    return model


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """(release state dict, path of the Lightning file) for random tiny weights."""
    mp = pytest.MonkeyPatch()
    try:
        state = release_state(_random_tiny())
        path = write_release(tmp_path_factory.mktemp("lseg") / "demo_tiny.ckpt", state, mp)
    finally:
        mp.undo()
    return state, path


# ----------------------------------------------------------------------------------------------- the reference


def _f(sd, key):
    return sd[key].float()


def _official_text(sd: dict, names: list[str], heads: int = 2) -> torch.Tensor:
    """CLIP ViT text tower (OpenAI model.py encode_text) from ``net.clip_pretrained.*``, all 77 positions."""
    p = "net.clip_pretrained."
    tokens = tokenize(names).long()
    x = _f(sd, p + "token_embedding.weight")[tokens] + _f(sd, p + "positional_embedding")
    n, length, width = x.shape
    mask = torch.full((length, length), float("-inf")).triu(1)
    i = 0
    while f"{p}transformer.resblocks.{i}.ln_1.weight" in sd:
        b = f"{p}transformer.resblocks.{i}."
        y = F.layer_norm(x, (width,), _f(sd, b + "ln_1.weight"), _f(sd, b + "ln_1.bias"), 1e-5)
        q, k, v = F.linear(y, _f(sd, b + "attn.in_proj_weight"), _f(sd, b + "attn.in_proj_bias")).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(n, length, width)
        x = x + F.linear(y, _f(sd, b + "attn.out_proj.weight"), _f(sd, b + "attn.out_proj.bias"))
        y = F.layer_norm(x, (width,), _f(sd, b + "ln_2.weight"), _f(sd, b + "ln_2.bias"), 1e-5)
        y = F.linear(y, _f(sd, b + "mlp.c_fc.weight"), _f(sd, b + "mlp.c_fc.bias"))
        y = y * torch.sigmoid(1.702 * y)
        x = x + F.linear(y, _f(sd, b + "mlp.c_proj.weight"), _f(sd, b + "mlp.c_proj.bias"))
        i += 1
    x = F.layer_norm(x, (width,), _f(sd, p + "ln_final.weight"), _f(sd, p + "ln_final.bias"), 1e-5)
    return x[torch.arange(n), tokens.argmax(-1)] @ _f(sd, p + "text_projection")


def _official_net(sd: dict, x: torch.Tensor, text: torch.Tensor, heads: int, hooks=(0, 1, 2, 3)) -> torch.Tensor:
    """``LSeg.forward`` (arch_option 0) on a normalised batch [B, 3, H, W] (H, W multiples of 32) -> [B, C, H, W]."""
    m = "net.pretrained.model."
    b, _, h, w = x.shape
    gh, gw = h // 16, w // 16
    t = F.conv2d(x, _f(sd, m + "patch_embed.proj.weight"), _f(sd, m + "patch_embed.proj.bias"), stride=16)
    t = t.flatten(2).transpose(1, 2)
    pos = _f(sd, m + "pos_embed")
    g = int(math.sqrt(pos.shape[1] - 1))
    grid = F.interpolate(pos[0, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(gh, gw), mode="bilinear")
    pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)
    t = torch.cat([_f(sd, m + "cls_token").expand(b, -1, -1), t], dim=1) + pos
    d = t.shape[-1]
    acts = []
    i = 0
    while f"{m}blocks.{i}.norm1.weight" in sd:
        k = f"{m}blocks.{i}."
        y = F.layer_norm(t, (d,), _f(sd, k + "norm1.weight"), _f(sd, k + "norm1.bias"), 1e-6)
        qkv = F.linear(y, _f(sd, k + "attn.qkv.weight"), _f(sd, k + "attn.qkv.bias"))
        q, kk, v = qkv.reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ kk.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, -1, d)
        t = t + F.linear(y, _f(sd, k + "attn.proj.weight"), _f(sd, k + "attn.proj.bias"))
        y = F.layer_norm(t, (d,), _f(sd, k + "norm2.weight"), _f(sd, k + "norm2.bias"), 1e-6)
        y = F.gelu(F.linear(y, _f(sd, k + "mlp.fc1.weight"), _f(sd, k + "mlp.fc1.bias")))
        t = t + F.linear(y, _f(sd, k + "mlp.fc2.weight"), _f(sd, k + "mlp.fc2.bias"))
        if i in hooks:
            acts.append(t)
        i += 1
    layers = []
    for n, a in enumerate(acts, start=1):
        p = f"net.pretrained.act_postprocess{n}."
        y = torch.cat([a[:, 1:], a[:, :1].expand_as(a[:, 1:])], dim=-1)
        y = F.gelu(F.linear(y, _f(sd, p + "0.project.0.weight"), _f(sd, p + "0.project.0.bias")))
        y = F.conv2d(y.transpose(1, 2).unflatten(2, (gh, gw)), _f(sd, p + "3.weight"), _f(sd, p + "3.bias"))
        if n in (1, 2):
            y = F.conv_transpose2d(y, _f(sd, p + "4.weight"), _f(sd, p + "4.bias"), stride=4 if n == 1 else 2)
        elif n == 4:
            y = F.conv2d(y, _f(sd, p + "4.weight"), _f(sd, p + "4.bias"), stride=2, padding=1)
        layers.append(F.conv2d(y, _f(sd, f"net.scratch.layer{n}_rn.weight"), padding=1))

    def bn(y, p):
        return F.batch_norm(y, _f(sd, p + "running_mean"), _f(sd, p + "running_var"), _f(sd, p + "weight"),
                            _f(sd, p + "bias"), training=False, eps=1e-5)

    def rcu(y, p):
        out = bn(F.conv2d(F.relu(y), _f(sd, p + "conv1.weight"), padding=1), p + "bn1.")
        out = bn(F.conv2d(F.relu(out), _f(sd, p + "conv2.weight"), padding=1), p + "bn2.")
        return out + y

    def refine(n, y, skip=None):
        p = f"net.scratch.refinenet{n}."
        if skip is not None:
            y = y + rcu(skip, p + "resConfUnit1.")
        y = F.interpolate(rcu(y, p + "resConfUnit2."), scale_factor=2, mode="bilinear", align_corners=True)
        return F.conv2d(y, _f(sd, p + "out_conv.weight"), _f(sd, p + "out_conv.bias"))

    path = refine(4, layers[3])
    for n in (3, 2, 1):
        path = refine(n, path, layers[n - 1])
    feat = F.conv2d(path, _f(sd, "net.scratch.head1.weight"), _f(sd, "net.scratch.head1.bias"))
    _, dim, fh, fw = feat.shape
    pix = feat.permute(0, 2, 3, 1).reshape(-1, dim)
    pix = pix / pix.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    scale = (torch.ones([]) * np.log(1 / 0.07)).exp()
    logits = (scale * pix @ text.t()).view(b, fh, fw, -1).permute(0, 3, 1, 2)
    return F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True)


def _normalise(rgb: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5


def _official_single(sd, rgb, names, short=64, heads=2) -> torch.Tensor:
    """The documented single-scale evaluation: short side -> ``short`` (align_corners=True), pad with -1 to
    multiples of 32, LSeg.forward, crop, align_corners=True back to H × W. -> [C, H, W]."""
    x = _normalise(rgb)
    h, w = rgb.shape[:2]
    if min(h, w) != short:
        nh, nw = (short, int(w * short / h + 0.5)) if h <= w else (int(h * short / w + 0.5), short)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=True)
    nh, nw = x.shape[-2:]
    x = F.pad(x, (0, -nw % 32, 0, -nh % 32), value=-1.0)
    out = _official_net(sd, x, _official_text(sd, names), heads)[:, :, :nh, :nw]
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)[0]


def _official_multi(sd, rgb, names, scales, flip, base, crop, heads=2) -> torch.Tensor:
    """LSeg_MultiEvalModule.forward (additional_utils/models.py) with the reference network -> [C, H, W]."""
    image = _normalise(rgb)
    text = _official_text(sd, names)
    _, _, h, w = image.shape
    stride = int(crop * 2.0 / 3.0)

    def pad(img):
        ph, pw = max(crop - img.shape[2], 0), max(crop - img.shape[3], 0)
        return torch.stack([F.pad(img[:, c], (0, pw, 0, ph), value=-1.0) for c in range(3)], dim=1)

    def infer(img):
        out = _official_net(sd, img, text, heads)
        if flip:
            out = out + _official_net(sd, img.flip(3), text, heads).flip(3)
        return out

    scores = torch.zeros(1, len(names), h, w)
    for scale in scales:
        long_size = int(math.ceil(base * scale))
        if h > w:
            height, width, short_size = long_size, int(1.0 * w * long_size / h + 0.5), int(1.0 * w * long_size / h + 0.5)
        else:
            width, height, short_size = long_size, int(1.0 * h * long_size / w + 0.5), int(1.0 * h * long_size / w + 0.5)
        cur = F.interpolate(image, (height, width), mode="bilinear", align_corners=True)
        if long_size <= crop:
            outputs = infer(pad(cur))[:, :, :height, :width]
        else:
            pad_img = pad(cur) if short_size < crop else cur
            _, _, ph, pw = pad_img.shape
            outputs = torch.zeros(1, len(names), ph, pw)
            count = torch.zeros(1, 1, ph, pw)
            for idh in range(int(math.ceil(1.0 * (ph - crop) / stride)) + 1):
                for idw in range(int(math.ceil(1.0 * (pw - crop) / stride)) + 1):
                    h0, w0 = idh * stride, idw * stride
                    h1, w1 = min(h0 + crop, ph), min(w0 + crop, pw)
                    out = infer(pad(pad_img[:, :, h0:h1, w0:w1]))
                    outputs[:, :, h0:h1, w0:w1] += out[:, :, :h1 - h0, :w1 - w0]
                    count[:, :, h0:h1, w0:w1] += 1
            outputs = (outputs / count)[:, :, :height, :width]
        scores += F.interpolate(outputs, (h, w), mode="bilinear", align_corners=True)
    return scores[0]


# ----------------------------------------------------------------------------------------------- layout


def _reference_keys() -> dict[str, tuple[list[int], str]]:
    out = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        out[key] = ([int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype)
    return out


def test_key_map_covers_the_730_release_tensors_with_their_dtypes():
    reference = _reference_keys()
    assert len(reference) == 730
    dtypes = [d for _, d in reference.values()]
    assert (dtypes.count("float32"), dtypes.count("float16"), dtypes.count("int64")) == (519, 195, 16)
    assert sum(math.prod(s) for s, _ in reference.values()) == 495_144_697
    with torch.device("meta"):
        model = create_model("lseg_vit_large_16")
    ours = release_state(model)  # meta tensors: names, shapes and dtypes only
    assert set(ours) == set(reference)
    for key, value in ours.items():
        assert (list(value.shape), str(value.dtype).replace("torch.", "")) == reference[key], key
    kept = release_to_vocabseg(ours)
    assert set(kept) == set(model.state_dict())
    dropped = [k for k in reference if any(re.match(p, k[len("net."):]) for p in _DROPPED)]
    assert len(kept) == 574 and len(dropped) == 156  # CLIP's image tower (152), timm's head and norm (4)


def test_full_size_model_is_built_on_the_meta_device_until_loaded():
    model = create_model("lseg_vit_large_16")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 406_260_225
    cfg = get_config("lseg_vit_large_16")
    assert (cfg.geometry, cfg.short_side, cfg.size_divisibility, cfg.pad_value, cfg.templates) == (
        "release", 480, 32, -1.0, "none")
    assert (cfg.base_size, cfg.crop_size, cfg.scales, cfg.flip) == (520, 480, (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True)
    assert cfg.hooks == (5, 11, 17, 23) and cfg.encoder.pos_interpolation == "bilinear"


# ----------------------------------------------------------------------------------------------- loading


def test_release_file_loads_unchanged_with_fp16_upcast(tiny_release):
    state, path = tiny_release
    model = vocabseg.load_model(TINY, checkpoint=path, **RELEASE)
    own = model.state_dict()
    for key, value in release_to_vocabseg(state).items():
        assert own[key].dtype == (torch.int64 if value.dtype == torch.int64 else torch.float32), key
        assert torch.equal(own[key], value.to(own[key].dtype)), key
    assert model.clip.visual is None  # CLIP's image tower is dropped: LSeg never runs it
    assert not any(p.requires_grad for p in model.clip.parameters())


def test_deferred_model_loads_by_assignment_or_materialises(tiny_release):
    _, path = tiny_release
    loaded = vocabseg.load_model(TINY, checkpoint=path, deferred_init=True, **RELEASE)
    assert not any(p.is_meta for p in loaded.parameters())
    fresh = create_model(TINY, deferred_init=True)
    assert all(p.is_meta for p in fresh.parameters())
    fresh.to("cpu")  # a never-loaded model gets random weights when it is first moved or run
    assert not any(p.is_meta or not torch.isfinite(p).all() for p in fresh.parameters())


SIZES = [(64, 64), (64, 80), (40, 56), (100, 70)]  # no resize; no resize + padding; upscaled; downscaled + padding


@pytest.mark.parametrize("size", SIZES)
def test_single_scale_matches_the_official_steps(tiny_release, size):
    state, path = tiny_release
    model = vocabseg.load_model(TINY, checkpoint=path, **RELEASE)
    rgb = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    names = ["cat", "a dog", "green grass", "sky"]
    ref = _official_single(state, rgb, names)
    result = model.predict(rgb, names)
    assert result.logits.shape == (4, *size) and result.labels.shape == size
    diff = np.abs(result.logits - ref.numpy()).max()
    assert diff < 2e-4, diff
    assert (result.labels == ref.argmax(0).numpy()).mean() >= 0.999
    # another order of the same words: the rows follow the order given
    order = [2, 0, 3, 1]
    again = model.predict(rgb, [names[i] for i in order])
    assert np.abs(again.logits - result.logits[order]).max() < 1e-5
    assert (np.asarray(order)[again.labels] == result.labels).mean() >= 0.999


def test_multi_scale_with_one_scale_one_window_no_flip_is_single_scale(tiny_release):
    _, path = tiny_release
    names = ["cat", "dog", "grass"]
    # base_size 64 puts the long side at 64, one crop-size window (64, padded with -1 like the single scale's
    # multiple of 32); the short side is the single scale's, so neither path resizes
    for size in [(64, 64), (48, 64)]:
        model = vocabseg.load_model(TINY, checkpoint=path, short_side=min(size), **RELEASE)
        rgb = np.random.default_rng(3).integers(0, 256, (*size, 3), dtype=np.uint8)
        single = model.predict(rgb, names)
        multi = model.predict(rgb, names, multi_scale=True, scales=[1.0], flip=False, base_size=64)
        assert np.abs(single.logits - multi.logits).max() < 1e-5
        assert np.array_equal(single.labels, multi.labels)


def test_multi_scale_flip_and_windows_match_the_official_evaluator(tiny_release):
    state, path = tiny_release
    model = vocabseg.load_model(TINY, checkpoint=path, **RELEASE)
    names = ["cat", "dog", "grass"]
    rgb = np.random.default_rng(5).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    # scale 0.75: long side 54 -> one padded window; 1.25: 50x90 padded to 64x90, two windows (stride 42)
    ref = _official_multi(state, rgb, names, scales=(0.75, 1.25), flip=True, base=72, crop=64)
    result = model.predict(rgb, names, multi_scale=True, scales=(0.75, 1.25), flip=True)
    assert np.abs(result.logits - ref.numpy()).max() < 5e-4
    assert (result.labels == ref.argmax(0).numpy()).mean() >= 0.999


# ----------------------------------------------------------------------------------------------- bad input


def test_wrong_files_are_one_line_checkpoint_errors(tiny_release, tmp_path, monkeypatch):
    state, path = tiny_release

    def error(name, checkpoint, **kw):
        with pytest.raises(CheckpointError) as err:
            vocabseg.load_model(name, checkpoint=checkpoint, **kw)
        msg = str(err.value)
        assert "\n" not in msg and str(checkpoint) in msg
        return msg

    # the tiny variant given to the full-size name: another variant, said before anything is allocated
    assert "another variant" in error("lseg_vit_large_16", path)
    # a file of another family (SAN's layout)
    san = tmp_path / "san.pth"
    torch.save({"model": {"side_adapter_network.query_embed": torch.zeros(1, 4, 8)}}, san)
    assert "not an LSeg release" in error(TINY, san)
    # an unknown and a missing tensor, by name
    extra = dict(state, **{"net.scratch.unknown_thing.weight": torch.zeros(1)})
    assert "unknown_thing" in error(TINY, write_release(tmp_path / "extra.ckpt", extra, monkeypatch))
    short = {k: v for k, v in state.items() if k != "net.scratch.refinenet2.out_conv.bias"}
    assert "missing" in error(TINY, write_release(tmp_path / "short.ckpt", short, monkeypatch))
    # a truncated download
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated" in error(TINY, cut) or "corrupt" in error(TINY, cut)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned_by_lseg",))


def test_hostile_metadata_is_refused_without_running(tiny_release, tmp_path, monkeypatch):
    state, _ = tiny_release
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"epoch": 1, "state_dict": state, "callbacks": {"x": _Evil()}}, path)
    with pytest.raises(CheckpointError) as err:
        vocabseg.load_model(TINY, checkpoint=path)
    assert "\n" not in str(err.value) and "evil.ckpt" in str(err.value) and "system" in str(err.value)
    assert not (tmp_path / "pwned_by_lseg").exists()


def test_predictor_and_cli_path_use_the_release_geometry(tiny_release):
    """``Predictor.predict_array`` (what ``vocabseg segment``/``eval`` call) gives the release's numbers too; the
    generic geometry (the tiny config's default) still goes through the generic path."""
    from vocabseg.predict import Predictor

    _, path = tiny_release
    rgb = np.random.default_rng(7).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    names = ["cat", "dog"]
    release = vocabseg.load_model(TINY, checkpoint=path, **RELEASE)
    text = release.text_embeddings(names)
    assert np.array_equal(Predictor(release).predict_array(rgb, names, text).logits, release.predict(rgb, names).logits)
    generic = vocabseg.load_model(TINY, checkpoint=path)
    assert generic.release_scores(rgb, text) is None
    assert generic.predict(rgb, names).logits.shape == (2, 40, 56)
