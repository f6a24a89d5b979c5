"""Loading state dicts into models: strict, with one readable error, resizing positional tables when needed."""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import CheckpointError


RenameRule = tuple[str, "str | Callable[[re.Match], str]"]

_ASSIGN = contextvars.ContextVar("vocabseg_assign_weights", default=False)


@contextlib.contextmanager
def assigning() -> Iterator[None]:
    """Inside, :func:`load_strict` hands the file's tensors to the model instead of copying them, so loading never
    holds the weights twice. Only for a model just built to be loaded (``load_model``): nothing else (an optimizer)
    may hold its old parameters."""
    token = _ASSIGN.set(True)
    try:
        yield
    finally:
        _ASSIGN.reset(token)


def rename_key(key: str, rules: Sequence[RenameRule]) -> str | None:
    """``key`` renamed by the first rule (regex, replacement) whose pattern matches its start; None if none does.
    The key maps beside the models (release name <-> ours) are lists of such rules."""
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


def check_state_matches(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                        allow_missing_prefix: str | None = None) -> None:
    """Raise one CheckpointError line naming wrongly shaped, unexpected and missing tensors of ``state`` against a
    model's state dict ``own`` (tensors under ``allow_missing_prefix`` may be missing)."""
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not (allow_missing_prefix and k.startswith(allow_missing_prefix))]
    problems = [f"{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                for k, v in state.items() if k in own and v.shape != own[k].shape][:2]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems[:4]))


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], allow_missing_prefix: str | None = None) -> None:
    """``load_state_dict`` that names missing, unexpected and wrongly shaped tensors in one CheckpointError line.

    Positional embeddings whose grid differs (e.g. CLIP's 197-token table) are resized to the model's grid.
    """
    own = model.state_dict()
    fixed = {}
    for k, v in state.items():
        if k in own and v.shape != own[k].shape:
            resized = _resize_positional(k, v, own[k].shape)
            v = v if resized is None else resized  # unresizable: reported by the check below
        fixed[k] = v
    check_state_matches(own, fixed, allow_missing_prefix)
    if _ASSIGN.get():
        fixed = {k: (v.to(own[k].dtype) if v.is_floating_point() and v.dtype != own[k].dtype else v)
                 for k, v in fixed.items()}
        model.load_state_dict(fixed, strict=False, assign=True)
    else:
        model.load_state_dict(fixed, strict=False)


def assign_strict(model: nn.Module, state: Mapping[str, torch.Tensor], allow_missing_prefix: str | None = None) -> None:
    """``load_state_dict(assign=True)`` after :func:`check_state_matches`: the model takes the given tensors (e.g.
    memory-mapped from a release file) instead of copying them, so a large file is never held twice. Floating
    tensors are cast to the model's dtype (fp16 release tensors become fp32); allowed missing ones keep the model's."""
    own = model.state_dict(keep_vars=True)
    check_state_matches(own, state, allow_missing_prefix)
    fixed = {k: (v.to(own[k].dtype) if v.is_floating_point() and v.dtype != own[k].dtype else v)
             for k, v in state.items()}
    fixed.update({k: v for k, v in own.items() if k not in fixed})
    model.load_state_dict(fixed, strict=True, assign=True)


def _resize_positional(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    from ..clip.model import resize_grid_embedding

    if key.endswith("visual.positional_embedding") and value.ndim == 2 and value.shape[1] == shape[1]:
        side = int(math.isqrt(shape[0] - 1))
        return torch.cat([value[:1], resize_grid_embedding(value[1:], (side, side))])
    if key.endswith("side.pos_embed") and value.ndim == 3 and value.shape[2] == shape[2]:
        side = int(math.isqrt(shape[1]))
        return resize_grid_embedding(value[0], (side, side))[None]
    return None
