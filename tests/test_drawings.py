"""The out-of-generator drawing test set and the generator's drawing-like options."""

import dataclasses

import numpy as np
import pytest

from vocabseg.data.drawings import draw_scene, drawing_set, issue_drawings, same_color_drawings, shape_outline
from vocabseg.data.world import COLOR_RGB, OBJECT_CATEGORIES, WorldConfig, generate_sample


def test_drawing_truth_matches_pixels():
    d = draw_scene([{"shape": "square", "color": "red", "cx": 0.5, "cy": 0.5, "radius": 0.3}], (100, 100), "white",
                   edges="hard")
    assert d.names == ["red square", "background"]
    inside = d.labels == 0
    assert abs(inside.mean() - (0.3 * 100 * 2 ** 0.5) ** 2 / 100 ** 2) < 0.02  # a square of side r * sqrt(2)
    assert np.all(np.abs(d.image[inside].astype(int) - COLOR_RGB["red"]).max(axis=1) <= 1)
    assert np.all(d.image[~inside] >= 240)


@pytest.mark.parametrize("shape", OBJECT_CATEGORIES)
def test_every_shape_draws_a_distinct_region(shape):
    d = draw_scene([{"shape": shape, "color": "blue", "cx": 0.5, "cy": 0.5, "radius": 0.4}], (120, 120), "white")
    cover = (d.labels == 0).mean()
    assert 0.05 < cover < 0.55, (shape, cover)
    assert shape_outline("circle", 1.0) is None or shape in ("circle", "ring")


def test_shapes_differ_from_each_other():
    masks = {s: draw_scene([{"shape": s, "color": "blue", "cx": 0.5, "cy": 0.5, "radius": 0.4}], (96, 96),
                           "white").labels == 0 for s in OBJECT_CATEGORIES}
    for a in OBJECT_CATEGORIES:
        for b in OBJECT_CATEGORIES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.9, (a, b, iou)


def test_random_drawings_are_deterministic_and_varied():
    a, b = drawing_set(6), drawing_set(6)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.labels, y.labels) and x.names == y.names
    sizes = {d.image.shape[:2] for d in a}
    assert len(sizes) == 6 and all(256 <= s <= 1024 for hw in sizes for s in hw)
    for d in a:
        assert d.labels.max() == len(d.names) - 1
        colors = [n.split()[0] for n in d.names[:-1]]
        assert len(set(colors)) == len(colors)  # each object a unique colour
        for k in range(len(d.names) - 1):
            assert 0.005 < (d.labels == k).mean() < 0.65


def test_issue_and_same_colour_drawings():
    assert [d.names for d in issue_drawings()] == [["red circle", "blue square", "background"],
                                                   ["green triangle", "yellow star", "background"],
                                                   ["blue circle", "red square", "yellow triangle", "background"]]
    for d in same_color_drawings(4):
        c1, s1 = d.names[0].split()
        c2, s2 = d.names[1].split()
        assert c1 == c2 and s1 != s2


def test_generator_drawing_options_default_off_and_take_effect():
    base = WorldConfig(min_size=96, max_size=128, max_objects=1, min_objects=1, stuff=("background",))
    plain = generate_sample(3, base)
    assert np.array_equal(plain.image, generate_sample(3, base).image)
    clean = dataclasses.replace(base, blur_prob=0.0, noise_prob=0.0, texture_prob=0.0)
    hard = generate_sample(3, dataclasses.replace(clean, hard_edge_prob=1.0))
    soft = generate_sample(3, clean)
    # hard edges: no blended colours along the border, so fewer distinct colours than the anti-aliased drawing
    assert len(np.unique(hard.image.reshape(-1, 3), axis=0)) < len(np.unique(soft.image.reshape(-1, 3), axis=0))
    jpeg = generate_sample(3, dataclasses.replace(base, jpeg_prob=1.0))
    assert not np.array_equal(jpeg.image, plain.image)
    areas = [generate_sample(i, dataclasses.replace(base, huge_prob=1.0)).objects[0].area /
             (128 * 128) for i in range(8)]
    assert max(areas) > 0.25
    with pytest.raises(Exception):
        WorldConfig(huge_prob=2.0)
