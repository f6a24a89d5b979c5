"""The HTTP API and web page of vocabseg (FastAPI).

Endpoints (all paths relative to the app's mount point, so it runs behind a proxy under a sub-path):

- ``POST /api/segment``: multipart form with ``image`` (a file) and ``vocabulary`` ("cat, dog, grass"); option
  ``format`` (query or form): ``json`` (default; vocabulary, per-class areas and colours, image size, timings),
  ``labels`` (the label map as a PNG of class indices, palette-coloured) or ``overlay`` (the overlay PNG).
- ``GET /api/models``: the served models' names, families, backends and configurations (the first is the
  default); the server's limits. ``POST /api/segment`` takes ``model`` (form or query) to choose one.
- ``GET /healthz``: liveness, ``{"status": "ok"}``.
- ``GET /``: one HTML page (no external resources, no build step) to try the model in a browser.
- ``GET /openapi.json``, ``GET /docs``: FastAPI's schema and its explorer.

Limits: the upload's size is checked while the body streams in (and from ``Content-Length`` before anything is
read), the pixel count from the image header before decoding (both 413); the vocabulary's length (422); a file
that is not an image is a 400. Every error is ``{"detail": "one sentence"}``.

The model is not thread-safe, so model calls are serialised by a lock; decoding, the model and the PNG encoding
run in the thread pool, off the event loop, so the server keeps answering (``/healthz``) while a request computes.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError, ImageError, UserError, VocabularyError


class ServeDependencyError(UserError, ImportError):
    """fastapi / uvicorn / python-multipart are not installed."""


try:
    from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ServeDependencyError(f"serving needs FastAPI ({e}); install it with: pip install 'vocabseg[serve]' "
                               f"(fastapi, uvicorn, python-multipart)") from None

__all__ = ["create_app", "serve", "label_png_bytes", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MAX_PIXELS",
           "DEFAULT_MAX_VOCABULARY", "MAX_NAME_CHARS"]

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # 20 MiB image file
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels
DEFAULT_MAX_VOCABULARY = 1000  # class names per request
MAX_NAME_CHARS = 200  # one class name (CLIP reads 75 tokens at most anyway)
FORM_ALLOWANCE_BYTES = 1024 * 1024  # multipart headers and the vocabulary field, on top of the image
FORMATS = ("json", "labels", "overlay")


class ApiError(Exception):
    """An error answered with ``status`` and ``{"detail": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------------------------- helpers


def label_png_bytes(labels: np.ndarray, names: list[str]) -> bytes:
    """A label map as PNG bytes in the format of :func:`vocabseg.io.save_label_png`: a palette ('P') PNG whose pixel
    values are the class indices (coloured like the overlay) for up to 256 classes, else 16-bit grayscale."""
    from ..viz import palette_for

    labels = np.asarray(labels)
    h, w = labels.shape
    num_classes = len(names)
    if num_classes <= 256:
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[:num_classes] = palette_for(names)
        im = Image.frombytes("P", (w, h), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
        im.putpalette(pal.reshape(-1).tolist())
    else:
        im = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16))
    return _png_bytes(im)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)  # fast: these are answers, not archives
    return buf.getvalue()


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def parse_request_vocabulary(text: str, max_vocabulary: int) -> list[str]:
    """Class names of a request ("a, b, c" or one per line), or an :class:`ApiError` (422) saying what is wrong."""
    from ..clip.vocabulary import parse_vocabulary

    try:
        names = parse_vocabulary(text or "")
    except VocabularyError:
        raise ApiError(422, "the vocabulary is empty: send class names separated by commas, "
                            "e.g. vocabulary='cat, dog, grass'") from None
    if len(names) > max_vocabulary:
        raise ApiError(422, f"the vocabulary has {len(names)} class names; this server accepts at most "
                            f"{max_vocabulary} per request")
    long = next((n for n in names if len(n) > MAX_NAME_CHARS), None)
    if long is not None:
        raise ApiError(422, f"the class name {long[:40]!r}... is {len(long)} characters long; at most "
                            f"{MAX_NAME_CHARS} are accepted")
    return names


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Upload bytes -> H×W×3 uint8 through :func:`vocabseg.io.load_image` (EXIF, alpha, 16-bit handled there).

    The pixel count is checked from the header, before any pixel is decoded (413); unreadable data is a 400."""
    from ..io import load_image

    if not data:
        raise ApiError(400, "the uploaded image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ApiError(413, f"the image has far more than this server's limit of {max_pixels:,} pixels") from None
    except Exception:  # noqa: BLE001 - anything PIL cannot identify is the upload's fault
        raise ApiError(400, "the upload is not an image file that can be read (PNG, JPEG, WebP, BMP, TIFF, GIF)") \
            from None
    with im:
        try:
            return load_image(im, max_pixels=max_pixels)
        except ImageError as e:
            if im.width * im.height > max_pixels:
                raise ApiError(413, f"the image is {im.width}×{im.height} = {im.width * im.height:,} pixels, more "
                                    f"than this server's limit of {max_pixels:,}") from None
            raise ApiError(400, "the image is corrupt or truncated: its pixels cannot be decoded") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# ----------------------------------------------------------------------------------------------- the service


class SegmentService:
    """The model behind the API: one lock around every model call (text embeddings and inference)."""

    def __init__(self, model_or_predictor: Any):
        from ..predict import Predictor

        if hasattr(model_or_predictor, "predict_array") and hasattr(model_or_predictor, "text_embeddings"):
            self.predictor = model_or_predictor  # a Predictor, an OnnxSegmenter or anything shaped like them
            self.model = getattr(model_or_predictor, "model", None)
        else:
            self.predictor = Predictor(model_or_predictor)
            self.model = model_or_predictor
        self.lock = threading.Lock()
        self.requests_served = 0

    # -- description ----------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(getattr(self.model, "model_name", "") or getattr(self.predictor, "model_name", "") or "unnamed")

    def summary(self) -> dict:
        from ..models import get_entry

        backend = "torch" if self.model is not None else type(self.predictor).__name__
        if backend == "OnnxSegmenter":
            backend = "onnx"
        info: dict[str, Any] = {"name": self.name, "backend": backend}
        try:
            entry = get_entry(self.name)
            info["family"], info["description"] = entry.family, entry.description
        except (UserError, KeyError):
            info["family"], info["description"] = None, None
        if self.model is not None:
            info["parameters"] = int(sum(p.numel() for p in self.model.parameters()))
            info["device"] = str(getattr(self.model, "device", "cpu"))
            info["config"] = _jsonable(getattr(self.model, "config", None))
        else:
            info["config"] = _jsonable(getattr(self.predictor, "config", None))
            templates = getattr(self.predictor, "templates", None)
            if templates is not None:
                info["templates"] = _jsonable(templates)
        return info

    # -- one request ----------------------------------------------------------------------------------------
    def segment(self, data: bytes, names: list[str], fmt: str, max_pixels: int, legend: bool, alpha: float,
                embed_overlay: bool) -> tuple[Any, dict]:
        """Decode, segment and render; returns (JSON dict or PNG bytes, timings in seconds). Runs in a worker."""
        from ..viz import palette_for

        t0 = time.perf_counter()
        rgb = decode_upload(data, max_pixels)
        t1 = time.perf_counter()
        with self.lock:
            t2 = time.perf_counter()
            try:
                text = self.predictor.text_embeddings(names)
                t3 = time.perf_counter()
                result = self.predictor.predict_array(rgb, names, text)
            except UserError as e:
                raise ApiError(400, _one_line(e)) from None
            self.requests_served += 1
        t4 = time.perf_counter()
        if fmt == "labels":
            body: Any = label_png_bytes(result.labels, names)
        elif fmt == "overlay":
            body = _png_bytes(result.overlay(alpha=alpha, legend=legend))
        else:
            palette = palette_for(names)
            areas = result.areas()
            for a in areas:
                a["color"] = _hex(palette[a["index"]])
            body = {"model": self.name, "vocabulary": names, "colors": [_hex(c) for c in palette],
                    "image": {"width": int(rgb.shape[1]), "height": int(rgb.shape[0])}, "areas": areas}
            if embed_overlay:
                png = _png_bytes(result.overlay(alpha=alpha, legend=legend))
                body["overlay_png"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        t5 = time.perf_counter()
        timing = {"decode_s": t1 - t0, "queue_s": t2 - t1, "text_s": t3 - t2, "model_s": t4 - t3,
                  "render_s": t5 - t4}
        return body, timing


# ----------------------------------------------------------------------------------------------- body limit


class _BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with a 413, before reading it when it declares
    its length, else as soon as the streamed bytes pass the limit (the rest is never read)."""

    def __init__(self, app: Any, limit: int, file_limit: int):
        self.app = app
        self.limit = limit
        self.file_limit = file_limit

    def _too_large(self) -> str:
        return f"the upload is too large: this server accepts image files of at most {self.file_limit:,} bytes"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.limit:
            response = JSONResponse({"detail": self._too_large()}, status_code=413, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # FastAPI re-raises an HTTPException met while parsing the body: the app answers a 413.
                    raise HTTPException(413, self._too_large(), headers={"Connection": "close"})
            return message

        await self.app(scope, limited_receive, send)


# ----------------------------------------------------------------------------------------------- the app


def _services(models: Any) -> dict[str, SegmentService]:
    """Name -> service for one model (or predictor) or a sequence of them; names must be distinct."""
    items = list(models) if isinstance(models, (list, tuple)) else [models]
    if not items:
        raise ConfigError("serve needs at least one model")
    services: dict[str, SegmentService] = {}
    for item in items:
        service = SegmentService(item)
        if service.name in services:
            raise ConfigError(f"model {service.name!r} is served twice; give each served model once")
        services[service.name] = service
    return services


def create_app(model_or_predictor: Any, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_vocabulary: int = DEFAULT_MAX_VOCABULARY,
               title: str = "vocabseg") -> FastAPI:
    """A FastAPI app serving one model or several (each a model, a :class:`~vocabseg.predict.Predictor` or an ONNX
    segmenter). With several, a request names its model (``model`` field); the first is the default, and the web
    page shows the chosen ones side by side.

    ``max_upload_bytes``: size of the image file (the whole request may carry 1 MiB more for the form fields);
    ``max_pixels``: width × height of the decoded image; ``max_vocabulary``: class names per request.
    """
    from .. import __version__

    for label, v in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels),
                     ("max_vocabulary", max_vocabulary)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{label} must be a positive integer, got {v!r}")
    services = _services(model_or_predictor)
    service = next(iter(services.values()))  # the default model

    def pick(name: Optional[str]) -> SegmentService:
        if not name:
            return service
        if name not in services:
            raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(services)}")
        return services[name]
    limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_vocabulary": max_vocabulary,
              "max_name_chars": MAX_NAME_CHARS}
    app = FastAPI(title=title, version=__version__,
                  description="Open-vocabulary segmentation: send an image and any list of class names.")
    app.state.service = service
    app.state.services = services
    app.state.limits = limits
    app.add_middleware(_BodyLimit, limit=max_upload_bytes + FORM_ALLOWANCE_BYTES, file_limit=max_upload_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query")]
            field = ".".join(loc) or "request"
            if err.get("type") == "missing":
                what = {"image": "an image file (form field 'image')",
                        "vocabulary": "class names (form field 'vocabulary', e.g. 'cat, dog, grass')"}
                parts.append(f"missing {what.get(field, repr(field))}")
            else:
                parts.append(f"{field}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE_HTML, headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "img-src 'self' data: blob:; connect-src 'self'; form-action 'self'",
            "Cache-Control": "no-cache"})

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict:
        return {"status": "ok", "model": service.name, "models": list(services)}

    @app.get("/api/models", summary="The served models (the first is the default) and the server's limits")
    async def models() -> dict:
        return {"models": [s.summary() for s in services.values()], "limits": limits}

    @app.post(
        "/api/segment",
        summary="Segment an image with any vocabulary",
        responses={200: {"description": "JSON summary (format=json), or a PNG (format=labels / overlay)",
                         "content": {"application/json": {}, "image/png": {}}},
                   400: {"description": "not a readable image"},
                   413: {"description": "upload or image too large"},
                   422: {"description": "missing field, empty or too long vocabulary"}},
    )
    async def segment(
        image: UploadFile = File(..., description="The image file (PNG, JPEG, WebP, BMP, TIFF, GIF)."),
        vocabulary: str = Form(..., description="Class names separated by commas or newlines: 'cat, dog, grass'."),
        format_query: Optional[Literal["json", "labels", "overlay"]] = Query(
            None, alias="format", description="json (default), labels (PNG of class indices) or overlay (PNG)."),
        format_form: Optional[Literal["json", "labels", "overlay"]] = Form(
            None, alias="format", description="Same as the query parameter (the form field wins)."),
        legend: bool = Query(True, description="Draw the legend panel on the overlay."),
        alpha: float = Query(0.5, ge=0.0, le=1.0, description="Opacity of the class colours on the overlay."),
        embed_overlay: bool = Query(False, description="format=json only: add the overlay PNG as a data: URL "
                                                       "('overlay_png'); the web page uses this."),
        model_query: Optional[str] = Query(None, alias="model", description="A served model's name (default: "
                                                                             "the first); see /api/models."),
        model_form: Optional[str] = Form(None, alias="model", description="Same as the query parameter."),
    ) -> Response:
        t0 = time.perf_counter()
        fmt = format_form or format_query or "json"
        chosen = pick(model_form or model_query)
        names = parse_request_vocabulary(vocabulary, max_vocabulary)
        size = getattr(image, "size", None)
        if size is not None and size > max_upload_bytes:
            raise ApiError(413, f"the image file is {size:,} bytes, more than this server's limit of "
                                f"{max_upload_bytes:,}")
        data = await image.read()
        if len(data) > max_upload_bytes:
            raise ApiError(413, f"the image file is {len(data):,} bytes, more than this server's limit of "
                                f"{max_upload_bytes:,}")
        body, timing = await run_in_threadpool(chosen.segment, data, names, fmt, max_pixels, legend, alpha,
                                               embed_overlay)
        timing["total_s"] = time.perf_counter() - t0
        server_timing = ", ".join(f"{k[:-2]};dur={v * 1000:.1f}" for k, v in timing.items())
        headers = {"Server-Timing": server_timing, "X-Vocabseg-Classes": str(len(names)),
                   "X-Vocabseg-Model": chosen.name}
        if fmt == "json":
            body["timing"] = {k: round(v, 6) for k, v in timing.items()}
            return JSONResponse(body, headers=headers)
        headers["Content-Disposition"] = f'inline; filename="{fmt}.png"'
        return Response(body, media_type="image/png", headers=headers)

    return app


# ----------------------------------------------------------------------------------------------- running it


def serve(host: str = "127.0.0.1", port: int = 8000, model_name: str | Sequence[str] | None = None,
          checkpoint: str | Path | Mapping[str, str | Path] | None = None, clip: str | Path | None = None, backend: str = "torch", *,
          onnx_dir: str | Path | None = None, device: str = "cpu", trust_jit: bool = False,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
          max_vocabulary: int = DEFAULT_MAX_VOCABULARY, root_path: str = "", proxy_headers: bool = True,
          forwarded_allow_ips: str | None = None, log_level: str = "info", precision: str = "fp32") -> None:
    """Load a model like ``vocabseg segment`` does and serve it with uvicorn (one process; requests share it).

    ``backend="onnx"`` serves a folder written by ``vocabseg export`` (``onnx_dir``). ``root_path``: the sub-path a
    reverse proxy serves the app under (e.g. "/vocabseg"); ``proxy_headers``/``forwarded_allow_ips``: trust
    ``X-Forwarded-*`` from those addresses (uvicorn's options; default: from 127.0.0.1 only).
    """
    try:
        import uvicorn
    except ImportError as e:
        raise ServeDependencyError(f"serving needs uvicorn ({e}); install it with: pip install 'vocabseg[serve]'") \
            from None
    if backend == "onnx":
        from ..export import load_onnx_segmenter

        if onnx_dir is None:
            raise UserError("--backend onnx needs --onnx DIR (a folder written by `vocabseg export`)")
        target: Any = load_onnx_segmenter(onnx_dir)
    elif backend == "torch":
        from ..models import load_model
        from ..runtime import resolve_dtype

        dtype = resolve_dtype(precision)
        names = [model_name] if model_name is None or isinstance(model_name, str) else list(model_name)
        if isinstance(checkpoint, Mapping):
            unknown = [n for n in checkpoint if n not in names]
            if unknown:
                raise UserError(f"--checkpoint names a model that is not served: {', '.join(unknown)}")
            checkpoints = dict(checkpoint)
        elif checkpoint is not None and len(names) > 1:
            raise UserError("with several --model, give checkpoints as --checkpoint NAME=PATH")
        else:
            checkpoints = {names[0]: checkpoint}
        for label, path in [*(("checkpoint", p) for p in checkpoints.values()), ("CLIP weights", clip)]:
            if path is not None and not Path(path).exists():
                raise UserError(f"{label} file {path} does not exist")
        target = [load_model(n, checkpoint=checkpoints.get(n), clip=clip, device=device, trust_jit=trust_jit,
                             dtype=dtype) for n in names]
    else:
        raise UserError(f"unknown backend {backend!r}; use torch or onnx")
    app = create_app(target, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels,
                     max_vocabulary=max_vocabulary)
    uvicorn.run(app, host=host, port=port, root_path=root_path, proxy_headers=proxy_headers,
                forwarded_allow_ips=forwarded_allow_ips, log_level=log_level, workers=1)


# ----------------------------------------------------------------------------------------------- the page

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vocabseg</title>
<link rel="icon" href="data:,">
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 1rem; color: #222; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  #model { color: #666; font-size: .9rem; margin-bottom: 1rem; }
  form { display: grid; grid-template-columns: auto 1fr; gap: .5rem .8rem; align-items: center; }
  #vocabulary { width: 100%; box-sizing: border-box; padding: .35rem; font: inherit; }
  #models { display: flex; flex-wrap: wrap; gap: .3rem 1.2rem; }
  #models label { white-space: nowrap; }
  button { padding: .4rem 1.2rem; font: inherit; cursor: pointer; }
  #status { margin: .8rem 0; min-height: 1.3em; }
  #status.error { color: #b00020; }
  #result { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
  #cards { display: flex; flex-wrap: wrap; gap: 1rem; }
  .card { margin: 0; }
  .card figcaption { font-weight: 600; margin-bottom: .3rem; }
  .card figcaption .time { font-weight: normal; color: #666; }
  .card.error figcaption { color: #b00020; }
  .card img { display: block; max-width: 100%; max-height: 70vh; border: 1px solid #ccc; }
  #cards.several .card img { max-width: min(100%, 44vw, 640px); }
  #legend { list-style: none; padding: 0; margin: 0; min-width: 14rem; }
  #legend li { display: flex; align-items: center; gap: .5rem; margin: .2rem 0; }
  #legend .swatch { width: 1.1rem; height: 1.1rem; border: 1px solid #555; flex: none; }
  #legend .pct { margin-left: auto; color: #555; font-variant-numeric: tabular-nums; }
</style>
</head>
<body>
<h1>vocabseg: segment an image with any words</h1>
<div id="model">loading model information&hellip;</div>
<form id="form">
  <label for="image">Image</label>
  <input id="image" name="image" type="file" accept="image/*" required>
  <label for="vocabulary">Vocabulary</label>
  <input id="vocabulary" name="vocabulary" type="text" placeholder="red circle, blue square, background" required>
  <span>Models</span>
  <div id="models" role="group" aria-label="models"></div>
  <span></span>
  <span><button id="run" type="submit">Segment</button></span>
</form>
<div id="status" role="status"></div>
<div id="result">
  <div id="cards"></div>
  <ul id="legend" aria-label="legend"></ul>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
fetch("api/models").then((r) => r.json()).then((info) => {
  const names = info.models.map((m) => m.name);
  const first = info.models[0];
  $("model").textContent = (names.length > 1 ? names.length + " models; choose one or several to compare" :
    "model: " + first.name + (first.description ? " (" + first.description + ")" : "")) +
    "; at most " + info.limits.max_vocabulary + " names, " + (info.limits.max_pixels / 1e6) + " MP, " +
    Math.round(info.limits.max_upload_bytes / 1048576) + " MiB";
  const box = $("models");
  info.models.forEach((m, i) => {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.name = "model";
    input.value = m.name;
    input.checked = i === 0;
    label.title = m.description || "";
    label.append(input, " " + m.name);
    box.append(label);
  });
}).catch(() => { $("model").textContent = ""; });

async function segmentWith(model, file, vocabulary) {
  const body = new FormData();
  body.append("image", file);
  body.append("vocabulary", vocabulary);
  body.append("model", model);
  const response = await fetch("api/segment?format=json&embed_overlay=true&legend=false", {method: "POST", body});
  const data = await response.json().catch(() => ({detail: response.status + " " + response.statusText}));
  if (!response.ok) {
    throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
  }
  return data;
}

function card(model) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.dataset.model = model;
  const caption = document.createElement("figcaption");
  caption.textContent = model + " ";
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = "\\u2026";
  caption.append(time);
  const img = document.createElement("img");
  img.alt = model + " overlay";
  figure.append(caption, img);
  return figure;
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("image").files[0];
  const vocabulary = $("vocabulary").value;
  if (!file) { show("choose an image first", true); return; }
  const chosen = Array.from(document.querySelectorAll("#models input:checked")).map((i) => i.value);
  if (chosen.length === 0) { show("choose at least one model", true); return; }
  const cards = $("cards");
  cards.replaceChildren(...chosen.map(card));
  cards.classList.toggle("several", chosen.length > 1);
  $("legend").replaceChildren();
  $("run").disabled = true;
  show("segmenting\\u2026", false);
  let failures = 0;
  let legendDrawn = false;
  let summary = "";
  await Promise.all(chosen.map(async (model, k) => {
    const figure = cards.children[k];
    try {
      const data = await segmentWith(model, file, vocabulary);
      figure.querySelector("img").src = data.overlay_png;
      figure.querySelector(".time").textContent = (data.timing.total_s * 1000).toFixed(0) + " ms";
      figure.title = data.areas.map((a) => a.name + " " + (100 * a.fraction).toFixed(1) + " %").join(", ");
      if (!legendDrawn) { drawLegend(data, chosen.length === 1); legendDrawn = true; }
      summary = data.image.width + "\\u00d7" + data.image.height + " px, " + data.vocabulary.length + " names";
    } catch (err) {
      failures += 1;
      figure.classList.add("error");
      figure.querySelector(".time").textContent = "error: " + err.message;
    }
  }));
  $("run").disabled = false;
  if (failures === chosen.length) {
    show("error: " + cards.children[0].querySelector(".time").textContent.replace(/^error: /, ""), true);
  } else {
    show(summary + (chosen.length > 1 ? ", " + chosen.length + " models" : "") +
         (failures ? ", " + failures + " failed" : ""), failures > 0);
  }
});

function drawLegend(data, withAreas) {
  // the palette depends on the names alone, so one legend serves every model's overlay
  const legend = $("legend");
  const shown = withAreas ? data.areas : data.vocabulary.map((name, index) => ({name, index, color: data.colors[index]}));
  for (const area of shown) {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = area.color;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = area.name;
    li.append(swatch, name);
    if (withAreas) {
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = (100 * area.fraction).toFixed(1) + " %";
      li.append(pct);
    }
    legend.append(li);
  }
}

function show(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}
</script>
</body>
</html>
"""
