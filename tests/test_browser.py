"""The web page in a real browser: the system Chromium driven by Playwright loads the page from a live server,
uploads an image, types a vocabulary, clicks, and sees the overlay and its legend. Skipped without
/usr/bin/chromium (no browser is ever downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from live_server import LiveServer

CHROMIUM = Path(os.environ.get("VOCABSEG_CHROMIUM", "/usr/bin/chromium"))
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no system Chromium at {CHROMIUM}")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WORDS = ["red circle", "blue square", "background"]


def _run_page(tmp_path, app, chosen: list[str] | None):
    """Load the page, upload a scene, type the words, tick ``chosen`` models (None: keep the default), click, and
    wait for every card's overlay. Returns (overlay sizes, card captions, legend text, status, problems)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    rgb = np.zeros((96, 128, 3), np.uint8)
    rgb[:48], rgb[48:], rgb[20:60, 30:70] = (90, 150, 240), (40, 180, 60), (220, 30, 30)
    image = tmp_path / "scene.png"
    Image.fromarray(rgb).save(image)
    shot = tmp_path / "page.png"
    with LiveServer(app) as server, sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.goto(server.url + "/", wait_until="load", timeout=30_000)
            # the page's CSP forbids eval: wait on selectors and functions, never on expression strings
            page.locator("#models input").first.wait_for(timeout=30_000)
            for box in page.query_selector_all("#models input"):
                if chosen is not None and (box.get_attribute("value") in chosen) != box.is_checked():
                    box.click()
            page.set_input_files("#image", str(image))
            page.fill("#vocabulary", ", ".join(WORDS))
            page.click("#run")
            page.wait_for_function(
                "() => { const imgs = [...document.querySelectorAll('#cards .card img')];"
                "        return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0)"
                "               && document.querySelector('#legend li') && !document.getElementById('run').disabled; }",
                timeout=60_000)
            page.screenshot(path=str(shot), full_page=True)
            sizes = page.eval_on_selector_all("#cards .card img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
            captions = page.eval_on_selector_all("#cards figcaption", "cs => cs.map(c => c.textContent)")
            legend = page.inner_text("#legend")
            status = page.inner_text("#status")
            header = page.inner_text("#model")
        finally:
            context.close()
    assert shot.stat().st_size > 1000 and Image.open(shot).width > 0
    return sizes, captions, legend, status, header, problems


def _app(*names):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("multipart")
    import vocabseg
    from vocabseg.serve import create_app

    models = []
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = vocabseg.create_model("san_tiny_test").eval()
        model.model_name = name
        models.append(model)
    return create_app(models)


def test_page_uploads_and_shows_overlay_with_legend(tmp_path):
    sizes, captions, legend, status, header, problems = _run_page(tmp_path, _app("san_tiny_test"), None)
    assert "san_tiny_test" in header
    assert sizes == [[128, 96]]  # the page asks for the overlay without the drawn legend: the image's own size
    assert captions[0].startswith("san_tiny_test") and "ms" in captions[0]
    assert any(word in legend for word in WORDS), legend
    assert "%" in legend and "128×96" in status, status
    assert not problems, problems


def test_page_compares_the_chosen_models_side_by_side(tmp_path):
    app = _app("tiny_a", "tiny_b", "tiny_c")
    sizes, captions, legend, status, header, problems = _run_page(tmp_path, app, ["tiny_a", "tiny_c"])
    assert "3 models" in header
    assert sizes == [[128, 96], [128, 96]]
    assert [c.split()[0] for c in captions] == ["tiny_a", "tiny_c"] and all("ms" in c for c in captions)
    assert all(word in legend for word in WORDS), legend  # one legend of every name serves both overlays
    assert "2 models" in status, status
    assert not problems, problems
