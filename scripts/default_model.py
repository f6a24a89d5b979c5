"""Stage 3 of the embedded default: pack the trained weights into the package, and measure what it knows.

    python scripts/default_model.py ship        # runs/default_clip + runs/default_san -> vocabseg/weights/ (fp16)
    python scripts/default_model.py evaluate    # held-out world: CLIP zero-shot, SAN seen/unseen mIoU, baselines
                                                # -> docs/default_model_results.json (numbers quoted in the docs)

Seen / unseen split (configs/default_san_world.yaml): SAN's segmentation labels never contain sand, wall or pink,
white, black or brown objects; CLIP saw those words only in captions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEEN = ["sky", "grass", "water", "road", "background", "red shape", "green shape", "blue shape", "yellow shape",
        "orange shape", "purple shape"]
UNSEEN = ["sand", "wall", "pink shape", "white shape", "black shape", "brown shape"]
# Shape names: SAN never trained on them either; reported separately (the small CLIP did not learn shapes).
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "heart", "hexagon", "arrow", "crescent"]
EVAL_SEED = 7_777_777  # held-out scenes: seeds disjoint from training (train 0, val 1)


def ship(clip_run: Path, san_run: Path) -> None:
    """Write fp16 safetensors: the CLIP in OpenAI layout, and SAN without the CLIP tensors it shares."""
    from safetensors.torch import load_file, save_file

    from vocabseg.clip import load as load_clip
    from vocabseg.clip.load import save_state_dict
    from vocabseg.models.default import DEFAULT_CLIP_WEIGHTS, DEFAULT_SAN_WEIGHTS

    DEFAULT_CLIP_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    clip = load_clip(clip_run / "tiny_clip.safetensors").half()
    save_state_dict(clip, DEFAULT_CLIP_WEIGHTS)
    full = load_file(str(san_run / "model_final.safetensors"))
    keep = {k: v.half().contiguous() for k, v in full.items()
            if not k.startswith("clip.") or k == "clip.visual.positional_embedding"}
    save_file(keep, str(DEFAULT_SAN_WEIGHTS), metadata={"format": "vocabseg-san", "model": "default"})
    for p in (DEFAULT_CLIP_WEIGHTS, DEFAULT_SAN_WEIGHTS):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size / 2**20:.1f} MB")


def _world_eval_set(n: int, scheme, seed: int = EVAL_SEED):
    from vocabseg.data.world import WorldConfig, WorldDataset

    return WorldDataset(n, seed=seed, config=WorldConfig(min_size=160, max_size=320), scheme=scheme)


def segmentation_scores(model, names: list[str], n: int, closed_set_names: list[str] | None = None) -> dict:
    """Per-class IoU on ``n`` held-out scenes labelled with ``names``; a closed-set model predicts only its own
    classes, mapped into ``names`` by name."""
    from vocabseg.metrics import ConfusionMatrix
    from vocabseg.predict import Predictor

    ds = _world_eval_set(n, names)
    cm = ConfusionMatrix(len(names), ignore_index=ds.ignore_index if hasattr(ds, "ignore_index") else 255)
    predictor = Predictor(model)
    query = closed_set_names or names
    text = model.text_embeddings(query)
    remap = np.array([names.index(q) for q in query])
    for i in range(n):
        item = ds[i]
        seg = predictor.predict_array(item["image"], list(query), text)
        cm.update(remap[seg.labels], item["label"])
    m = cm.compute()
    iou = dict(zip(names, m["IoU"]))
    return {"mIoU": m["mIoU"], "pACC": m["pACC"], "IoU": iou}


def _mean(values) -> float:
    vals = [v for v in values if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def hand_drawn_check(model) -> dict:
    """The bundled drawing (not from the generator): red circle and blue square on white."""
    from vocabseg.io import load_image

    rgb = load_image(ROOT / "vocabseg" / "examples" / "shapes.png")
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    truth = np.full((h, w), 2)
    truth[(xx - 130) ** 2 + (yy - 170) ** 2 <= 80 ** 2] = 0
    truth[(xx >= 270) & (xx <= 420) & (yy >= 110) & (yy <= 260)] = 1
    names = ["red circle", "blue square", "background"]
    labels = model.predict(rgb, names).labels
    iou = {}
    for k, name in enumerate(names):
        inter = np.logical_and(labels == k, truth == k).sum()
        union = np.logical_or(labels == k, truth == k).sum()
        iou[name] = 100.0 * inter / max(union, 1)
    return {"IoU": iou, "pixel_accuracy": 100.0 * float((labels == truth).mean())}


def evaluate(n: int, out: Path, closed_run: Path | None) -> dict:
    import vocabseg
    from vocabseg.engine.contrastive import ContrastiveConfig, zero_shot_report

    torch.manual_seed(0)
    report: dict = {"held_out_images": n, "seen": SEEN, "unseen": UNSEEN, "eval_seed": EVAL_SEED}
    model = vocabseg.load_model()  # the shipped default
    t0 = time.time()
    report["clip_zero_shot"] = zero_shot_report(model.clip, ContrastiveConfig(), num_samples=400)
    names = SEEN + UNSEEN
    r = segmentation_scores(model, names, n)
    report["san_open_vocab"] = {"seen_mIoU": _mean(r["IoU"][c] for c in SEEN),
                                "unseen_mIoU": _mean(r["IoU"][c] for c in UNSEEN), "mIoU": r["mIoU"],
                                "pACC": r["pACC"], "IoU": r["IoU"]}
    # chance: every pixel labelled uniformly at random among the 17 names, same scenes
    rng = np.random.default_rng(0)
    from vocabseg.metrics import ConfusionMatrix

    ds = _world_eval_set(n, names)
    cm = ConfusionMatrix(len(names))
    for i in range(n):
        gt = ds[i]["label"]
        cm.update(rng.integers(0, len(names), gt.shape), gt)
    ch = cm.compute()
    report["chance"] = {"seen_mIoU": _mean(ch["IoU"][names.index(c)] for c in SEEN),
                        "unseen_mIoU": _mean(ch["IoU"][names.index(c)] for c in UNSEEN)}
    if closed_run is not None and (closed_run / "model_final.safetensors").exists():
        closed = vocabseg.load_model("default", checkpoint=closed_run / "model_final.safetensors",
                                     closed_set_classes=len(SEEN))
        rc = segmentation_scores(closed, names, n, closed_set_names=SEEN)
        report["closed_set_baseline"] = {"seen_mIoU": _mean(rc["IoU"][c] for c in SEEN),
                                         "unseen_mIoU": _mean(rc["IoU"][c] for c in UNSEEN), "IoU": rc["IoU"]}
    # colour + category names: SAN was trained on category names only; colours come from CLIP alone
    from vocabseg.data.world import COLORS, OBJECT_CATEGORIES, STUFF_CLASSES

    cc = list(STUFF_CLASSES) + [f"{c} {s}" for c in COLORS for s in OBJECT_CATEGORIES]
    rcc = segmentation_scores(model, cc, max(20, n // 3))
    report["san_color_category_zero_shot"] = {"mIoU": rcc["mIoU"], "classes": len(cc)}
    report["hand_drawn"] = hand_drawn_check(model)
    report["seconds"] = time.time() - t0
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("seen", "unseen")}, indent=1)[:4000])
    return report


def results_table(report: dict) -> str:
    """Markdown table of a report written by :func:`evaluate` (what docs/default_model.md shows)."""
    z = report["clip_zero_shot"]
    o = report["san_open_vocab"]
    c = report.get("closed_set_baseline")
    ch = report["chance"]
    hd = report["hand_drawn"]
    rows = [
        "| measurement (held-out world scenes, seeds disjoint from training) | value |",
        "|---|---|",
        f"| CLIP zero-shot, single objects: colour (10-way) | {z['color']['accuracy']:.1f} % (chance {z['color']['chance']:.0f} %) |",
        f"| CLIP zero-shot: background (7-way) | {z['stuff']['accuracy']:.1f} % (chance {z['stuff']['chance']:.1f} %) |",
        f"| CLIP zero-shot: shape (10-way) | {z['shape']['accuracy']:.1f} % (chance {z['shape']['chance']:.0f} %) |",
        f"| CLIP zero-shot: colour + shape (100-way) | {z['color+shape']['accuracy']:.1f} % (chance {z['color+shape']['chance']:.0f} %) |",
        f"| SAN, 17-name vocabulary: **seen** mIoU (11 classes) | {o['seen_mIoU']:.1f} |",
        f"| SAN, 17-name vocabulary: **unseen** mIoU (6 classes never labelled in SAN training) | {o['unseen_mIoU']:.1f} |",
        f"| random labels: seen / unseen mIoU | {ch['seen_mIoU']:.1f} / {ch['unseen_mIoU']:.1f} |",
    ]
    if c:
        rows.append(f"| closed-set baseline (same SAN, 11 learnt class vectors): seen / unseen mIoU | "
                    f"{c['seen_mIoU']:.1f} / {c['unseen_mIoU']:.1f} (it cannot name unseen classes) |")
    rows.append(f"| SAN with 107 colour+shape names (zero-shot; shapes never learnt) | "
                f"{report['san_color_category_zero_shot']['mIoU']:.1f} mIoU |")
    rows.append(f"| hand-drawn `examples/shapes.png`, vocabulary \"red circle, blue square, background\" | IoU "
                + ", ".join(f"{k} {v:.1f}" for k, v in hd["IoU"].items()) + f"; pixel accuracy {hd['pixel_accuracy']:.1f} % |")
    per_class = ", ".join(f"{k} {v:.1f}" for k, v in o["IoU"].items())
    return "\n".join(rows) + f"\n\nPer-class IoU (open-vocabulary SAN): {per_class}.\n\nHeld-out images: " \
        f"{report['held_out_images']} (eval seed {report['eval_seed']}); command: `python scripts/default_model.py evaluate -n {report['held_out_images']}`."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ship")
    s.add_argument("--clip-run", type=Path, default=ROOT / "runs" / "default_clip")
    s.add_argument("--san-run", type=Path, default=ROOT / "runs" / "default_san")
    e = sub.add_parser("evaluate")
    e.add_argument("-n", type=int, default=200)
    e.add_argument("--closed-run", type=Path, default=ROOT / "runs" / "default_san_closed")
    e.add_argument("--out", type=Path, default=ROOT / "docs" / "default_model_results.json")
    args = parser.parse_args()
    if args.cmd == "ship":
        ship(args.clip_run, args.san_run)
    else:
        report = evaluate(args.n, args.out, args.closed_run)
        doc = ROOT / "docs" / "default_model.md"
        text = doc.read_text()
        start, end = "<!-- results -->", "<!-- /results -->"
        if start in text:
            head, rest = text.split(start, 1)
            text = head + start + "\n" + results_table(report) + "\n" + end + rest.split(end, 1)[1]
            doc.write_text(text)


if __name__ == "__main__":
    main()
