"""One registry of model names: name -> (builder, default config, optional bundled weights).

Model files register their builders with :func:`register_model`; ``vocabseg.models`` imports every model file so
the registry is complete after ``import vocabseg``.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError


@dataclass
class ModelEntry:
    name: str
    family: str
    builder: Callable[[Any], nn.Module]
    default_config: Any  # a dataclass instance
    description: str = ""
    weights: Path | None = None  # bundled weights (package data), loaded when no checkpoint is given
    test_only: bool = False  # tiny configs for the test-suite
    # bundled CLIP weights loaded before ``weights`` (which then omit CLIP): a file, or a file and weight patches
    clip_weights: Path | tuple[Path, ...] | None = None
    task: str = "semantic"  # "semantic": predict(image, vocabulary); "referring": refer(image, sentence)


_REGISTRY: dict[str, ModelEntry] = {}
DEFAULT_MODEL = "default"


def register_model(name: str, family: str, config: Any, description: str = "", weights: Path | None = None,
                   test_only: bool = False, clip_weights: Path | tuple[Path, ...] | None = None, task: str = "semantic") -> Callable:
    """Decorator: register ``builder(config) -> model`` under ``name`` with its default ``config``."""

    def wrap(builder: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, family, builder, config, description, weights, test_only, clip_weights,
                                     task)
        return builder

    return wrap


def list_models(pattern: str = "*", include_test: bool = False, task: str | None = None) -> list[str]:
    """Registered model names matching a shell-style pattern (``"san_*"``), optionally of one task."""
    return sorted(n for n, e in _REGISTRY.items()
                  if fnmatch.fnmatch(n, pattern) and (include_test or not e.test_only)
                  and (task is None or e.task == task))


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        known = ", ".join(list_models(include_test=True))
        raise ConfigError(f"unknown model {name!r}; registered models: {known}")
    return _REGISTRY[name]


def get_config(name: str, **overrides) -> Any:
    """A copy of a model's default config with fields overridden."""
    cfg = copy.deepcopy(get_entry(name).default_config)
    fields = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(f"model {name!r} has no config field {key!r}; fields: {', '.join(sorted(fields))}")
        setattr(cfg, key, value)
    return cfg


def create_model(name: str, config: Any | None = None, **overrides) -> nn.Module:
    """A randomly initialised model (no weights loaded)."""
    cfg = config if config is not None else get_config(name, **overrides)
    model = get_entry(name).builder(cfg)
    model.model_name = name
    return model
