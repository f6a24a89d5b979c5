"""World scoring helpers (vocabseg.engine.world_eval) and config inheritance used by the world experiments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vocabseg.data.world import caption_words
from vocabseg.engine.world_eval import (SEEN, UNSEEN, chance_scores, mean_iou, renamed, segmentation_scores,
                                        seen_unseen, trainable_parameters)


def test_renamed_words_never_appear_in_captions():
    words = caption_words()
    assert {"red", "grass", "sky", "shape"} <= words  # the caption words themselves are there
    names = list(SEEN + UNSEEN)
    new = [renamed(c) for c in names]
    assert len(set(new)) == len(names)  # one distinct name per class
    for old, name in zip(names, new):
        first = name.split()[0]
        assert first not in words, f"{first!r} (for {old!r}) occurs in captions"
        assert first != old.split()[0]


def test_seen_and_unseen_are_disjoint_and_mean_skips_nan():
    assert not set(SEEN) & set(UNSEEN)
    assert mean_iou({"a": 10.0, "b": float("nan"), "c": 30.0}, ["a", "b", "c"]) == 20.0
    assert math.isnan(mean_iou({"a": float("nan")}, ["a"]))


@pytest.fixture(scope="module")
def tiny_san():
    import vocabseg

    with pytest.warns(UserWarning):
        return vocabseg.load_model("san_tiny_test")


def test_query_to_class_maps_every_prediction(tiny_san):
    names = ["sky", "grass", "water", "road", "background", "red shape"]
    # every query name counts as class 0: only class 0 can have a non-zero IoU, the others are 0 or absent
    r = segmentation_scores(tiny_san, names, 2, query_names=["a", "b", "c"], query_to_class=[0, 0, 0])
    assert all(v == 0 or math.isnan(v) for k, v in r["IoU"].items() if k != "sky")
    with pytest.raises(ValueError):
        segmentation_scores(tiny_san, names, 1, query_names=["a", "b"], query_to_class=[0])
    split = seen_unseen(r, seen=names[:3], unseen=names[3:])
    assert set(split) >= {"seen_mIoU", "unseen_mIoU", "IoU"}


def test_chance_is_near_one_over_classes_for_frequent_classes():
    names = list(SEEN + UNSEEN)
    r = chance_scores(names, 4)
    # a class covering fraction f of the pixels gets IoU ~ (f/C) / (f + 1/C - f/C) < 100/C
    finite = [v for v in r["IoU"].values() if not math.isnan(v)]
    assert finite and max(finite) < 100.0 / len(names) + 1.0 and min(finite) >= 0


def test_trainable_parameters_excludes_frozen_clip(tiny_san):
    total = sum(p.numel() for p in tiny_san.parameters())
    clip = sum(p.numel() for p in tiny_san.clip.parameters())
    pos = tiny_san.clip.visual.positional_embedding.numel()
    assert trainable_parameters(tiny_san) == total - clip + pos


def test_config_base_inheritance(tmp_path):
    from vocabseg.engine.config import load_config
    from vocabseg.errors import ConfigError

    (tmp_path / "base.yaml").write_text("model: san_tiny_test\nlr: 0.001\nmax_iters: 300\n"
                                        "augment: {policy: choice, max_size: 512}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmax_iters: 50\naugment: {max_size: 256}\n")
    cfg = load_config(tmp_path / "child.yaml", ["lr=0.01"])
    assert (cfg.model, cfg.max_iters, cfg.lr) == ("san_tiny_test", 50, 0.01)
    assert cfg.augment["policy"] == "choice" and cfg.augment["max_size"] == 256  # nested keys merge
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "orphan.yaml")


def test_shipped_world_configs_resolve():
    from pathlib import Path

    from vocabseg.engine.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for name, model in (("world_compare_san", "default"), ("world_compare_segvit", "segvit_world"),
                        ("world_compare_lseg", "lseg_world"), ("default_san_lit_world", "default_lit")):
        cfg = load_config(root / f"{name}.yaml")
        assert cfg.model == model and cfg.world["scheme"][0] == "sky"
        assert np.isfinite(cfg.lr)
