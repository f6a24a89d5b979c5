"""Model families and the registry. Importing this package registers every model."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .registry import DEFAULT_MODEL, create_model, get_config, get_entry, list_models, register_model
from .weights import assigning, load_strict
from . import san  # noqa: F401  (registers SAN configs)
from . import default  # noqa: F401  (the embedded default)
from . import clims, etris, groupvit, lseg, segvit  # noqa: F401
from . import clims_release, etris_release, lseg_release, segvit_release  # noqa: F401  (official release architectures)


_RANDOM_INITS = ("trunc_normal_", "normal_", "uniform_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                 "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def _skip_random_init():
    """Build a model whose every tensor the checkpoint will overwrite: random initialisers do nothing (half the
    start-up time of the default model went into ``trunc_normal_``, and untouched memory costs no page faults).
    Loading is strict (a tensor missing from the file fails by name), so no uninitialised value survives."""
    saved = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS}

    def fill(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    for name in _RANDOM_INITS:
        setattr(torch.nn.init, name, fill)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def load_model(name: str | None = None, checkpoint: str | Path | None = None, clip: str | Path | None = None,
               device: str | torch.device = "cpu", trust_jit: bool = False, dtype: str | torch.dtype = "float32",
               **overrides: Any) -> torch.nn.Module:
    """Build a registered model and load its weights, in eval mode.

    ``checkpoint``: our own or the official release file of that model. ``clip``: separate CLIP weights (OpenAI or
    open_clip file) for checkpoints that carry none. With neither, the model's bundled weights are used if it has
    any, else it is randomly initialised with a warning. ``dtype``: ``"float32"`` (default) or ``"bfloat16"``
    (weights, image and text towers in bf16; class scores are still combined in fp32).
    """
    from ..runtime import adaptive_threads, resolve_dtype

    dtype = resolve_dtype(dtype)
    with adaptive_threads(), assigning():  # few-operator copies: few cores; the file's tensors become the weights
        return _load_model(name or DEFAULT_MODEL, checkpoint, clip, device, trust_jit, dtype, overrides)


def _load_model(name: str, checkpoint: str | Path | None, clip: str | Path | None, device: str | torch.device,
                trust_jit: bool, dtype: torch.dtype, overrides: dict[str, Any]) -> torch.nn.Module:
    from ..clip.load import drop_non_weights, read_patched_state_dict, read_state_dict
    from ..runtime import cast_model

    entry = get_entry(name)
    bundled = checkpoint is None and clip is None
    with _skip_random_init() if checkpoint is not None or (bundled and entry.weights is not None) else \
            contextlib.nullcontext():
        model = create_model(name, **overrides)
    if bundled and entry.weights is not None and not Path(entry.weights).exists():
        raise CheckpointError(f"the bundled weights of {name!r} are missing ({entry.weights}); reinstall vocabseg")
    if bundled and entry.clip_weights is not None:
        clip = entry.clip_weights
    if clip is not None:
        if not isinstance(getattr(model, "clip", None), torch.nn.Module):
            raise ConfigError(f"model {name!r} takes no separate CLIP weights (clip=...): its checkpoint holds "
                              f"everything it needs; pass checkpoint=... alone")
        clip_state = drop_non_weights(read_patched_state_dict(clip, trust_jit=trust_jit))
        where = clip if isinstance(clip, (str, os.PathLike)) else " + ".join(map(str, clip))
        try:
            load_strict(model.clip, clip_state)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
    if bundled:
        checkpoint = entry.weights
    if checkpoint is not None:
        state = read_state_dict(checkpoint, trust_jit=trust_jit, expected=f"a {name} checkpoint")
        try:
            model.load_checkpoint_state(state, allow_missing_clip=clip is not None)
        except CheckpointError as e:
            raise CheckpointError(f"{checkpoint}: {e}") from None
    else:
        what = "everything but CLIP is" if clip is not None else "it is"
        warnings.warn(f"model {name!r} has no checkpoint: {what} randomly initialised and its output is noise; "
                      f"pass checkpoint=... (and clip=... if the checkpoint has no CLIP)", stacklevel=2)
    return cast_model(model.to(device), dtype).eval()


__all__ = ["load_model", "list_models", "create_model", "get_config", "get_entry", "register_model"]
