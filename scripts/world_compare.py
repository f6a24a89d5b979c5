"""Issue #7: SAN vs SegViT (open-vocabulary head) vs LSeg on the generated world, same frozen small CLIP and budget.

    vocabseg train configs/world_compare_san.yaml      # then _segvit, _lseg (same data, crops, batch, steps)
    python scripts/world_compare.py -n 100             # scores -> docs/world_compare_results.json + docs/models.md

Each model is scored on the same held-out scenes (vocabseg.engine.world_eval): seen and unseen mIoU with the
17-name vocabulary, trainable parameters, forward GFLOPs and CPU latency (512² scene, 17 names, text cached,
median of 5; run it on an otherwise idle machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = {"SAN": ("default", "world_compare_san"), "SegViT (open head)": ("segvit_world", "world_compare_segvit"),
        "LSeg": ("lseg_world", "world_compare_lseg")}
MARK_START, MARK_END = "<!-- world-compare -->", "<!-- /world-compare -->"


def forward_gflops(model: torch.nn.Module, size: int, num_classes: int) -> float:
    """Multiply-adds × 2 of one forward pass on a size² image with ``num_classes`` text embeddings."""
    from torch.utils.flop_counter import FlopCounterMode

    text = torch.nn.functional.normalize(torch.randn(num_classes, model.clip.embed_dim), dim=-1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size), text)
    return counter.get_total_flops() / 1e9


def evaluate(n: int, runs_dir: Path, latency: bool) -> dict:
    import vocabseg
    from vocabseg.engine.world_eval import (EVAL_SEED, SEEN, UNSEEN, chance_scores, cpu_latency, mean_iou,
                                            segmentation_scores, seen_unseen, trainable_parameters)

    torch.manual_seed(0)
    names = list(SEEN + UNSEEN)
    report: dict = {"held_out_images": n, "eval_seed": EVAL_SEED, "models": {}}
    chance = chance_scores(names, n)
    report["chance"] = {"seen_mIoU": mean_iou(chance["IoU"], SEEN), "unseen_mIoU": mean_iou(chance["IoU"], UNSEEN)}
    for label, (model_name, run) in RUNS.items():
        ckpt = runs_dir / run / "model_final.safetensors"
        if not ckpt.exists():
            print(f"skipping {label}: {ckpt} does not exist (train configs/{run}.yaml first)")
            continue
        model = vocabseg.load_model(model_name, checkpoint=ckpt)
        row = seen_unseen(segmentation_scores(model, names, n))
        row["trainable_params_M"] = trainable_parameters(model) / 1e6
        row["forward_GFLOPs_512"] = forward_gflops(model, 512, len(names))
        if latency:
            row["cpu_latency_s_512"] = cpu_latency(model, 512, names)
        row["steps"] = json.loads((runs_dir / run / "model_final.json").read_text())["iteration"]
        report["models"][label] = row
        print(label, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "IoU"})
    return report


def table(report: dict) -> str:
    rows = ["| model (same frozen small CLIP, 600 steps) | seen mIoU (11) | unseen mIoU (6) | trainable params | "
            "GFLOPs (512², 17 names) | CPU latency (512², 17 names) |", "|---|---|---|---|---|---|"]
    for label, r in report["models"].items():
        lat = f"{r['cpu_latency_s_512'] * 1000:.0f} ms" if "cpu_latency_s_512" in r else "–"
        rows.append(f"| {label} | {r['seen_mIoU']:.1f} | {r['unseen_mIoU']:.1f} | {r['trainable_params_M']:.2f} M | "
                    f"{r['forward_GFLOPs_512']:.1f} | {lat} |")
    ch = report["chance"]
    rows.append(f"| random labels | {ch['seen_mIoU']:.1f} | {ch['unseen_mIoU']:.1f} | – | – | – |")
    return "\n".join(rows) + (f"\n\nHeld-out scenes: {report['held_out_images']} (seed {report['eval_seed']}); "
                              f"command: `python scripts/world_compare.py -n {report['held_out_images']}`.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=100, help="held-out scenes")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--no-latency", action="store_true", help="skip the CPU timing (e.g. on a busy machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "world_compare_results.json")
    args = parser.parse_args()
    report = evaluate(args.n, args.runs, latency=not args.no_latency)
    args.out.write_text(json.dumps(report, indent=2))
    doc = ROOT / "docs" / "models.md"
    text = doc.read_text()
    if MARK_START in text:
        head, rest = text.split(MARK_START, 1)
        doc.write_text(head + MARK_START + "\n" + table(report) + "\n" + MARK_END + rest.split(MARK_END, 1)[1])
    print(table(report))


if __name__ == "__main__":
    main()
