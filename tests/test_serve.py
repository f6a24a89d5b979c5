"""The HTTP API (vocabseg.serve): answers, limits and errors through FastAPI's TestClient, then a bounded load test
against a real uvicorn server on loopback. Runs on the tiny random model."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from live_server import LiveServer

pytest.importorskip("fastapi")
pytest.importorskip("multipart")  # python-multipart, needed for form uploads
httpx = pytest.importorskip("httpx")

import vocabseg  # noqa: E402
from vocabseg.predict import Predictor  # noqa: E402
from vocabseg.serve import create_app, label_png_bytes  # noqa: E402

VOCAB = "red circle, blue square, background"
NAMES = ["red circle", "blue square", "background"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vocabseg.create_model("san_tiny_test").eval()


@pytest.fixture(scope="module")
def client(model):
    from fastapi.testclient import TestClient

    app = create_app(model, max_upload_bytes=200_000, max_pixels=300 * 300, max_vocabulary=20)
    with TestClient(app) as c:
        yield c


def scene(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A picture with structure (two halves and a square) plus noise, so labels are not all one class."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2], img[h // 2:] = (90, 150, 240), (40, 180, 60)
    y, x = rng.integers(0, h // 2, 2)
    img[y:y + h // 3, x:x + w // 3] = (220, 30, 30)
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def post(c, data: bytes | None, vocabulary: str | None = VOCAB, query: str = "", **form):
    files = {"image": ("x.png", data, "image/png")} if data is not None else None
    fields = dict(form)
    if vocabulary is not None:
        fields["vocabulary"] = vocabulary
    return c.post("/api/segment" + query, files=files, data=fields)


# ----------------------------------------------------------------------------------------------- good requests


def test_json_summary(client, model):
    rgb = scene(0)
    r = post(client, png(rgb))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["vocabulary"] == NAMES and body["model"] == "san_tiny_test"
    assert body["image"] == {"width": 64, "height": 48}
    assert len(body["colors"]) == 3 and all(c.startswith("#") and len(c) == 7 for c in body["colors"])
    expected = Predictor(model).predict(rgb, NAMES).areas()
    assert [(a["name"], a["pixels"]) for a in body["areas"]] == [(a["name"], a["pixels"]) for a in expected]
    assert abs(sum(a["fraction"] for a in body["areas"]) - 1) < 1e-9
    assert set(body["timing"]) == {"decode_s", "queue_s", "text_s", "model_s", "render_s", "total_s"}
    assert "overlay_png" not in body
    assert "model;dur=" in r.headers["server-timing"]


def test_labels_png_equals_predictor(client, model):
    for seed in range(3):
        rgb = scene(seed, 40 + 8 * seed, 72)
        r = post(client, png(rgb), query="?format=labels")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        got = np.array(Image.open(io.BytesIO(r.content)))
        want = Predictor(model).predict(rgb, NAMES).labels
        assert got.shape == want.shape and np.array_equal(got, want)


def test_format_as_form_field_and_overlay(client, model):
    rgb = scene(1)
    r = post(client, png(rgb), format="overlay")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with_legend = Image.open(io.BytesIO(r.content))
    assert with_legend.width >= 64 and with_legend.height >= 48
    r = post(client, png(rgb), query="?format=overlay&legend=false&alpha=0.4")
    got = np.array(Image.open(io.BytesIO(r.content)).convert("RGB"))
    want = np.array(Predictor(model).predict(rgb, NAMES).overlay(alpha=0.4, legend=False).convert("RGB"))
    assert np.array_equal(got, want)


def test_json_can_embed_the_overlay(client):
    r = post(client, png(scene(2)), query="?embed_overlay=true&legend=false")
    url = r.json()["overlay_png"]
    assert url.startswith("data:image/png;base64,")
    import base64

    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (64, 48)


def test_a_predictor_can_be_served(model):
    from fastapi.testclient import TestClient

    with TestClient(create_app(Predictor(model))) as c:
        r = post(c, png(scene(3)), query="?format=labels")
    assert r.status_code == 200
    assert np.array_equal(np.array(Image.open(io.BytesIO(r.content))), Predictor(model).predict(scene(3), NAMES).labels)


def test_an_onnx_export_can_be_served(model, tmp_path):
    pytest.importorskip("onnxruntime")
    import warnings

    from fastapi.testclient import TestClient

    from vocabseg.export import export_command, load_onnx_segmenter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_command(None, None, None, tmp_path / "onnx", model=model)
    with TestClient(create_app(load_onnx_segmenter(tmp_path / "onnx"))) as c:
        info = c.get("/api/models").json()["models"][0]
        r = post(c, png(scene(4)), query="?format=labels")
    assert info["backend"] == "onnx" and info["name"] == "san_tiny_test"
    assert r.status_code == 200
    assert np.array_equal(np.array(Image.open(io.BytesIO(r.content))), Predictor(model).predict(scene(4), NAMES).labels)


def test_serve_refuses_bad_options_before_starting(tmp_path):
    from vocabseg.errors import ConfigError, UserError
    from vocabseg.serve import serve

    with pytest.raises(UserError, match="does not exist"):
        serve(model_name="san_tiny_test", checkpoint=tmp_path / "missing.pth")
    with pytest.raises(UserError, match="unknown backend"):
        serve(backend="tensorflow")
    with pytest.raises(UserError, match="--onnx"):
        serve(backend="onnx")
    with pytest.raises(ConfigError, match="max_pixels"):
        create_app(Predictor(vocabseg.create_model("san_tiny_test")), max_pixels=0)


def test_label_png_format_matches_save_label_png(tmp_path):
    from vocabseg.io import read_label_png, save_label_png
    from vocabseg.viz import palette_for

    rng = np.random.default_rng(0)
    for n in (3, 256, 300):
        labels = rng.integers(0, n, (17, 23))
        names = ["red thing"] + [f"c{i}" for i in range(1, n)]
        data = label_png_bytes(labels, names)
        save_label_png(labels, tmp_path / "ref.png", palette_for(names))
        (tmp_path / "api.png").write_bytes(data)
        assert np.array_equal(read_label_png(tmp_path / "api.png"), labels)
        a, b = Image.open(tmp_path / "api.png"), Image.open(tmp_path / "ref.png")
        assert a.mode == b.mode and (a.mode != "P" or a.getpalette() == b.getpalette())


def test_models_health_page_and_schema(client):
    info = client.get("/api/models").json()
    assert info["models"][0]["name"] == "san_tiny_test" and info["models"][0]["family"] == "san"
    assert info["models"][0]["config"]["short_side"] == 64
    assert info["limits"] == {"max_upload_bytes": 200_000, "max_pixels": 90_000, "max_vocabulary": 20,
                              "max_name_chars": 200}
    assert client.get("/healthz").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('type="file"', 'id="vocabulary"', 'id="run"', 'id="models"', 'id="cards"', 'id="legend"'):
        assert needle in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    schema = client.get("/openapi.json").json()
    assert {"/api/segment", "/api/models", "/healthz"} <= set(schema["paths"])
    seg = schema["paths"]["/api/segment"]["post"]
    assert "multipart/form-data" in seg["requestBody"]["content"]
    assert any(p["name"] == "format" for p in seg["parameters"])


def test_several_models_each_request_names_one(model):
    """A server started with several models lists them (the first is the default) and answers each request with
    the model it names; an unknown name is a one-line 404; two models under one name are refused."""
    from fastapi.testclient import TestClient

    from vocabseg.errors import ConfigError

    torch.manual_seed(1)
    other = vocabseg.create_model("san_tiny_test").eval()
    other.model_name = "other_tiny"
    rgb = scene(3)
    with TestClient(create_app([model, other])) as c:
        assert [m["name"] for m in c.get("/api/models").json()["models"]] == ["san_tiny_test", "other_tiny"]
        assert c.get("/healthz").json()["models"] == ["san_tiny_test", "other_tiny"]
        for chosen, how in ((model, {}), (other, {"model": "other_tiny"}), (model, {"model": "san_tiny_test"})):
            r = post(c, png(rgb), query="?format=labels", **how)
            assert r.status_code == 200 and r.headers["x-vocabseg-model"] == chosen.model_name
            want = Predictor(chosen).predict(rgb, NAMES).labels
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), want)
        r = post(c, png(rgb), query="?model=other_tiny&format=labels")
        assert r.headers["x-vocabseg-model"] == "other_tiny"
        r = post(c, png(rgb), model="no_such_model")
        assert r.status_code == 404 and "no_such_model" in r.json()["detail"] and "other_tiny" in r.json()["detail"]
    with pytest.raises(ConfigError, match="twice"):
        create_app([model, model])


# ----------------------------------------------------------------------------------------------- bad requests


def test_missing_file_or_vocabulary(client):
    r = post(client, None)
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = post(client, png(scene(0)), vocabulary=None)
    assert r.status_code == 422 and "vocabulary" in r.json()["detail"]


def test_corrupt_truncated_and_empty_files(client):
    data = png(scene(0, 120, 160))
    for bad, why in ((b"this is not an image", "not an image"), (data[:300], "corrupt or truncated"),
                     (b"", "empty")):
        r = post(client, bad)
        assert r.status_code == 400, (why, r.text)
        assert why in r.json()["detail"] and "\n" not in r.json()["detail"]


def test_vocabulary_limits(client):
    data = png(scene(0))
    r = post(client, data, vocabulary=" , \n ")
    assert r.status_code == 422 and "vocabulary is empty" in r.json()["detail"]
    r = post(client, data, vocabulary=", ".join(f"thing {i}" for i in range(21)))
    assert r.status_code == 422 and "21 class names" in r.json()["detail"] and "at most 20" in r.json()["detail"]
    r = post(client, data, vocabulary="x" * 201)
    assert r.status_code == 422 and "201 characters" in r.json()["detail"]
    r = post(client, data, query="?format=xml")
    assert r.status_code == 422 and "format" in r.json()["detail"]


def test_oversized_upload_is_refused(client):
    # 1. a file over the limit (the request itself within the form allowance): checked on the parsed upload
    r = post(client, b"\0" * 200_001)
    assert r.status_code == 413 and "200,000" in r.json()["detail"]
    # 2. a declared Content-Length far over the limit: refused before the body is read
    r = post(client, b"\0" * 1_400_000)
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    # 3. a streamed body without Content-Length: cut off once the bytes pass the limit
    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        for _ in range(400):
            yield b"\0" * 10_000

    r = client.post("/api/segment", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]


def test_too_many_pixels(client):
    big = io.BytesIO()
    Image.new("RGB", (301, 300), (10, 20, 30)).save(big, format="PNG")  # small file, 90,300 pixels
    r = post(client, big.getvalue())
    assert r.status_code == 413 and "90,300 pixels" in r.json()["detail"]
    ok = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 20, 30)).save(ok, format="PNG")
    assert post(client, ok.getvalue()).status_code == 200


# ----------------------------------------------------------------------------------------------- live server


class CountingPredictor:
    """A Predictor that records how many model calls overlap (the app's lock must keep that at one)."""

    def __init__(self, model):
        self.inner = Predictor(model)
        self.model = model
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self._guard = threading.Lock()

    def text_embeddings(self, names):
        return self.inner.text_embeddings(names)

    def predict_array(self, rgb, names, text):
        with self._guard:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(0.002)  # widen the window in which an unserialised call would overlap
            return self.inner.predict_array(rgb, names, text)
        finally:
            with self._guard:
                self.active -= 1


N_REQUESTS = 50
TIME_BOUND_S = 90.0  # generous: the 50 tiny-model requests take ~1-3 s on an idle 2-core machine


def test_load_50_concurrent_requests_on_loopback(model):
    pytest.importorskip("uvicorn")
    predictor = CountingPredictor(model)
    images = [scene(s, 48 + 4 * s, 64) for s in range(5)]
    bodies = [png(rgb) for rgb in images]
    expected = [Predictor(model).predict(rgb, NAMES).labels for rgb in images]

    async def fire(url):
        limits = httpx.Limits(max_connections=N_REQUESTS, max_keepalive_connections=N_REQUESTS)
        async with httpx.AsyncClient(base_url=url, timeout=TIME_BOUND_S, limits=limits, trust_env=False) as c:
            async def one(i):
                r = await c.post("/api/segment?format=labels", data={"vocabulary": VOCAB},
                                 files={"image": (f"{i}.png", bodies[i % 5], "image/png")})
                return i, r

            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(N_REQUESTS)), c.get("/healthz"))
            return results, time.perf_counter() - t0

    with LiveServer(create_app(predictor)) as server:
        results, elapsed = asyncio.run(fire(server.url))
    health = results.pop()
    assert health.status_code == 200
    assert len(results) == N_REQUESTS
    for i, r in results:
        assert r.status_code == 200, r.text
        assert np.array_equal(np.array(Image.open(io.BytesIO(r.content))), expected[i % 5]), f"request {i}"
    assert predictor.calls == N_REQUESTS and predictor.max_active == 1
    assert elapsed < TIME_BOUND_S, f"{N_REQUESTS} requests took {elapsed:.1f} s"
    print(f"\n{N_REQUESTS} concurrent requests answered in {elapsed:.2f} s ({N_REQUESTS / elapsed:.1f} req/s)")
