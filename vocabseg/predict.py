"""The user-facing path: image in -> model -> per-pixel labels at the input resolution.

``Predictor(model).predict(image, vocabulary)`` (or ``model.predict``) reads and converts the image, embeds the
vocabulary through the shared cache (a repeated vocabulary costs no text work), lets the model prepare and run its
input, and post-processes in bands (see ``postprocess.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .postprocess import DenseScores, MaskScores, full_scores, labels_and_confidence
from .runtime import adaptive_threads, model_dtype


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H×W×3 uint8 -> resized to (h, w) with PIL bilinear (detectron2's ResizeShortestEdge default)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


@dataclass
class Segmentation:
    """Result of one prediction. ``labels`` [H, W] index ``vocabulary``; ``logits`` [C, H, W] is built on demand."""

    image: np.ndarray
    vocabulary: list[str]
    labels: np.ndarray
    confidence: np.ndarray
    scores: MaskScores | DenseScores = field(repr=False)
    _logits: np.ndarray | None = field(default=None, repr=False)

    @property
    def logits(self) -> np.ndarray:
        """Class scores [C, H, W] (float32) at the input resolution; computed once, on first access."""
        if self._logits is None:
            self._logits = full_scores(self.scores)
        return self._logits

    def colorize(self, palette: np.ndarray | None = None) -> np.ndarray:
        from .viz import colorize, palette_for

        return colorize(self.labels, palette_for(self.vocabulary) if palette is None else palette)

    def overlay(self, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        from .viz import overlay

        return overlay(self.image, self.labels, self.vocabulary, alpha=alpha, legend=legend)

    def areas(self) -> list[dict]:
        """Present classes with their pixel count and share of the image, largest first."""
        from .viz import class_areas

        return class_areas(self.labels, self.vocabulary)


class Predictor:
    """Wraps a model for inference: conversions, vocabulary cache, band-wise post-processing."""

    def __init__(self, model: Any):
        self.model = model.eval()

    def predict(self, image: Any, vocabulary: Sequence[str] | str) -> Segmentation:
        from .clip.vocabulary import parse_vocabulary
        from .io import load_image

        names = parse_vocabulary(vocabulary)
        rgb = load_image(image)
        return self.predict_array(rgb, names, self.text_embeddings(names))

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """[C, D] embeddings of the class names through the model's cached vocabulary encoder."""
        return self.model.text_embeddings(names)

    @torch.inference_mode()
    def predict_array(self, rgb: np.ndarray, names: list[str], text_embeddings: torch.Tensor) -> Segmentation:
        """Segment an H×W×3 uint8 array with precomputed text embeddings [C, D]."""
        with adaptive_threads():
            return self._predict_array(rgb, names, text_embeddings)

    def _predict_array(self, rgb: np.ndarray, names: list[str], text_embeddings: torch.Tensor) -> Segmentation:
        dtype = model_dtype(self.model)
        if dtype != torch.float32 and text_embeddings.is_floating_point():  # bf16 weights: the network runs in bf16, scores are combined in fp32
            text_embeddings = text_embeddings.to(dtype)
        own = getattr(self.model, "release_scores", None)  # a release's own geometry (LSeg: align_corners=True)
        scores = own(rgb, text_embeddings) if own is not None else None
        if scores is not None:
            labels, conf = labels_and_confidence(scores)
            return Segmentation(rgb, names, labels, conf, scores)
        pixels, crop = self.model.prepare(rgb)
        out = self.model.infer(pixels.to(dtype) if pixels.is_floating_point() else pixels, text_embeddings)
        padded = tuple(pixels.shape[-2:])
        if isinstance(out, tuple):  # mask classification: (class probs [B,Q,C], mask logits [B,Q,h,w])
            scores: MaskScores | DenseScores = MaskScores(out[0][0].float(), out[1][0].float(), padded, crop,
                                                          rgb.shape[:2])
        else:  # dense logits [B, C, h, w]
            scores = DenseScores(out[0].float(), padded, crop, rgb.shape[:2])
        labels, conf = labels_and_confidence(scores)
        return Segmentation(rgb, names, labels, conf, scores)
