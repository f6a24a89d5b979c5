"""vocabseg benchmark: prints a table of timings and ratios measured in one run, and writes JSON.

    python bench/run.py                 # everything
    python bench/run.py --only san      # one section: san, vocab, scale, default
    python bench/run.py --json out.json

Models run with random weights where no weights ship (timings do not depend on the values). Reference figures of
the official code come from ../shared/FACTS.md (measured on this project's 2-core machines, torch 2.13 CPU); they
are quoted, not re-measured here, and are marked "ref".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Official SAN-B/16 on one 640x853 image, 2 CPU cores (FACTS.md "Reference timings").
REF_SAN_CACHED_S = 2.2
REF_SAN_NEW_150_S = 94.0


def peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux), so the next reading covers one stage."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_san(rows: list, quick: bool) -> None:
    import vocabseg
    from vocabseg.predict import Predictor

    torch.manual_seed(0)
    model = vocabseg.create_model("san_vit_b_16").eval()
    rgb = np.random.default_rng(0).integers(0, 256, (640, 853, 3), dtype=np.uint8)
    names = [f"class {i}" for i in range(150)]
    text = F.normalize(torch.randn(len(names), 512), dim=-1)  # "cached text": embeddings given
    predictor = Predictor(model)
    repeat = 1 if quick else 3
    peak_rss_reset()
    total = timeit(lambda: predictor.predict_array(rgb, names, text), repeat=repeat)
    peak = peak_rss_mb()
    pixels, crop = model.prepare(rgb)
    with torch.inference_mode():
        t_clip = timeit(lambda: model.clip_features(pixels), repeat=repeat)
        maps, tokens, grid = model.clip_features(pixels)
        t_side = timeit(lambda: model.side(pixels, maps, decode_all=False), repeat=repeat)
        masks, bias = model.side(pixels, maps, decode_all=False)[-1]
        t_rec = timeit(lambda: model.recognize(tokens, bias, grid), repeat=repeat)
    t_post = max(0.0, total - t_clip - t_side - t_rec)
    rows.append(("SAN-B/16 640x853, 150 names, cached text: predict (s)", total, f"{total / REF_SAN_CACHED_S:.2f}x ref {REF_SAN_CACHED_S}s", "target <= 0.6x"))
    rows.append(("  CLIP feature part (s)", t_clip, "", ""))
    rows.append(("  side network (s)", t_side, "", ""))
    rows.append(("  recognition with [SOS] (s)", t_rec, "", ""))
    rows.append(("  pre/post-processing + classifier (s)", t_post, "", ""))
    rows.append(("  peak RSS during predict (MB)", peak, "", ""))


def bench_vocab(rows: list, quick: bool) -> None:
    import vocabseg
    from vocabseg.clip.vocabulary import TextEmbeddingCache, encode_vocabulary

    torch.manual_seed(0)
    model = vocabseg.create_model("san_vit_b_16").eval()
    n = 30 if quick else 150
    names = [f"thing number {i}" for i in range(n)]
    t0 = time.perf_counter()
    encode_vocabulary(model.clip, names, templates="vild", cache=None)
    cold = time.perf_counter() - t0
    if quick:
        cold *= 150 / n
    cache = TextEmbeddingCache(cache_dir=None)
    encode_vocabulary(model.clip, names, templates="vild", cache=cache)
    t0 = time.perf_counter()
    encode_vocabulary(model.clip, names, templates="vild", cache=cache)
    warm = time.perf_counter() - t0
    rows.append(("new 150-name vocabulary, 14 templates, ViT-B/16 text (s)", cold,
                 f"{cold / REF_SAN_NEW_150_S:.3f}x ref {REF_SAN_NEW_150_S}s", "target <= 0.1x and <= 10 s"))
    rows.append(("same vocabulary again, cached (s)", warm, "", ""))


def bench_scale(rows: list, quick: bool) -> None:
    """Cost of 1,000 names vs 10 once their text is cached (the whole predict, post-processing included)."""
    import vocabseg
    from vocabseg.predict import Predictor

    torch.manual_seed(0)
    model = vocabseg.create_model("san_vit_b_16").eval()
    rgb = np.random.default_rng(1).integers(0, 256, (640, 853, 3), dtype=np.uint8)
    predictor = Predictor(model)
    repeat = 1 if quick else 3
    times = {}
    for n in (10, 1000):
        names = [f"c{i}" for i in range(n)]
        text = F.normalize(torch.randn(n, 512), dim=-1)
        times[n] = timeit(lambda: predictor.predict_array(rgb, names, text), repeat=repeat)
    ratio = times[1000] / times[10]
    rows.append(("predict with 10 names, cached (s)", times[10], "", ""))
    rows.append(("predict with 1,000 names, cached (s)", times[1000], f"{ratio:.3f}x of 10 names", "target <= 1.10x"))


def bench_default(rows: list, quick: bool) -> None:
    import vocabseg
    from vocabseg.models import get_entry

    if get_entry("default").weights is None:
        rows.append(("embedded default: no bundled weights yet", float("nan"), "", ""))
        return
    model = vocabseg.load_model()
    rgb = np.random.default_rng(2).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    names = ["red circle", "blue square", "green star", "yellow triangle", "sky", "grass", "water", "sand",
             "wall", "road"]
    model.predict(rgb, names)  # warm-up (and text cache)
    t = timeit(lambda: model.predict(rgb, names), repeat=1 if quick else 5)
    rows.append(("embedded default, 512x512, 10 names (s)", t, f"{t / 2.0:.2f}x of the 2 s target", "target < 2 s"))


SECTIONS = {"san": bench_san, "vocab": bench_vocab, "scale": bench_scale, "default": bench_default}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SECTIONS), action="append")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller vocabularies (extrapolated)")
    parser.add_argument("--json", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args()
    os.environ.setdefault("VOCABSEG_CACHE", str(Path("/tmp/vocabseg-bench-cache")))
    rows: list = []
    for name in args.only or list(SECTIONS):
        SECTIONS[name](rows, args.quick)
    info = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    print(f"vocabseg benchmark ({info})")
    width = max(len(r[0]) for r in rows)
    for label, value, ratio, target in rows:
        print(f"{label:<{width}}  {value:10.3f}  {ratio:<28} {target}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"info": info, "rows": [
        {"what": r[0], "value": r[1], "ratio": r[2], "target": r[3]} for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
