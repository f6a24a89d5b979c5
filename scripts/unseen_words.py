"""Zero-shot classification of held-out world scenes with words that never appear in any caption.

    python scripts/unseen_words.py --clip vocabseg/weights/default_clip.safetensors --lit runs/default_lit_clip/lit_clip.safetensors
    python scripts/unseen_words.py --segmentation --lit-san runs/default_san_lit/model_final.safetensors -n 100

For colour and background, each class is named once with the caption word ("red", "grass") and once with a word
the world's captions never contain ("crimson", "meadow"). A CLIP whose text tower only saw the captions should do
no better than chance with the second set; the LiT variant (frozen MiniLM text tower) should not care.

``--segmentation`` asks the same of the segmenters: the shipped default SAN (caption CLIP) and the LiT SAN segment
held-out scenes with the 17 class names of vocabseg.engine.world_eval, once as the captions say them ("red shape",
"grass") and once renamed ("crimson shape", "meadow"); seen / unseen mIoU for both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vocabseg.engine.world_eval import UNSEEN_COLOR_WORDS as COLOR_WORDS  # noqa: E402
from vocabseg.engine.world_eval import UNSEEN_STUFF_WORDS as STUFF_WORDS  # noqa: E402


@torch.inference_mode()
def score(model, n: int = 400, seed: int = 10_000_019) -> dict:
    from vocabseg.clip.vocabulary import encode_vocabulary
    from vocabseg.data.world import WorldConfig, caption_words, generate_sample, sample_seed
    from vocabseg.engine.contrastive import to_clip_tensor

    unseen = [w for w in list(COLOR_WORDS.values()) + list(STUFF_WORDS.values())
              if any(part in caption_words() for part in w.split())]
    assert not unseen, f"not unseen: {unseen}"
    world = WorldConfig(min_size=96, max_size=160, max_objects=1, min_objects=1)
    images, truth_color, truth_stuff = [], [], []
    for i in range(n):
        s = generate_sample(sample_seed(seed, i), world)
        if not s.objects:
            continue
        images.append(to_clip_tensor(s.image, model.config.image_resolution))
        truth_color.append(max(s.objects, key=lambda o: o.area).color)
        truth_stuff.append(max(s.stuff, key=lambda r: r.area).name)
    emb = F.normalize(model.encode_image(torch.stack(images)), dim=-1)
    out = {}
    for task, table, truth, template in (("colour", COLOR_WORDS, truth_color, "a {} shape"),
                                         ("background", STUFF_WORDS, truth_stuff, "a photo of {}")):
        names = list(table)
        for kind, words in (("caption words", names), ("unseen words", [table[k] for k in names])):
            text = encode_vocabulary(model, [template.format(w) for w in words], templates="none", cache=False)
            pred = (emb @ text.t()).argmax(-1).tolist()
            acc = 100.0 * sum(names[p] == t for p, t in zip(pred, truth)) / len(truth)
            out[f"{task}, {kind}"] = round(acc, 1)
        out[f"{task}, chance"] = round(100.0 / len(names), 1)
    return out


def segmentation(model, n: int) -> dict:
    """Seen/unseen mIoU of a segmenter with the caption names and with the renamed ones, same scenes."""
    from vocabseg.engine.world_eval import SEEN, UNSEEN, renamed, segmentation_scores, seen_unseen

    names = list(SEEN + UNSEEN)
    out = {}
    for kind, query in (("caption words", names), ("unseen words", [renamed(c) for c in names])):
        r = seen_unseen(segmentation_scores(model, names, n, query_names=query))
        out[kind] = {"seen_mIoU": round(r["seen_mIoU"], 1), "unseen_mIoU": round(r["unseen_mIoU"], 1),
                     "mIoU": round(r["mIoU"], 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, default=ROOT / "vocabseg" / "weights" / "default_clip.safetensors")
    parser.add_argument("--lit", type=Path, default=None)
    parser.add_argument("-n", type=int, default=400)
    parser.add_argument("--segmentation", action="store_true", help="score the SAN segmenters instead of CLIP")
    parser.add_argument("--lit-san", type=Path, default=ROOT / "runs" / "default_san_lit" / "model_final.safetensors")
    parser.add_argument("--caption-san", type=Path, default=None,
                        help="a SAN on the caption CLIP (default: the shipped embedded default)")
    args = parser.parse_args()
    from vocabseg.clip import load

    if args.segmentation:
        import vocabseg

        caption = vocabseg.load_model("default", checkpoint=args.caption_san)
        report = {"SAN on the caption-trained CLIP": segmentation(caption, args.n)}
        if args.lit_san.exists():
            report["SAN on the LiT CLIP"] = segmentation(vocabseg.load_model("default_lit", checkpoint=args.lit_san),
                                                         args.n)
        print(json.dumps(report, indent=2))
        return

    report = {"caption-trained CLIP (embedded default)": score(load(args.clip), args.n)}
    if args.lit is not None:
        report["LiT CLIP (frozen MiniLM text tower)"] = score(load(args.lit), args.n)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
