"""How many intra-op threads to use right now, and which floating-point precision a model runs in.

Threads: torch's intra-op pool joins all its threads at the end of every operator. When another process keeps a
core busy, one of our threads waits for a scheduler slice at each join, so a path of many small operators (the text
tower on short prompts, a small model) slows 4-15x on 2 cores while one of large matrix products barely moves.
:func:`adaptive_threads` counts the runnable threads of other processes (``/proc/loadavg`` minus our own running
threads, about 0.2 ms) and uses only the cores left free, at least one. On an idle machine it changes nothing, so
fp32 numbers are bit-for-bit those of a fixed thread count; ``VOCABSEG_THREADS=N`` pins the count (reproducible
to the last bit under any load, as the thread count can change the last bits of a reduction).
"""

from __future__ import annotations

import glob
import os
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from .errors import ConfigError

PRECISIONS = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

_lock = threading.Lock()
_active = 0
_full: int | None = None  # the thread count torch was configured with (OMP_NUM_THREADS or all cores)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"fp32"``/``"float32"``/``torch.float32`` or ``"bf16"``/``"bfloat16"``/``torch.bfloat16``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in PRECISIONS:
        return PRECISIONS[dtype.lower()]
    raise ConfigError(f"unknown precision {dtype!r}; use fp32 (the default) or bf16")


def model_dtype(model: object) -> torch.dtype:
    """The floating-point type of a model's weights (float32 for anything without parameters)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def cast_model(model: torch.nn.Module, dtype: str | torch.dtype | None) -> torch.nn.Module:
    """Weights and buffers in ``dtype`` (bf16 halves the memory and runs the matrix products in bf16), except the
    pixel mean/std, which stay fp32 so 0..255 inputs are normalised exactly before the cast."""
    dtype = resolve_dtype(dtype)
    if dtype == torch.float32:
        return model
    if getattr(model, "precision_scope", "all") == "clip":  # a model whose own parts expect fp32 around CLIP
        cast_model(model.clip, dtype)
        return model
    keep = {name: buf for name, buf in model.named_buffers()
            if name.rsplit(".", 1)[-1] in ("pixel_mean", "pixel_std") and buf.dtype == torch.float32}
    model.to(dtype)
    for name, buf in keep.items():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        owner._buffers[name.rsplit(".", 1)[-1]] = buf
    return model


def _own_running() -> int:
    """Threads of this process that are running or runnable now."""
    n = 0
    for path in glob.glob("/proc/self/task/*/stat"):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        n += text[text.rindex(")") + 2: text.rindex(")") + 3] == "R"
    return n


def other_runnable() -> int | None:
    """Runnable threads of other processes on this machine (Linux), None where it cannot be read."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - max(1, _own_running()))


def available_threads() -> int:
    """The configured thread count, lowered to the cores other processes leave free (at least 1).

    ``VOCABSEG_THREADS=N`` returns N; ``VOCABSEG_THREADS=auto`` (the default) adapts.
    """
    full = _full if _full is not None else torch.get_num_threads()
    setting = os.environ.get("VOCABSEG_THREADS", "auto").strip().lower()
    if setting not in ("", "auto"):
        try:
            return max(1, int(setting))
        except ValueError:
            raise ConfigError(f"VOCABSEG_THREADS={setting!r}: use a positive integer or 'auto'") from None
    if full <= 1:
        return 1
    others = other_runnable()
    if others is None or others == 0:
        return full
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or full
    return max(1, min(full, cores - others))


@contextmanager
def adaptive_threads() -> Iterator[int]:
    """Run the body with :func:`available_threads` intra-op threads; restore the configured count afterwards."""
    global _active, _full
    with _lock:
        if _active == 0:
            _full = torch.get_num_threads()  # what the user configured; restored when the last body ends
        _active += 1
        n = available_threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    try:
        yield n
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                if torch.get_num_threads() != _full:
                    torch.set_num_threads(_full)
                _full = None
