"""Reading ``torch.save`` files whose containers hold pickled metadata objects, without running any code.

Official releases keep objects beside their weights: GroupViT an OmegaConf ``DictConfig``, ETRIS a
``collections.Counter`` in its scheduler state, LSeg Lightning's ``ModelCheckpoint`` class as a dict key, mmcv
files numpy scalars in ``meta``. ``torch.load(weights_only=True)`` refuses all of them, and a plain
``torch.load`` would import and run whatever the file names.

:func:`safe_torch_load` keeps torch's weights-only unpickler (which never calls anything it was not told is safe)
and tells it that each global the file names is an :class:`Inert` placeholder: a class with no behaviour that only
records the arguments and state it was given. Only globals of modules known to hold such metadata are accepted;
any other (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) makes the file refused with a one-line
:class:`~vocabseg.errors.CheckpointError`. Zip files are memory-mapped, so a 1.7 GB release is not read into memory
twice.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["Inert", "safe_torch_load", "inert_contents", "METADATA_MODULES", "strip_prefix", "find_state_dict"]

# Top-level modules whose classes and functions appear as metadata in published checkpoints. Their globals load
# as inert placeholders; globals of any other module make the file refused.
METADATA_MODULES = frozenset({
    "omegaconf", "typing", "collections", "numpy", "pytorch_lightning", "lightning", "lightning_fabric",
    "mmcv", "mmengine", "mmseg", "argparse", "pathlib", "datetime", "fractions", "decimal", "yacs", "easydict",
    "copyreg", "_codecs",  # protocol-2 reconstructors and byte strings of numpy arrays: placeholders too
})

_MAX_GLOBALS = 256

# Plain data types a pickle may name as globals (OmegaConf pickles ``defaultdict(list)`` and ``dict``): real types,
# harmless to call. Any other builtin (eval, exec, getattr, __import__, open...) is refused.
_PLAIN_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                             "bytearray", "bool", "slice", "object"})


class Inert:
    """Stand-in for a class or function named by a pickle: it records what it was given and does nothing else."""

    __slots__ = ("args", "kwargs", "state", "items")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, {}

    def __new__(cls, *args: Any, **kwargs: Any) -> "Inert":
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, {}
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses (OrderedDict-like) are filled this way
        self.items[key] = value

    def append(self, value: Any) -> None:  # list subclasses
        self.items[len(self.items)] = value

    def extend(self, values: Iterable[Any]) -> None:
        for v in values:
            self.append(v)

    def __repr__(self) -> str:
        return f"<inert {type(self).__module__}.{type(self).__qualname__}>"


def _placeholder(qualified: str) -> tuple[type, str]:
    module, _, name = qualified.rpartition(".")
    cls = type(name, (Inert,), {"__module__": module, "__qualname__": name, "__slots__": ()})
    return cls, qualified


def _refuse(path: Path, name: str, expected: str) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint file {path} holds pickled objects other than tensors and plain metadata ({name}), which "
        f"{expected} does not contain; refused without running it (unpickling it could execute code).")


# Real (not placeholder) globals a torch.save file needs to rebuild its tensors and plain containers; the same
# set torch's own weights-only unpickler accepts for these purposes.
_TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
}


def _restricted_pickle_module(path: Path, expected: str) -> Any:
    """A stand-in for the ``pickle`` module whose Unpickler resolves only safe globals (see module docstring)."""
    placeholders: dict[str, type] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in _TENSOR_GLOBALS:
                return getattr(__import__(module, fromlist=[name]), name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if module in ("builtins", "__builtin__"):  # protocol 2 names builtins "__builtin__" (Python 2)
                module, name = _compat_pickle.NAME_MAPPING.get((module, name), ("builtins", name))
                if module == "builtins" and name in _PLAIN_BUILTINS:  # e.g. OmegaConf's defaultdict(list) factory
                    return getattr(builtins, name)
            qualified = f"{module}.{name}"
            if module.split(".", 1)[0] not in METADATA_MODULES:
                raise _refuse(path, qualified, expected)
            if qualified not in placeholders:
                if len(placeholders) >= _MAX_GLOBALS:
                    raise CheckpointError(f"Checkpoint file {path} names over {_MAX_GLOBALS} pickled classes.")
                placeholders[qualified] = _placeholder(qualified)[0]
            return placeholders[qualified]

    class Module:
        Unpickler = RestrictedUnpickler
        load = staticmethod(lambda f, **kw: RestrictedUnpickler(f, **kw).load())  # legacy files' header pickles
        __name__ = "vocabseg_restricted_pickle"

    return Module


def safe_torch_load(path: str | os.PathLike, expected: str = "a weights file") -> Any:
    """The object stored by ``torch.save`` in ``path``, with metadata objects as :class:`Inert` placeholders.

    ``expected`` describes what the caller wanted (e.g. "a GroupViT release") for error messages. Raises
    :class:`CheckpointError` for a missing, truncated or corrupt file, and for a file that names a global outside
    :data:`METADATA_MODULES` (nothing from the file is executed in any case). Zip files are memory-mapped.
    """
    path = Path(os.fspath(path)).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} does not exist." if not path.exists()
                              else f"Checkpoint path {path} is not a file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint file {path} is empty (0 bytes).")
    is_zip = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False, mmap=is_zip,
                              pickle_module=_restricted_pickle_module(path, expected))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip/pickle data fails in many library-specific ways
        raise CheckpointError(f"Checkpoint file {path} is truncated or corrupt, or not {expected} "
                              f"({_short(e)}).") from None


def _short(err: BaseException, limit: int = 140) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = re.sub(r"\x1b\[[0-9;]*m", "", lines[0] if lines else type(err).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def inert_contents(obj: Any) -> Any:
    """Plain data from placeholders: an OmegaConf ``DictConfig``'s ``_content`` as nested dicts, for reading."""
    if isinstance(obj, Inert):
        state = obj.state
        if isinstance(state, Mapping) and "_content" in state:
            return inert_contents(state["_content"])
        if isinstance(state, Mapping) and "_val" in state:  # OmegaConf value nodes
            return inert_contents(state["_val"])
        if obj.items:
            return {k: inert_contents(v) for k, v in obj.items.items()}
        return state if state is not None else obj
    if isinstance(obj, Mapping):
        return {k: inert_contents(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(inert_contents(v) for v in obj)
    return obj


def find_state_dict(obj: Any, path: Path | str, keys: Iterable[str], expected: str) -> dict[str, torch.Tensor]:
    """The tensor dict under the first of ``keys`` present in the container ``obj`` ("" = ``obj`` itself)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"Checkpoint file {path} holds a {type(obj).__name__}, not {expected}.")
    for key in keys:
        inner = obj if key == "" else obj.get(key)
        if isinstance(inner, Mapping) and inner and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    shown = ", ".join(str(k) for k in list(obj)[:6])
    raise CheckpointError(f"Checkpoint file {path} has no weights where {expected} keeps them "
                          f"(top-level keys: {shown}).")


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` with ``prefix`` removed from every key that has it (others kept as they are)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
