"""Training configuration: one flat dataclass, read from YAML, patched by ``key=value`` overrides.

Flat on purpose (see docs/STYLE): a config file lists every knob that differs from the defaults below, and
``config.yaml`` in the output folder records the complete, resolved configuration of a run. Two fields hold
dictionaries passed through to other parts (``model_overrides`` to the model registry, ``augment`` to the
training transform); overrides reach into them with dots: ``model_overrides.clip_scale=0.7``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import yaml

from ..errors import ConfigError

__all__ = ["TrainConfig", "load_config", "config_from_dict", "config_to_dict", "save_config", "apply_overrides"]

AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
# Parameter names that get ``weight_decay_embed`` instead of ``weight_decay`` (SAN's WEIGHT_DECAY_EMBED_GROUP).
SAN_EMBED_KEYWORDS = ["absolute_pos_embed", "positional_embedding", "pos_embed", "query_embed",
                      "relative_position_bias_table"]


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults follow the SAN recipe (FACTS.md) where one applies."""

    # -- model ----------------------------------------------------------------------------------------------
    model: str = "san_vit_b_16"  # registered model name (vocabseg.list_models())
    model_overrides: dict[str, Any] = field(default_factory=dict)  # fields of the model's config dataclass
    clip: str | None = None  # CLIP weights (OpenAI / open_clip file) for the frozen tower
    init_checkpoint: str | None = None  # start from these model weights (ours or the official release)
    trust_jit: bool = False  # allow TorchScript CLIP archives (loading them runs code from the file)
    # -- data -----------------------------------------------------------------------------------------------
    dataset: str = "custom"  # a name known to vocabseg.data.build_dataset
    data_root: str | None = None
    train_split: str = "train"
    val_dataset: str | None = None  # default: ``dataset``
    val_root: str | None = None  # default: ``data_root``
    val_split: str | None = "val"  # null: no evaluation
    val_max_images: int | None = None  # evaluate on the first N images only
    crop_size: int = 640
    augment: dict[str, Any] = field(default_factory=dict)  # extra arguments of build_train_transform
    num_workers: int = 4  # DataLoader worker processes per training process
    world: dict[str, Any] | None = None  # generate a vocabseg.data.world data set into data_root/val_root first
    mask_only_classes: list[str] = field(default_factory=list)  # dataset classes whose objects SAN learns to
    # mask but never to name: left out of the text vocabulary, their label ids become K, K+1, ... (mask-only
    # targets of the set criterion), ignored in validation
    mask_only_objectness: float = 0.0  # > 0: queries matched to mask-only targets also learn "an object" (weight of
    # -log(1 - p_no-object) in the class loss), no class favoured
    # -- optimisation ---------------------------------------------------------------------------------------
    batch_size: int = 8  # images per process and micro-step; total = batch_size * processes * grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # normalisation layers' weights and biases
    weight_decay_embed: float = 0.0  # parameters whose name contains one of ``embed_keywords``
    embed_keywords: list[str] = field(default_factory=lambda: list(SAN_EMBED_KEYWORDS))
    max_iters: int = 60000  # optimizer steps
    warmup_iters: int = 0
    warmup_factor: float = 0.001  # LR multiplier at iteration 0 of a linear warm-up
    poly_power: float = 0.9
    clip_grad: float | None = 0.01  # max L2 norm of all trainable gradients together; null or 0: off
    amp: str = "none"  # none | bf16 | fp16 (fp16 only on CUDA, with a GradScaler)
    # -- run ------------------------------------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda (under torchrun each process takes cuda:LOCAL_RANK)
    seed: int = 0
    output_dir: str = "runs/train"
    resume: Union[bool, str] = "auto"  # auto: continue from the newest checkpoint if any; true: it must exist;
    # false: start fresh (refused when the folder already holds checkpoints)
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3  # most recent numbered checkpoints kept; 0 keeps all
    eval_every: int = 5000  # 0: evaluate only at the end
    log_every: int = 20
    progress: bool = True  # rich progress bar (only on a terminal, only on rank 0)
    find_unused_parameters: bool = False  # DDP option, for models whose forward skips trainable parameters

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError for values no run could use (checked again after every override)."""
        positive = ("crop_size", "batch_size", "grad_accum", "max_iters", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        non_negative = ("num_workers", "warmup_iters", "checkpoint_every", "keep_checkpoints", "eval_every", "seed",
                        "mask_only_objectness")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if not 0 < self.warmup_factor <= 1:
            raise ConfigError(f"warmup_factor must be in (0, 1], got {self.warmup_factor}.")
        if self.poly_power < 0:
            raise ConfigError(f"poly_power must be 0 or more, got {self.poly_power}.")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ConfigError(f"clip_grad must be positive (or 0/null to disable), got {self.clip_grad}.")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}.")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}.")
        if not (isinstance(self.resume, bool) or self.resume == "auto"):
            raise ConfigError(f"resume must be true, false or auto, got {self.resume!r}.")
        if self.val_max_images is not None and self.val_max_images < 1:
            raise ConfigError(f"val_max_images must be at least 1 (or null for all), got {self.val_max_images}.")
        if not self.model:
            raise ConfigError("model must name a registered model (see `vocabseg models`).")
        if not self.output_dir:
            raise ConfigError("output_dir must be a folder path.")

    @property
    def clip_grad_enabled(self) -> bool:
        return self.clip_grad is not None and self.clip_grad > 0

    def total_batch_size(self, world_size: int) -> int:
        """Images per optimizer step over all processes."""
        return self.batch_size * world_size * self.grad_accum


# ---------------------------------------------------------------------------------------------------- coercion

_HINTS: dict[type, dict[str, Any]] = {}


def _field_hints(cls: type | None = None) -> dict[str, Any]:
    """Resolved type hints of a config dataclass's fields (TrainConfig by default), cached per class."""
    cls = TrainConfig if cls is None else cls
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(hint)
    return None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML value to the field's type (``1e-4`` is a string in YAML 1.1, ints are fine for floats)."""
    args = _union_args(hint)
    if args is not None:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key} has the wrong type: got {value!r}, expected {_describe(hint)}.")
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    elif origin is tuple or hint is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin is list or hint is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(hint) or (Any,)
            return [v if item is Any else _coerce(key, v, item) for v in value]
        if isinstance(value, str) and typing.get_args(hint) == (str,):
            return [value]
    elif hint is Any:
        return value
    raise ConfigError(f"{key} has the wrong type: got {value!r}, expected {_describe(hint)}.")


def _describe(hint: Any) -> str:
    args = _union_args(hint)
    if args is not None:
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is not None:
        return {dict: "a mapping", list: "a list", tuple: "a list"}.get(origin, str(hint))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _is_mapping_field(hint: Any) -> bool:
    options = _union_args(hint) or (hint,)
    return any(typing.get_origin(o) is dict or o is dict for o in options)


def _unknown_key(key: str, where: str = "", cls: type | None = None) -> ConfigError:
    names = [f.name for f in dataclasses.fields(TrainConfig if cls is None else cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"Unknown config key {key!r}{where}{hint}; valid keys: {', '.join(names)}.")


# ---------------------------------------------------------------------------------------------------- public API


def dataclass_from_mapping(cls: type, data: Mapping[str, Any], where: str = ""):
    """An instance of the config dataclass ``cls`` from a plain mapping: unknown keys raise ConfigError naming the
    valid ones, values are converted to the fields' types (YAML reads ``1e-4`` as a string), wrong types are a
    one-line ConfigError. Used by every trainer's config loader."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"A training config must be a mapping of keys to values{where}, got {type(data).__name__}.")
    hints = _field_hints(cls)
    data = dict(data)
    family = data.pop("family", None)
    if family is not None and family != CONFIG_FAMILY.get(cls.__name__, family):
        raise ConfigError(f"family is {family!r}{where}, but this is a {CONFIG_FAMILY[cls.__name__]} config.")
    values = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(str(key), where, cls)
        try:
            values[key] = _coerce(key, value, hints[key])
        except ConfigError as e:
            raise ConfigError(f"{str(e).rstrip('.')}{where}.") from None
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{str(e).rstrip('.')}{where}.") from None


def config_from_dict(data: dict[str, Any], where: str = "") -> TrainConfig:
    """A validated TrainConfig from a plain mapping; unknown keys raise ConfigError naming the valid ones."""
    return dataclass_from_mapping(TrainConfig, data, where)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain-data copy of a config (what ``config.yaml`` and checkpoints store)."""
    return dataclasses.asdict(config)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"Override {item!r} must look like key=value "
                          f"(e.g. lr=2e-4 or model_overrides.clip_scale=0.7).")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"Override {item!r} has no key before '='.")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], cls: type | None = None) -> dict[str, Any]:
    """Apply ``key=value`` strings to a config mapping of ``cls`` (TrainConfig by default); dotted keys reach into
    the dict-valued fields."""
    hints = _field_hints(cls)
    data = dict(data)
    for item in overrides:
        parts, value = _parse_override(item)
        top = parts[0]
        if top not in hints:
            raise _unknown_key(top, f" in override {item!r}", cls)
        if len(parts) == 1:
            data[top] = value
            continue
        if not _is_mapping_field(hints[top]):
            raise ConfigError(f"Override {item!r}: {top} is not a mapping, so it takes no dotted sub-key.")
        node = data.setdefault(top, {})
        node = dict(node) if isinstance(node, dict) else {}
        data[top] = node
        for part in parts[1:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def read_yaml_config(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config file as a dict. ``base: other.yaml`` (relative to the file) inherits that file's keys; keys
    given here replace the base's (nested mappings merge key by key), so a variant states only what differs."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    if p.resolve() in _chain:
        raise ConfigError(f"Config file {p} inherits from itself (base: chain {' -> '.join(map(str, _chain))}).")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"Config file {p} is not valid YAML: {first}.") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"Config file {p} must hold a mapping of keys to values, not a {type(loaded).__name__}.")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"'base' in {p} must be a file name, not {base!r}.")
    return _merge(read_yaml_config(p.parent / base, _chain + (p.resolve(),)), loaded)


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a YAML training config (``None``: defaults only; ``base:`` inheritance) and apply ``key=value``
    overrides."""
    data: dict[str, Any] = {}
    where = ""
    if path is not None:
        where = f" in {Path(path).expanduser()}"
        data = read_yaml_config(path)
    data = apply_overrides(data, list(overrides))
    return config_from_dict(data, where)


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically), so a run folder says exactly what produced it."""
    return save_family_config("segmentation", config_to_dict(config), path)


def save_family_config(family: str, data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """A run's resolved config as YAML, ``family:`` first, so ``vocabseg train RUN/config.yaml`` repeats the run."""
    from .checkpoint import atomic_write_text

    text = yaml.safe_dump({"family": family, **data}, sort_keys=False, default_flow_style=False)
    return atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------------- families

# family name -> (module, Family class); a config says its family with ``family:`` or by what it holds
FAMILIES: dict[str, tuple[str, str]] = {
    "segmentation": ("vocabseg.engine.trainer", "SegmentationFamily"),
    "referring": ("vocabseg.engine.referring", "ReferringFamily"),
    "groupvit": ("vocabseg.engine.groupvit_train", "GroupViTFamily"),
    "clip": ("vocabseg.engine.contrastive", "ClipFamily"),
    "shapes": ("vocabseg.engine.shape_tuning", "ShapeTuningFamily"),
}
CONFIG_FAMILY = {"TrainConfig": "segmentation", "ReferringTrainConfig": "referring",
                 "GroupViTTrainConfig": "groupvit", "ContrastiveConfig": "clip",
                 "ShapeTuningConfig": "shapes"}
_MODEL_FAMILY = {"etris": "referring", "groupvit": "groupvit"}  # registry family -> training family


def family_class(name: str) -> type:
    import importlib

    if name not in FAMILIES:
        raise ConfigError(f"family must be one of {', '.join(FAMILIES)}, got {name!r}.")
    module, cls = FAMILIES[name]
    return getattr(importlib.import_module(module), cls)


def detect_family(data: Mapping[str, Any]) -> str:
    """The family of a config without a ``family:`` key: from its ``model`` (ETRIS -> referring, GroupViT ->
    groupvit, other registered models -> segmentation), else CLIP when it has ContrastiveConfig-only keys."""
    model = data.get("model")
    if isinstance(model, str):
        from ..models import get_entry

        try:
            return _MODEL_FAMILY.get(get_entry(model).family, "segmentation")
        except ConfigError:
            return "segmentation"  # its loader names the unknown model
    clip_only = set(_field_hints(family_class("clip").config_cls)) - set(_field_hints(TrainConfig))
    return "clip" if clip_only & set(data) else "segmentation"


def load_family(path: str | os.PathLike, overrides: Iterable[str] = (), family: str | None = None):
    """The :class:`vocabseg.engine.loop.Family` of a YAML config (any family), with ``key=value`` overrides.

    ``family`` (the ``train-clip`` etc. aliases) insists on one; a ``family:`` key in the file must agree."""
    p = Path(path).expanduser()
    data = read_yaml_config(p)
    overrides = list(overrides)
    named = data.pop("family", None)
    if named is not None and family is not None and named != family:
        raise ConfigError(f"family is {named!r} in {p}, but this command trains {family} models.")
    if named is not None and named not in FAMILIES:
        raise ConfigError(f"family must be one of {', '.join(FAMILIES)} in {p}, got {named!r}.")
    if family is None and named is None:
        probe = dict(data)
        for item in overrides:
            key, _, value = item.partition("=")
            if key.strip() == "model":
                probe["model"] = yaml.safe_load(value)
        family = detect_family(probe)
    cls = family_class(family or named)
    data = apply_overrides(data, overrides, cls.config_cls)
    return cls(dataclass_from_mapping(cls.config_cls, data, f" in {p}"))


def load_flat_config(cls: type, path: str | Path, overrides: Iterable[str] = ()):
    """A config dataclass ``cls`` from a YAML of its fields (``base:`` inheritance) plus ``key=value`` overrides.

    For the small trainers (contrastive CLIP, GroupViT, referring): the same parsing and type conversion as the
    main trainer's config (:func:`dataclass_from_mapping`).
    """
    p = Path(path)
    data = apply_overrides(read_yaml_config(p), list(overrides), cls)
    return dataclass_from_mapping(cls, data, f" in {p}")
