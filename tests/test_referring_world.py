"""Referring expressions on the generated world: uniqueness from the text, determinism, held-out compositions."""

from __future__ import annotations

import numpy as np
import pytest

from vocabseg.data import referring_world as RW
from vocabseg.data.world import generate_sample, sample_seed


def _independent_matches(desc: RW.Descriptor, obj) -> bool:
    """A second, literal reading of a descriptor (not the module's own ``matches``)."""
    if desc.category is not None and obj.category != desc.category:
        return False
    if desc.color is not None and obj.color != desc.color:
        return False
    if desc.texture == "plain":
        return obj.texture is None
    return desc.texture is None or obj.texture == desc.texture


@pytest.fixture(scope="module")
def train_items():
    ds = RW.ReferringWorldDataset(80, "train", seed=3)
    return ds, [ds.referring_sample(i) for i in range(len(ds))]


def test_expressions_identify_exactly_one_object(train_items):
    ds, samples = train_items
    kinds = set()
    for r in samples:
        parsed = RW.parse_expression(r.sentence)
        assert parsed == r.expression, r.sentence  # the text carries the whole structure
        facts = RW.SceneFacts.from_sample(r.sample)
        assert RW.resolve(parsed, facts) == [r.target], r.sentence
        kinds.add(parsed.kind)
        objs = r.sample.objects
        visible = [o for o in objs if o.area > 0]
        fitting = [o for o in visible if _independent_matches(parsed.target, o)]
        target = objs[r.target]
        assert target in fitting
        if parsed.kind == "attribute":
            assert fitting == [target], r.sentence
        elif parsed.kind == "relation":
            anchors = [o for o in visible if _independent_matches(parsed.anchor, o)]
            assert len(anchors) == 1 and anchors[0] is not target, r.sentence
            a = anchors[0]
            tx0, ty0, tx1, ty1 = target.bbox
            ax0, ay0, ax1, ay1 = a.bbox
            assert {"left_of": tx1 <= ax0, "right_of": tx0 >= ax1, "above": ty1 <= ay0,
                    "below": ty0 >= ay1}[parsed.relation], r.sentence
        elif parsed.superlative == "biggest":
            assert all(target.area >= 1.5 * o.area for o in fitting if o is not target), r.sentence
        elif parsed.superlative == "smallest":
            assert all(o.area >= 1.5 * target.area for o in fitting if o is not target), r.sentence
        elif parsed.kind == "stuff":
            under = r.sample.stuff_map[r.sample.instance_map == target.instance_id]
            share = np.mean([RW.STUFF_CLASSES[v] == parsed.stuff for v in under])
            assert share >= 0.75, r.sentence
        # the mask is exactly the target's visible pixels
        assert np.array_equal(r.mask, r.sample.instance_map == target.instance_id) and r.mask.any()
    assert {"attribute", "relation", "superlative"} <= kinds


def test_item_dict_and_determinism(train_items):
    ds, samples = train_items
    item = ds[5]
    assert item["image"].dtype == np.uint8 and item["image"].shape[0] == 3
    assert item["mask"].dtype == np.bool_ and item["mask"].shape == item["image"].shape[1:]
    assert item["sentence"] == samples[5].sentence and item["ref_id"] == 5
    again = RW.ReferringWorldDataset(80, "train", seed=3)[5]
    assert again["sentence"] == item["sentence"] and np.array_equal(again["mask"], item["mask"])
    assert np.array_equal(again["image"], item["image"])
    other = RW.ReferringWorldDataset(80, "train", seed=4)
    assert [other[i]["sentence"] for i in range(6)] != [ds[i]["sentence"] for i in range(6)]
    val = RW.ReferringWorldDataset(6, "val", seed=3)
    assert all(val.referring_sample(i).scene_seed != samples[i].scene_seed for i in range(6))


def test_held_out_combinations_never_in_training(train_items):
    _, samples = train_items
    for r in samples:
        assert not RW.combinations(RW.parse_expression(r.sentence)) & RW.HELD_OUT, r.sentence
    held = RW.ReferringWorldDataset(12, "heldout", seed=3)
    seen = set()
    for i in range(len(held)):
        r = held.referring_sample(i)
        hit = RW.combinations(RW.parse_expression(r.sentence)) & RW.HELD_OUT
        assert hit, r.sentence
        seen |= hit
        assert RW.resolve(r.expression, RW.SceneFacts.from_sample(r.sample)) == [r.target]
    assert len(seen) >= 2
    # every held-out attribute and relation does occur in training, just not together
    attributes = {a for a, _ in RW.HELD_OUT}
    relations = {k for _, k in RW.HELD_OUT}
    facts_all = []
    for k in range(40):
        facts = RW.SceneFacts.from_sample(generate_sample(sample_seed(11, k), RW.REFERRING_WORLD_CONFIG))
        facts_all += [e for _, e in RW.enumerate_expressions(facts) if not RW.combinations(e) & RW.HELD_OUT]
    assert {a for e in facts_all for a in e.target.attributes()} >= attributes
    assert {e.relation_key() for e in facts_all} >= relations - {"stuff:grass"}


def test_parse_rejects_unknown_words():
    assert RW.parse_expression("the red circle to the left of the blue star") == RW.Expression(
        RW.Descriptor("circle", "red"), relation="left_of", anchor=RW.Descriptor("star", "blue"))
    assert RW.parse_expression("the biggest striped square").superlative == "biggest"
    assert RW.parse_expression("the donut that is on the lawn") == RW.Expression(
        RW.Descriptor("ring"), relation="on", stuff="grass")
    with pytest.raises(ValueError):
        RW.parse_expression("the crimson circle")
    with pytest.raises(ValueError):
        RW.parse_expression("the red")


def test_write_referring_dataset(tmp_path):
    info = RW.write_referring_dataset(tmp_path, 3, "val", seed=1)
    assert info["num_samples"] == 3
    lines = (tmp_path / "refs.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len(list((tmp_path / "masks").glob("*.png"))) == 3


def test_largest_object_baseline_scores_exactly_the_scenes_where_the_target_is_biggest():
    from vocabseg.engine.referring import largest_object_baseline

    ds = RW.ReferringWorldDataset(24, "val", seed=3)
    hits, by_kind = 0, {}
    for i in range(len(ds)):
        r = ds.referring_sample(i)
        areas = [(r.sample.instance_map == o.instance_id).sum() for o in r.sample.objects]
        hits += int(np.argmax(areas)) == r.target
        by_kind.setdefault(r.expression.kind, []).append(int(np.argmax(areas)) == r.target)
    out = largest_object_baseline(ds)
    assert out["object_acc"] == pytest.approx(100.0 * hits / len(ds))  # it picks exactly the largest object
    for kind, kind_hits in by_kind.items():  # per-kind mIoU over that kind's items only
        assert out[f"items/{kind}"] == len(kind_hits)
        assert out[f"mIoU/{kind}"] == pytest.approx(100.0 * np.mean(kind_hits))
    assert len(by_kind) >= 2
    # the answer is an object's whole visible mask: IoU 100 when it is the target, 0 otherwise (objects disjoint)
    assert out["Prec@0.5"] == pytest.approx(100.0 * hits / len(ds))
    assert out["Prec@0.9"] == pytest.approx(out["Prec@0.5"])
    assert out["mIoU"] == pytest.approx(100.0 * hits / len(ds))
    assert 0 < hits < len(ds)  # neither trivial nor impossible on this world
