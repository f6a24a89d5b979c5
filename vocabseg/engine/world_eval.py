"""Scoring models on held-out scenes of the generated world: seen / unseen mIoU, chance, renamed classes, latency.

Every world experiment (the embedded default, the SAN / SegViT / LSeg comparison, the LiT variant) is scored here,
so their numbers are comparable: the same held-out seed, scene sizes, class split and metric.

Seen / unseen split (``configs/default_san_world.yaml``): segmentation labels of training never contain sand, wall
or pink, white, black or brown objects; the CLIP knew those words from captions only.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

SEEN: tuple[str, ...] = ("sky", "grass", "water", "road", "background", "red shape", "green shape", "blue shape",
                         "yellow shape", "orange shape", "purple shape")
UNSEEN: tuple[str, ...] = ("sand", "wall", "pink shape", "white shape", "black shape", "brown shape")
EVAL_SEED = 7_777_777  # held-out scenes: seeds disjoint from training (train 0, val 1)

# Words no caption of the world ever contains, for each colour and background: a text tower that learnt language
# only from the captions cannot know them (checked by tests/test_world_eval.py).
UNSEEN_COLOR_WORDS: dict[str, str] = {
    "red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden", "orange": "tangerine",
    "purple": "violet", "pink": "rose", "white": "ivory", "black": "ebony", "brown": "chocolate"}
UNSEEN_STUFF_WORDS: dict[str, str] = {
    "sky": "heavens", "grass": "meadow", "water": "ocean", "sand": "desert", "wall": "masonry", "road": "highway",
    "background": "canvas"}


def renamed(name: str) -> str:
    """A class name of SEEN/UNSEEN in words no caption contains: "red shape" -> "crimson shape", "sky" -> "heavens"."""
    words = name.split()
    if words[0] in UNSEEN_COLOR_WORDS:
        return " ".join([UNSEEN_COLOR_WORDS[words[0]]] + words[1:])
    return UNSEEN_STUFF_WORDS[name]


def world_eval_set(n: int, scheme: Sequence[str] | str, seed: int = EVAL_SEED, min_size: int = 160,
                   max_size: int = 320):
    """``n`` held-out world scenes labelled with ``scheme`` (same sizes as the SAN training data)."""
    from ..data.world import WorldConfig, WorldDataset

    return WorldDataset(n, seed=seed, config=WorldConfig(min_size=min_size, max_size=max_size), scheme=scheme)


def segmentation_scores(model: torch.nn.Module, names: Sequence[str], n: int,
                        query_names: Sequence[str] | None = None, query_to_class: Sequence[int] | None = None,
                        seed: int = EVAL_SEED) -> dict[str, Any]:
    """Per-class IoU of ``model`` on ``n`` held-out scenes whose ground truth is labelled with ``names``.

    The model is asked with ``query_names`` (default: ``names``); query ``i`` counts as class
    ``query_to_class[i]`` (default: the same index). This scores renamed vocabularies (:func:`renamed`) and
    closed-set models that know only some of the classes.
    """
    from ..metrics import ConfusionMatrix
    from ..predict import Predictor

    names = list(names)
    query = list(query_names or names)
    remap = np.asarray(query_to_class if query_to_class is not None else range(len(query)))
    if len(remap) != len(query):
        raise ValueError("query_to_class needs one class index per query name")
    ds = world_eval_set(n, names, seed)
    cm = ConfusionMatrix(len(names))
    predictor = Predictor(model)
    text = model.text_embeddings(query)
    for i in range(n):
        item = ds[i]
        seg = predictor.predict_array(item["image"], query, text)
        cm.update(remap[seg.labels], item["label"])
    m = cm.compute()
    return {"mIoU": float(m["mIoU"]), "pACC": float(m["pACC"]), "IoU": dict(zip(names, map(float, m["IoU"])))}


def mean_iou(iou: dict[str, float], classes: Sequence[str]) -> float:
    """Mean IoU over ``classes`` (classes absent from every scene, NaN, left out)."""
    vals = [iou[c] for c in classes if iou[c] == iou[c]]
    return float(np.mean(vals)) if vals else float("nan")


def seen_unseen(scores: dict[str, Any], seen: Sequence[str] = SEEN, unseen: Sequence[str] = UNSEEN) -> dict:
    """``segmentation_scores`` -> {seen_mIoU, unseen_mIoU, mIoU, IoU}."""
    return {"seen_mIoU": mean_iou(scores["IoU"], seen), "unseen_mIoU": mean_iou(scores["IoU"], unseen),
            "mIoU": scores["mIoU"], "IoU": scores["IoU"]}


def chance_scores(names: Sequence[str], n: int, seed: int = EVAL_SEED) -> dict[str, Any]:
    """IoU of labelling every pixel uniformly at random among ``names`` (the floor any model must clear)."""
    from ..metrics import ConfusionMatrix

    rng = np.random.default_rng(0)
    ds = world_eval_set(n, list(names), seed)
    cm = ConfusionMatrix(len(names))
    for i in range(n):
        gt = ds[i]["label"]
        cm.update(rng.integers(0, len(names), gt.shape), gt)
    m = cm.compute()
    return {"mIoU": float(m["mIoU"]), "IoU": dict(zip(names, map(float, m["IoU"])))}


@torch.inference_mode()
def cpu_latency(model: torch.nn.Module, size: int = 512, names: Sequence[str] = SEEN + UNSEEN,
                repeats: int = 5) -> float:
    """Median seconds of ``model.predict`` on a ``size``² world scene with ``names`` (text embeddings cached)."""
    from ..predict import Predictor

    image = world_eval_set(1, list(names), min_size=size, max_size=size)[0]["image"]
    predictor = Predictor(model)
    text = model.text_embeddings(list(names))
    predictor.predict_array(image, list(names), text).labels  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.predict_array(image, list(names), text).labels
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def trainable_parameters(model: torch.nn.Module) -> int:
    """Parameters a training run updates (the frozen CLIP excluded; SAN's CLIP positional embedding included)."""
    with torch.no_grad():
        return sum(p.numel() for name, p in model.named_parameters()
                   if not name.startswith("clip.") or name == "clip.visual.positional_embedding")


def drawing_scores(model: torch.nn.Module, drawings: Sequence[Any]) -> dict[str, Any]:
    """IoU of every object (and background) of plain drawings (:mod:`vocabseg.data.drawings`), each asked with its
    own obvious vocabulary. Returns per-drawing records plus the mean / minimum object IoU and the mean over drawings
    of their mIoU (objects and background)."""
    from ..metrics import ConfusionMatrix
    from ..predict import Predictor

    predictor = Predictor(model)
    records, object_ious, drawing_mious = [], [], []
    for d in drawings:
        labels = predictor.predict_array(d.image, list(d.names), model.text_embeddings(list(d.names))).labels
        cm = ConfusionMatrix(len(d.names), ignore_index=None)
        cm.update(labels, d.labels)
        m = cm.compute()
        ious = dict(zip(d.names, map(float, m["IoU"])))
        records.append({"kind": d.kind, "IoU": ious, "pACC": float(m["pACC"])})
        object_ious += [ious[n] for n in d.names[:-1]]
        drawing_mious.append(float(np.mean(list(ious.values()))))
    obj = np.asarray(object_ious)
    return {"drawings": len(records), "objects": int(obj.size), "object_mIoU": float(obj.mean()),
            "object_min_IoU": float(obj.min()), "objects_at_least_30": float((obj >= 30).mean() * 100),
            "objects_at_least_50": float((obj >= 50).mean() * 100),
            "drawing_mIoU": float(np.mean(drawing_mious)), "records": records}
