"""ONNX export: one image-model file serves any vocabulary and image size; text tower; onnxruntime segmenter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import vocabseg  # noqa: E402
from vocabseg.clip.tokenizer import tokenize  # noqa: E402
from vocabseg.errors import CheckpointError  # noqa: E402
from vocabseg.export import (  # noqa: E402
    CONFIG_NAME,
    OnnxSegmenter,
    PreprocessConfig,
    export_command,
    export_image_model,
    export_text_encoder,
    load_onnx_segmenter,
    preprocess,
)
from vocabseg.export.onnx import _pool_plan, adaptive_max_pool_gather  # noqa: E402

TOL = 1e-4  # max |onnx - eager| relative to the eager output's largest magnitude


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _rel(onnx_out: np.ndarray, eager: torch.Tensor) -> float:
    return float(np.abs(onnx_out - eager.numpy()).max() / eager.abs().max().item())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vocabseg.create_model("san_tiny_test").eval()


@pytest.fixture(scope="module")
def tiny_files(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_tiny")
    return export_image_model(tiny, out / "image.onnx"), export_text_encoder(tiny.clip, out / "text.onnx")


def _check_image_parity(model, session, sizes, class_counts):
    gen = torch.Generator().manual_seed(1)
    dim = model.clip.embed_dim
    worst = 0.0
    for h, w in sizes:
        pixels = torch.randn(1, 3, h, w, generator=gen)
        for c in class_counts:
            text = F.normalize(torch.randn(c, dim, generator=gen), dim=-1)
            probs, masks = model.infer(pixels, text)
            o_probs, o_masks = session.run(None, {"pixels": pixels.numpy(), "text_embeddings": text.numpy()})
            assert o_probs.shape == tuple(probs.shape) and o_masks.shape == tuple(masks.shape)
            worst = max(worst, _rel(o_probs, probs), _rel(o_masks, masks))
    assert worst < TOL, worst
    return worst


def _test_models():
    from vocabseg.models import get_entry

    return [n for n in vocabseg.list_models(include_test=True, task="semantic") if get_entry(n).test_only]


@pytest.mark.parametrize("name", _test_models())
def test_one_image_file_serves_any_size_and_vocabulary(name, tmp_path):
    """Every registered tiny model: one exported file, two image sizes x C = 3 and 17, against eager ``infer``;
    then the onnxruntime segmenter's labels against the eager ``predict``."""
    torch.manual_seed(0)
    model = vocabseg.create_model(name).eval()
    path = export_image_model(model, tmp_path / "image.onnx")
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["pixels", "text_embeddings"]
    d = model.config.size_divisibility
    d *= -(-32 // d)  # sides a multiple of the model's divisibility and >= 32 (release models pad to 1: no padding)
    if [o.name for o in session.get_outputs()] == ["class_probs", "mask_logits"]:
        _check_image_parity(model, session, [(2 * d, 3 * d), (5 * d, 2 * d)], (3, 17))
    else:  # dense logits (LSeg-style)
        gen = torch.Generator().manual_seed(1)
        for (h, w), c in [((2 * d, 3 * d), 3), ((5 * d, 2 * d), 17)]:
            pixels = torch.randn(1, 3, h, w, generator=gen)
            text = F.normalize(torch.randn(c, model.clip.embed_dim, generator=gen), dim=-1)
            (dense,) = session.run(None, {"pixels": pixels.numpy(), "text_embeddings": text.numpy()})
            assert _rel(dense, model.infer(pixels, text)) < TOL
    segmenter = OnnxSegmenter(path, model=model, threads=1)
    vocab = ["cat", "dog", "grass", "sky", "road"]
    text = model.text_embeddings(vocab)
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    assert np.array_equal(segmenter.predict(rgb, vocab, text_embeddings=text).labels, model.predict(rgb, vocab).labels)


@pytest.mark.parametrize("opset", [18])
def test_default_model_parity(opset, tmp_path):
    torch.manual_seed(0)
    model = vocabseg.create_model("default").eval()  # architecture of the embedded model, random weights
    path = export_image_model(model, tmp_path / "image.onnx", opset=opset)
    d = model.config.size_divisibility
    _check_image_parity(model, _session(path), [(2 * d, 3 * d), (4 * d, d)], (3, 17))


def test_non_integer_grid_ratio_uses_exact_adaptive_pooling(tmp_path):
    """CLIP at 0.75× gives side/CLIP grid ratios like 4/3 (as SAN-L/14's 0.7× does): gather-based pooling."""
    x = torch.randn(2, 5, 40, 24)
    for size in [(20, 12), (30, 7), (13, 24), (40, 24), (1, 1)]:
        assert torch.equal(adaptive_max_pool_gather(x, size, 41), F.adaptive_max_pool2d(x, size))
    torch.manual_seed(0)
    cfg = vocabseg.get_config("san_tiny_test", clip_scale=0.75)
    assert _pool_plan(cfg)[0] is None
    model = vocabseg.create_model("san_tiny_test", config=cfg).eval()
    path = export_image_model(model, tmp_path / "image.onnx")
    _check_image_parity(model, _session(path), [(32, 48), (80, 112)], (3, 17))


def test_text_encoder_parity(tiny, tiny_files):
    session = _session(tiny_files[1])
    prompts = ["a photo of a cat.", "grass", "There is a large traffic light in the scene.", "a", "x " * 40]
    for batch in (prompts, prompts[:1]):
        tokens = tokenize(batch)
        with torch.no_grad():
            eager = tiny.clip.encode_text(tokens)
        (onnx_out,) = session.run(None, {"tokens": tokens.numpy()})
        assert onnx_out.shape == tuple(eager.shape)
        assert _rel(onnx_out, eager) < TOL


@pytest.mark.parametrize("shape", [(50, 70), (33, 64), (120, 40)])
def test_preprocess_is_bit_identical_to_prepare(tiny, shape):
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    pixels, crop = tiny.prepare(rgb)
    ours, our_crop = preprocess(rgb, PreprocessConfig.from_model(tiny))
    assert our_crop == crop
    assert np.array_equal(ours, pixels.numpy())


def test_segmenter_labels_equal_eager_predict(tiny, tiny_files):
    segmenter = OnnxSegmenter(*tiny_files, model=tiny, threads=1)
    vocab = ["cat", "dog", "grass", "sky", "road"]
    for i, shape in enumerate([(50, 70), (90, 40)]):
        rgb = np.random.default_rng(i).integers(0, 256, (*shape, 3), dtype=np.uint8)
        eager = tiny.predict(rgb, vocab)
        onnx_result = segmenter.predict(rgb, vocab)
        assert onnx_result.labels.shape == shape and onnx_result.labels.dtype == np.int32
        assert np.array_equal(onnx_result.labels, eager.labels)
        assert np.allclose(onnx_result.confidence, eager.confidence, atol=1e-5)
        given = segmenter.predict(rgb, vocab, text_embeddings=tiny.text_embeddings(vocab))  # embeddings passed in
        assert np.array_equal(given.labels, eager.labels)


def test_export_folder_round_trip(tiny, tmp_path):
    meta_path = export_command("san_tiny_test", None, None, tmp_path / "out", model=tiny)
    meta = json.loads(meta_path.read_text())
    assert meta_path.name == CONFIG_NAME and meta["model"] == "san_tiny_test" and meta["exporter"] == "torchscript"
    assert meta["preprocess"]["size_divisibility"] == tiny.config.size_divisibility
    segmenter = load_onnx_segmenter(tmp_path / "out", threads=1)
    rgb = np.random.default_rng(7).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    vocab = "red, green, blue"
    assert np.array_equal(segmenter.predict(rgb, vocab).labels, tiny.predict(rgb, vocab).labels)
    with pytest.raises(CheckpointError, match="not an ONNX export folder"):
        load_onnx_segmenter(tmp_path)


def test_dynamo_exporter_gives_the_same_results(tiny, tmp_path):
    """The torch.export-based exporter on the same wrapper (slower to export; ready for when TorchScript goes)."""
    pytest.importorskip("onnxscript")
    meta = json.loads(export_command(None, None, None, tmp_path, model=tiny, exporter="dynamo").read_text())
    assert meta["exporter"] == "dynamo" and meta["opset"] == 18  # torch.export's translation starts at opset 18
    d = tiny.config.size_divisibility
    _check_image_parity(tiny, _session(tmp_path / "image.onnx"), [(2 * d, 3 * d), (4 * d, d)], (3, 17))
    tokens = tokenize(["a photo of a cat.", "grass", "There is a large traffic light in the scene."])
    (onnx_text,) = _session(tmp_path / "text.onnx").run(None, {"tokens": tokens.numpy()})
    with torch.no_grad():
        assert _rel(onnx_text, tiny.clip.encode_text(tokens)) < TOL
    rgb = np.random.default_rng(3).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    vocab = ["cat", "dog", "grass"]
    assert np.array_equal(load_onnx_segmenter(tmp_path, threads=1).predict(rgb, vocab).labels,
                          tiny.predict(rgb, vocab).labels)


def test_closed_set_model_exports_without_a_text_input(tmp_path):
    torch.manual_seed(0)
    model = vocabseg.create_model("san_tiny_test", closed_set_classes=4).eval()
    export_command(None, None, None, tmp_path, model=model)
    segmenter = load_onnx_segmenter(tmp_path, threads=1)
    assert segmenter.input_names == ["pixels"]  # the learnt class embeddings replace the text
    rgb = np.random.default_rng(5).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    vocab = ["a", "b", "c", "d"]
    assert np.array_equal(segmenter.predict(rgb, vocab).labels, model.predict(rgb, vocab).labels)


def test_nested_cut_traces_into_onnx(tmp_path):
    """The default's nested-proposal cut (a confident star cut out of the wall masks over it) in onnxruntime."""
    from vocabseg.export.onnx import _onnx_export
    from vocabseg.models.san import cut_nested_proposals

    class Cut(torch.nn.Module):
        def forward(self, probs, logits):
            return cut_nested_proposals(probs, logits, 0.8)

    logits = torch.full((1, 3, 8, 8), -8.0)
    logits[0, :2] = 6.0
    logits[0, 2, 2:5, 2:5] = 6.0
    probs = torch.tensor([[[0.97, 0.0], [0.95, 0.0], [0.0, 0.9]]])
    axes = {"probs": {1: "q"}, "logits": {1: "q", 2: "h", 3: "w"}}
    _onnx_export(Cut(), (probs, logits), tmp_path / "cut.onnx", ("probs", "logits"), ("out",), 18, "torchscript",
                 axes, None)
    eager = cut_nested_proposals(probs, logits, 0.8)
    assert (eager[0, :2, 2:5, 2:5] < -5).all()  # the cut fired
    (out,) = _session(tmp_path / "cut.onnx").run(None, {"probs": probs.numpy(), "logits": logits.numpy()})
    assert np.allclose(torch.sigmoid(torch.from_numpy(out)).numpy(), eager.sigmoid().numpy(), atol=1e-5)
