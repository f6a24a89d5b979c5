"""Tests of the generated world: determinism, label/caption truth, class schemes, dataset files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vocabseg.data.world import (
    CATEGORY_MAP_NAMES, COLORS, IGNORE_INDEX, IGNORE_INDEX_16, OBJECT_CATEGORIES, SIZE_RANGES,
    STUFF_CLASSES, STUFF_SYNONYMS, TEXTURES, ObjectSpec, SceneSpec, StuffBand, WorldConfig,
    WorldDataset, WorldVocabulary, caption_words, class_names, generate_sample, parse_caption,
    parse_class_name, render_scene, sample_scene, sample_seed, semantic_map, write_dataset,
)
from vocabseg.errors import ConfigError, DatasetError, VocabularyError

SMALL = WorldConfig(min_size=96, max_size=160)


@pytest.fixture(scope="module")
def samples():
    return [generate_sample(seed, SMALL) for seed in range(120)]


def _digest(sample) -> str:
    h = hashlib.sha256()
    for a in (sample.image, sample.category_map, sample.instance_map, sample.stuff_map):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(sample.to_record("x"), sort_keys=True).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------- determinism

def test_same_seed_same_sample_and_different_seeds_differ():
    a, b = generate_sample(7), generate_sample(7)
    assert a.image.dtype == np.uint8 and a.image.ndim == 3 and a.image.shape[2] == 3
    assert _digest(a) == _digest(b)
    assert a.captions == b.captions and a.objects == b.objects and a.stuff == b.stuff
    others = {_digest(generate_sample(s)) for s in range(8, 14)}
    assert _digest(a) not in others and len(others) == 6


def test_determinism_does_not_depend_on_the_process_hash_seed():
    code = ("import hashlib, json, numpy as np\n"
            "from vocabseg.data.world import generate_sample\n"
            "s = generate_sample(11)\n"
            "h = hashlib.sha256()\n"
            "for a in (s.image, s.category_map, s.instance_map, s.stuff_map):\n"
            "    h.update(np.ascontiguousarray(a).tobytes())\n"
            "h.update(json.dumps(s.to_record('x'), sort_keys=True).encode())\n"
            "print(h.hexdigest())\n")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == _digest(generate_sample(11))


def test_config_changes_the_sample():
    a = generate_sample(3, WorldConfig())
    b = generate_sample(3, WorldConfig(categories=("star",)))
    assert all(o.category == "star" for o in b.objects)
    assert _digest(a) != _digest(b)


# ------------------------------------------------------------------------------- labels

def test_label_maps_agree_with_records(samples):
    n_stuff = len(STUFF_CLASSES)
    for s in samples:
        h, w = s.height, s.width
        assert s.category_map.shape == s.instance_map.shape == s.stuff_map.shape == (h, w)
        background = s.instance_map == 0
        # Background pixels carry their stuff class, object pixels their object's category.
        assert np.array_equal(s.category_map[background], s.stuff_map[background])
        assert (s.category_map[~background] >= n_stuff).all()
        assert s.instance_map.max() <= len(s.objects)
        for o in s.objects:
            mask = s.instance_map == o.instance_id
            assert int(mask.sum()) == o.area
            assert o.area <= o.full_area
            if o.area == 0:
                continue
            cat = CATEGORY_MAP_NAMES.index(o.category)
            assert (s.category_map[mask] == cat).all()
            x0, y0, x1, y1 = o.bbox
            assert mask[y0:y1, x0:x1].sum() == o.area
            assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()
            assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()
            assert o.on_stuff in [st.name for st in s.stuff]
        names = [st.name for st in s.stuff]
        assert len(names) == len(set(names)) and 1 <= len(names) <= 3
        for st in s.stuff:
            sid = STUFF_CLASSES.index(st.name)
            assert st.area == int((s.category_map == sid).sum())
            assert st.full_area == int((s.stuff_map == sid).sum()) > 0
        assert sum(st.full_area for st in s.stuff) == h * w
        if "sky" in names and len(names) > 1:
            assert s.stuff[0].name == "sky" and s.stuff[0].position == "top"


def test_sizes_and_positions_within_bounds(samples):
    cfg = WorldConfig(min_size=130, max_size=300, square_prob=0.3, size_multiple=8)
    shapes = set()
    for seed in range(60):
        spec = sample_scene(seed, cfg)
        assert 130 <= spec.height <= 300 and 130 <= spec.width <= 300
        assert spec.height % 8 == 0 and spec.width % 8 == 0
        shapes.add(spec.height == spec.width)
    assert shapes == {True, False}
    sizes = set()
    for s in samples:
        assert SMALL.min_size <= s.height <= SMALL.max_size
        assert SMALL.min_size <= s.width <= SMALL.max_size
        assert 1 <= len(s.objects) <= SMALL.max_objects
        for o in s.objects:
            lo, hi = SIZE_RANGES[o.size]
            assert lo <= o.radius / min(s.height, s.width) <= hi
            assert 0 <= o.center[0] <= s.width and 0 <= o.center[1] <= s.height
            sizes.add(o.size)
    assert sizes == {"small", "medium", "large"}


def test_texture_rate_and_variety(samples):
    objs = [o for s in samples for o in s.objects]
    textured = [o for o in objs if o.texture is not None]
    assert 0.2 < len(textured) / len(objs) < 0.4
    assert {o.texture for o in textured} == set(TEXTURES)
    assert {o.category for o in objs} == set(OBJECT_CATEGORIES)
    assert {o.color for o in objs} == set(COLORS)
    assert {st.name for s in samples for st in s.stuff} == set(STUFF_CLASSES)


def _scene(objects, bands=None, size=(128, 128)) -> SceneSpec:
    return SceneSpec(height=size[0], width=size[1],
                     bands=bands or [StuffBand("sky"), StuffBand("grass", top=0.6)],
                     objects=objects, render_seed=5, caption_seed=9)


def test_anti_aliased_edges_and_majority_labels():
    circle = ObjectSpec("circle", "red", "large", center=(60.3, 50.7), radius=30.0,
                        rgb=(255.0, 0.0, 0.0))
    for ss, expect_mixed in ((4, True), (1, False)):
        cfg = WorldConfig(supersample=ss)
        with_obj = render_scene(_scene([circle]), cfg)
        without = render_scene(_scene([]), cfg)
        g_with = with_obj.image[..., 1].astype(float)
        g_bg = without.image[..., 1].astype(float)
        alpha = 1.0 - g_with / np.maximum(g_bg, 1.0)  # object green is 0: g = bg * (1 - alpha)
        mixed = (alpha > 0.15) & (alpha < 0.85)
        assert mixed.any() == expect_mixed
        label = with_obj.instance_map == 1
        clear = np.abs(alpha - 0.5) > 0.05
        assert np.array_equal(label[clear], (alpha >= 0.5)[clear])


def test_occluded_object_has_no_pixels_and_is_not_mentioned():
    hidden = ObjectSpec("circle", "red", "small", center=(64.0, 64.0), radius=10.0)
    cover = ObjectSpec("square", "blue", "large", center=(64.0, 64.0), radius=40.0)
    partly = ObjectSpec("star", "yellow", "medium", center=(100.0, 40.0), radius=20.0)
    over = ObjectSpec("hexagon", "green", "medium", center=(112.0, 40.0), radius=18.0)
    spec = _scene([hidden, cover, partly, over])
    s = render_scene(spec, WorldConfig(captions_per_image=8))
    rec = {o.category: o for o in s.objects}
    assert rec["circle"].area == 0 and rec["circle"].full_area > 200
    assert rec["circle"].bbox == (0, 0, 0, 0) and not rec["circle"].visible
    assert not (s.instance_map == 1).any()
    assert not (s.category_map == CATEGORY_MAP_NAMES.index("circle")).any()
    assert 0 < rec["star"].area < rec["star"].full_area
    assert rec["hexagon"].area == rec["hexagon"].full_area
    assert len(s.captions) == 8
    mentioned = {m.category for c in s.captions for m in parse_caption(c)[0]}
    assert "circle" not in mentioned
    assert "square" in mentioned


def test_scenes_without_nameable_objects_get_honest_captions():
    empty = render_scene(_scene([]), WorldConfig(captions_per_image=4))
    assert empty.captions and all(not parse_caption(c)[0] for c in empty.captions)
    # A sliver at the border: visible, too small to name, so never called "empty".
    sliver = ObjectSpec("circle", "red", "small", center=(-9.0, 64.0), radius=10.0)
    s = render_scene(_scene([sliver]), WorldConfig(captions_per_image=4))
    assert 0 < s.objects[0].area < 12 and not s.objects[0].mentionable
    for c in s.captions:
        assert not parse_caption(c)[0]
        assert "empty" not in c and "nothing" not in c, c


# ------------------------------------------------------------------------------- captions

def test_captions_only_state_true_things(samples):
    words = caption_words()
    counted = 0
    for s in samples:
        assert len(s.captions) == SMALL.captions_per_image == len(set(s.captions))
        visible = [o for o in s.objects if o.area > 0]
        stuff_present = {st.name for st in s.stuff if st.area > 0}
        for caption in s.captions:
            assert set(caption.replace(",", " ").replace(":", " ").split()) <= words, caption
            mentions, stuff = parse_caption(caption)
            assert set(stuff) <= stuff_present, (caption, stuff_present)
            for m in mentions:
                if m.category is None:  # "three shapes ...": counts every visible object
                    assert m.count == len(visible), caption
                    counted += 1
                    continue
                matching = [o for o in visible if o.category == m.category
                            and m.color in (None, o.color) and m.texture in (None, o.texture)
                            and m.size in (None, o.size) and o.mentionable]
                assert len(matching) >= (m.count or 1), (caption, s.objects)
    assert counted > 5  # the counting templates do occur


def test_caption_vocabulary_tables():
    words = caption_words()
    assert {"crimson", "scarlet", "navy", "dark", "light"}.isdisjoint(words)
    for syns in STUFF_SYNONYMS.values():
        assert all(set(w.split()) <= words for w in syns)
    assert {"box", "disc", "donut", "moon", "plus", "lawn", "sea", "beach", "street"} <= words
    mentions, stuff = parse_caption("two shapes over water: a striped yellow box and a green heart")
    assert [m.category for m in mentions] == [None, "square", "heart"]
    assert mentions[0].count == 2 and mentions[1].texture == "striped" and stuff == ["water"]
    assert parse_caption("three big red round shapes on the beach")[0][0].count == 3


def test_captions_use_synonyms_and_omit_things(samples):
    text = " ".join(c for s in samples for c in s.captions)
    for word in ("box", "disc", "donut", "lawn", "sea", "beach", "street", "bricks", "shapes"):
        assert word in text.split() or word in text, word
    # Some captions leave a mentionable object out.
    omitted = 0
    for s in samples:
        n = sum(o.mentionable for o in s.objects)
        for c in s.captions:
            mentions = [m for m in parse_caption(c)[0] if m.category]
            omitted += sum(m.count or 1 for m in mentions) < n
    assert omitted > 10


# ------------------------------------------------------------------------------- schemes

def test_category_and_color_category_schemes(samples):
    cat_names = class_names("category")
    assert cat_names == list(STUFF_CLASSES) + list(OBJECT_CATEGORIES)
    cc_names = class_names("color_category")
    assert len(cc_names) == len(STUFF_CLASSES) + 100 and "red circle" in cc_names and "brown crescent" in cc_names
    for s in samples[:40]:
        cat = semantic_map(s, "category")
        assert np.array_equal(np.asarray(cat_names)[cat], np.asarray(CATEGORY_MAP_NAMES)[s.category_map])
        cc = semantic_map(s, "color_category")
        assert cc.shape == (s.height, s.width) and cc.max() < len(cc_names) and cc.min() >= 0
        for o in s.objects:
            if o.area:
                assert set(np.unique(cc[s.instance_map == o.instance_id])) == {cc_names.index(o.name)}


def test_explicit_names_most_specific_wins():
    objs = [ObjectSpec("circle", "red", "medium", (30.0, 30.0), 15.0),
            ObjectSpec("circle", "blue", "medium", (90.0, 30.0), 15.0),
            ObjectSpec("star", "green", "medium", (30.0, 90.0), 15.0, texture="striped",
                       texture_color="white"),
            ObjectSpec("heart", "red", "medium", (90.0, 95.0), 15.0)]
    s = render_scene(_scene(objs, bands=[StuffBand("sky"), StuffBand("grass", top=0.5)]))
    names = ["shape", "sky", "circle", "red circle", "lawn", "striped star", "red"]
    lab = semantic_map(s, names)
    inst = s.instance_map
    assert set(np.unique(lab[inst == 1])) == {names.index("red circle")}
    assert set(np.unique(lab[inst == 2])) == {names.index("circle")}
    assert set(np.unique(lab[inst == 3])) == {names.index("striped star")}
    assert set(np.unique(lab[inst == 4])) == {names.index("red")}
    bg = inst == 0
    sky = s.stuff_map == STUFF_CLASSES.index("sky")
    assert (lab[bg & sky] == 1).all() and (lab[bg & ~sky] == names.index("lawn")).all()
    # Names that claim nothing leave pixels ignored.
    lab2 = semantic_map(s, ["red circle", "grass"])
    assert (lab2[inst == 2] == IGNORE_INDEX).all() and (lab2[bg & sky] == IGNORE_INDEX).all()
    assert (lab2[inst == 1] == 0).all()
    # Ties go to the first listed; synonyms parse to the same class.
    assert (semantic_map(s, ["disc", "circle"])[inst == 2] == 0).all()
    with pytest.raises(VocabularyError):
        semantic_map(s, ["crimson circle", "circle"])
    loose = semantic_map(s, ["crimson circle", "circle"], strict=False)
    assert (loose[inst == 1] == 1).all()
    with pytest.raises(VocabularyError):
        class_names("colour-ish")
    assert parse_class_name("red sky") is None and parse_class_name("the sky").stuff == "sky"


def test_vocabulary_over_255_classes_uses_16_bit_ignore():
    names = [f"{z} {t} {c} {k}" for z in ("small", "medium", "large") for t in TEXTURES
             for c in COLORS for k in OBJECT_CATEGORIES][:300]
    v = WorldVocabulary(names)
    assert v.ignore_index == IGNORE_INDEX_16 and v.dtype == np.uint16
    s = generate_sample(1, SMALL)
    lab = v.label_map(s)
    assert (lab[s.instance_map == 0] == IGNORE_INDEX_16).all()


# ------------------------------------------------------------------------------- config

def test_config_subsets_restrict_what_is_generated():
    cfg = WorldConfig(min_size=96, max_size=128, categories=("star", "heart"),
                      colors=("red", "blue"), stuff=("water", "sand"), textures=("dotted",))
    allowed_words = {"star", "stars", "heart", "hearts", "red", "blue"}
    for seed in range(40):
        s = generate_sample(seed, cfg)
        assert {o.category for o in s.objects} <= {"star", "heart"}
        assert {o.color for o in s.objects} <= {"red", "blue"}
        assert {o.texture for o in s.objects} <= {None, "dotted"}
        assert {st.name for st in s.stuff} <= {"water", "sand"}
        for c in s.captions:
            mentions, stuff = parse_caption(c)
            assert {m.category for m in mentions} <= {None, "star", "heart"}
            assert {m.color for m in mentions} <= {None, "red", "blue"}
            assert set(stuff) <= {"water", "sand"}
        toks = {t for c in s.captions for t in c.split()}
        assert not (toks & {c for c in COLORS} - allowed_words)
    assert class_names("category", cfg) == ["water", "sand", "star", "heart"]
    assert class_names("color_category", cfg)[2:] == ["red star", "red heart", "blue star", "blue heart"]


@pytest.mark.parametrize("bad", [dict(categories=("blob",)), dict(colors=()), dict(min_size=600),
                                 dict(supersample=0), dict(texture_prob=1.5),
                                 dict(stuff=("sky", "sky"))])
def test_invalid_config_is_refused(bad):
    with pytest.raises(ConfigError):
        WorldConfig(**bad)


# ------------------------------------------------------------------------------- dataset + files

def test_dataset_items():
    ds = WorldDataset(5, seed=2, config=SMALL, scheme="color_category")
    assert len(ds) == 5 and len(ds.class_names) == len(STUFF_CLASSES) + 100
    item = ds[3]
    assert set(item) >= {"image", "label", "captions", "index"} and item["index"] == 3
    ref = generate_sample(sample_seed(2, 3), SMALL)
    assert np.array_equal(item["image"], ref.image) and item["captions"] == ref.captions
    assert item["label"].shape == ref.image.shape[:2] and np.issubdtype(item["label"].dtype, np.integer)
    assert np.array_equal(item["label"], semantic_map(ref, "color_category"))
    other = WorldDataset(5, seed=3, config=SMALL)[3]["image"]
    assert other.shape != item["image"].shape or not np.array_equal(other, item["image"])
    assert sample_seed(0, 5) != sample_seed(1, 5)
    with pytest.raises(IndexError):
        ds[5]
    assert len(list(ds)) == 5


def _stats(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_dataset_layout_and_resume(tmp_path):
    root = tmp_path / "world"
    report = write_dataset(root, 6, seed=3, config=SMALL, scheme="color_category")
    assert report["generated"] == 6
    names = (root / "classes.txt").read_text().splitlines()
    assert names == class_names("color_category", SMALL)
    lines = (root / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 6
    ds = WorldDataset(6, seed=3, config=SMALL, scheme="color_category")
    for i, line in enumerate(lines):
        rec = json.loads(line)
        stem = f"world_{i:06d}"
        assert rec["image"] == stem and set(rec) >= {"captions", "objects", "stuff"}
        img = Image.open(root / "images" / f"{stem}.png")
        lab = Image.open(root / "labels" / f"{stem}.png")
        assert img.mode == "RGB" and lab.mode == "L" and img.size == lab.size
        item = ds[i]
        assert np.array_equal(np.asarray(img), item["image"])
        assert np.array_equal(np.asarray(lab), item["label"])
        assert rec["captions"] == item["captions"]
        assert {o["category"] for o in rec["objects"]} <= set(OBJECT_CATEGORIES)

    before = _stats(root)
    again = write_dataset(root, 6, seed=3, config=SMALL, scheme="color_category")
    assert again["files_written"] == 0 and again["generated"] == 0
    assert _stats(root) == before

    img2 = (root / "images" / "world_000002.png").read_bytes()
    lab4 = (root / "labels" / "world_000004.png").read_bytes()
    (root / "images" / "world_000002.png").unlink()
    (root / "labels" / "world_000004.png").unlink()
    (root / "images" / ".world_000005.png.tmp-999").write_bytes(b"partial")
    resumed = write_dataset(root, 6, seed=3, config=SMALL, scheme="color_category")
    assert resumed["generated"] == 2 and resumed["files_written"] == 2
    assert (root / "images" / "world_000002.png").read_bytes() == img2
    assert (root / "labels" / "world_000004.png").read_bytes() == lab4
    assert not (root / "images" / ".world_000005.png.tmp-999").exists()
    after = _stats(root)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"images/world_000002.png", "labels/world_000004.png"}

    with pytest.raises(DatasetError):
        write_dataset(root, 6, seed=4, config=SMALL, scheme="color_category")


def test_write_dataset_workers_and_16_bit_labels(tmp_path):
    names = list(STUFF_CLASSES) + [
        f"{z} {t} {c} {k}" for z in ("small", "medium", "large") for t in TEXTURES
        for c in COLORS for k in OBJECT_CATEGORIES][:294] + list(OBJECT_CATEGORIES)
    write_dataset(tmp_path / "a", 4, seed=1, config=SMALL, scheme=names, num_workers=2)
    write_dataset(tmp_path / "b", 4, seed=1, config=SMALL, scheme=names, num_workers=0)
    for sub in ("images", "labels"):
        for p in sorted((tmp_path / "a" / sub).iterdir()):
            assert p.read_bytes() == (tmp_path / "b" / sub / p.name).read_bytes()
    assert (tmp_path / "a" / "captions.jsonl").read_text() == (tmp_path / "b" / "captions.jsonl").read_text()
    lab = np.asarray(Image.open(tmp_path / "a" / "labels" / "world_000000.png"))
    assert lab.dtype == np.uint16
    ref = WorldDataset(4, seed=1, config=SMALL, scheme=names)[0]["label"]
    assert np.array_equal(lab, ref) and lab.max() < len(names)


def test_same_color_scenes_differ_only_by_shape_and_leave_other_data_unchanged():
    from vocabseg.data.world import WorldConfig, generate_sample, sample_scene

    cfg = WorldConfig(min_size=96, max_size=128, min_objects=2, max_objects=3, same_color_prob=1.0)
    for seed in range(5):
        colors = {o.color for o in sample_scene(seed, cfg).objects}
        assert len(colors) == 1
    plain, off = WorldConfig(min_size=96, max_size=128), WorldConfig(min_size=96, max_size=128, same_color_prob=0.0)
    assert (generate_sample(7, plain).image == generate_sample(7, off).image).all()


def test_ground_colored_objects_take_a_lookalike_of_the_stuff_under_them():
    from vocabseg.data.world import GROUND_LOOKALIKES, WorldConfig, generate_sample, sample_scene

    cfg = WorldConfig(min_size=96, max_size=128, min_objects=2, max_objects=4, ground_color_prob=1.0)
    checked = 0
    for seed in range(30):
        spec = sample_scene(seed, cfg)
        sample = generate_sample(seed, cfg)
        for obj, record in zip(spec.objects, sample.objects):
            assert record.color == obj.color
            row = min(int(obj.center[1]), spec.height - 1)
            ground = spec.bands[0].name if len(spec.bands) == 1 else None
            if ground is not None:  # one band: the stuff under every object is known exactly
                assert obj.color in GROUND_LOOKALIKES[ground], (seed, ground, obj.color, row)
                checked += 1
    assert checked > 10
    # colours the config does not allow are never introduced
    only_red = WorldConfig(min_size=96, max_size=128, colors=("red",), ground_color_prob=1.0)
    assert {o.color for s in range(10) for o in sample_scene(s, only_red).objects} <= {"red"}
    plain, off = WorldConfig(min_size=96, max_size=128), WorldConfig(min_size=96, max_size=128, ground_color_prob=0.0)
    assert (generate_sample(7, plain).image == generate_sample(7, off).image).all()


def test_world_probabilities_are_checked():
    from vocabseg.data.world import WorldConfig
    from vocabseg.errors import ConfigError

    for name in ("same_color_prob", "ground_color_prob"):
        with pytest.raises(ConfigError, match=name):
            WorldConfig(**{name: 1.5})


def test_plain_tone_power_spreads_paper_towards_mid_grey():
    from vocabseg.data.world import WorldConfig, generate_sample
    from vocabseg.errors import ConfigError

    def paper(power=None):
        extra = {} if power is None else {"plain_tone_power": power}
        cfg = WorldConfig(min_size=64, max_size=64, min_objects=0, max_objects=0, stuff=("background",),
                          plain_tones=True, **extra)
        return np.array([generate_sample(seed, cfg).image.astype(np.float32).mean() for seed in range(24)])

    near_white, grey = paper(1.5), paper(0.5)
    assert (grey <= near_white + 0.5).all()  # the same draws, each paper at least as dark
    assert near_white.mean() - grey.mean() > 10 and grey.min() > 150
    assert np.array_equal(paper(), near_white)  # 1.5 is the default (the spread before the option existed)
    with pytest.raises(ConfigError, match="plain_tone_power"):
        WorldConfig(plain_tone_power=0.0)
