"""Loading state dicts into models: strict, with one readable error, resizing positional tables when needed."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import CheckpointError


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], allow_missing_prefix: str | None = None) -> None:
    """``load_state_dict`` that names missing, unexpected and wrongly shaped tensors in one CheckpointError line.

    Positional embeddings whose grid differs (e.g. CLIP's 197-token table) are resized to the model's grid.
    """
    own = model.state_dict()
    problems = []
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not (allow_missing_prefix and k.startswith(allow_missing_prefix))]
    fixed = {}
    for k, v in state.items():
        if k not in own:
            continue
        if v.shape != own[k].shape:
            v2 = _resize_positional(k, v, own[k].shape)
            if v2 is None:
                problems.append(f"{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
                continue
            v = v2
        fixed[k] = v
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems[:4]))
    model.load_state_dict(fixed, strict=False)


def _resize_positional(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    from ..clip.model import resize_grid_embedding

    if key.endswith("visual.positional_embedding") and value.ndim == 2 and value.shape[1] == shape[1]:
        side = int(math.isqrt(shape[0] - 1))
        return torch.cat([value[:1], resize_grid_embedding(value[1:], (side, side))])
    if key.endswith("side.pos_embed") and value.ndim == 3 and value.shape[2] == shape[2]:
        side = int(math.isqrt(shape[1]))
        return resize_grid_embedding(value[0], (side, side))[None]
    return None
