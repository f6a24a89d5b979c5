"""vocabseg benchmark: prints a table of timings and ratios measured in one run, and writes JSON.

    python bench/run.py                 # everything (about 15-25 min on 2 CPU cores)
    python bench/run.py --quick         # fewer repeats, sizes and names (extrapolated where marked)
    python bench/run.py --only models --only flops   # some sections (see --help for their names)
    python bench/run.py --json out.json

Sections: san (SAN-B/16 stage breakdown), vocab (new 150-name vocabulary), scale (10 vs 1,000 names), default (the
embedded default with its bundled weights), models (latency and peak RSS of each registered model at its standard
size), folder (``vocabseg segment FOLDER`` images/s), compile (eager vs torch.compile vs onnxruntime), flops
(achieved FLOP/s vs this machine's measured fp32 matmul rate), coldvocab (a new 1,000-name vocabulary, cold vs
cached), size (latency vs image size) and vocabsize (latency vs vocabulary size). Issue 27: bf16 (bf16 vs fp32 matmul
rates, SAN-B/16 in bf16, label agreement per family), text (a new 20-name vocabulary vs the official work), contention
(text and image with a competing busy process), startup (`vocabseg segment` vs `import torch`), memory (peak RSS of
predict and of loading), pipeline (`vocabseg segment FOLDER` pipelined vs plain loop) and onnx (onnxruntime vs torch
fp32 vs torch bf16).

Models run with random weights where no weights ship (timings do not depend on the values). Every ratio is between
figures measured in this run, on this machine, except those marked "ref": reference figures of the official code
from ../shared/FACTS.md (measured on this project's 2-core machines, torch 2.13 CPU), quoted, not re-measured,
and the official SAN-B/16 predict peak RSS, measured once on this machine with the official code in a scratch venv
(docs/performance.md).
Set the thread count with OMP_NUM_THREADS; the header line says what was used.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Official SAN-B/16 on one 640x853 image, 2 CPU cores (FACTS.md "Reference timings").
REF_SAN_CACHED_S = 2.2
REF_SAN_NEW_150_S = 94.0
# Official SAN-B/16 predict at 640 px, peak RSS of the process (MB): build, torch.load the release .pth +
# load_state_dict, one 640x853 image with a new 150-name vocabulary. Not in FACTS.md: measured on this machine
# (2026-12-05) with the official code in a scratch venv, outside the project; docs/performance.md says how.
REF_SAN_PREDICT_PEAK_MB = 2132.0

# The standard input size of each model benchmarked (its paper's evaluation short side).
STANDARD = (("default", 512), ("san_vit_b_16", 640), ("segvit_vit_b_16", 512), ("lseg_vit_b_16", 512))
if os.environ.get("VOCABSEG_BENCH_MODELS"):  # smoke-testing this script: "san_tiny_test:64,lseg_tiny_test:64"
    STANDARD = tuple((m.split(":")[0], int(m.split(":")[1])) for m in os.environ["VOCABSEG_BENCH_MODELS"].split(","))
# Too slow and too big for a CPU benchmark (ViT-L/14: ~4x the FLOPs of B/16): not run.
SKIPPED_MODELS = ("san_vit_large_14", "segvit_vit_large_14", "segvit_shrunk_vit_large_14", "lseg_vit_large_14")


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


def rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
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


def build(name: str):
    """The model to time: the embedded default with its bundled weights when they exist, else random weights."""
    import vocabseg
    from vocabseg.models import get_entry

    entry = get_entry(name)
    clip_files = [] if entry.clip_weights is None else \
        [entry.clip_weights] if isinstance(entry.clip_weights, Path) else list(entry.clip_weights)
    if entry.weights is not None and Path(entry.weights).exists() and all(Path(f).exists() for f in clip_files):
        return vocabseg.load_model(name)
    torch.manual_seed(0)
    return vocabseg.create_model(name).eval()


def random_text(model, n: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, model.clip.embed_dim, generator=torch.Generator().manual_seed(n)), dim=-1)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def class_names(n: int) -> list[str]:
    """``n`` real class names (the benchmark lists: ADE-847, Pascal Context-459, COCO-Stuff, ...), then numbered."""
    folder = Path(__file__).resolve().parents[1] / "vocabseg" / "data" / "classes"
    names: dict[str, None] = {}
    for f in sorted(folder.glob("*.txt")):
        for line in f.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                names.setdefault(line.split(",")[0].strip(), None)
    out = [n for n in names if n][:n]
    return out + [f"object number {i}" for i in range(n - len(out))]


def fmt_err(e: BaseException, width: int = 70) -> str:
    msg = " ".join(f"{type(e).__name__}: {e}".split())
    return msg if len(msg) <= width else msg[: width - 3] + "..."


# ----------------------------------------------------------------------------------------------- original sections


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

    entry = get_entry("default")
    if entry.weights is None or not Path(entry.weights).exists():
        rows.append(("embedded default: no bundled weights yet", float("nan"), "", ""))
        return
    model = vocabseg.load_model()
    rgb = np.random.default_rng(2).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    names = ["red circle", "blue square", "green star", "yellow triangle", "sky", "grass", "water", "sand",
             "wall", "road"]
    model.predict(rgb, names)  # warm-up (and text cache)
    t = timeit(lambda: model.predict(rgb, names), repeat=1 if quick else 5)
    rows.append(("embedded default, 512x512, 10 names (s)", t, f"{t / 2.0:.2f}x of the 2 s target", "target < 2 s"))


# ----------------------------------------------------------------------------------------------- models


def _model_worker(name: str, size: int, repeat: int, threads: int) -> dict:
    """In a fresh process: build one model, predict at its standard size; latency and this process's peak RSS."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    from vocabseg.predict import Predictor

    base = rss_mb()
    model = build(name)
    rgb = random_image(size, size)
    names = [f"class {i}" for i in range(10)]
    text = random_text(model, len(names))
    predictor = Predictor(model)
    loaded = rss_mb()
    t = timeit(lambda: predictor.predict_array(rgb, names, text), repeat=repeat)
    return {"latency": t, "peak": peak_rss_mb(), "base": base, "loaded": loaded,
            "params": sum(p.numel() for p in model.parameters())}


def bench_models(rows: list, quick: bool) -> None:
    """Each model in its own process, so its peak RSS is its own (torch's import included, ~0.3-0.4 GB)."""
    repeat = 1 if quick else 3
    ctx = multiprocessing.get_context("spawn")
    first = None
    for name, size in STANDARD:
        label = f"{name} {size}x{size}, 10 names, cached text: predict (s)"
        try:
            with futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                r = pool.submit(_model_worker, name, size, repeat, torch.get_num_threads()).result()
        except Exception as e:  # noqa: BLE001 - report, do not crash the run
            rows.append((label, float("nan"), f"failed: {fmt_err(e)}", ""))
            continue
        first = first or r["latency"]
        rows.append((label, r["latency"], f"{r['latency'] / first:.2f}x {STANDARD[0][0]}" if name != STANDARD[0][0]
                     else "", f"{r['params'] / 1e6:.1f} M parameters"))
        rows.append(("  peak RSS of the process (MB)", r["peak"],
                     f"+{r['peak'] - r['base']:.0f} MB over import", f"weights+model {r['loaded'] - r['base']:.0f} MB"))
    rows.append(("ViT-L/14 models: not run (too slow for a CPU benchmark)", float("nan"), "",
                 ", ".join(SKIPPED_MODELS)))


# ----------------------------------------------------------------------------------------------- folder mode


def bench_folder(rows: list, quick: bool) -> None:
    """``vocabseg segment FOLDER`` in this process (labels PNG + overlay + JSON per image) vs the bare predict loop."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from vocabseg.cli import app
    from vocabseg.predict import Predictor

    n = 4 if quick else 12
    names = "red circle, blue square, green star, sky, grass, water, sand, wall, road, background"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        from PIL import Image

        for i in range(n):
            Image.fromarray(random_image(384, 512, seed=i)).save(tmp / "in" / f"{i:03d}.jpg", quality=90)
        model = build("default")
        args = ["segment", str(tmp / "in"), "--vocab", names, "--out", str(tmp / "out")]
        from vocabseg.models import get_entry

        if not Path(get_entry("default").weights).exists():
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "w.safetensors"))
            args += ["--model", "default", "--checkpoint", str(tmp / "w.safetensors")]
        runner = CliRunner()
        runner.invoke(app, args[:2] + ["--vocab", names, "--out", str(tmp / "warm")] + args[6:])  # warm caches
        t0 = time.perf_counter()
        res = runner.invoke(app, args)
        t_cli = time.perf_counter() - t0
        if res.exit_code != 0:
            rows.append(("folder mode: vocabseg segment failed", float("nan"), fmt_err(RuntimeError(res.output)), ""))
            return
        predictor = Predictor(model)
        from vocabseg.io import list_images, load_image

        text = predictor.text_embeddings([s.strip() for s in names.split(",")])
        t0 = time.perf_counter()
        for path in list_images(tmp / "in"):
            predictor.predict_array(load_image(path), [s.strip() for s in names.split(",")], text)
        t_loop = time.perf_counter() - t0
    rows.append((f"folder mode, default, {n} images 512x384, 1 process (images/s)", n / t_cli,
                 f"{t_loop / t_cli:.2f}x the bare loop's rate", "model load + outputs included"))
    rows.append(("  bare load + predict loop, same images (images/s)", n / t_loop, "", ""))


# ----------------------------------------------------------------------------------------------- runtimes


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _compile_worker(name: str, size: int, repeat: int, threads: int) -> dict:
    """In a fresh process (a failed torch.compile can leave torch unusable): time ``infer`` three ways."""
    import functools

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    model = build(name)
    pixels, _ = model.prepare(random_image(size, size))
    text = random_text(model, 10)
    res: dict = {}
    with torch.inference_mode():
        ref = [t.clone() for t in _flat(model.infer(pixels, text))]
        res["eager"] = timeit(lambda: model.infer(pixels, text), repeat=repeat)
    # torch.compile (inductor; needs a C++ compiler on CPU). ``infer`` runs under inference_mode, which dynamo
    # cannot trace, so the undecorated function is compiled and run under no_grad.
    try:
        plain = getattr(type(model).infer, "__wrapped__", type(model).infer)
        compiled = torch.compile(functools.partial(plain, model), dynamic=False)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = _flat(compiled(pixels, text))
            res["compile_first"] = time.perf_counter() - t0
            res["compile"] = timeit(lambda: compiled(pixels, text), repeat=repeat)
        res["compile_diff"] = max(float((a - b).abs().max()) for a, b in zip(out, ref))
    except Exception as e:  # noqa: BLE001 - a failure is a result, not a crash
        res["compile_error"] = fmt_err(e, 50)
    # onnxruntime
    try:
        import onnxruntime as ort

        from vocabseg.export import export_image_model

        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            path = export_image_model(model, Path(tmp) / "image.onnx")
            res["export"] = time.perf_counter() - t0
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            inputs = [i.name for i in session.get_inputs()]
            feed = {k: v for k, v in {"pixels": pixels.numpy(), "text_embeddings": text.numpy()}.items()
                    if k in inputs}
            outs = session.run(None, feed)
            res["ort"] = timeit(lambda: session.run(None, feed), repeat=repeat)
        res["ort_diff"] = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(outs, ref))
    except Exception as e:  # noqa: BLE001
        res["ort_error"] = fmt_err(e, 50)
    return res


def bench_compile(rows: list, quick: bool) -> None:
    """The image model's ``infer`` (pixels + cached text -> scores): eager, torch.compile, onnxruntime."""
    repeat = 2 if quick else 5
    ctx = multiprocessing.get_context("spawn")
    for name, size in STANDARD[:2]:
        label = f"{name} {size}x{size}, 10 names: eager infer (s)"
        try:
            with futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                r = pool.submit(_compile_worker, name, size, repeat, torch.get_num_threads()).result()
        except Exception as e:  # noqa: BLE001
            rows.append((label, float("nan"), f"failed: {fmt_err(e, 50)}", ""))
            continue
        eager = r["eager"]
        rows.append((label, eager, "", ""))
        if "compile" in r:
            rows.append(("  torch.compile infer (s)", r["compile"], f"{r['compile'] / eager:.2f}x of eager",
                         f"first call {r['compile_first']:.0f} s; max |diff| {r['compile_diff']:.1e}"))
        else:
            rows.append(("  torch.compile infer (s)", float("nan"), f"failed: {r['compile_error']}", ""))
        if "ort" in r:
            rows.append(("  onnxruntime infer (s)", r["ort"], f"{r['ort'] / eager:.2f}x of eager",
                         f"export {r['export']:.0f} s; max |diff| {r['ort_diff']:.1e}"))
        else:
            rows.append(("  onnxruntime infer (s)", float("nan"), f"failed: {r['ort_error']}", ""))


def matmul_gflops(n: int = 2048, repeat: int = 5) -> float:
    """This machine's fp32 matmul rate with torch's current thread count (GFLOP/s, multiply-add = 2 FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    t = timeit(lambda: torch.mm(a, b, out=c), repeat=repeat, warmup=2)
    return 2 * n ** 3 / t / 1e9


def model_flops(model, pixels: torch.Tensor, text: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.infer(pixels, text)
    return int(counter.get_total_flops())


def bench_flops(rows: list, quick: bool) -> None:
    """Achieved FLOP/s of each model's ``infer`` against the attainable rate: a 2048² fp32 matmul, same threads."""
    peak = matmul_gflops(repeat=3 if quick else 5)
    rows.append((f"fp32 matmul 2048x2048, {torch.get_num_threads()} thread(s) (GFLOP/s)", peak, "attainable", ""))
    repeat = 2 if quick else 3
    for name, size in STANDARD:
        try:
            model = build(name)
            pixels, _ = model.prepare(random_image(size, size))
            text = random_text(model, 10)
            flops = model_flops(model, pixels, text)
            with torch.inference_mode():
                t = timeit(lambda: model.infer(pixels, text), repeat=repeat)
            achieved = flops / t / 1e9
            rows.append((f"{name} {size}x{size} infer: achieved (GFLOP/s)", achieved,
                         f"{100 * achieved / peak:.0f}% of matmul", f"{flops / 1e9:.1f} GFLOP in {t:.2f} s"))
            del model
        except Exception as e:  # noqa: BLE001
            rows.append((f"{name} {size}x{size} infer: achieved (GFLOP/s)", float("nan"),
                         f"failed: {fmt_err(e, 50)}", ""))
    peak2 = matmul_gflops(repeat=3)
    rows.append(("fp32 matmul again, after the models (GFLOP/s)", peak2, f"{peak2 / peak:.2f}x of the first",
                 "shows CPU contention"))


# ----------------------------------------------------------------------------------------------- vocabulary


def bench_coldvocab(rows: list, quick: bool) -> None:
    """A new 1,000-name vocabulary: cold (text tower, all templates), then cached in memory, then read from disk."""
    from vocabseg.clip.vocabulary import TextEmbeddingCache, encode_vocabulary, resolve_templates

    n = 1000
    names = class_names(n)
    for name, _ in STANDARD[:2]:
        model = build(name)
        templates = model.config.templates
        n_templates = len(resolve_templates(templates)[1])
        # quick: the big text tower encodes a fifth of the names and is scaled up (the cost is linear in names)
        n_cold = 200 if (quick and name != "default") else n
        with tempfile.TemporaryDirectory() as tmp:
            cache = TextEmbeddingCache(cache_dir=tmp)
            t0 = time.perf_counter()
            encode_vocabulary(model.clip, names[:n_cold], templates=templates, cache=cache)
            cold = (time.perf_counter() - t0) * n / n_cold
            if n_cold < n:
                encode_vocabulary(model.clip, names, templates=templates, cache=cache)
            t_mem = timeit(lambda: encode_vocabulary(model.clip, names, templates=templates, cache=cache),
                           repeat=3, warmup=0)
            t_disk = timeit(lambda: encode_vocabulary(model.clip, names, templates=templates,
                                                      cache=TextEmbeddingCache(cache_dir=tmp)), repeat=3, warmup=0)
        note = f" (from {n_cold})" if n_cold < n else ""
        rows.append((f"{name}: new 1,000-name vocabulary, {n_templates} templates, cold (s)", cold,
                     "", f"{n * n_templates / cold:.0f} prompts/s{note}"))
        rows.append(("  same names, cached in memory (s)", t_mem, f"{t_mem / cold:.5f}x of cold", ""))
        rows.append(("  same names, from the disk cache (fresh cache object) (s)", t_disk,
                     f"{t_disk / cold:.5f}x of cold", ""))
        del model


def bench_size(rows: list, quick: bool) -> None:
    """predict (cached text, 10 names) as the input grows: resize, model at its own resolution, post-processing."""
    from vocabseg.predict import Predictor

    sizes = (256, 512, 1024) if quick else (256, 384, 512, 768, 1024)
    repeat = 1 if quick else 3
    for name, _ in STANDARD[:2]:
        model = build(name)
        predictor = Predictor(model)
        names = [f"class {i}" for i in range(10)]
        text = random_text(model, 10)
        base = None
        for s in sizes:
            rgb = random_image(s, s, seed=s)
            t = timeit(lambda: predictor.predict_array(rgb, names, text), repeat=repeat)
            base = base or t
            rows.append((f"{name} {s}x{s}, 10 names: predict (s)" if s == sizes[0] else f"  {s}x{s} (s)", t,
                         f"{t / base:.2f}x of {sizes[0]}x{sizes[0]}" if s != sizes[0] else "",
                         "input resized to short side {}".format(model.config.short_side) if s == sizes[0] else ""))
        del model, predictor


def bench_vocabsize(rows: list, quick: bool) -> None:
    """predict at the standard size as the vocabulary grows (text cached): classifier + post-processing cost."""
    from vocabseg.predict import Predictor

    counts = (10, 100, 1000) if quick else (10, 30, 100, 300, 1000)
    repeat = 1 if quick else 3
    for name, size in STANDARD[:2]:
        model = build(name)
        predictor = Predictor(model)
        rgb = random_image(size, size, seed=7)
        base = None
        for n in counts:
            names = [f"c{i}" for i in range(n)]
            text = random_text(model, n)
            t = timeit(lambda: predictor.predict_array(rgb, names, text), repeat=repeat)
            base = base or t
            rows.append((f"{name} {size}x{size}, {n} names, cached: predict (s)" if n == counts[0]
                         else f"  {n} names (s)", t, f"{t / base:.2f}x of {counts[0]} names" if n != counts[0] else "",
                         ""))
        del model, predictor


# ----------------------------------------------------------------------------------------------- issue 27 sections

FORCE_BF16 = False  # --bf16-anyway: time SAN-B/16 in bf16 even on a CPU without bf16 units (minutes)
TWENTY_NAMES = [f"{a} {b}" for a, b in zip(
    "red blue green small large old new wooden metal plastic dark bright tall short round square striped spotted "
    "white black".split(),
    "car chair table lamp door window bottle cup plant sign fence bench tree house road wall floor bag box dog".split())]
EXAMPLES = Path(__file__).resolve().parents[1] / "vocabseg" / "examples"


def cpu_bf16_flags() -> str:
    """The CPU's bf16 instructions (avx512_bf16, amx_bf16) as /proc/cpuinfo lists them, and torch's SIMD level."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    found = [f for f in flags if "bf16" in f or f.startswith("amx")]
    return (f"cpu flags: {' '.join(found) or 'no avx512_bf16/amx'}; torch SIMD "
            f"{torch.backends.cpu.get_cpu_capability()}; mkldnn {torch.backends.mkldnn.is_available()}")


def matmul_rate(dtype: torch.dtype, m: int = 1024, k: int = 768, n: int = 3072, repeat: int = 3) -> float:
    """GFLOP/s of an [m, k] x [k, n] product (a ViT-B MLP layer's shape) in ``dtype``."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    t = timeit(lambda: F.linear(a, b), repeat=repeat, warmup=1)
    return 2 * m * k * n / t / 1e9


def _agreement(name: str, images: list) -> tuple[float, float, float]:
    """(pixel label agreement bf16 vs fp32, fp32 s, bf16 s) of a model with its bundled weights, text included."""
    import vocabseg
    from vocabseg.models import get_entry

    task = get_entry(name).task
    m32, m16 = vocabseg.load_model(name), vocabseg.load_model(name, dtype="bf16")
    vocab = "red circle, blue square, green triangle, yellow star, sky, grass, tree, background"
    agree, t32, t16 = [], 0.0, 0.0
    for img in images:
        t0 = time.perf_counter()
        a = m32.refer(img, "the red circle").mask if task == "referring" else m32.predict(img, vocab).labels
        t1 = time.perf_counter()
        b = m16.refer(img, "the red circle").mask if task == "referring" else m16.predict(img, vocab).labels
        t32, t16 = t32 + t1 - t0, t16 + time.perf_counter() - t1
        agree.append(float((a == b).mean()))
    return min(agree), t32, t16


def bench_bf16(rows: list, quick: bool) -> None:
    """bf16 vs fp32: the CPU's matmul rates, SAN-B/16 640 px with cached text, label agreement per family."""
    import vocabseg
    from vocabseg.io import load_image
    from vocabseg.predict import Predictor
    from vocabseg.runtime import cast_model

    r32, r16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    rows.append(("fp32 matmul 1024x768x3072 (GFLOP/s)", r32, "", cpu_bf16_flags()))
    rows.append(("  bf16 matmul, same shape (GFLOP/s)", r16, f"{r16 / r32:.2f}x of fp32", "bf16 pays only if > 1"))
    torch.manual_seed(0)
    model = vocabseg.create_model("san_vit_b_16").eval()
    rgb = random_image(640, 853)
    names = [f"class {i}" for i in range(150)]
    text = random_text(model, 150)
    predictor = Predictor(model)
    t32 = timeit(lambda: predictor.predict_array(rgb, names, text), repeat=1 if quick else 3)
    rows.append(("SAN-B/16 640x853, 150 names, cached text, fp32 predict (s)", t32, "", "random weights"))
    if r16 > r32 or FORCE_BF16:
        ref = predictor.predict_array(rgb, names, text).labels
        cast_model(model, "bf16")
        t16 = timeit(lambda: predictor.predict_array(rgb, names, text), repeat=1 if quick else 3)
        agree = float((predictor.predict_array(rgb, names, text).labels == ref).mean())
        rows.append(("  same in bf16 (s)", t16, f"{t16 / t32:.2f}x of fp32", f"target <= 0.4x; labels agree "
                                                                           f"{100 * agree:.1f} % (random weights)"))
    else:
        rows.append(("  same in bf16: not timed", float("nan"), "this CPU has no fast bf16",
                     "bf16 matmul slower than fp32; --bf16-anyway to time it"))
    images = [load_image(EXAMPLES / "shapes.png"), load_image(EXAMPLES / "world_scene.png")]
    for name in ("default", "segvit_world", "etris_world") + (() if quick else ("lseg_world",)):
        try:
            agree, a32, a16 = _agreement(name, images)
        except Exception as e:  # noqa: BLE001
            rows.append((f"{name}: bf16 agreement failed", float("nan"), fmt_err(e, 50), ""))
            continue
        rows.append((f"{name}: bf16 labels equal to fp32 (% of pixels, worst of 2 images)", 100 * agree,
                     f"bf16 {a16 / a32:.2f}x fp32 time", "target >= 97 %; text encoded in bf16 too"))


def _official_text_work(clip, names: list[str], templates) -> None:
    """What the official SAN code computes for a new vocabulary: each template over all names, 77 tokens each."""
    from vocabseg.clip.tokenizer import tokenize

    with torch.inference_mode():
        for t in templates:
            ids = tokenize([t.replace("{}", n) for n in names])
            x = clip.token_embedding(ids).to(clip.dtype) + clip.positional_embedding.to(clip.dtype)
            x = clip.ln_final(clip.transformer(x, is_causal=True))
            x[torch.arange(len(names)), ids.argmax(-1)] @ clip.text_projection


def _cut_at_eot_only(clip, names: list[str], templates) -> None:
    """Our previous text path: prompts sorted by EOT, batches of 128 cut at their last EOT (no shared prefix)."""
    from vocabseg.clip.tokenizer import tokenize

    ids = tokenize([t.replace("{}", n) for n in names for t in templates])
    order = torch.argsort(ids.argmax(-1), stable=True)
    with torch.inference_mode():
        for s in range(0, len(ids), 128):
            clip.encode_text(ids[order[s:s + 128]])


def bench_text(rows: list, quick: bool) -> None:
    """A new 20-name vocabulary (two words each) with the 14 ViLD templates on SAN-B/16's text tower."""
    import vocabseg
    from vocabseg.clip.vocabulary import VILD_TEMPLATES, encode_vocabulary

    torch.manual_seed(0)
    clip = vocabseg.create_model("san_vit_b_16").eval().clip
    repeat = 1 if quick else 3
    ours = timeit(lambda: encode_vocabulary(clip, TWENTY_NAMES, cache=None), repeat=repeat)
    before = timeit(lambda: _cut_at_eot_only(clip, TWENTY_NAMES, VILD_TEMPLATES), repeat=repeat)
    official = timeit(lambda: _official_text_work(clip, TWENTY_NAMES, VILD_TEMPLATES), repeat=1, warmup=0)
    rows.append(("new 20-name vocabulary, 14 templates, fp32 (s)", ours, f"{ours / official:.3f}x official work",
                 "target <= 0.1x"))
    rows.append(("  previous path (cut at EOT, no shared prefix) (s)", before, f"{before / official:.3f}x", ""))
    rows.append(("  official work: per template, 77 tokens (s)", official, "same run, our tower", ""))
    if matmul_rate(torch.bfloat16) > matmul_rate(torch.float32) or FORCE_BF16:
        from vocabseg.runtime import cast_model

        clip16 = cast_model(clip, "bf16")
        t16 = timeit(lambda: encode_vocabulary(clip16, TWENTY_NAMES, cache=None), repeat=repeat)
        rows.append(("  same vocabulary in bf16 (s)", t16, f"{t16 / official:.3f}x official work", "target <= 0.05x"))


_SPIN = "import time\nend = time.time() + {s}\nwhile time.time() < end:\n    pass\n"


def _under_load(fn, seconds: float = 120.0) -> float:
    """Median time of ``fn`` while another process keeps one core busy."""
    import subprocess

    spin = subprocess.Popen([sys.executable, "-c", _SPIN.format(s=seconds)])
    try:
        time.sleep(0.3)
        return timeit(fn, repeat=3, warmup=1)
    finally:
        spin.kill()
        spin.wait()


def bench_contention(rows: list, quick: bool) -> None:
    """Text encoding and the SAN-B/16 image forward with and without a competing busy process, with the thread
    count pinned (VOCABSEG_THREADS = all threads: the previous behaviour) and adaptive (the default)."""
    import vocabseg
    from vocabseg.clip.vocabulary import encode_vocabulary

    torch.manual_seed(0)
    model = vocabseg.create_model("san_vit_b_16").eval()
    pixels, _ = model.prepare(random_image(640, 640))
    text = random_text(model, 10)
    full = torch.get_num_threads()

    def encode():
        encode_vocabulary(model.clip, TWENTY_NAMES, cache=None)

    def image():
        from vocabseg.runtime import adaptive_threads

        with adaptive_threads(), torch.inference_mode():
            model.infer(pixels, text)

    for mode in (str(full), "auto"):
        os.environ["VOCABSEG_THREADS"] = mode
        for label, fn in (("text, 20 names", encode), ("SAN-B/16 image forward 640", image)):
            quiet = timeit(fn, repeat=1 if quick else 3)
            loaded = _under_load(fn)
            rows.append((f"{label}, threads {mode}: with a busy process (s)", loaded,
                         f"{loaded / quiet:.2f}x of without ({quiet:.2f} s)", "text target: no worse than image"))
    os.environ.pop("VOCABSEG_THREADS", None)


def _wall(cmd: list[str], env: dict) -> float:
    import subprocess

    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_startup(rows: list, quick: bool) -> None:
    """Wall time of `vocabseg segment shapes.png` (first run: empty text cache; cached) vs `import torch`."""
    root = Path(__file__).resolve().parents[1]
    repeat = 2 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(root)}
        seg = [sys.executable, "-m", "vocabseg", "segment", str(EXAMPLES / "shapes.png"), "--vocab",
               "red circle, blue square, background", "-o", str(Path(tmp) / "out")]
        times: dict[str, list[float]] = {"torch": [], "vocabseg": [], "first": [], "cached": []}
        for i in range(repeat):  # interleaved, so load changes hit every command alike
            times["torch"].append(_wall([sys.executable, "-c", "import torch"], env))
            times["vocabseg"].append(_wall([sys.executable, "-c", "import vocabseg"], env))
            cold = {**env, "VOCABSEG_CACHE": str(Path(tmp) / f"cache{i}")}
            times["first"].append(_wall(seg, cold))
            times["cached"].append(_wall(seg, cold))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows.append(("python -c 'import torch' (s, median)", med["torch"], "", f"{repeat} runs interleaved"))
    rows.append(("  python -c 'import vocabseg' (s)", med["vocabseg"], f"{med['vocabseg'] / med['torch']:.2f}x torch", ""))
    rows.append(("  vocabseg segment shapes.png, cached text (s)", med["cached"],
                 f"{med['cached'] / med['torch']:.2f}x torch", "target <= 1.5x"))
    rows.append(("  vocabseg segment shapes.png, first run (s)", med["first"],
                 f"{med['first'] / med['torch']:.2f}x torch", "target <= 2.5x"))


_MEM_PREDICT = """
import sys, warnings; warnings.simplefilter('ignore'); sys.path.insert(0, {root!r})
import numpy as np, vocabseg
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) / 1024
before = rss(); open('/proc/self/clear_refs', 'w').write('5')
m = vocabseg.load_model('san_vit_b_16', checkpoint={path!r})
if {mode!r} == 'load':
    print(hwm() - before)
else:
    rgb = np.random.default_rng(0).integers(0, 256, (640, 853, 3), dtype=np.uint8)
    vocabseg.Predictor(m).predict(rgb, ['class %d' % i for i in range(150)])
    print(hwm())
"""


def bench_memory(rows: list, quick: bool) -> None:
    """Peak RSS of a process that loads SAN-B/16 and predicts one 640 px image with a new 150-name vocabulary
    (the user's path: text encoded, nothing cached), next to the official code's; peak RSS growth while loading."""
    import subprocess

    import vocabseg
    from safetensors.torch import save_file

    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "san.safetensors"
        torch.manual_seed(0)
        model = vocabseg.create_model("san_vit_b_16")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        del model
        size = path.stat().st_size / 2 ** 20
        env = {**os.environ, "VOCABSEG_CACHE": str(Path(tmp) / "cache")}
        peaks = {}
        for mode in ("predict", "load"):
            out = subprocess.run([sys.executable, "-c", _MEM_PREDICT.format(root=root, mode=mode, path=str(path))],
                                 capture_output=True, text=True, check=True, env=env)
            peaks[mode] = float(out.stdout.split()[-1])
    rows.append(("SAN-B/16 load + predict 640x853, new 150-name vocabulary: peak RSS (MB)", peaks["predict"],
                 f"{peaks['predict'] / REF_SAN_PREDICT_PEAK_MB:.2f}x official",
                 f"official {REF_SAN_PREDICT_PEAK_MB:.0f} MB (ref, this machine); target <= 1x"))
    rows.append(("  load_model from a safetensors file: peak RSS growth (MB)", peaks["load"],
                 f"{peaks['load'] / size:.2f}x the file ({size:.0f} MB)", "target <= 1.3x"))


def bench_pipeline(rows: list, quick: bool) -> None:
    """`vocabseg segment FOLDER` (segment_folder): pipelined vs the plain loop vs bare predict, same images."""
    import vocabseg
    from PIL import Image

    from vocabseg.folder import segment_folder
    from vocabseg.io import list_images, load_image

    n = 12 if quick else 100
    names = [s.strip() for s in "red circle, blue square, green star, sky, grass, water, sand, wall, road, "
                                "background".split(",")]
    model = vocabseg.load_model()
    predictor = vocabseg.Predictor(model)
    text = predictor.text_embeddings(names)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        for i in range(n):
            Image.fromarray(random_image(480, 640, seed=i)).save(tmp / "in" / f"{i:03d}.jpg", quality=90)
        files = list_images(tmp / "in")
        segment_folder(predictor, files[:2], names, text, tmp / "warm")
        res = {}
        for label, pipelined in (("loop", False), ("pipelined", True), ("loop2", False), ("pipelined2", True)):
            t0 = time.perf_counter()
            segment_folder(predictor, files, names, text, tmp / label, pipelined=pipelined)
            res[label] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for path in files:
            predictor.predict_array(load_image(path), names, text)
        bare = time.perf_counter() - t0
    loop, pipe = min(res["loop"], res["loop2"]), min(res["pipelined"], res["pipelined2"])
    rows.append((f"folder, default model, {n} images 640x480, pipelined (images/s)", n / pipe,
                 f"{loop / pipe:.2f}x the plain loop", "decode/write beside the model"))
    rows.append(("  plain loop, same outputs (images/s)", n / loop, "", ""))
    rows.append(("  decode + predict only, no outputs (images/s)", n / bare, "", ""))


def _onnx_worker(name: str, size: int, repeat: int, threads: int) -> dict:
    """Fresh process: infer of ``name`` in torch fp32, torch bf16 and onnxruntime (exported fp32), both runtimes
    with the thread count ``predict`` would use now (the cores other processes leave free)."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    from vocabseg.runtime import available_threads, cast_model

    threads = available_threads()
    torch.set_num_threads(threads)

    model = build(name)
    pixels, _ = model.prepare(random_image(size, size))
    text = random_text(model, 10)
    res: dict = {"threads": threads}
    with torch.inference_mode():
        res["fp32"] = timeit(lambda: model.infer(pixels, text), repeat=repeat)
    try:
        import onnxruntime as ort

        from vocabseg.export import export_image_model

        with tempfile.TemporaryDirectory() as tmp:
            path = export_image_model(model, Path(tmp) / "image.onnx")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            inputs = [i.name for i in session.get_inputs()]
            feed = {k: v for k, v in {"pixels": pixels.numpy(), "text_embeddings": text.numpy()}.items()
                    if k in inputs}
            res["ort"] = timeit(lambda: session.run(None, feed), repeat=repeat)
    except Exception as e:  # noqa: BLE001
        res["ort_error"] = fmt_err(e, 50)
    if matmul_rate(torch.bfloat16) > matmul_rate(torch.float32) or FORCE_BF16 or name == "default":
        cast_model(model, "bf16")
        with torch.inference_mode():
            p16, t16 = pixels.to(torch.bfloat16), text.to(torch.bfloat16)
            res["bf16"] = timeit(lambda: model.infer(p16, t16), repeat=repeat)
    return res


def bench_onnx(rows: list, quick: bool) -> None:
    """onnxruntime vs torch fp32 vs torch bf16 for the exported default and SAN-B/16 (``infer``, cached text)."""
    ctx = multiprocessing.get_context("spawn")
    for name, size in (("default", 512), ("san_vit_b_16", 640)):
        try:
            with futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                r = pool.submit(_onnx_worker, name, size, 2 if quick else 3, torch.get_num_threads()).result()
        except Exception as e:  # noqa: BLE001
            rows.append((f"{name}: onnx comparison failed", float("nan"), fmt_err(e, 50), ""))
            continue
        rows.append((f"{name} {size}x{size}, 10 names: torch fp32 infer (s)", r["fp32"], "",
                     f"{r['threads']} thread(s) for both runtimes"))
        if "ort" in r:
            rows.append(("  onnxruntime fp32 (s)", r["ort"], f"{r['ort'] / r['fp32']:.2f}x torch fp32", ""))
        else:
            rows.append(("  onnxruntime: failed", float("nan"), r["ort_error"], ""))
        if "bf16" in r:
            rows.append(("  torch bf16 (s)", r["bf16"], f"{r['bf16'] / r['fp32']:.2f}x torch fp32", ""))
        else:
            rows.append(("  torch bf16: not timed", float("nan"), "no fast bf16 on this CPU", ""))


SECTIONS = {"san": bench_san, "vocab": bench_vocab, "scale": bench_scale, "default": bench_default,
            "models": bench_models, "folder": bench_folder, "compile": bench_compile, "flops": bench_flops,
            "coldvocab": bench_coldvocab, "size": bench_size, "vocabsize": bench_vocabsize,
            "bf16": bench_bf16, "text": bench_text, "contention": bench_contention, "startup": bench_startup,
            "memory": bench_memory, "pipeline": bench_pipeline, "onnx": bench_onnx}


def _json_value(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _write_json(path: Path, info: str, quick: bool, sections: list, load: list, rows: list, complete: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "info": info, "quick": quick, "sections": sections, "complete": complete, "loadavg": load,
        "cpus": os.cpu_count(),
        "rows": [{"what": r[0], "value": _json_value(r[1]), "ratio": r[2], "target": r[3]} for r in rows]},
        indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SECTIONS), action="append")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller vocabularies (extrapolated)")
    parser.add_argument("--json", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--bf16-anyway", action="store_true",
                        help="time SAN-B/16 in bf16 even where bf16 matmuls are slower than fp32 (minutes)")
    args = parser.parse_args()
    global FORCE_BF16
    FORCE_BF16 = args.bf16_anyway
    os.environ.setdefault("VOCABSEG_CACHE", str(Path("/tmp/vocabseg-bench-cache")))
    warnings.filterwarnings("ignore", message=".*randomly initialised.*")
    info = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    sections = args.only or list(SECTIONS)
    load = [os.getloadavg()[0]]
    t_start = time.perf_counter()
    rows: list = []
    for name in sections:
        t0 = time.perf_counter()
        SECTIONS[name](rows, args.quick)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        _write_json(args.json, info, args.quick, sections, load, rows, complete=False)  # a killed run keeps these
    load.append(os.getloadavg()[0])
    print(f"vocabseg benchmark ({info})")
    width = max(len(r[0]) for r in rows)
    for label, value, ratio, target in rows:
        print(f"{label:<{width}}  {value:10.3f}  {ratio:<28} {target}")
    print(f"load average {load[0]:.2f} before, {load[1]:.2f} after; {os.cpu_count()} CPUs; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    _write_json(args.json, info, args.quick, sections, load, rows, complete=True)


if __name__ == "__main__":
    main()
