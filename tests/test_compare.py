"""`vocabseg compare` / vocabseg.compare: one picture, same colours for the same names across panels."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

import vocabseg
from vocabseg.compare import compare, parse_checkpoint_pairs
from vocabseg.errors import ConfigError, VocabularyError
from vocabseg.viz import palette_for

EXAMPLE = "vocabseg/examples/shapes.png"
WORDS = ["red circle", "blue square", "background"]


@pytest.fixture(scope="module")
def default_model():
    return vocabseg.load_model()


def _panels(picture: Image.Image, count: int, width: int) -> list[np.ndarray]:
    """Cut the panel row (pad, then width + pad per panel) out of a compare picture."""
    arr = np.asarray(picture)
    pad = max(4, max(12, width // 24) // 2)
    title_h = max(12, width // 24) + 2 * pad
    h = round(Image.open(EXAMPLE).size[1] * width / Image.open(EXAMPLE).size[0])
    return [arr[pad + title_h: pad + title_h + h, pad + k * (width + pad): pad + k * (width + pad) + width]
            for k in range(count)]


def test_same_model_twice_gives_identical_panels_in_the_palette(default_model):
    picture = compare(EXAMPLE, WORDS, [default_model, default_model], panel_width=256)
    assert picture.size[0] == 3 * 256 + 4 * 6  # panels and the padding around them
    first, a, b = _panels(picture, 3, 256)
    assert np.array_equal(a, b)  # same names, same colours, whatever the panel
    assert np.abs(a.astype(int) - first.astype(int)).mean() > 10  # the overlay differs from the input
    # the shared legend shows each name's palette colour
    legend = np.asarray(picture)[-40:].reshape(-1, 3)
    colours = {tuple(c) for c in legend}
    for colour in palette_for(WORDS):
        assert tuple(int(v) for v in colour) in colours


def test_referring_model_needs_a_sentence_and_shows_its_mask():
    with pytest.raises(VocabularyError, match="sentence"):
        compare(EXAMPLE, WORDS, ["default", "etris_world"])
    picture = compare(EXAMPLE, [], ["etris_world"], sentence="the red circle", panel_width=200)
    legend = {tuple(c) for c in np.asarray(picture)[-30:].reshape(-1, 3)}
    assert (255, 0, 200) in legend


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ConfigError, match="NAME=PATH"):
        parse_checkpoint_pairs(["san_vit_b_16"])
    assert parse_checkpoint_pairs(["a=b.pth"]) == {"a": __import__("pathlib").Path("b.pth")}
    with pytest.raises(ConfigError, match="not compared"):
        compare(EXAMPLE, WORDS, ["default"], checkpoints={"lseg_world": "x.pth"})
    with pytest.raises(ConfigError, match="at least one model"):
        compare(EXAMPLE, WORDS, [])
    with pytest.raises(VocabularyError, match="vocabulary"):
        compare(EXAMPLE, [], ["default"])
    with pytest.raises(ConfigError, match="cams model"):
        compare(EXAMPLE, WORDS, ["clims_resnet50_voc"])


def test_command_line_writes_the_picture(tmp_path):
    out = tmp_path / "cmp.png"
    res = subprocess.run([sys.executable, "-m", "vocabseg", "compare", EXAMPLE, "--vocab", ", ".join(WORDS),
                          "--models", "default,default", "--out", str(out), "--panel-width", "128"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert Image.open(out).size[0] == 3 * 128 + 4 * 6
    res = subprocess.run([sys.executable, "-m", "vocabseg", "compare", EXAMPLE, "--vocab", "a",
                          "--models", "no_such_model", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "unknown model" in res.stderr and "Traceback" not in res.stderr


def test_bundled_world_models_compare_out_of_the_box():
    """default, segvit_world and lseg_world ship their weights: no random-initialisation warning, and each one
    finds the bundled drawing's red circle (its panel is red where the circle is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "has no checkpoint: randomly initialised" would fail here
        picture = compare(EXAMPLE, WORDS, ["default", "segvit_world", "lseg_world"], panel_width=256)
    panels = _panels(picture, 4, 256)
    source = panels[0].astype(int)
    circle = (source[..., 0] > 180) & (source[..., 1] < 60) & (source[..., 2] < 60)  # the drawing's red disc
    assert circle.sum() > 500
    red = tuple(int(v) for v in palette_for(WORDS)[0])
    for panel in panels[1:]:
        near = np.abs(panel.astype(int) - np.array(red)).sum(-1) < 60
        assert (near & circle).sum() > 0.6 * circle.sum()
