"""CLIP's image preprocessing: bicubic resize of the short side, centre crop, normalisation.

Mirrors OpenAI's pipeline (``Resize(R, BICUBIC)`` on a PIL image, ``CenterCrop(R)``, ``ToTensor``,
``Normalize``) without torchvision, so embeddings match those computed with the official code.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vocabseg.errors import ImageError

from .model import OPENAI_MEAN, OPENAI_STD

__all__ = ["preprocess", "normalize", "resize_short_side", "center_crop", "resolution_for"]

DEFAULT_RESOLUTION = 224


def resolution_for(model: object) -> int:
    """The input resolution a model wants: ``preprocess_resolution`` (set by ``load``) or its trained resolution."""
    for attr in ("preprocess_resolution", "image_resolution"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(model, "config", None)
    value = getattr(config, "image_resolution", None)
    if isinstance(value, int) and value > 0:
        return value
    raise TypeError(f"cannot tell the input resolution of a {type(model).__name__}; pass resolution=")


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short side is ``size``; the long side is scaled and truncated as torchvision does."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to ``size`` x ``size``, rounding the offsets as torchvision's ``CenterCrop`` does."""
    w, h = image.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _stats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).view(3, 1, 1)


def normalize(images: torch.Tensor | np.ndarray, mean: Sequence[float] = OPENAI_MEAN,
              std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """Images as CLIP's image tower expects them: float32, channels first, ``(x - mean) / std``.

    Takes one image or a batch, uint8 (0-255) or float (0-1), channels first ([.., 3, H, W]) or last
    ([.., H, W, 3]); channels-first is assumed when both readings are possible.
    """
    if isinstance(images, np.ndarray):
        arr = np.ascontiguousarray(images)
        x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # PIL gives read-only arrays
    else:
        x = images
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4):
        raise ImageError(f"normalize expects an image [3, H, W] or a batch [B, 3, H, W] (or channels last), "
                         f"got {getattr(x, 'shape', type(x).__name__)}.")
    if x.shape[-3] != 3:
        if x.shape[-1] != 3:
            raise ImageError(f"normalize expects 3 colour channels, got an array of shape {list(x.shape)}.")
        x = x.movedim(-1, -3)
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    elif x.is_floating_point():
        x = x.to(torch.float32)
    else:
        raise ImageError(f"normalize expects uint8 or float images, got {x.dtype}.")
    return (x - _stats(mean, x)) / _stats(std, x)


def preprocess(image: object, resolution: int | None = None, mean: Sequence[float] = OPENAI_MEAN,
               std: Sequence[float] = OPENAI_STD, *, model: object | None = None) -> torch.Tensor:
    """One image (path, PIL image or numpy array) -> CLIP input [3, R, R], float32, normalised.

    ``resolution`` defaults to the model's (``model=``) or 224. Images are read by
    :func:`vocabseg.io.load_image`, so EXIF rotation, alpha and odd dtypes are handled there.
    """
    from vocabseg.io import load_image  # the I/O module is only needed here

    if resolution is None:
        resolution = resolution_for(model) if model is not None else DEFAULT_RESOLUTION
    if not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    pil = Image.fromarray(load_image(image))
    pil = center_crop(resize_short_side(pil, resolution), resolution)
    return normalize(np.asarray(pil), mean, std)
