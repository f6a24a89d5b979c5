"""Training checkpoints that survive being killed at any moment, and the final model files.

Every file is written atomically: to ``NAME.tmp`` in the same folder, flushed and fsynced, then renamed over
``NAME`` (``os.replace`` is atomic on POSIX and Windows), and the folder is fsynced so the rename itself is
durable. A ``kill -9`` therefore leaves either the old file or the new one, plus at worst a stray ``*.tmp`` that
is never read and is removed when the run resumes.

Layout of an output folder::

    checkpoint_0005000.pt   numbered training checkpoints (the ``keep_checkpoints`` most recent are kept); the
                            newest one that reads is where a run resumes: no pointer file can disagree with it
    model_final.safetensors full model state dict, loadable by vocabseg.load_model(name, checkpoint=...)
    model_final.json        model name, model overrides, class names, iteration

A training checkpoint holds only tensors, plain containers, numbers and strings, so it loads with
``torch.load(weights_only=True)``: trainable parameters (+ persistent buffers), optimizer, scheduler, grad scaler,
iteration, sampler position, per-rank RNG states, the config as a dict and a fingerprint of the frozen weights.
The frozen CLIP is not stored (it is 95 % of the model and never changes); the fingerprint catches a resume with
different CLIP weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError

__all__ = [
    "atomic_write", "atomic_write_text", "atomic_write_bytes", "checkpoint_path", "list_checkpoints",
    "save_checkpoint", "load_checkpoint", "find_resume_checkpoint", "remove_stale_tmp", "trainable_state",
    "load_trainable_state", "frozen_fingerprint", "capture_rng_state", "restore_rng_state", "save_final_model",
    "FINAL_WEIGHTS", "FINAL_META",
]

CHECKPOINT_FORMAT = "vocabseg-train-checkpoint"
CHECKPOINT_VERSION = 1
FINAL_WEIGHTS = "model_final.safetensors"
FINAL_META = "model_final.json"
_NUMBERED = re.compile(r"^checkpoint_(\d+)\.pt$")


# ---------------------------------------------------------------------------------------------------- atomic files


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; not possible (nor needed) on every platform, so failures are ignored."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None],
                 before_replace: Callable[[], None] | None = None) -> Path:
    """Call ``write(file)`` on ``PATH.tmp`` and rename it to ``PATH`` only once it is complete and on disk.

    If ``write`` raises, the partial tmp file is removed and ``PATH`` is untouched. ``before_replace`` runs between
    the two (the crash tests kill the process there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete ``*.tmp`` files left by a killed writer (call on rank 0 before writing anything)."""
    removed = []
    for tmp in Path(folder).glob("*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


# ---------------------------------------------------------------------------------------------------- model state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train (``requires_grad``) plus persistent buffers, as CPU copies."""
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            state[name] = p.detach().to("cpu", copy=True)
    full = model.state_dict()
    buffer_names = {name for name, _ in model.named_buffers()}
    for name, t in full.items():
        if name in buffer_names:
            state[name] = t.detach().to("cpu", copy=True)
    return state


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a :func:`trainable_state` back, requiring exactly the same tensor names and shapes."""
    expected = trainable_state_names(model)
    own = model.state_dict()
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with another shape (e.g. {wrong[0]})")
        raise CheckpointError("The checkpoint's trainable tensors do not match the model: " + "; ".join(parts)
                              + "; resume with the model and model_overrides the run started with.")
    model.load_state_dict(dict(state), strict=False)


def trainable_state_names(model: nn.Module) -> set[str]:
    buffers = {name for name, _ in model.named_buffers()}
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return names | {k for k in model.state_dict() if k in buffers}


def frozen_fingerprint(model: nn.Module) -> str:
    """SHA-1 over the names and bytes of all frozen parameters: identifies the CLIP a run was trained on."""
    h = hashlib.sha1()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        t = p.detach().to("cpu").contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and current CUDA device), numpy and python RNG states as checkpoint-safe plain data."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"algorithm": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": [int(v) for v in py_internal],
                   "gauss_next": None if py_gauss is None else float(py_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_path(folder: str | os.PathLike, iteration: int) -> Path:
    return Path(folder) / f"checkpoint_{iteration:07d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Numbered checkpoints in ``folder`` as (iteration, path), oldest first; ``*.tmp`` files never match."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NUMBERED.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike, iteration: int, keep: int = 0,
                    before_replace: Callable[[], None] | None = None) -> Path:
    """Write ``checkpoint_{iteration}.pt`` atomically and keep the ``keep`` newest (0: all)."""
    path = checkpoint_path(folder, iteration)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state, "iteration": int(iteration)}
    atomic_write(path, lambda f: torch.save(payload, f), before_replace)
    if keep > 0:
        for _, old in list_checkpoints(folder)[:-keep]:
            if old != path:
                try:
                    old.unlink()
                except OSError:
                    pass
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint with ``torch.load(weights_only=True)``; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a usable checkpoint
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"Checkpoint {path} cannot be read ({first}); it may be truncated.") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a vocabseg training checkpoint.")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj.get('version')}, this vocabseg reads "
                              f"version {CHECKPOINT_VERSION}.")
    return obj


def find_resume_checkpoint(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint in ``folder`` and its contents, or None if there is none.

    Numbered checkpoints are tried newest first; unreadable files are skipped with a warning, ``*.tmp`` files are
    never considered. (A ``last_checkpoint`` pointer left by older versions is ignored: the listing is the truth.)
    """
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping unusable checkpoint: {e}", stacklevel=2)
    return None


# ---------------------------------------------------------------------------------------------------- final model


def read_final_meta(weights: str | os.PathLike | None) -> dict[str, Any]:
    """The ``model_final.json`` written beside a run's weights (model name, overrides, class names), or ``{}`` when
    there is none — so commands can pick the right model for a checkpoint without being told."""
    if weights is None:
        return {}
    path = Path(weights).with_suffix(".json")
    try:
        meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def save_final_model(model: nn.Module, folder: str | os.PathLike, meta: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``model_final.safetensors`` (the full state dict) and ``model_final.json`` atomically."""
    from safetensors.torch import save

    folder = Path(folder)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    info = {"format": "pt", "model": str(meta.get("model", ""))}
    weights = atomic_write(folder / FINAL_WEIGHTS, lambda f: f.write(save(state, metadata=info)))
    meta_text = json.dumps({**meta, "weights": FINAL_WEIGHTS}, indent=2, default=str) + "\n"
    meta_path = atomic_write_text(folder / FINAL_META, meta_text)
    return weights, meta_path


def truncate_log(path: Path, iteration: int) -> None:
    """On resume, drop log lines a killed run wrote after its last checkpoint (they will be written again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            if row.get("iter", row.get("step", 0)) <= iteration:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by the kill
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def bundle_weights(final_weights: str | os.PathLike, out_path: str | os.PathLike,
                   dtype: torch.dtype | None = torch.float16) -> dict[str, int]:
    """Write a finished run's weights as they ship in ``vocabseg/weights``: every tensor outside ``clip.`` plus the
    CLIP tensors the run trained (e.g. the image positional table), floats cast to ``dtype`` (None keeps them).
    Loading needs the same frozen CLIP, which ``load_model`` takes from the model's bundled ``clip_weights``.
    Returns tensor and byte counts."""
    from safetensors.torch import load_file, save

    from ..models import create_model

    src = Path(final_weights)
    meta = read_final_meta(src)
    if "model" not in meta:
        raise CheckpointError(f"{src}: expected a run's model_final.safetensors (with model_final.json beside it)")
    model = create_model(meta["model"], **meta.get("model_overrides", {}))
    trained_clip = {f"clip.{n}" for n, p in model.clip.named_parameters() if p.requires_grad}
    state = load_file(str(src))
    kept = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in state.items() if not k.startswith("clip.") or k in trained_clip}
    info = {"format": "pt", "model": meta["model"], "iteration": str(meta.get("iteration", ""))}
    atomic_write(Path(out_path), lambda f: f.write(save(kept, metadata=info)))
    return {"tensors": len(kept), "bytes": Path(out_path).stat().st_size}
