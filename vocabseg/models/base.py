"""What every open-vocabulary model shares: a frozen CLIP, cached vocabulary embeddings, ``predict``.

A model never tokenises text inside ``forward``: it receives text embeddings [C, D] computed (once, cached) by
``vocabseg.clip.vocabulary``. That keeps the cache and ONNX export identical for all models.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..clip.model import CLIP


class OpenVocabModel(nn.Module):
    """Base class: subclasses set ``self.clip`` and ``self.config`` and implement ``prepare``/``infer``."""

    clip: CLIP
    config: Any
    model_name: str = ""

    # -- parameters -------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def freeze_clip(self, keep: Sequence[str] = ()) -> None:
        """Freeze every CLIP parameter except those whose name is in ``keep`` (e.g. SAN's positional embedding)."""
        for name, p in self.clip.named_parameters():
            p.requires_grad = name in keep

    def train(self, mode: bool = True) -> "OpenVocabModel":
        """Frozen CLIP stays in eval mode even while the rest trains (matters for the ResNet's BatchNorm)."""
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- text --------------------------------------------------------------------------------------------------
    def text_embeddings(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """L2-normalised, template-averaged embeddings [C, D] of the class names (cached on disk and in memory)."""
        from ..clip.vocabulary import encode_vocabulary

        return encode_vocabulary(self.clip, list(vocabulary), templates=self.config.templates).to(self.device)

    # -- inference ---------------------------------------------------------------------------------------------
    def predict(self, image: Any, vocabulary: Sequence[str] | str, **kwargs) -> "Segmentation":  # noqa: F821
        """Segment one image (path, PIL image or H×W×3 array) with any list of class names."""
        from ..predict import Predictor

        return Predictor(self).predict(image, vocabulary, **kwargs)
