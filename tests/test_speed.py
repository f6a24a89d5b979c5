"""The speed features keep results: bf16 plumbing and agreement, shared-prefix text encoding, skipped random init,
lazy imports on the segment path, pipelined folders, adaptive thread counts. Nothing here is timed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vocabseg
from vocabseg import runtime
from vocabseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "vocabseg" / "examples" / "shapes.png"
VOCAB = "red circle, blue square, background"


@pytest.fixture(scope="module")
def default_fp32():
    return vocabseg.load_model()


@pytest.fixture(scope="module")
def default_bf16():
    return vocabseg.load_model(dtype="bf16")


# -- bf16 ------------------------------------------------------------------------------------------------------


def test_resolve_dtype_names_and_errors():
    assert runtime.resolve_dtype(None) is torch.float32
    assert runtime.resolve_dtype("fp32") is torch.float32
    assert runtime.resolve_dtype("BF16") is torch.bfloat16
    assert runtime.resolve_dtype(torch.bfloat16) is torch.bfloat16
    for bad in ("fp16", torch.float16, 3):
        with pytest.raises(ConfigError, match="unknown precision"):
            runtime.resolve_dtype(bad)


def test_bf16_weights_are_bf16_except_pixel_statistics(default_bf16):
    floats = {k: v.dtype for k, v in default_bf16.state_dict().items() if v.is_floating_point()}
    assert floats and all(d == torch.bfloat16 for d in floats.values())
    assert default_bf16.pixel_mean.dtype == torch.float32 and default_bf16.pixel_std.dtype == torch.float32
    assert runtime.model_dtype(default_bf16) == torch.bfloat16


def test_fp32_load_keeps_fp32(default_fp32):
    assert all(v.dtype == torch.float32 for v in default_fp32.state_dict().values() if v.is_floating_point())


def test_bf16_labels_agree_with_fp32_on_the_default_model(default_fp32, default_bf16):
    """Measured 99.9 % on shapes.png; the issue's bar is 97 %."""
    a = default_fp32.predict(str(SHAPES), VOCAB)
    b = default_bf16.predict(str(SHAPES), VOCAB)
    assert b.logits.dtype == np.float32
    assert (a.labels == b.labels).mean() >= 0.97
    assert len(np.unique(a.labels)) > 1  # a constant map would agree trivially


def test_bf16_text_embeddings_close_to_fp32_and_cached_apart(default_fp32, default_bf16):
    names = ["red circle", "blue square"]
    e32 = default_fp32.text_embeddings(names)
    e16 = default_bf16.text_embeddings(names)
    assert e16.dtype == torch.float32  # embeddings are handed out in fp32 whatever the tower
    assert (e32 * e16).sum(-1).min() > 0.99
    assert not torch.equal(e32, e16)  # a bf16 tower is a different cache key, not a hit on the fp32 rows


@pytest.mark.parametrize("name", ["san_tiny_test", "segvit_tiny_test", "lseg_tiny_test", "groupvit_tiny_test",
                                  "clims_tiny_test", "etris_tiny_test", "clims_release_tiny_test",
                                  "segvit_release_tiny_test"])
def test_every_family_runs_in_bf16(name):
    torch.manual_seed(0)
    model = runtime.cast_model(vocabseg.create_model(name).eval(), "bf16")
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    entry = vocabseg.models.get_entry(name)
    if entry.task == "referring":
        out = model.refer(rgb, "the thing on the left").probability
    elif entry.task == "cams":
        out = model.cams(rgb).cams
    elif entry.task == "closed_set":
        out = model.predict(rgb, model.class_names[:2]).logits
    else:
        text = torch.nn.functional.normalize(torch.randn(3, model.clip.embed_dim), dim=-1)
        out = vocabseg.Predictor(model).predict_array(rgb, ["a", "b", "c"], text).logits
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_cli_precision_option(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-m", "vocabseg", "segment", str(SHAPES), "--vocab", VOCAB, "-o",
                         str(tmp_path), "--precision", "bf16"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "shapes_labels.png").exists()
    bad = subprocess.run([sys.executable, "-m", "vocabseg", "segment", str(SHAPES), "--vocab", VOCAB, "-o",
                          str(tmp_path), "--precision", "fp16"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "unknown precision 'fp16'" in bad.stderr and "Traceback" not in bad.stderr


# -- loading and text ------------------------------------------------------------------------------------------


def test_skipped_random_init_loads_the_same_tensors():
    """load_model builds without random init; every tensor must still come out equal to a plain build + load."""
    from vocabseg.clip.load import read_state_dict
    from vocabseg.models import get_entry
    from vocabseg.models.weights import load_strict

    fast = vocabseg.load_model("segvit_world")
    entry = get_entry("segvit_world")
    plain = vocabseg.create_model("segvit_world")
    load_strict(plain.clip, read_state_dict(entry.clip_weights)) if entry.clip_weights else None
    plain.load_checkpoint_state(read_state_dict(entry.weights), allow_missing_clip=entry.clip_weights is not None)
    a, b = fast.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grouped_text_encoding_equals_plain_encoding():
    from vocabseg.clip.tokenizer import tokenize
    from vocabseg.clip.vocabulary import VILD_TEMPLATES, encode_vocabulary

    torch.manual_seed(0)
    clip = vocabseg.create_model("san_tiny_test").eval().clip
    names = ["cat", "red car", "a rather long name of a household object", "x"]
    tokens = tokenize([t.replace("{}", n) for n in names for t in VILD_TEMPLATES])
    group = torch.arange(len(VILD_TEMPLATES)).repeat(len(names))
    with torch.inference_mode():
        plain = clip.encode_text(tokens)
        grouped = clip.encode_text_grouped(tokens, group)
        one = clip.encode_text_grouped(tokens[:1], group[:1])  # a group of one row: all but EOT is "prefix"
    assert torch.allclose(plain, grouped, atol=1e-5)
    assert torch.allclose(plain[:1], one, atol=1e-5)
    # through encode_vocabulary (grouped path, several batches) vs one prompt at a time
    a = encode_vocabulary(clip, names, cache=False, batch_size=7)
    per_template = torch.stack([encode_vocabulary(clip, names, cache=False, templates=[t]) for t in VILD_TEMPLATES])
    expected = torch.nn.functional.normalize(per_template.mean(0), dim=-1)
    assert torch.allclose(a, expected, atol=1e-5)
    calls = []
    plain_encode = clip.encode_text
    clip.encode_text = lambda t: calls.append(len(t)) or plain_encode(t)
    exact = encode_vocabulary(clip, names, cache=False, shared_prefix=False)
    del clip.encode_text
    assert sum(calls) == len(names) * len(VILD_TEMPLATES)  # every prompt through the plain tower
    assert torch.allclose(exact, a, atol=1e-5)


# -- imports ---------------------------------------------------------------------------------------------------


def test_segment_path_imports_nothing_heavy(tmp_path):
    """`vocabseg segment` (cached text on the second run) imports no serve/export/engine code, no scipy or yaml,
    and no tokenizer once the vocabulary is cached."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['vocabseg', 'segment', {str(SHAPES)!r}, '--vocab', {VOCAB!r}, '-o', {str(tmp_path)!r}]\n"
        "try:\n    runpy.run_module('vocabseg', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code\n"
        "print(' '.join(sorted(m for m in sys.modules)))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VOCABSEG_CACHE": str(tmp_path / "c")}
    for run in ("first", "cached"):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        mods = set(res.stdout.split())
        assert "vocabseg.predict" in mods  # the probe did run the segment path
        heavy = [m for m in mods if m.split(".")[0] in ("scipy", "yaml", "fastapi", "onnxruntime", "onnx")
                 or m.startswith(("vocabseg.serve", "vocabseg.export", "vocabseg.engine"))]
        assert heavy == [], (run, heavy)
    assert "vocabseg.clip.tokenizer" not in mods and "ftfy" not in mods  # cached run: no text work at all


# -- folders ---------------------------------------------------------------------------------------------------


def test_pipelined_folder_equals_sequential_loop(tmp_path, default_fp32):
    from vocabseg.folder import segment_folder
    from vocabseg.io import list_images

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    base = np.array(Image.open(SHAPES).convert("RGB"))
    for i in range(5):
        Image.fromarray(np.roll(base, 17 * i, axis=1)).save(src / f"img{i}.png")
    (src / "img2b.png").write_bytes(b"not an image")  # unreadable, between two good files
    (src / "img4b.jpg").write_bytes(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
    files = list_images(src)
    predictor = vocabseg.Predictor(default_fp32)
    names = [n.strip() for n in VOCAB.split(",")]
    text = predictor.text_embeddings(names)
    reports, seen = {}, {}
    for mode in (False, True):
        order: list[int] = []
        reports[mode] = segment_folder(predictor, files, names, text, tmp_path / str(mode), pipelined=mode,
                                       summary={"model": "default"}, on_image=lambda: order.append(1))
        seen[mode] = len(order)
    seq, pipe = reports[False], reports[True]
    assert (seq.done, pipe.done) == (5, 5) and seen[True] == seen[False] == len(files)
    assert [p.name for p, _ in pipe.failed] == [p.name for p, _ in seq.failed] == ["img2b.png", "img4b.jpg"]
    assert [m for _, m in pipe.failed] == [m for _, m in seq.failed]
    out_seq = sorted(p.name for p in (tmp_path / "False").iterdir())
    assert out_seq == sorted(p.name for p in (tmp_path / "True").iterdir()) and len(out_seq) == 15
    for name in out_seq:
        assert (tmp_path / "False" / name).read_bytes() == (tmp_path / "True" / name).read_bytes(), name
    record = json.loads((tmp_path / "True" / "img3.json").read_text())
    assert record["image"].endswith("img3.png") and record["model"] == "default"


# -- threads ---------------------------------------------------------------------------------------------------


def test_adaptive_threads_use_free_cores_and_restore(monkeypatch):
    monkeypatch.delenv("VOCABSEG_THREADS", raising=False)
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "other_runnable", lambda: 10 ** 6)  # a saturated machine
    with runtime.adaptive_threads() as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    monkeypatch.setattr(runtime, "other_runnable", lambda: 0)  # idle: the configured count, unchanged
    with runtime.adaptive_threads() as n:
        assert n == before
    monkeypatch.setenv("VOCABSEG_THREADS", "3")
    assert runtime.available_threads() == 3
    monkeypatch.setenv("VOCABSEG_THREADS", "many")
    with pytest.raises(ConfigError, match="VOCABSEG_THREADS"):
        runtime.available_threads()


def test_other_runnable_reads_this_machine():
    n = runtime.other_runnable()
    assert n is None or (isinstance(n, int) and n >= 0)


def test_short_palette_is_a_prefix_of_the_full_one():
    from vocabseg import palette

    full = palette._greedy_palette(0)
    for n in (1, 3, 40):
        assert np.array_equal(palette.make_palette(n), full[:n])
    assert len(palette.make_palette(len(full) + 3)) == len(full) + 3
