"""ETRIS release files (kkakkkka/ETRIS ``best_model.pth``): layout, loading, and the official test path.

Reference numbers in ``tests/data/etris_release_official.npz`` come from the official code (kkakkkka/ETRIS at
cdc6d8e: ``model/clip.py``, ``model/bridger.py``, ``model/layers.py``, ``utils/dataset.py`` ``getTransformMat``/
``convert``/``tokenize``, the steps of ``engine/engine.py:inference``) with opencv-python-headless 4.14.0.94, run
outside the project on the weights :func:`release_state` writes here (same seed), at the reduced widths of
``etris_release_{vit,resnet}_tiny_test`` (the official modules take these widths as arguments; blocks, Bridger
positions and every layer kind are as released). ``tests/data/etris_release_opencv4.npz`` holds
``cv2.getAffineTransform``/``cv2.warpAffine`` (INTER_CUBIC) outputs of the same OpenCV for the port's bit-exact check.
The script that wrote both is described in docs/referring.md ("Release files").
"""

from __future__ import annotations

import collections
import functools
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import vocabseg
from vocabseg.errors import CheckpointError
from vocabseg.models import create_model
from vocabseg.models import etris_release as R

DATA = Path(__file__).parent / "data"
SENTENCES = ["the man in the red shirt on the far left side", "a dog", "left!! guy"]
SIZES = [(50, 70), (64, 64), (30, 64)]


# ----------------------------------------------------------------------------------------------- release files


@functools.lru_cache(maxsize=4)  # read-only; generated once per test session
def release_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for model ``name`` in the release's exact layout (``module.`` keys, ConvTranspose [in, out, k,
    k], packed attention projections, int64 ``num_batches_tracked``), from numpy's PCG64 so any machine (and the
    scratch script that ran the official code) regenerates the same tensors."""
    with torch.device("meta"):
        model = create_model(name)
    keys = R.etris_to_release(model.state_dict())
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(keys):
        shape = tuple(keys[key].shape)
        leaf = key.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            out[key] = torch.tensor(1234, dtype=torch.int64)
            continue
        n = rng.standard_normal(shape).astype(np.float32)
        if leaf == "running_var":
            v = 1.0 + 0.5 * np.abs(n)
        elif leaf == "running_mean" or leaf == "bias" or leaf.endswith("in_proj_bias"):
            v = 0.1 * n
        elif len(shape) == 1 or leaf in ("class_embedding",):  # norm weights
            v = 1.0 + 0.2 * n if "ln" in key or "norm" in key or ".1.weight" in key or "bn" in key else 0.1 * n
        elif "positional_embedding" in key or "token_embedding" in key:
            v = 0.1 * n
        else:
            fan_in = int(np.prod(shape[1:])) if ".zoom_out." not in key and "f5_proj.0" not in key else shape[0]
            if key.endswith(("visual.proj", "text_projection")):
                fan_in = shape[0]
            v = n / np.sqrt(max(1, fan_in))
        out[key] = torch.from_numpy(np.array(v, np.float32).reshape(shape))
    # centre the tiny models' maps near the 0.35 threshold so masks have boundaries to compare
    out["module.proj.txt.bias"][-1] += {"etris_release_vit_tiny_test": 1.5,
                                        "etris_release_resnet_tiny_test": -2.5}.get(name, 0.0)
    return out


def write_release(path: Path, name: str, seed: int = 0, state: dict | None = None) -> Path:
    """``best_model.pth`` as train.py saves it: epoch, ious, prec, DDP state dict, optimizer, a scheduler whose
    milestones are a ``collections.Counter``."""
    state = release_state(name, seed) if state is None else state
    torch.save({"epoch": 50, "cur_iou": 0.7106, "best_iou": 0.7106, "prec": {"Pr@50": 0.81},
                "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "params": [0, 1]}]},
                "scheduler": {"milestones": collections.Counter({35: 1}), "gamma": 0.1, "last_epoch": 50,
                              "base_lrs": [1e-4, 1e-4]}}, path)
    return path


def test_image(i: int) -> np.ndarray:
    """Smooth test images (deterministic): bicubic-upsampled noise plus flat rectangles."""
    from PIL import Image

    rng = np.random.default_rng(100 + i)
    h, w = SIZES[i]
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    im = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).copy()
    im[h // 4: h // 2, w // 3: w // 3 * 2] = rng.integers(0, 256, 3)
    return im


test_image.__test__ = False  # a helper, not a test


# ----------------------------------------------------------------------------------------------- layout (full size)


@pytest.mark.parametrize("name,tensors,values,trainable", [
    ("etris_vit_b_16", 522, 173_272_016, 23_829_313),
    ("etris_resnet50", 769, None, None),
    ("etris_resnet101", 1075, None, None),
])
def test_release_layout_full_size(name, tensors, values, trainable):
    with torch.device("meta"):
        model = create_model(name)
    keys = R.etris_to_release(model.state_dict())
    assert len(keys) == tensors and all(k.startswith("module.") for k in keys)
    assert set(R.etris_from_release(keys, model.config)) == set(model.state_dict())
    if values is not None:
        assert sum(v.numel() for v in keys.values()) == values
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable == R.RELEASE_TRAINABLE_PARAMS
        assert tuple(keys["module.backbone.visual.positional_embedding"].shape) == (677, 768)
        assert tuple(keys["module.backbone.positional_embedding"].shape) == (77, 512)
        # ConvTranspose weights as stored: [in, out, k, k]
        assert tuple(keys["module.bridger.zoom_out.0.0.weight"].shape) == (64, 768, 1, 1)
        assert tuple(keys["module.bridger.zoom_in.2.0.weight"].shape) == (768, 64, 1, 1)
        assert isinstance(model.neck.f5_proj[0], torch.nn.ConvTranspose2d)
        assert not any("gate" in k for k in keys)
    else:
        assert "module.backbone.visual.attnpool.connect.0.weight" in keys
        assert tuple(keys["module.backbone.visual.attnpool.positional_embedding"].shape) == (50, 2048)
        out = 1024 if name == "etris_resnet50" else 512
        assert tuple(keys["module.backbone.visual.attnpool.connect.0.weight"].shape) == (out, 2048, 1, 1)
        assert tuple(keys["module.bridger.zoom_out.0.weight"].shape) == (64, 512, 2, 2)  # ConvTranspose [in, out]
    assert model.config.word_len == 17 and model.config.threshold == 0.35 and model.config.input_size == 416
    with torch.device("meta"):
        assert create_model(name + "_refcocog").config.word_len == 22


# ----------------------------------------------------------------------------------------------- OpenCV port


def test_opencv4_affine_and_cubic_warp_are_bit_exact():
    ref = np.load(DATA / "etris_release_opencv4.npz")
    for (h, w), m, mi in zip(ref["sizes"], ref["mat"], ref["inv"]):
        a, b = R.letterbox_matrices(int(h), int(w), 416)
        assert np.array_equal(a, m) and np.array_equal(b, mi), (h, w)
    for k in range(int(ref["n"])):
        img, mat, inv = ref[f"img{k}"], ref[f"wmat{k}"], ref[f"winv{k}"]
        s = int(ref["size"])
        out = R.cv_warp_affine_cubic(img, mat, (s, s), [0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255])
        assert np.array_equal(out, ref[f"out{k}"]), k  # to the grey level
        back = R.cv_warp_affine_cubic(ref[f"p{k}"], inv, (img.shape[1], img.shape[0]), 0.0)
        assert np.abs(back - ref[f"q{k}"]).max() < 1e-5, k


def test_opencv5_warp_option():
    """OpenCV 5.x warps without the 1/32 quantisation (``opencv=5``): against opencv-python-headless 5.1.0."""
    ref = np.load(DATA / "etris_release_opencv5.npz")
    mean = [0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255]
    for k in range(int(ref["n"])):
        img = ref[f"img{k}"]
        out = R.cv_warp_affine_cubic(img, ref[f"wmat{k}"], (64, 64), mean, opencv=5).astype(int)
        diff = np.abs(out - ref[f"out{k}"])
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, k
        assert (np.abs(R.cv_warp_affine_cubic(img, ref[f"wmat{k}"], (64, 64), mean) - ref[f"out{k}"]) > 1).any()
        back = R.cv_warp_affine_cubic(ref[f"p{k}"], ref[f"winv{k}"], (img.shape[1], img.shape[0]), 0.0, opencv=5)
        assert np.abs(back - ref[f"q{k}"]).max() < 1e-5, k


def test_opencv_setting_resolution(monkeypatch):
    import sys
    import types

    model = create_model("etris_release_vit_tiny_test", opencv=0)
    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="5.1.0"))
    assert model.opencv == 5
    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="4.10.0"))
    assert model.opencv == 4
    assert create_model("etris_release_vit_tiny_test").opencv == 4  # default: the releases' OpenCV


def test_cubic_warp_identity_and_shift_are_exact():
    img = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    eye = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    assert np.array_equal(R.cv_warp_affine_cubic(img, eye, (11, 9)), img)
    shift = np.array([[1.0, 0, 2], [0, 1.0, 1]])  # dst(x, y) = src(x - 2, y - 1), border 7 elsewhere
    out = R.cv_warp_affine_cubic(img, shift, (11, 9), (7, 7, 7))
    assert np.array_equal(out[1:, 2:], img[:-1, :-2]) and (out[0] == 7).all() and (out[:, :2] == 7).all()


# ----------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["etris_release_vit_tiny_test", "etris_release_resnet_tiny_test"])
def test_release_file_loads_unchanged(tmp_path, name):
    state = release_state(name)
    path = write_release(tmp_path / "best_model.pth", name, state=state)
    model = vocabseg.load_model(name, checkpoint=path)
    ours = model.state_dict()
    back = R.etris_to_release(ours)
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("name", ["etris_release_vit_tiny_test", "etris_release_resnet_tiny_test"])
def test_refer_matches_official_code(tmp_path, name):
    """Probabilities of the official test path (official code, same weights) within 2e-3, masks equal."""
    ref = np.load(DATA / "etris_release_official.npz")
    kind = "vit" if "vit" in name else "resnet"
    model = vocabseg.load_model(name, checkpoint=write_release(tmp_path / "best_model.pth", name))
    for i in range(len(SIZES)):
        img = test_image(i)
        assert np.array_equal(model.prepare(img)[0].shape[-2:], (64, 64))
        results = model.refer_batch([img] * len(SENTENCES), SENTENCES)  # one batch, all sentences
        for j, r in enumerate(results):
            official = ref[f"{kind}_prob{i}_{j}"]
            assert r.probability.shape == img.shape[:2] and r.mask.shape == img.shape[:2]
            assert np.abs(r.probability - official).max() < 2e-3, (i, j)
            assert (r.mask == (official > 0.35)).mean() >= 0.999, (i, j)
    # a single call, another order: the same numbers
    alone = model.refer(test_image(2), SENTENCES[2])
    assert np.abs(alone.probability - ref[f"{kind}_prob2_2"]).max() < 2e-3


def test_word_len_override_matches_official(tmp_path):
    """word_len is not in the file and changes the outputs (RefCOCOg releases: 22); the override reproduces the
    official code run with that word_len."""
    ref = np.load(DATA / "etris_release_official.npz")
    name = "etris_release_vit_tiny_test"
    model = vocabseg.load_model(name, checkpoint=write_release(tmp_path / "best_model.pth", name), word_len=12)
    for j, r in enumerate(model.refer_batch([test_image(0)] * len(SENTENCES), SENTENCES)):
        assert np.abs(r.probability - ref[f"vit_wl12_prob0_{j}"]).max() < 2e-3, j
    assert np.abs(ref["vit_wl12_prob0_0"] - ref["vit_prob0_0"]).max() > 0.05  # it matters


def test_word_len_and_padding_semantics():
    model = create_model("etris_release_vit_tiny_test").eval()
    tokens = model.tokenize(["a b c d e f g h i j k l m n", "left!! guy"])
    assert tokens.shape == (2, 9)
    assert tokens[0, -1] == tokens.max()  # cut sentences end with EOT
    assert tokens[1, 4] == tokens.max() and (tokens[1, 5:] == 0).all()  # EOT, then 0 padding
    longer = create_model("etris_release_vit_tiny_test", word_len=12)
    assert longer.tokenize("a dog").shape == (1, 12)


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_files_give_one_line_errors(tmp_path):
    name = "etris_release_vit_tiny_test"
    good = write_release(tmp_path / "best_model.pth", name)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    other_family = tmp_path / "san.pth"
    torch.save({"model": {"side_adapter_network.query_embed": torch.zeros(100, 240)}}, other_family)
    resnet = write_release(tmp_path / "resnet.pth", "etris_release_resnet_tiny_test")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    hostile = tmp_path / "hostile.pth"
    state = release_state(name)
    torch.save({"state_dict": state, "scheduler": {"milestones": Evil()}}, hostile)
    for path, pattern in [(truncated, "truncated|corrupt"), (other_family, "not an ETRIS release"),
                          (resnet, "resnet"), (hostile, "refused")]:
        with pytest.raises(CheckpointError, match=pattern) as err:
            vocabseg.load_model(name, checkpoint=path)
        assert "\n" not in str(err.value) and path.name in str(err.value)
    assert not (tmp_path / "pwned").exists()
    # our gated models refuse release files with a pointer to the release names
    with pytest.raises(CheckpointError, match="etris_vit_b_16"):
        vocabseg.load_model("etris_tiny_test", checkpoint=good)


# ----------------------------------------------------------------------------------------------- commands


def test_refer_and_eval_referring_commands_with_release_file(tmp_path):
    """``vocabseg refer IMAGE "sentence" --model M --checkpoint best_model.pth`` and ``vocabseg eval-referring``
    on RefCOCO-layout data, through the real command line."""
    import yaml
    from PIL import Image
    from typer.testing import CliRunner

    from vocabseg.cli import app
    from vocabseg.engine.referring import evaluate_referring_checkpoint

    name = "etris_release_vit_tiny_test"
    ckpt = write_release(tmp_path / "best_model.pth", name)
    image = tmp_path / "img.png"
    Image.fromarray(test_image(0)).save(image)
    runner = CliRunner()
    res = runner.invoke(app, ["refer", str(image), SENTENCES[0], "--model", name, "--checkpoint", str(ckpt),
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    mask = np.asarray(Image.open(tmp_path / "out" / "img_mask.png")) > 0
    ref = np.load(DATA / "etris_release_official.npz")["vit_prob0_0"] > 0.35
    assert mask.shape == (50, 70) and (mask == ref).mean() >= 0.999

    from test_refcoco import _make_fake_refcoco

    _make_fake_refcoco(tmp_path / "refer")
    cfg = {"model": name, "dataset": "refcoco", "data_root": str(tmp_path / "refer"), "val_splits": ["val", "testB"],
           "device": "cpu"}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["eval-referring", str(tmp_path / "eval.yaml"), "-c", str(ckpt)])
    assert res.exit_code == 0, res.output
    assert "val @ model" in res.output and "testB @ model" in res.output
    results = evaluate_referring_checkpoint(cfg, ckpt)
    assert results["testB @ model"]["num_items"] == 2 and 0 <= results["val @ model"]["mIoU"] <= 100
    # the same numbers as scoring the model's own refer() by hand
    from vocabseg.data.refcoco import RefCOCODataset
    from vocabseg.metrics import ReferringMeter

    model = vocabseg.load_model(name, checkpoint=ckpt)
    meter = ReferringMeter()
    for item in RefCOCODataset(tmp_path / "refer", "refcoco", "testB"):
        meter.update(model.refer(np.asarray(item["image"]).transpose(1, 2, 0), item["sentence"]).mask, item["mask"])
    assert abs(meter.compute()["mIoU"] - results["testB @ model"]["mIoU"]) < 1e-9
