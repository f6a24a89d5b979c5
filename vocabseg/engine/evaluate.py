"""Semantic-segmentation evaluation over a dataset, through the same Predictor path users run.

Each image goes through ``Predictor.predict_array`` (the model's own resize policy, whole image, labels at the
input resolution) with the dataset's class names as vocabulary; predictions and ground truth feed one
:class:`~vocabseg.metrics.ConfusionMatrix` with the dataset's ``ignore_index``. Under torchrun every process
takes every ``world_size``-th image and the matrices are summed, so the numbers equal a single-process run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..metrics import ConfusionMatrix
from . import distributed as du

__all__ = ["evaluate", "write_metrics_json", "metrics_from_confusion"]


def _to_hwc_uint8(image: Any) -> np.ndarray:
    """A dataset image (uint8 [3, H, W] tensor, or H×W×3 array) as a contiguous H×W×3 uint8 array."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.permute(1, 2, 0)
        image = image.numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [3, H, W] or [H, W, 3], got shape {arr.shape}")
    return np.ascontiguousarray(arr.astype(np.uint8, copy=False))


def _to_label(label: Any) -> np.ndarray:
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    return np.asarray(label)


def metrics_from_confusion(cm: ConfusionMatrix, class_names: Sequence[str], num_images: int) -> dict[str, Any]:
    """``ConfusionMatrix.compute()`` with per-class values keyed by class name (ordered as the classes)."""
    res = cm.compute()
    names = [str(n) for n in class_names]
    return {
        "mIoU": res["mIoU"],
        "fwIoU": res["fwIoU"],
        "mACC": res["mACC"],
        "pACC": res["pACC"],
        "IoU": dict(zip(names, res["IoU"])),
        "ACC": dict(zip(names, res["ACC"])),
        "num_images": int(num_images),
        "num_classes": len(names),
    }


def _progress_enabled(progress: bool) -> bool:
    return bool(progress) and du.is_main_process() and sys.stdout.isatty()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, max_images: int | None = None, progress: bool = True,
             text_embeddings: torch.Tensor | None = None) -> dict[str, Any]:
    """mIoU, fwIoU, mACC, pACC (percent) and per-class IoU/ACC of ``model`` on ``dataset``.

    ``dataset`` items are ``{"image": uint8 [3,H,W], "label": int [H,W], ...}`` and the dataset has
    ``class_names`` and ``ignore_index``. ``max_images`` evaluates the first N images only. ``text_embeddings``
    (of the class names) skips re-encoding when the caller already has them. A DDP-wrapped model is unwrapped;
    its training mode is restored afterwards.
    """
    from ..predict import Predictor

    core = du.unwrap_model(model)
    was_training = core.training
    names = [str(n) for n in dataset.class_names]
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    rank, world = du.get_rank(), du.get_world_size()
    cm = ConfusionMatrix(len(names), getattr(dataset, "ignore_index", 255))
    try:
        predictor = Predictor(core)  # puts the model in eval mode
        text = text_embeddings if text_embeddings is not None else core.text_embeddings(names)
        indices = range(rank, n, world)
        bar = None
        if _progress_enabled(progress):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            bar.start()
            task = bar.add_task("eval", total=len(indices))
        try:
            for i in indices:
                item = dataset[i]
                seg = predictor.predict_array(_to_hwc_uint8(item["image"]), names, text)
                cm.update(seg.labels, _to_label(item["label"]))
                if bar is not None:
                    bar.advance(task)
        finally:
            if bar is not None:
                bar.stop()
    finally:
        core.train(was_training)
    if du.is_distributed():
        total = du.all_reduce_sum(torch.from_numpy(cm.matrix))
        cm.matrix = total.numpy().astype(np.int64)
    return metrics_from_confusion(cm, names, n)


def _json_safe(value: Any) -> Any:
    """NaN/inf -> null (JSON has no NaN), numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics_json(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write metrics as indented JSON (NaN as null), atomically."""
    from .checkpoint import atomic_write_text

    text = json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)
