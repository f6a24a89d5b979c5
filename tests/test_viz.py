"""Tests for vocabseg.viz: palettes, colouring, areas and overlays with a legend."""

from __future__ import annotations

import colorsys
import itertools

import numpy as np
import pytest
from PIL import Image

from vocabseg.errors import ImageError, VocabularyError
from vocabseg.viz import class_areas, colorize, make_palette, overlay


def _colour_set(a: np.ndarray) -> set[tuple[int, int, int]]:
    return set(map(tuple, a.reshape(-1, 3).tolist()))


# ---------------------------------------------------------------------------------------------
# make_palette
# ---------------------------------------------------------------------------------------------


def test_palette_shape_determinism_and_seed():
    p = make_palette(20)
    assert p.shape == (20, 3) and p.dtype == np.uint8
    np.testing.assert_array_equal(p, make_palette(20))
    np.testing.assert_array_equal(p, make_palette(200)[:20])  # prefix: colours do not shift with n
    assert not np.array_equal(p, make_palette(20, seed=1))
    assert make_palette(0).shape == (0, 3)
    with pytest.raises(ValueError):
        make_palette(-1)


@pytest.mark.parametrize("n", [1000, 5000, 50_000])
def test_palette_colours_are_distinct_and_never_black(n):
    p = make_palette(n)
    assert p.shape == (n, 3)
    assert len(_colour_set(p)) == n
    assert (0, 0, 0) not in _colour_set(p)
    np.testing.assert_array_equal(p, make_palette(n))


def test_first_twenty_colours_are_well_separated_and_vivid():
    p = make_palette(20).astype(int)
    # Well separated: every pair differs by a clear amount in RGB (sum of channel differences).
    min_diff = min(np.abs(p[i] - p[j]).sum() for i, j in itertools.combinations(range(20), 2))
    assert min_diff >= 60
    # Visible on photos: reasonably saturated and not dark.
    for r, g, b in p / 255.0:
        _, s, v = colorsys.rgb_to_hsv(r, g, b)
        assert s >= 0.2 and v >= 0.4


# ---------------------------------------------------------------------------------------------
# colorize and class_areas
# ---------------------------------------------------------------------------------------------


def test_colorize_maps_indices_and_blackens_ignore():
    pal = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], dtype=np.uint8)
    labels = np.array([[0, 1, 2], [255, -1, 1]])
    out = colorize(labels, pal)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], pal)
    np.testing.assert_array_equal(out[1], [[0, 0, 0], [0, 0, 0], [40, 50, 60]])


def test_colorize_treats_255_as_a_class_when_there_are_more_than_255():
    pal = make_palette(300)
    out = colorize(np.array([[255, -1]]), pal)
    np.testing.assert_array_equal(out[0, 0], pal[255])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])


def test_colorize_out_of_range_and_default_palette():
    with pytest.raises(VocabularyError, match="7"):
        colorize(np.array([[0, 7]]), make_palette(3))
    out = colorize(np.array([[0, 2]]))
    np.testing.assert_array_equal(out[0], make_palette(3)[[0, 2]])


def test_class_areas_hand_example():
    labels = np.array([[2, 2, 2, 0], [2, 0, 255, -1]])  # 8 pixels: 4 of class 2, 2 of class 0
    areas = class_areas(labels, ["sky", "tree", "road"])
    assert areas == [
        {"name": "road", "index": 2, "pixels": 4, "fraction": 0.5},
        {"name": "sky", "index": 0, "pixels": 2, "fraction": 0.25},
    ]
    with pytest.raises(VocabularyError, match="3"):
        class_areas(np.array([[3]]), ["a", "b", "c"])


# ---------------------------------------------------------------------------------------------
# overlay
# ---------------------------------------------------------------------------------------------


def _two_region_case(h=40, w=40):
    img = np.full((h, w, 3), 100, dtype=np.uint8)
    labels = np.zeros((h, w), dtype=np.int64)
    labels[:, w // 4 :] = 1  # class 1 covers 75 %, class 0 25 %
    pal = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250]], dtype=np.uint8)
    return img, labels, pal


def test_overlay_blends_draws_boundaries_and_keeps_ignored_pixels():
    img, labels, pal = _two_region_case()
    labels[0, 0] = 255
    out = overlay(img, labels, ["red", "green", "blue"], palette=pal, alpha=0.5, legend=False)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (40, 40)
    a = np.array(out)
    np.testing.assert_array_equal(a[20, 2], [175, 50, 50])  # 0.5*100 + 0.5*(250,0,0)
    np.testing.assert_array_equal(a[20, 30], [50, 175, 50])
    np.testing.assert_array_equal(a[20, 9], [255, 255, 255])  # last column of class 0: boundary
    np.testing.assert_array_equal(a[0, 0], [255, 255, 255])  # next to the ignored pixel: boundary
    labels2 = labels.copy()
    labels2[30, 30] = -1
    labels2[0, 0] = 0
    a2 = np.array(overlay(img, labels2, ["red", "green", "blue"], palette=pal, alpha=0.5, legend=False))
    np.testing.assert_array_equal(a2[30, 30], [255, 255, 255])  # ignored pixels are bounded ...
    labels3 = labels.copy()
    labels3[30:35, 30:35] = -1
    a3 = np.array(overlay(img, labels3, ["red", "green", "blue"], palette=pal, alpha=0.5, legend=False))
    np.testing.assert_array_equal(a3[32, 32], [100, 100, 100])  # ... and keep the photo inside


def test_overlay_alpha_extremes():
    img, labels, pal = _two_region_case()
    a0 = np.array(overlay(img, labels, ["r", "g", "b"], palette=pal, alpha=0.0, legend=False))
    np.testing.assert_array_equal(a0[20, 2], [100, 100, 100])
    a1 = np.array(overlay(img, labels, ["r", "g", "b"], palette=pal, alpha=1.0, legend=False))
    np.testing.assert_array_equal(a1[20, 30], pal[1])
    with pytest.raises(ValueError):
        overlay(img, labels, ["r", "g", "b"], alpha=1.5)


def _panel(out: Image.Image, img_shape) -> np.ndarray:
    a = np.array(out)
    h, w = img_shape[:2]
    return a[:, w:] if a.shape[1] > w else a[h:, :]


def test_legend_lists_only_present_classes_sorted_by_area():
    img, labels, pal = _two_region_case()
    out = overlay(img, labels, ["red", "green", "blue"], palette=pal)
    assert out.size[0] > 40  # panel to the right of a square image
    panel = _panel(out, img.shape)
    colours = _colour_set(panel)
    assert tuple(pal[0]) in colours and tuple(pal[1]) in colours
    assert tuple(pal[2]) not in colours  # "blue" is absent from the label map
    # Larger class (green, 75 %) is listed first, i.e. its swatch is higher up.
    y_green = np.flatnonzero((panel == pal[1]).all(-1).any(1)).min()
    y_red = np.flatnonzero((panel == pal[0]).all(-1).any(1)).min()
    assert y_green < y_red
    plain = overlay(img, labels, ["r", "g", "b"], pal, legend=False)
    np.testing.assert_array_equal(np.array(out)[:40, :40], np.array(plain))  # image part unchanged


def test_legend_is_limited_to_max_entries():
    rng = np.random.default_rng(0)
    n = 30
    labels = np.repeat(np.arange(n), 4)[None].repeat(60, 0)[:, :120]  # 30 classes, equal areas
    labels = labels[:, rng.permutation(120)]
    pal = make_palette(n)
    img = np.full((60, 120, 3), 128, np.uint8)
    out = overlay(img, labels[:, :120], [f"c{i}" for i in range(n)], palette=pal, max_legend_entries=5)
    panel = _panel(out, img.shape)
    shown = sum(tuple(c) in _colour_set(panel) for c in pal)
    assert shown == 5


def test_tiny_large_and_wide_images():
    names = ["cat", "dog"]
    tiny = np.zeros((16, 16, 3), np.uint8)
    lab = np.zeros((16, 16), np.int64)
    lab[8:] = 1
    out_tiny = overlay(tiny, lab, names)
    assert out_tiny.size[0] > 16 and out_tiny.size[1] >= 16
    big = np.zeros((900, 1200, 3), np.uint8)
    lab_big = np.zeros((900, 1200), np.int64)
    lab_big[450:] = 1
    out_big = overlay(big, lab_big, names)
    # The legend font scales with the image: the big panel is much wider than the tiny one.
    assert out_big.size[0] - 1200 > 2 * (out_tiny.size[0] - 16)
    wide = np.zeros((100, 800, 3), np.uint8)
    lab_wide = np.zeros((100, 800), np.int64)
    out_wide = overlay(wide, lab_wide, names)
    assert out_wide.size[0] == 800 and out_wide.size[1] > 100  # legend below a wide image


def test_overlay_accepts_non_ascii_names_and_file_paths(tmp_path):
    img = np.full((20, 20, 3), 50, np.uint8)
    Image.fromarray(img).save(tmp_path / "p.png")
    lab = np.zeros((20, 20), np.int64)
    out = overlay(tmp_path / "p.png", lab, ["café ☕ 猫"])
    assert out.size[0] > 20


def test_overlay_errors():
    img = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ImageError, match="label map"):
        overlay(img, np.zeros((5, 10), np.int64), ["a"])
    with pytest.raises(VocabularyError):
        overlay(img, np.full((10, 10), 2), ["a", "b"])
    with pytest.raises(VocabularyError):
        overlay(img, np.zeros((10, 10), np.int64), [])


def test_palette_for_uses_colour_words_only_when_unambiguous():
    from vocabseg.viz import NAMED_COLORS, make_palette, palette_for

    pal = palette_for(["red circle", "blue square", "background"])
    assert tuple(pal[0]) == NAMED_COLORS["red"] and tuple(pal[1]) == NAMED_COLORS["blue"]
    assert tuple(pal[2]) == tuple(make_palette(3)[2])  # no colour word: the distinct palette
    pal = palette_for(["red circle", "red square", "grass"])  # "red" twice: keep them distinguishable
    assert tuple(pal[0]) != tuple(pal[1])
    assert tuple(pal[0]) == tuple(make_palette(3)[0])
