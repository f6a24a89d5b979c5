"""One picture comparing models on the same image and words: the input, then one overlay per model.

Every panel colours a name the same way (one palette for the vocabulary), each is titled with the model's name and
the time its prediction of the image took (the words are encoded, and cached, before the clock starts), and one legend below serves them all. A referring model (ETRIS) is given the
``sentence`` instead of the vocabulary and shows its mask.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import ConfigError, VocabularyError

__all__ = ["compare", "parse_checkpoint_pairs"]

REFERRING_COLOUR = (255, 0, 200)  # a referring mask is drawn in one colour that no vocabulary palette starts with


def parse_checkpoint_pairs(pairs: Sequence[str]) -> dict[str, Path]:
    """``["san_vit_b_16=san.pth", ...]`` -> {model name: path}; a malformed pair is a one-line ConfigError."""
    out: dict[str, Path] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--checkpoint expects NAME=PATH (e.g. san_vit_b_16=san_vit_b_16.pth), got {pair!r}")
        out[name.strip()] = Path(path.strip())
    return out


def _model_name(spec: Any) -> str:
    return spec if isinstance(spec, str) else (getattr(spec, "model_name", "") or type(spec).__name__)


def _task(model: Any) -> str:
    return "referring" if hasattr(model, "refer") and not hasattr(model, "predict") else "semantic"


def compare(image: Any, vocabulary: Sequence[str] | str, models: Sequence[Any],
            checkpoints: Mapping[str, str | Path] | None = None, sentence: str | None = None,
            panel_width: int = 384) -> Image.Image:
    """The comparison picture (PIL image) of ``models`` (registered names or loaded models) on ``image``.

    ``checkpoints`` maps model names to weight files (models without one use their bundled weights).
    Semantic models segment ``vocabulary``; referring models segment what ``sentence`` refers to.
    """
    from .clip.vocabulary import parse_vocabulary
    from .io import load_image
    from .models import get_entry, load_model
    from .viz import compare_grid, overlay, palette_for

    if not models:
        raise ConfigError("compare needs at least one model (e.g. --models default,segvit_world,lseg_world)")
    checkpoints = dict(checkpoints or {})
    unknown = [n for n in checkpoints if n not in [_model_name(m) for m in models]]
    if unknown:
        raise ConfigError(f"--checkpoint names a model that is not compared: {', '.join(unknown)}")
    rgb = load_image(image)
    names = parse_vocabulary(vocabulary) if (vocabulary if isinstance(vocabulary, str) else len(vocabulary)) else []
    palette = palette_for(names) if names else np.zeros((0, 3), np.uint8)
    panels: list[tuple[str, Image.Image]] = [("input", Image.fromarray(rgb))]
    referring_used = False
    for spec in models:
        name = _model_name(spec)
        if isinstance(spec, str):
            task = get_entry(name).task
            if task not in ("semantic", "closed_set", "referring"):
                raise ConfigError(f"{name} is a {task} model, which compare does not draw; compare models that "
                                  f"segment a vocabulary or a sentence")
            if task == "referring" and not sentence:
                raise VocabularyError(f"{name} segments what a sentence refers to: pass a sentence (--sentence)")
            if task != "referring" and not names:
                raise VocabularyError(f"{name} needs a vocabulary: pass --vocab \"cat, grass, sky\"")
            model = load_model(name, checkpoint=checkpoints.get(name))
        else:
            model, task = spec, _task(spec)
        if task == "semantic" and hasattr(model, "text_embeddings"):
            model.text_embeddings(names)  # encode (and cache) the words first: the title times the image's path
        start = time.perf_counter()
        if task == "referring":
            result = model.refer(rgb, sentence)
            labels = np.where(result.mask, 0, -1)
            picture = overlay(rgb, labels, [sentence], palette=np.array([REFERRING_COLOUR]), legend=False)
            referring_used = True
        else:
            result = model.predict(rgb, vocabulary=names)
            picture = overlay(rgb, result.labels, names, palette=palette, legend=False)
        elapsed = time.perf_counter() - start
        panels.append((f"{name} · {_format_time(elapsed)}", picture))
    extra = [(f'"{sentence}"', REFERRING_COLOUR)] if referring_used else []
    return compare_grid(panels, names, palette, extra_entries=extra, panel_width=panel_width)


def _format_time(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"
