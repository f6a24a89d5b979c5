"""The ``vocabseg`` command line: parse, call the library, report. No logic of its own.

A :class:`vocabseg.errors.UserError` is printed as one line and exits with status 1; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import UserError, VocabularyError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Open-vocabulary image segmentation on a frozen CLIP.")
console = Console(stderr=True, soft_wrap=True)  # soft wrap: an error stays one line


def _read_vocabulary(vocab: Optional[str], vocab_file: Optional[Path]) -> list[str]:
    from .clip.vocabulary import parse_vocabulary

    if vocab and vocab_file:
        raise VocabularyError("give either --vocab or --vocab-file, not both")
    if vocab_file is not None:
        if not vocab_file.is_file():
            raise VocabularyError(f"vocabulary file {vocab_file} does not exist")
        return parse_vocabulary(vocab_file.read_text(encoding="utf-8"))
    if not vocab:
        raise VocabularyError("the vocabulary is empty: pass --vocab \"cat, dog, grass\" or --vocab-file names.txt")
    return parse_vocabulary(vocab)


PRECISION_HELP = "fp32 (default, exact) or bf16 (half the weight memory; faster only on CPUs with bf16 units)."


def _load(model: Optional[str], checkpoint: Optional[Path], clip: Optional[Path], device: str, trust_jit: bool,
          precision: str = "fp32"):
    from .models import load_model
    from .runtime import resolve_dtype

    dtype = resolve_dtype(precision)  # a mistyped precision fails before the weights are read

    for label, path in (("checkpoint", checkpoint), ("CLIP weights", clip)):
        if path is not None and not Path(path).exists():
            raise UserError(f"{label} file {path} does not exist")
    return load_model(model, checkpoint=checkpoint, clip=clip, device=device, trust_jit=trust_jit, dtype=dtype)


@app.command()
def segment(
    inputs: Path = typer.Argument(..., help="An image file or a folder of images."),
    vocab: Optional[str] = typer.Option(None, "--vocab", "-v", help='Class names, comma separated: "cat, dog, grass".'),
    vocab_file: Optional[Path] = typer.Option(None, "--vocab-file", help="A text file with one class name per line."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registered model name (default: the embedded model)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Weights file of that model."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="Separate CLIP weights (OpenAI .pt / open_clip file)."),
    out: Path = typer.Option(Path("vocabseg_out"), "--out", "-o", help="Output folder."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    skip_existing: bool = typer.Option(False, help="Skip images whose outputs already exist (resume a folder run)."),
    trust_jit: bool = typer.Option(False, help="Allow loading TorchScript checkpoints (runs code from the file)."),
    backend: str = typer.Option("torch", "--backend", help="torch, or onnx (with --onnx DIR from `vocabseg export`)."),
    onnx_dir: Optional[Path] = typer.Option(None, "--onnx", help="Folder written by `vocabseg export`."),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
) -> None:
    """Segment images with any vocabulary; writes a label PNG, an overlay with legend and a JSON per image."""
    from rich.progress import Progress

    from .folder import segment_folder
    from .io import list_images
    from .predict import Predictor

    names = _read_vocabulary(vocab, vocab_file)
    files = list_images(inputs)
    if not files:
        raise UserError(f"no images found in {inputs}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    files = files[rank::world]  # under torchrun each process takes its share of the files
    if backend == "onnx":
        from .export import load_onnx_segmenter

        if onnx_dir is None:
            raise UserError("--backend onnx needs --onnx DIR (a folder written by `vocabseg export`)")
        predictor = load_onnx_segmenter(onnx_dir)
        model_name = predictor.model_name
    elif backend == "torch":
        net = _load(model, checkpoint, clip, device, trust_jit, precision)
        predictor = Predictor(net)
        model_name = getattr(net, "model_name", model)
    else:
        raise UserError(f"unknown backend {backend!r}; use torch or onnx")
    text = predictor.text_embeddings(names)  # once for the whole folder
    with Progress(console=console, disable=len(files) < 2 or not sys.stderr.isatty()) as progress:
        task = progress.add_task("segmenting", total=len(files))
        report = segment_folder(predictor, files, names, text, out, skip_existing=skip_existing,
                                summary={"model": model_name, "backend": backend},
                                on_image=lambda: progress.advance(task))
    for path, msg in report.failed:
        console.print(f"[yellow]skipped[/yellow] {path}: {msg}")
    console.print(f"wrote {report.done} result(s) to {out}"
                  + (f"; {len(report.failed)} image(s) could not be read" if report.failed else ""))
    if report.failed and report.done == 0:
        raise typer.Exit(1)


def _atomic_write_text(path: Path, text: str) -> None:
    from .folder import atomic_write_text

    atomic_write_text(path, text)


def _atomic_save_image(image, path: Path) -> None:
    from .folder import atomic_save_image

    atomic_save_image(image, path)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    model: List[str] = typer.Option([], "--model", "-m",
                                    help="A registered model (repeatable: the page compares them; first = default)."),
    checkpoint: List[str] = typer.Option([], "--checkpoint", "-c",
                                         help="Weights: PATH for one model, NAME=PATH with several (repeatable)."),
    clip: Optional[Path] = typer.Option(None, "--clip"),
    device: str = typer.Option("cpu"),
    trust_jit: bool = typer.Option(False),
    backend: str = typer.Option("torch", "--backend", help="torch, or onnx (with --onnx DIR)"),
    onnx_dir: Optional[Path] = typer.Option(None, "--onnx"),
    max_upload_mb: float = typer.Option(20, "--max-upload-mb"),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels"),
    max_vocabulary: int = typer.Option(1000, "--max-vocabulary"),
    root_path: str = typer.Option("", "--root-path", help="Prefix when served behind a proxy."),
    forwarded_allow_ips: Optional[str] = typer.Option(None, "--forwarded-allow-ips"),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
) -> None:
    """Serve a model over HTTP: JSON/PNG API and a web page (docs/serving.md)."""
    from .compare import parse_checkpoint_pairs
    from .serve import serve as run

    models = model or [None]
    if len(checkpoint) == 1 and "=" not in checkpoint[0]:
        weights: object = Path(checkpoint[0])  # one model, one plain path (as before)
    else:
        weights = parse_checkpoint_pairs(checkpoint) if checkpoint else None
    run(host, port, models if len(models) > 1 else models[0], weights, clip, backend, onnx_dir=onnx_dir,
        device=device, trust_jit=trust_jit,
        max_upload_bytes=int(max_upload_mb * 2 ** 20), max_pixels=max_pixels, max_vocabulary=max_vocabulary,
        root_path=root_path, forwarded_allow_ips=forwarded_allow_ips, precision=precision)


@app.command("compare")
def compare_cmd(
    image: Path = typer.Argument(..., help="The image to segment with every model."),
    vocab: Optional[str] = typer.Option(None, "--vocab", "-v", help='Class names, comma separated: "cat, dog, grass".'),
    vocab_file: Optional[Path] = typer.Option(None, "--vocab-file", help="A text file with one class name per line."),
    models: str = typer.Option("default,segvit_world,lseg_world", "--models", "-m",
                               help="Comma-separated registered model names."),
    checkpoint: List[str] = typer.Option([], "--checkpoint", "-c", help="NAME=PATH weights of a compared model (repeatable)."),
    sentence: Optional[str] = typer.Option(None, "--sentence", "-s", help="What referring models (ETRIS) segment."),
    out: Path = typer.Option(Path("compare.png"), "--out", "-o", help="The picture to write."),
    panel_width: int = typer.Option(384, help="Width of each panel in pixels."),
) -> None:
    """One picture: the input and each model's overlay, same colours for the same names, timed."""
    from .compare import compare, parse_checkpoint_pairs

    names = [m.strip() for m in models.split(",") if m.strip()]
    words = _read_vocabulary(vocab, vocab_file) if (vocab or vocab_file) else []
    picture = compare(image, words, names, checkpoints=parse_checkpoint_pairs(checkpoint), sentence=sentence,
                      panel_width=panel_width)
    _atomic_save_image(picture, out)
    console.print(f"wrote {out} ({len(names)} models)")


@app.command("models")
def models_cmd(all: bool = typer.Option(False, "--all", help="Include tiny test configs.")) -> None:
    """List registered models."""
    from rich.table import Table

    from .models import get_entry, list_models

    table = Table("name", "family", "weights", "description")
    for name in list_models(include_test=all):
        e = get_entry(name)
        table.add_row(name, e.family, "bundled" if e.weights else "-", e.description)
    Console().print(table)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML training config of any family (see configs/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. max_iters=100"),
    resume: bool = typer.Option(False, "--resume", help="Require a checkpoint in the output dir to continue from "
                                "(by default a run continues when there is one)."),
) -> None:
    """Train any model: segmentation (SAN, SegViT, LSeg, CLIMS), referring (ETRIS), GroupViT or CLIP/LiT; the
    config's `family:` key or its contents say which. Rerun the same command to resume. Works under torchrun."""
    _train(config, overrides, None, resume)


def _train(config: Path, overrides: Optional[List[str]], family: Optional[str], resume: bool = False) -> None:
    from .engine.config import load_family
    from .engine.loop import run_family

    fam = load_family(config, list(overrides or []), family)
    if resume:
        fam.config.resume = True
    result = run_family(fam, log=lambda line: console.print(line, markup=False, highlight=False))
    if result.get("final_weights"):
        console.print(f"wrote {result['final_weights']}")


@app.command()
def plot(
    runs: List[Path] = typer.Argument(..., help="Training run folders (each holds metrics.jsonl)."),
    out: Path = typer.Option(Path("curves.png"), "--out", "-o", help="Picture to write (.png, .svg, .pdf)."),
    title: Optional[str] = typer.Option(None, "--title"),
) -> None:
    """Draw loss terms, learning rate and evaluation metrics against the step, the runs overlaid (needs matplotlib:
    pip install 'vocabseg[plot]')."""
    from .engine.plot import plot_runs

    console.print(f"wrote {plot_runs(runs, out, title)}")


@app.command("export")
def export_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registered model name (default: embedded)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c"),
    clip: Optional[Path] = typer.Option(None, "--clip"),
    out: Path = typer.Option(Path("vocabseg_onnx"), "--out", "-o", help="Output folder."),
    opset: int = typer.Option(17, "--opset"),
    exporter: str = typer.Option("torchscript", "--exporter", help="torchscript or dynamo"),
) -> None:
    """Export to ONNX: the image model with text embeddings as an input (any vocabulary), the text encoder."""
    from .export import export_command

    export_command(model, checkpoint, clip, out, opset=opset, exporter=exporter)
    console.print(f"wrote {out}")


@app.command()
def refer(
    image: Path = typer.Argument(..., help="An image file."),
    sentence: str = typer.Argument(..., help='What to find, e.g. "the man in the red shirt".'),
    out: Path = typer.Option(Path("vocabseg_out"), "--out", "-o"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A referring model (default: the one the "
                                        "checkpoint's model_final.json names, else etris_vit_b_16 with a "
                                        "checkpoint, else the bundled etris_world)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c"),
    clip: Optional[Path] = typer.Option(None, "--clip"),
    threshold: Optional[float] = typer.Option(None, help="Mask threshold (default: the model's, 0.35)."),
    device: str = typer.Option("cpu"),
    trust_jit: bool = typer.Option(False),
) -> None:
    """Referring segmentation: one sentence in, one mask out (mask PNG + overlay)."""
    from .models.etris import refer_command

    result = refer_command(image, sentence, out, model_name=model, checkpoint=checkpoint, clip=clip, device=device,
                           threshold=threshold, trust_jit=trust_jit)
    console.print(result)


@app.command("train-referring")
def train_referring_cmd(
    config: Path = typer.Argument(..., help="YAML referring config (configs/etris_*.yaml)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
) -> None:
    """Train a referring model (ETRIS); `vocabseg train` for referring configs only. Resumable."""
    _train(config, overrides, "referring")


@app.command("eval-referring")
def eval_referring_cmd(
    config: Path = typer.Argument(..., help="The YAML config the weights were trained with (for a release file: "
                                  "one naming its model, e.g. etris_vit_b_16, and the RefCOCO data)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="model_final.safetensors of that run, or an "
                                    "official ETRIS best_model.pth."),
    threshold: Optional[List[float]] = typer.Option(None, "--threshold", "-t",
                                                    help="Mask threshold(s) to score (default: the model's)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides (e.g. val_max_items=100)"),
) -> None:
    """Score a trained referring model on its config's validation splits (mIoU, oIoU, Prec@X), with the baseline."""
    from rich.table import Table

    from .engine.referring import evaluate_referring_checkpoint

    results = evaluate_referring_checkpoint(config, checkpoint, threshold or [None], list(overrides or []))
    table = Table("split @ threshold", "mIoU", "oIoU", "Prec@0.5", "Prec@0.7", "Prec@0.9", "object acc", "items")
    for name, r in results.items():
        table.add_row(name, *(f"{r[k]:.1f}" for k in ("mIoU", "oIoU", "Prec@0.5", "Prec@0.7", "Prec@0.9")),
                      f"{r['object_acc']:.1f}" if "object_acc" in r else "-", str(int(r["num_items"])))
    table.columns[0].no_wrap = True
    console.print(table)
    kinds = sorted({k.split("/", 1)[1] for r in results.values() for k in r if k.startswith("mIoU/")})
    if kinds:  # mIoU per expression kind (attribute, relation, ...), with each kind's item count
        by_kind = Table("split @ threshold", *kinds, title="mIoU by expression kind (items)")
        for name, r in results.items():
            by_kind.add_row(name, *(f"{r[f'mIoU/{k}']:.1f} ({int(r[f'items/{k}'])})" if f"mIoU/{k}" in r else "-"
                                    for k in kinds))
        by_kind.columns[0].no_wrap = True
        console.print(by_kind)


@app.command()
def cams(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (custom-dataset layout + cams/)."),
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c"),
    clip: Optional[Path] = typer.Option(None, "--clip"),
    dataset: str = typer.Option("custom", help="custom (with --root) or world"),
    root: Optional[Path] = typer.Option(None, "--root"),
    split: str = typer.Option("train"),
    threshold: Optional[float] = typer.Option(None),
    background: str = typer.Option("background", help='Name of the background class, or "none".'),
    scales: str = typer.Option("1,0.5,1.5,2"),
    max_images: Optional[int] = typer.Option(None),
    world_samples: int = typer.Option(100, help="--dataset world: how many generated scenes"),
    world_seed: int = typer.Option(0, help="--dataset world: scene seed (training used 0; held-out: any other)"),
    world_objects: Optional[str] = typer.Option(None, help='--dataset world: object classes, e.g. "red shape, '
                                                'blue shape" (default: the classes the checkpoint learnt)'),
    true_labels: bool = typer.Option(False, "--true-labels", help="Write the data set's own label maps instead "
                                     "(same classes as the pseudo-masks: a reference to score a model trained on "
                                     "them)"),
    images: Optional[Path] = typer.Option(None, "--images", help="A folder of images instead of a data set "
                                          "(released CLIMS networks: --model clims_resnet50_voc / _coco)"),
    classes: Optional[str] = typer.Option(None, "--classes", help='Release: the CAM classes, e.g. "bird, car" '
                                          "(default: all of the release's)"),
    image_labels: Optional[Path] = typer.Option(None, "--image-labels", help='Release with --images: JSON '
                                                '{"image stem": ["class", ...]} (default: every class everywhere)'),
    device: str = typer.Option("cpu"),
) -> None:
    """Write CLIMS class activation maps and thresholded pseudo-masks for a data set (or, for a released CLIMS
    network, a folder of images), and their mIoU."""
    from .engine.cams import cams_command

    cams_command(out, model=model, checkpoint=str(checkpoint) if checkpoint else None,
                 clip=str(clip) if clip else None, dataset=dataset, data_root=str(root) if root else None,
                 split=split, threshold=threshold, background=None if background == "none" else background,
                 scales=scales, max_images=max_images, world_samples=world_samples, world_seed=world_seed,
                 world_objects=[w.strip() for w in world_objects.split(",") if w.strip()] if world_objects else None,
                 true_labels=true_labels, device=device, log=lambda line: console.print(line),
                 images=images, classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
                 image_labels=image_labels)


@app.command("cams-sweep")
def cams_sweep_cmd(
    cams_dir: Path = typer.Argument(..., help="A `vocabseg cams` output folder (with its saved cams/)."),
    reference: Path = typer.Option(..., "--reference", "-r", help="Folder with the true label maps in the same "
                                   "class layout (e.g. `vocabseg cams --true-labels`)."),
    threshold: Optional[List[float]] = typer.Option(None, "--threshold", "-t", help="Thresholds to score "
                                                    "(default 0.05 ... 0.9)."),
    max_images: Optional[int] = typer.Option(None, help="Score only the first N images of cams.jsonl."),
) -> None:
    """Score saved CAMs at several background thresholds against true label maps, without rerunning the model."""
    from rich.table import Table

    from .engine.cams import SWEEP_THRESHOLDS, sweep_cam_thresholds

    results = sweep_cam_thresholds(cams_dir, reference, threshold or SWEEP_THRESHOLDS, max_images)
    best = max(results, key=lambda t: results[t]["mIoU"])
    table = Table("threshold", "mIoU", "pACC", "IoU of class 0")
    for t, r in results.items():
        table.add_row(f"{t:g}" + (" (best)" if t == best else ""), f"{r['mIoU']:.1f}", f"{r['pACC']:.1f}",
                      f"{r['IoU'][0]:.1f}")
    console.print(table)


@app.command("train-groupvit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_groupvit_cmd(ctx: typer.Context, config: Path = typer.Argument(...)) -> None:
    """Train GroupViT on the generated world's captions (`vocabseg train` for GroupViT configs only); key=value
    overrides follow the config; --eval-only scores the finished run again."""
    if "--eval-only" in ctx.args:
        from .engine.groupvit_train import main as groupvit_main

        raise typer.Exit(groupvit_main([str(config), *ctx.args]))
    _train(config, ctx.args, "groupvit")


@app.command("train-clip")
def train_clip_cmd(
    config: Path = typer.Argument(..., help="YAML of vocabseg.engine.contrastive.ContrastiveConfig fields."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
) -> None:
    """Train a small CLIP contrastively on the generated world (stage 1 of the embedded default); `vocabseg train`
    for CLIP configs only. Rerun to resume."""
    _train(config, overrides, "clip")


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c"),
    clip: Optional[Path] = typer.Option(None, "--clip"),
    dataset: str = typer.Option(..., "--dataset", "-d", help="ade150, ade847, coco_stuff171, pascal_context59, "
                                                              "pascal_context459, voc20 or custom"),
    root: Path = typer.Option(..., "--root", help="Dataset folder."),
    split: str = typer.Option("val", "--split"),
    max_images: Optional[int] = typer.Option(None, "--max-images"),
    out: Optional[Path] = typer.Option(None, "--out", help="Write metrics JSON here."),
    device: str = typer.Option("cpu"),
    trust_jit: bool = typer.Option(False),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
) -> None:
    """Evaluate on a benchmark: mIoU, fwIoU, mACC, pACC and per-class IoU/ACC."""
    from .data import build_dataset
    from .engine import evaluate, write_metrics_json

    net = _load(model, checkpoint, clip, device, trust_jit, precision)
    ds = build_dataset(dataset, root, split=split)
    metrics = evaluate(net, ds, max_images=max_images)
    Console().print({k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)})
    if out is not None:
        write_metrics_json(metrics, out)


def main() -> None:
    """Run the app. Click reports mistyped command lines itself (short usage message, exit 2); our own
    :class:`UserError` is printed as one line (exit 1); anything else is a bug and keeps its traceback."""
    try:
        app(standalone_mode=True)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
