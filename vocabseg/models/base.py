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

    # -- pixels ------------------------------------------------------------------------------------------------
    def register_pixel_statistics(self) -> None:
        """CLIP's mean/std × 255 as buffers: models take RGB in 0..255 and normalise inside, like the official SAN."""
        from ..clip.model import OPENAI_MEAN, OPENAI_STD

        self.register_buffer("pixel_mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def normalize_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in 0..255 -> CLIP-normalised."""
        return (images - self.pixel_mean) / self.pixel_std

    def inference_size(self, height: int, width: int) -> tuple[int, int]:
        """Resize so the short side is ``short_side`` while the long side stays <= ``max_side`` (official policy)."""
        c = self.config
        scale = c.short_side / min(height, width)
        if max(height, width) * scale > c.max_side:
            scale = c.max_side / max(height, width)
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """H×W×3 uint8 -> normalised, zero-padded batch [1, 3, Hp, Wp] and the (h, w) of the image inside it."""
        import torch.nn.functional as F

        from ..predict import resize_image

        h, w = self.inference_size(*image.shape[:2])
        resized = resize_image(image, (h, w))
        x = torch.from_numpy(np.ascontiguousarray(resized)).to(self.device).permute(2, 0, 1)[None].float()
        x = self.normalize_pixels(x)
        d = self.config.size_divisibility
        return F.pad(x, (0, (-w) % d, 0, (-h) % d)), (h, w)

    # -- inference ---------------------------------------------------------------------------------------------
    def predict(self, image: Any, vocabulary: Sequence[str] | str, **kwargs) -> "Segmentation":  # noqa: F821
        """Segment one image (path, PIL image or H×W×3 array) with any list of class names."""
        from ..predict import Predictor

        return Predictor(self).predict(image, vocabulary, **kwargs)
