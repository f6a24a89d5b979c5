"""Training curves from run folders: ``vocabseg plot RUN_DIR [RUN_DIR ...] --out curves.png``.

One panel per loss term, the learning rate and each evaluation metric, against the step; several runs overlay in
one colour each, named by their folder. Reads only ``metrics.jsonl``, so it works on a run that is still going.
matplotlib is an optional extra (``pip install 'vocabseg[plot]'``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError

__all__ = ["plot_runs", "curve_keys"]

_SKIP_TRAIN = {"type", "iter", "step", "time", "data_time", "sec_per_step", "img_per_s"}  # wall clock: not curves
_AUX = re.compile(r"_\d+$")  # deep-supervision copies of a loss (loss_ce_0 ...): one panel for the final layer only
_EVAL_PRIORITY = ("mIoU", "oIoU", "acc", "pACC", "Prec@0.5")
MAX_EVAL_PANELS = 8


def _read(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from .loop import METRICS_LOG, read_log

    path = run / METRICS_LOG
    if not path.is_file():
        raise UserError(f"{path} does not exist: give training run folders (they hold metrics.jsonl)")
    rows = read_log(path)
    step = lambda r: r.get("iter", r.get("step"))  # noqa: E731  (older CLIP/GroupViT logs say "step")
    train = [r for r in rows if r.get("type", "train") == "train" and "split" not in r and step(r) is not None]
    evals = [r for r in rows if r.get("type") == "eval" and step(r) is not None]
    for r in train + evals:
        r["iter"] = step(r)
    return train, evals


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_keys(train: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(train keys, eval keys) that get a panel: losses first (total first), then lr and grad_norm; eval metrics
    with mIoU-like ones first, counts (``num_*``, ``items/*``) left out."""
    seen: dict[str, None] = {}
    for r in train:
        for k, v in r.items():
            if k not in _SKIP_TRAIN and _numeric(v) and not _AUX.search(k):
                seen.setdefault(k)
    losses = sorted((k for k in seen if "loss" in k), key=lambda k: (k not in ("total_loss", "loss"), k))
    others = [k for k in ("lr", "grad_norm") if k in seen] + sorted(k for k in seen if k not in losses
                                                                      and k not in ("lr", "grad_norm"))
    metrics: dict[str, None] = {}
    for r in evals:
        for k, v in r.items():
            if k not in _SKIP_TRAIN and _numeric(v) and not k.startswith(("num_", "items/")):
                metrics.setdefault(k)
    rank = lambda k: next((i for i, p in enumerate(_EVAL_PRIORITY) if p.lower() in k.lower()), len(_EVAL_PRIORITY))  # noqa: E731
    eval_keys = sorted(metrics, key=lambda k: (rank(k), list(metrics).index(k)))[:MAX_EVAL_PANELS]
    return losses + others, eval_keys


def plot_runs(runs: Sequence[str | os.PathLike], out: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the curves of ``runs`` into ``out`` (PNG, or any format matplotlib knows by the suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'vocabseg[plot]' (or pip install matplotlib)") from None
    if not runs:
        raise UserError("give at least one run folder to plot")
    folders = [Path(r) for r in runs]
    data = [_read(f) for f in folders]
    names = _names(folders)
    train_keys: dict[str, None] = {}
    eval_keys: dict[str, None] = {}
    for train, evals in data:
        t, e = curve_keys(train, evals)
        train_keys.update(dict.fromkeys(t))
        eval_keys.update(dict.fromkeys(e))
    panels = [("train", k) for k in train_keys] + [("eval", k) for k in list(eval_keys)[:MAX_EVAL_PANELS]]
    if not panels:
        raise UserError(f"{', '.join(map(str, folders))}: metrics.jsonl has no numbers to plot yet")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    last = max((r["iter"] for train, evals in data for r in train + evals), default=1)
    for ax, (kind, key) in zip(axes.flat, panels):
        for i, ((train, evals), name) in enumerate(zip(data, names)):
            rows_ = train if kind == "train" else evals
            pts = [(r["iter"], r[key]) for r in rows_ if _numeric(r.get(key))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=colors[i % len(colors)], label=name, marker="o" if kind == "eval" else None,
                    markersize=3, linewidth=1.2)
        ax.set_title(key if kind == "train" else f"eval: {key}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, last * 1.03)  # every panel on the same step axis
        ax.grid(alpha=0.3)
        if kind == "train" and ("loss" in key or key == "grad_norm") and _positive(data, key):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10, y=1.0)
    fig.tight_layout(rect=(0, 0, 1, 0.95 if handles else 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _positive(data, key: str) -> bool:
    values = [r[key] for train, _ in data for r in train if _numeric(r.get(key))]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


def _names(folders: Sequence[Path]) -> list[str]:
    """Each run by its folder name; the parent too when two names clash."""
    names = [f.resolve().name for f in folders]
    return [f"{f.resolve().parent.name}/{n}" if names.count(n) > 1 else n for f, n in zip(folders, names)]
