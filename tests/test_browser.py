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


def test_page_uploads_and_shows_overlay_with_legend(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("multipart")
    sync_api = pytest.importorskip("playwright.sync_api")
    import vocabseg
    from vocabseg.serve import create_app

    torch.manual_seed(0)
    model = vocabseg.create_model("san_tiny_test").eval()
    rgb = np.zeros((96, 128, 3), np.uint8)
    rgb[:48], rgb[48:], rgb[20:60, 30:70] = (90, 150, 240), (40, 180, 60), (220, 30, 30)
    image = tmp_path / "scene.png"
    Image.fromarray(rgb).save(image)
    shot = tmp_path / "page.png"

    with LiveServer(create_app(model)) as server, sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.goto(server.url + "/", wait_until="load", timeout=30_000)
            # the page's CSP forbids eval: wait on selectors and functions, never on expression strings
            page.locator("#model", has_text="san_tiny_test").wait_for(timeout=30_000)
            page.set_input_files("#image", str(image))
            page.fill("#vocabulary", ", ".join(WORDS))
            page.click("#run")
            page.wait_for_function(
                "() => { const img = document.getElementById('overlay');"
                "        return img.complete && img.naturalWidth > 0 && document.querySelector('#legend li'); }",
                timeout=60_000)
            page.screenshot(path=str(shot), full_page=True)
            natural = page.eval_on_selector("#overlay", "img => [img.naturalWidth, img.naturalHeight]")
            legend = page.inner_text("#legend")
            status = page.inner_text("#status")
        finally:
            context.close()
    assert natural == [128, 96]  # the page asks for the overlay without the drawn legend: the image's own size
    assert any(word in legend for word in WORDS), legend
    assert "%" in legend and "128×96" in status, status
    assert not problems, problems
    assert shot.stat().st_size > 1000 and Image.open(shot).width > 0
