"""Predictor: input conversions, output contract, vocabulary caching, band-wise post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vocabseg
from vocabseg.errors import ImageError, VocabularyError
from vocabseg.postprocess import MaskScores, full_scores, labels_and_confidence


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="randomly initialised"):
        return vocabseg.load_model("san_tiny_test")


def _reference_scores(ms: MaskScores) -> torch.Tensor:
    """The official order, written independently: interpolate to padded size, crop, interpolate to output."""
    m = F.interpolate(ms.mask_logits[None], size=ms.padded, mode="bilinear", align_corners=False)
    m = m[..., : ms.crop[0], : ms.crop[1]]
    m = F.interpolate(m, size=ms.out, mode="bilinear", align_corners=False)[0]
    return torch.einsum("qc,qhw->chw", ms.class_probs, m.sigmoid())


@pytest.mark.parametrize("crop,out", [((40, 56), (40, 56)), ((40, 56), (97, 131)), ((44, 30), (23, 17))])
def test_band_postprocess_equals_whole_image_interpolation(crop, out, monkeypatch):
    torch.manual_seed(1)
    ms = MaskScores(torch.rand(6, 5).softmax(-1), torch.randn(6, 3, 4), (48, 64), crop, out)
    monkeypatch.setattr("vocabseg.postprocess.BAND_BYTES", 5 * out[1] * 4 * 3)  # force several bands
    ref = _reference_scores(ms)
    assert np.allclose(full_scores(ms), ref.numpy(), atol=1e-5)
    labels, conf = labels_and_confidence(ms)
    assert np.array_equal(labels, ref.argmax(0).numpy())
    assert np.allclose(conf, ref.max(0).values.numpy(), atol=1e-5)


def test_predict_contract(model):
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    result = model.predict(rgb, vocabulary=["cat", "dog", "grass"])
    assert result.vocabulary == ["cat", "dog", "grass"]
    assert result.labels.shape == (50, 70) and result.labels.dtype == np.int32
    assert result.logits.shape == (3, 50, 70) and result.logits.dtype == np.float32
    assert np.array_equal(result.logits.argmax(0), result.labels)
    assert result.labels.min() >= 0 and result.labels.max() < 3
    areas = result.areas()
    assert abs(sum(a["fraction"] for a in areas) - 1.0) < 1e-6
    assert result.overlay().size[1] >= 50  # legend may widen it
    assert result.colorize().shape == (50, 70, 3)


def test_predict_inputs_are_converted(model, tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    base = model.predict(rgb, ["a", "b"]).labels
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    assert np.array_equal(model.predict(path, ["a", "b"]).labels, base)
    assert np.array_equal(model.predict(str(path), ["a", "b"]).labels, base)
    assert np.array_equal(model.predict(Image.fromarray(rgb), ["a", "b"]).labels, base)
    rgba = np.dstack([rgb, np.full((40, 60), 255, np.uint8)])
    assert np.array_equal(model.predict(rgba, ["a", "b"]).labels, base)  # opaque alpha changes nothing
    gray = rgb[..., 0]
    assert model.predict(gray, ["a", "b"]).labels.shape == (40, 60)
    sixteen = rgb.astype(np.uint16) * 257
    assert np.array_equal(model.predict(sixteen, ["a", "b"]).labels, base)
    # EXIF-rotated file: the result has the displayed (rotated) size
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    rotated = tmp_path / "rot.jpg"
    Image.fromarray(rgb).save(rotated, exif=exif)
    assert model.predict(rotated, ["a", "b"]).labels.shape == (60, 40)


def test_bad_inputs_give_user_errors(model, tmp_path):
    rgb = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(VocabularyError):
        model.predict(rgb, [])
    with pytest.raises(VocabularyError):
        model.predict(rgb, " , ,")
    with pytest.raises(ImageError):
        model.predict(tmp_path / "missing.png", ["a"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError):
        model.predict(bad, ["a"])


def test_second_call_with_same_vocabulary_does_no_text_work(model, monkeypatch):
    rgb = np.zeros((32, 32, 3), np.uint8)
    names = ["unique name one", "unique name two"]
    model.predict(rgb, names)
    calls = []
    original, grouped = model.clip.encode_text, model.clip.encode_text_grouped  # plain or shared-prefix text path
    monkeypatch.setattr(model.clip, "encode_text", lambda t: calls.append(1) or original(t))
    monkeypatch.setattr(model.clip, "encode_text_grouped", lambda t, g: calls.append(1) or grouped(t, g))
    model.predict(rgb, names)
    assert calls == []
    model.predict(rgb, names + ["a new one"])
    assert len(calls) >= 1


def test_large_vocabulary_bands_bound_memory(model, monkeypatch):
    """1,000 classes: the band height shrinks so one band's scores stay under the budget."""
    from vocabseg import postprocess

    seen = []
    original = postprocess.MaskScores.mask_rows
    monkeypatch.setattr(postprocess.MaskScores, "mask_rows",
                        lambda self, r0, r1: seen.append(r1 - r0) or original(self, r0, r1))
    rgb = np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    text = F.normalize(torch.randn(1000, model.config.clip.embed_dim), dim=-1)
    result = vocabseg.Predictor(model).predict_array(rgb, [f"c{i}" for i in range(1000)], text)
    assert result.labels.shape == (300, 400)
    assert max(seen) * 1000 * 400 * 4 <= postprocess.BAND_BYTES + 1000 * 400 * 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_argmax_equals_full_argmax_for_large_vocabularies(seed):
    """best_rows scores only the likely classes everywhere; its labels must equal the full arg-max."""
    g = torch.Generator().manual_seed(seed)
    q, c = 20, 400
    logits = torch.randn(q, c + 1, generator=g) * 3
    ms = MaskScores(logits.softmax(-1)[:, :c], torch.randn(q, 6, 8, generator=g) * 4, (48, 64), (44, 60), (88, 121))
    ref = _reference_scores(ms)
    labels, conf = labels_and_confidence(ms)
    assert np.array_equal(labels, ref.argmax(0).numpy())
    assert np.allclose(conf, ref.max(0).values.numpy(), atol=1e-5)
