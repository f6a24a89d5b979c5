"""Referring expressions for the generated world: a scene, a sentence that singles out one object, its mask.

For a scene of :mod:`vocabseg.data.world` every object that is visible enough can be referred to in four ways:

* **attributes** — "the red circle", "the striped square", "the plain blue star": a descriptor (any non-empty
  subset of colour, texture, category; no category -> "shape"/"object") that fits the target and no other
  visible object;
* **superlatives** — "the biggest striped square", "the leftmost red object": among the objects the descriptor
  fits (at least two), the target is clearly the biggest/smallest (visible area ≥ 1.5× / ≤ 1/1.5× every other)
  or the leftmost/rightmost/topmost/lowest (centre ahead of every other by ≥ 8 % of the image side);
* **relations to another object** — "the red circle left of the blue star", "the ring that is above the
  heart": the anchor is described uniquely; the target descriptor fits the target and at least one other object
  (so the relation matters); the target lies entirely on that side of the anchor (bounding boxes disjoint along
  the axis) and no other fitting object (the anchor aside) lies even partly on that side (centre comparison);
* **relations to the background** — "the ring on the grass", "the star in the sky": at least 75 % of the
  target's visible pixels are on that stuff class and less than 25 % of every other fitting object's pixels.

The semantics (:func:`resolve`) return every object that *could* be meant; an expression is emitted only when
that is exactly the target. :func:`parse_expression` turns a sentence back into its structure, so tests (and
users) can check uniqueness from the text alone.

**Held-out compositions.** :data:`HELD_OUT` lists (target attribute, relation) pairs — e.g. a *red* target with
*left of*, a *striped* target with *biggest*, a *star* on the *grass*. The train/val/test splits never contain an
expression that mentions such an attribute of the target together with such a relation; the ``heldout`` split
contains only such expressions. Every attribute and every relation is seen in training, just not together.
Anchor attributes do not count (in "the ring left of the red star", red describes the anchor).

Scenes of different splits come from disjoint seeds; everything is deterministic in (seed, split, index).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import ConfigError, DatasetError
from .world import (CATEGORY_SYNONYMS, COLORS, GENERIC_OBJECT_WORDS, STUFF_CLASSES, TEXTURE_SYNONYMS,
                    WorldConfig, WorldSample, generate_sample, sample_seed)

__all__ = ["Descriptor", "Expression", "SceneFacts", "HELD_OUT", "REFERRING_WORLD_CONFIG", "SPLITS",
           "enumerate_expressions", "resolve", "render_expression", "parse_expression", "combinations",
           "generate_referring_sample", "ReferringSample", "ReferringWorldDataset", "write_referring_dataset"]

SPLITS = ("train", "val", "test", "heldout")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2, "heldout": 3}

#: The scenes referring expressions are made for: 2-5 objects, 96-160 px, no captions needed.
REFERRING_WORLD_CONFIG = WorldConfig(min_size=96, max_size=160, min_objects=2, max_objects=5, captions_per_image=0,
                                     texture_prob=0.35)

#: (attribute of the target, relation) pairs that only the ``heldout`` split contains.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("color:red", "rel:left_of"),
    ("color:blue", "rel:above"),
    ("category:circle", "rel:below"),
    ("texture:striped", "sup:biggest"),
    ("color:green", "sup:smallest"),
    ("category:star", "stuff:grass"),
})

RELATIONS = ("left_of", "right_of", "above", "below")
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left_of": ("left of", "to the left of"), "right_of": ("right of", "to the right of"),
    "above": ("above",), "below": ("below", "beneath"),
}
SUPERLATIVE_WORDS: dict[str, tuple[str, ...]] = {
    "biggest": ("biggest", "largest"), "smallest": ("smallest", "tiniest"),
    "leftmost": ("leftmost",), "rightmost": ("rightmost",), "topmost": ("topmost", "highest"),
    "bottommost": ("lowest", "bottommost"),
}
STUFF_WORDS: dict[str, tuple[str, ...]] = {
    "sky": ("in the sky",), "grass": ("on the grass", "on the lawn"), "water": ("on the water", "on the sea"),
    "sand": ("on the sand", "on the beach"), "wall": ("in front of the wall", "in front of the bricks"),
    "road": ("on the road", "on the street"),
}
PLAIN_WORD = "plain"

SIZE_MARGIN = 1.5  # superlative size: target area >= 1.5 x every other candidate's (biggest)
POSITION_MARGIN = 0.08  # superlative position: centre ahead by >= 8 % of the image side
ON_STRICT, ON_LOOSE = 0.75, 0.25  # share of an object's pixels on a stuff class: "on it" / "possibly on it"
MIN_VISIBLE = 1  # pixels an object needs to count as a distractor


# ----------------------------------------------------------------------------------------------- structures


@dataclass(frozen=True)
class Descriptor:
    """What a noun phrase says about an object; ``texture`` "plain" = untextured; None = not said."""

    category: str | None = None
    color: str | None = None
    texture: str | None = None

    def matches(self, obj) -> bool:
        tex = obj.texture if obj.texture is not None else PLAIN_WORD
        return (self.category in (None, obj.category) and self.color in (None, obj.color)
                and self.texture in (None, tex))

    @property
    def empty(self) -> bool:
        return self.category is None and self.color is None and self.texture is None

    def attributes(self) -> list[str]:
        return [f"{k}:{v}" for k, v in (("color", self.color), ("texture", self.texture),
                                         ("category", self.category)) if v is not None]


@dataclass(frozen=True)
class Expression:
    """A referring expression's structure. ``relation`` is a key of :data:`RELATIONS` (with ``anchor``) or
    ``"on"`` (with ``stuff``); ``superlative`` a key of :data:`SUPERLATIVE_WORDS`."""

    target: Descriptor
    superlative: str | None = None
    relation: str | None = None
    anchor: Descriptor | None = None
    stuff: str | None = None

    @property
    def kind(self) -> str:
        if self.superlative:
            return "superlative"
        if self.relation == "on":
            return "stuff"
        if self.relation:
            return "relation"
        return "attribute"

    def relation_key(self) -> str | None:
        if self.superlative:
            return f"sup:{self.superlative}"
        if self.relation == "on":
            return f"stuff:{self.stuff}"
        if self.relation:
            return f"rel:{self.relation}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def combinations(expr: Expression) -> set[tuple[str, str]]:
    """(target attribute, relation) pairs an expression uses — what :data:`HELD_OUT` is about."""
    key = expr.relation_key()
    return set() if key is None else {(a, key) for a in expr.target.attributes()}


@dataclass
class SceneFacts:
    """Per-object facts the semantics need, computed once from a :class:`WorldSample`."""

    objects: list  # ObjectRecord (all of them; ``visible`` marks who can be a distractor)
    visible: list[bool]
    stuff_share: list[dict[str, float]]  # per object: share of its visible pixels on each stuff class
    stuff_present: tuple[str, ...]
    height: int
    width: int

    @classmethod
    def from_sample(cls, sample: WorldSample) -> "SceneFacts":
        shares = []
        for o in sample.objects:
            under = sample.stuff_map[sample.instance_map == o.instance_id]
            n = max(len(under), 1)
            counts = np.bincount(under, minlength=len(STUFF_CLASSES)) if len(under) else np.zeros(len(STUFF_CLASSES))
            shares.append({STUFF_CLASSES[i]: float(c) / n for i, c in enumerate(counts) if c})
        present = tuple(s.name for s in sample.stuff)
        return cls(list(sample.objects), [o.area >= MIN_VISIBLE for o in sample.objects], shares, present,
                   sample.height, sample.width)


# ----------------------------------------------------------------------------------------------- semantics


def _centre(o) -> tuple[float, float]:
    x0, y0, x1, y1 = o.bbox
    return (x0 + x1) / 2, (y0 + y1) / 2


def _strictly(rel: str, o, a) -> bool:
    """``o`` lies entirely on the ``rel`` side of ``a`` (visible bounding boxes)."""
    ox0, oy0, ox1, oy1 = o.bbox
    ax0, ay0, ax1, ay1 = a.bbox
    return {"left_of": ox1 <= ax0, "right_of": ox0 >= ax1, "above": oy1 <= ay0, "below": oy0 >= ay1}[rel]


def _loosely(rel: str, o, a) -> bool:
    """``o`` could be said to be on the ``rel`` side of ``a`` (centre comparison)."""
    (ox, oy), (ax, ay) = _centre(o), _centre(a)
    return {"left_of": ox < ax, "right_of": ox > ax, "above": oy < ay, "below": oy > ay}[rel]


def _candidates(facts: SceneFacts, d: Descriptor) -> list[int]:
    return [i for i, o in enumerate(facts.objects) if facts.visible[i] and d.matches(o)]


def resolve(expr: Expression, facts: SceneFacts) -> list[int]:
    """Indices into ``facts.objects`` of every object the expression could mean (unique iff length 1)."""
    cands = _candidates(facts, expr.target)
    objs = facts.objects
    if expr.superlative in ("biggest", "smallest"):
        if not cands:
            return []
        areas = {i: objs[i].area for i in cands}
        if expr.superlative == "biggest":
            top = max(areas.values())
            return [i for i in cands if areas[i] * SIZE_MARGIN > top or areas[i] == top]
        low = min(areas.values())
        return [i for i in cands if areas[i] < low * SIZE_MARGIN or areas[i] == low]
    if expr.superlative:
        axis = 0 if expr.superlative in ("leftmost", "rightmost") else 1
        side = facts.width if axis == 0 else facts.height
        sign = 1 if expr.superlative in ("leftmost", "topmost") else -1
        pos = {i: sign * _centre(objs[i])[axis] for i in cands}
        if not pos:
            return []
        best = min(pos.values())
        return [i for i in cands if pos[i] < best + POSITION_MARGIN * side]
    if expr.relation == "on":
        return [i for i in cands if facts.stuff_share[i].get(expr.stuff, 0.0) >= ON_LOOSE]
    if expr.relation:
        anchors = _candidates(facts, expr.anchor or Descriptor())
        return [i for i in cands if any(i != a and _loosely(expr.relation, objs[i], objs[a]) for a in anchors)]
    return cands


# ----------------------------------------------------------------------------------------------- enumeration


def _descriptors(o) -> list[Descriptor]:
    """Every non-empty descriptor that fits ``o`` (but not the bare "the plain shape")."""
    tex = o.texture if o.texture is not None else PLAIN_WORD
    out = []
    for cat in (o.category, None):
        for col in (o.color, None):
            for t in (None, tex):
                d = Descriptor(cat, col, t)
                if d.empty or (cat is None and col is None and t == PLAIN_WORD):
                    continue
                out.append(d)
    return out


def _unique_descriptors(facts: SceneFacts, i: int) -> list[Descriptor]:
    return [d for d in _descriptors(facts.objects[i]) if _candidates(facts, d) == [i]]


def _mentionable(facts: SceneFacts, i: int) -> bool:
    return facts.visible[i] and facts.objects[i].mentionable


def enumerate_expressions(facts: SceneFacts) -> list[tuple[int, Expression]]:
    """Every (target index, expression) that refers to exactly one object of the scene, clearly."""
    out: list[tuple[int, Expression]] = []
    objs = facts.objects
    for i, o in enumerate(objs):
        if not _mentionable(facts, i):
            continue
        descs = _descriptors(o)
        for d in descs:
            cands = _candidates(facts, d)
            if cands == [i]:
                out.append((i, Expression(d)))
                continue
            if len(cands) < 2:
                continue
            # superlatives over the objects the descriptor fits
            for sup in SUPERLATIVE_WORDS:
                e = Expression(d, superlative=sup)
                if resolve(e, facts) == [i]:
                    out.append((i, e))
            # background relations
            for s in facts.stuff_present:
                if s not in STUFF_WORDS or facts.stuff_share[i].get(s, 0.0) < ON_STRICT:
                    continue
                e = Expression(d, relation="on", stuff=s)
                if resolve(e, facts) == [i]:
                    out.append((i, e))
            # relations to another object, described uniquely
            for a in range(len(objs)):
                if a == i or not _mentionable(facts, a):
                    continue
                anchor_descs = _unique_descriptors(facts, a)
                if not anchor_descs:
                    continue
                for rel in RELATIONS:
                    if not _strictly(rel, o, objs[a]):
                        continue
                    for ad in anchor_descs:
                        e = Expression(d, relation=rel, anchor=ad)
                        if resolve(e, facts) == [i]:
                            out.append((i, e))
    return out


def _split_filter(expr: Expression, split: str, held_out: frozenset) -> bool:
    hit = bool(combinations(expr) & held_out)
    return hit if split == "heldout" else not hit


# ----------------------------------------------------------------------------------------------- text


def _np_text(d: Descriptor, superlative: str | None, rng: np.random.Generator) -> str:
    words = ["the"]
    if superlative:
        words.append(_pick(rng, SUPERLATIVE_WORDS[superlative]))
    if d.texture == PLAIN_WORD:  # "the plain red circle", "the red striped circle"
        words.append(PLAIN_WORD)
    if d.color:
        words.append(d.color)
    if d.texture and d.texture != PLAIN_WORD:
        words.append(_pick(rng, TEXTURE_SYNONYMS[d.texture]))
    words.append(_pick(rng, CATEGORY_SYNONYMS[d.category]) if d.category else _pick(rng, GENERIC_OBJECT_WORDS))
    return " ".join(words)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def render_expression(expr: Expression, rng: np.random.Generator) -> str:
    """The sentence of an expression (synonyms and phrasing drawn from ``rng``)."""
    head = _np_text(expr.target, expr.superlative, rng)
    if expr.relation is None:
        return head
    link = " that is " if rng.random() < 0.3 else " "
    if expr.relation == "on":
        return head + link + _pick(rng, STUFF_WORDS[expr.stuff])
    return head + link + _pick(rng, RELATION_WORDS[expr.relation]) + " " + _np_text(expr.anchor, None, rng)


def _phrase_index() -> tuple[list[tuple[str, str, str]], dict[tuple[str, ...], tuple[str, str]]]:
    rel_phrases = [(p, "rel", r) for r, ps in RELATION_WORDS.items() for p in ps]
    rel_phrases += [(p, "stuff", s) for s, ps in STUFF_WORDS.items() for p in ps]
    rel_phrases.sort(key=lambda t: -len(t[0]))
    words: dict[tuple[str, ...], tuple[str, str]] = {}
    for cat, syns in CATEGORY_SYNONYMS.items():
        for s in syns:
            words[tuple(s.split())] = ("category", cat)
    for g in GENERIC_OBJECT_WORDS:
        words[(g,)] = ("generic", g)
    for c in COLORS:
        words[(c,)] = ("color", c)
    for t, syns in TEXTURE_SYNONYMS.items():
        for s in syns:
            words[(s,)] = ("texture", t)
    words[(PLAIN_WORD,)] = ("texture", PLAIN_WORD)
    for sup, syns in SUPERLATIVE_WORDS.items():
        for s in syns:
            words[(s,)] = ("superlative", sup)
    return rel_phrases, words


_REL_PHRASES, _NP_WORDS = _phrase_index()


def _parse_np(text: str) -> tuple[Descriptor, str | None]:
    toks = re.findall(r"[a-z]+", text.lower())
    toks = [t for t in toks if t not in ("the", "a", "an", "that", "is", "which")]
    found: dict[str, str] = {}
    i = 0
    while i < len(toks):
        for n in (2, 1):
            hit = _NP_WORDS.get(tuple(toks[i:i + n])) if i + n <= len(toks) else None
            if hit is not None:
                kind, value = hit
                if kind in found:
                    raise ValueError(f"{kind} given twice in {text!r}")
                found[kind] = value
                i += n
                break
        else:
            raise ValueError(f"unknown word {toks[i]!r} in {text!r}")
    if "category" not in found and "generic" not in found:
        raise ValueError(f"no noun in {text!r}")
    return Descriptor(found.get("category"), found.get("color"), found.get("texture")), found.get("superlative")


def parse_expression(sentence: str) -> Expression:
    """The structure of a sentence made by :func:`render_expression` (ValueError for anything else)."""
    s = " " + " ".join(re.findall(r"[a-z]+", sentence.lower())) + " "
    for phrase, kind, value in _REL_PHRASES:
        k = s.find(" " + phrase + " ")
        if k < 0:
            continue
        head, tail = s[:k], s[k + len(phrase) + 2:]
        target, sup = _parse_np(head)
        if sup:
            raise ValueError(f"a superlative with a relation is not generated: {sentence!r}")
        if kind == "stuff":
            if tail.strip():
                raise ValueError(f"words after the background phrase in {sentence!r}")
            return Expression(target, relation="on", stuff=value)
        anchor, anchor_sup = _parse_np(tail)
        if anchor_sup:
            raise ValueError(f"a superlative anchor is not generated: {sentence!r}")
        return Expression(target, relation=value, anchor=anchor)
    target, sup = _parse_np(s)
    return Expression(target, superlative=sup)


# ----------------------------------------------------------------------------------------------- samples


@dataclass
class ReferringSample:
    sample: WorldSample
    target: int  # index into sample.objects
    expression: Expression
    sentence: str
    scene_seed: int
    mask: np.ndarray = field(repr=False)


def generate_referring_sample(split: str, index: int, seed: int = 0, config: WorldConfig = REFERRING_WORLD_CONFIG,
                              held_out: frozenset = HELD_OUT, max_attempts: int = 64) -> ReferringSample:
    """Item ``index`` of ``split``: the first of up to ``max_attempts`` scenes that admits an expression of the
    split; the expression is drawn uniformly by kind, then uniformly within the kind."""
    if split not in _SPLIT_CODE:
        raise ConfigError(f"unknown referring-world split {split!r}; choose one of {', '.join(SPLITS)}")
    if index < 0 or index * max_attempts + max_attempts >= 2**32:
        raise ValueError(f"index {index} out of range")
    for attempt in range(max_attempts):
        scene_seed = sample_seed(seed * len(SPLITS) + _SPLIT_CODE[split], index * max_attempts + attempt)
        sample = generate_sample(scene_seed, config)
        facts = SceneFacts.from_sample(sample)
        options = [(i, e) for i, e in enumerate_expressions(facts) if _split_filter(e, split, held_out)]
        if not options:
            continue
        rng = np.random.default_rng(scene_seed ^ 0x5EED)
        kinds = sorted({e.kind for _, e in options})
        kind = kinds[int(rng.integers(len(kinds)))]
        pool = [(i, e) for i, e in options if e.kind == kind]
        target, expr = pool[int(rng.integers(len(pool)))]
        sentence = render_expression(expr, rng)
        mask = sample.instance_map == sample.objects[target].instance_id
        return ReferringSample(sample, target, expr, sentence, scene_seed, mask)
    raise DatasetError(f"no {split} expression in {max_attempts} scenes for item {index}; the world config allows "
                       "too few objects or attributes")


class ReferringWorldDataset:
    """Map-style referring dataset over generated scenes: item i = :func:`generate_referring_sample`.

    Items: ``{"image": uint8 [3, H, W], "mask": bool [H, W], "sentence", "sentences": [sentence], "ref_id": i,
    "kind", "expression" (dict), "combinations" (list of [attribute, relation]), "instance_map" [H, W],
    "object_ids" (the visible objects' ids in it), "target_id"}`` — the scene's objects let evaluation tell which
    object a prediction chose.
    """

    def __init__(self, num_samples: int, split: str = "train", seed: int = 0,
                 config: WorldConfig = REFERRING_WORLD_CONFIG, held_out: frozenset = HELD_OUT) -> None:
        if split not in _SPLIT_CODE:
            raise ConfigError(f"unknown referring-world split {split!r}; choose one of {', '.join(SPLITS)}")
        if num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples, self.split, self.seed = int(num_samples), split, int(seed)
        self.config, self.held_out = config, frozenset(held_out)

    def __len__(self) -> int:
        return self.num_samples

    def referring_sample(self, index: int) -> ReferringSample:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return generate_referring_sample(self.split, index % self.num_samples, self.seed, self.config, self.held_out)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.referring_sample(index)
        return {"image": np.ascontiguousarray(r.sample.image.transpose(2, 0, 1)), "mask": r.mask,
                "sentence": r.sentence, "sentences": [r.sentence], "ref_id": int(index) % self.num_samples,
                "kind": r.expression.kind, "expression": r.expression.to_dict(),
                "combinations": sorted(list(c) for c in combinations(r.expression)),
                "instance_map": r.sample.instance_map, "object_ids": [o.instance_id for o in r.sample.objects],
                "target_id": r.sample.objects[r.target].instance_id}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]


def write_referring_dataset(out_dir: str | os.PathLike, num_samples: int, split: str = "train", seed: int = 0,
                            config: WorldConfig = REFERRING_WORLD_CONFIG) -> dict[str, Any]:
    """Write ``images/{i}.png``, ``masks/{i}.png`` (0/255) and ``refs.jsonl`` (sentence, kind, expression);
    existing files are kept, so an interrupted write continues."""
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    ds = ReferringWorldDataset(num_samples, split, seed, config)
    lines = []
    for i in range(num_samples):
        stem = f"{split}_{i:06d}"
        r = ds.referring_sample(i)
        for sub, arr in (("images", r.sample.image), ("masks", r.mask.astype(np.uint8) * 255)):
            path = out / sub / f"{stem}.png"
            if not path.exists():
                tmp = path.with_name(path.name + ".tmp")
                Image.fromarray(arr).save(tmp, format="PNG")
                os.replace(tmp, path)
        lines.append(json.dumps({"image": stem, "sentence": r.sentence, "kind": r.expression.kind,
                                 "expression": r.expression.to_dict(), "scene_seed": r.scene_seed}))
    refs = out / "refs.jsonl"
    tmp = refs.with_name("refs.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, refs)
    return {"out_dir": str(out), "num_samples": num_samples, "split": split}
