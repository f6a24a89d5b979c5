"""Read CLIP weights in the formats they are published in and build a :class:`~vocabseg.clip.model.CLIP` from them.

The pipeline is short: read the file (format sniffed from its bytes, never its extension), unwrap training
containers, drop entries that are not weights, infer the architecture from tensor shapes, load strictly.

Formats:

* safetensors (preferred; also what :func:`save_state_dict` writes, with the config in its metadata);
* ``torch.save`` zip or legacy pickle: read with ``torch.load(weights_only=True)``, which cannot run code;
* TorchScript archives (OpenAI's ``ViT-B-16.pt`` and friends): loading one executes code stored in the file,
  so it is refused unless the caller passes ``trust_jit=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
import weakref
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from vocabseg.errors import CheckpointError, ConfigError

from .model import CLIP, CLIPConfig

__all__ = [
    "read_state_dict",
    "clip_config_from_state_dict",
    "drop_non_weights",
    "load",
    "save_state_dict",
    "weights_id",
    "LoadedCLIP",
    "TEXT_TOWER_PREFIXES",
]

PathLike = str | os.PathLike

# Entries of published state dicts that are not learnt weights: OpenAI's JIT state dicts carry
# input_resolution / context_length / vocab_size, open_clip (and SAN) store the causal attn_mask,
# BatchNorm keeps num_batches_tracked (meaningless in eval mode).
_METADATA_KEYS = frozenset({"input_resolution", "context_length", "vocab_size"})
_IGNORED_SUFFIXES = ("attn_mask", "num_batches_tracked")

# Names of the text tower's tensors in OpenAI's layout; everything else (visual.*, logit_scale) is the image side.
TEXT_TOWER_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")

# Keys of the SAN release file (see shared data/san-keys): a whole segmentation model, not a CLIP.
_SAN_PREFIXES = ("side_adapter_network.", "clip_rec_head.", "clip_visual_extractor.", "ov_classifier.")

_CONFIG_METADATA_KEY = "vocabseg.clip_config"


# ----------------------------------------------------------------------------------------------- reading files


def _first_line(err: BaseException, limit: int = 160) -> str:
    """A one-line summary of a library exception for inclusion in our own message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    text = text.split(". ", 1)[0].rstrip(".")  # one clause: our message must stay a single sentence
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # torch colours some of its messages
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_file(path: Path) -> int:
    """Size of ``path``; raise a CheckpointError if it is missing, a directory or empty."""
    if not path.exists():
        raise CheckpointError(f"Checkpoint file {path} does not exist.")
    if path.is_dir():
        raise CheckpointError(f"Checkpoint path {path} is a directory, not a weights file.")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"Checkpoint file {path} cannot be read ({e.strerror or e}).") from e
    if size == 0:
        raise CheckpointError(f"Checkpoint file {path} is empty (0 bytes); it was probably not fully written or downloaded.")
    return size


def _sniff(path: Path, size: int) -> str:
    """The file's format from its first bytes: 'zip', 'pickle', 'safetensors', 'text' or 'unknown'."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"Checkpoint file {path} cannot be read ({e.strerror or e}).") from e
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "pickle"
    looks_like_text = head.lstrip()[:1] in (b"{", b"[", b"#", b"<")
    if len(head) >= 9 and head[8:9] == b"{":  # u64 little-endian header length, then the JSON header
        header_len = int.from_bytes(head[:8], "little")
        if header_len + 8 > size and looks_like_text:
            return "text"
        if header_len + 8 > size:
            raise CheckpointError(
                f"Checkpoint file {path} is a truncated safetensors file (its header says {header_len} bytes, "
                f"the file has {size}).")
        return "safetensors"
    if looks_like_text:
        return "text"
    return "unknown"


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each tensor read straight from the file into its own freshly allocated (64-byte aligned) storage.

    Not memory-mapped: a mapped tensor sits at the file's 8-byte alignment, and oneDNN/MKL kernels then take other
    code paths whose last bits differ (fp32 results must not depend on how a file was read). Reading tensor by
    tensor into new storage holds the weights once (the model takes these tensors, see ``load_model``), and the
    format (8-byte header length, JSON header, raw data) needs nothing else.
    """
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            metadata = header.pop("__metadata__", None) or {}
            size = os.fstat(f.fileno()).st_size - 8 - n
            tensors = {}
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"unsupported dtype {info['dtype']} of {name}")
                begin, end = (int(x) for x in info["data_offsets"])
                t = torch.empty([int(d) for d in info["shape"]], dtype=dtype)
                nbytes = t.numel() * t.element_size()
                if end - begin != nbytes or begin < 0 or end > size:
                    raise ValueError(f"tensor {name} does not fit the file")
                if nbytes:
                    f.seek(8 + n + begin)
                    if f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != nbytes:
                        raise ValueError("unexpected end of file")
                tensors[name] = t
    except Exception as e:  # JSON, key, value and OS errors of a corrupt, truncated or foreign file
        raise CheckpointError(
            f"Checkpoint file {path} is a corrupt or truncated safetensors file ({_first_line(e)}).") from e
    return dict(sorted(tensors.items())), {str(k): str(v) for k, v in metadata.items()}


def _torch_load(path: Path, expected: str = "a weights file") -> object:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            # metadata objects beside the weights (OmegaConf configs, Counters, Lightning callbacks): read them as
            # inert placeholders; anything else (a pickled model, os.system...) is refused without running it
            from ..checkpoint_io import safe_torch_load

            return safe_torch_load(path, expected=expected)
        raise CheckpointError(f"Checkpoint file {path} is truncated or corrupt ({_first_line(e)}).") from e
    except (EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"Checkpoint file {path} is truncated or corrupt (unexpected end of data).") from e
    except Exception as e:  # RuntimeError from the zip reader, invalid magic number, ...
        if "eof" in str(e).lower():
            raise CheckpointError(f"Checkpoint file {path} is truncated or corrupt ({_first_line(e)}).") from e
        raise CheckpointError(
            f"Checkpoint file {path} could not be read by torch.load ({_first_line(e)}).") from e


def _read_zip(path: Path, trust_jit: bool, expected: str = "a weights file") -> object:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile as e:
        raise CheckpointError(
            f"Checkpoint file {path} is a truncated or corrupt zip archive (no valid end-of-archive record).") from e
    except OSError as e:
        raise CheckpointError(f"Checkpoint file {path} cannot be read ({e.strerror or e}).") from e
    is_jit = any("/code/" in n or n.endswith("constants.pkl") for n in names)
    if is_jit:
        if not trust_jit:
            raise CheckpointError(
                f"Checkpoint file {path} is a TorchScript archive, and loading it runs code stored in the file; "
                f"pass trust_jit=True (or --trust-jit) if you trust its source, or convert it to a plain state "
                f"dict or safetensors file.")
        try:
            with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript, but OpenAI's files are TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:
            raise CheckpointError(
                f"Checkpoint file {path} is a TorchScript archive that could not be loaded ({_first_line(e)}).") from e
    if any(n.endswith("data.pkl") for n in names):
        return _torch_load(path, expected)
    raise CheckpointError(f"Checkpoint file {path} is a zip archive but not a PyTorch checkpoint (no data.pkl inside).")


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, looking inside training containers ({"state_dict": ...}, {"model": ...})."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"Checkpoint file {path} holds a {type(obj).__name__}, not a dict of tensors (a state dict).")
    for _ in range(4):  # nested containers, e.g. {"model": {"state_dict": ...}}, are rare but cheap to support
        inner = obj.get("state_dict")
        if isinstance(inner, Mapping):
            obj = inner
            continue
        inner = obj.get("model")
        if _is_tensor_dict(inner):
            obj = inner
            continue
        break
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            tensors[key[len("module."):] if key.startswith("module.") else key] = value  # DDP-wrapped training
    if not tensors:
        raise CheckpointError(f"Checkpoint file {path} contains no tensors; it is not a state dict.")
    return tensors


def _read_checkpoint(path: PathLike, trust_jit: bool, expected: str = "a weights file"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """Tensors, safetensors metadata (empty for other formats) and the resolved path."""
    path = Path(os.fspath(path)).expanduser()
    size = _check_file(path)
    kind = _sniff(path, size)
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(path)
        return _unwrap(tensors, path), metadata, path
    if kind == "zip":
        obj = _read_zip(path, trust_jit, expected)
    elif kind == "pickle":
        obj = _torch_load(path, expected)
    elif kind == "text":
        raise CheckpointError(f"Checkpoint file {path} is a text file (JSON, YAML or HTML?), not a weights file.")
    else:
        raise CheckpointError(
            f"Checkpoint file {path} is not in a known weights format (expected safetensors, a torch.save file "
            f"or a TorchScript archive).")
    return _unwrap(obj, path), {}, path


def read_state_dict(path: PathLike, trust_jit: bool = False,
                    expected: str = "a weights file") -> dict[str, torch.Tensor]:
    """The tensors stored in a checkpoint file, whatever its format, with containers and DDP prefixes removed.

    Plain files are read with ``torch.load(weights_only=True)``; a TorchScript archive is only opened when
    ``trust_jit`` is true because loading it executes code from the file. Raises :class:`CheckpointError`
    with a one-line message for any unusable file.
    """
    return _read_checkpoint(path, trust_jit, expected)[0]


# ----------------------------------------------------------------------------------------------- architecture


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct block indices N in keys ``{prefix}N.…``."""
    idx = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    return len({i for i in idx if i.isdigit()})


def _heads_for(width: int) -> int:
    """OpenAI's rule (one head per 64 channels), falling back to one head for widths it does not divide."""
    heads = width // 64
    return heads if heads >= 1 and width % heads == 0 else 1


def _not_clip_error(sd: Mapping[str, object], missing: list[str], where: str) -> CheckpointError:
    keys = list(sd)
    if any(k.startswith(_SAN_PREFIXES) for k in keys):
        return CheckpointError(
            f"{where} is a SAN checkpoint; load it with vocabseg.load_model('san_vit_b_16', checkpoint=...) "
            f"rather than as a CLIP.")
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return CheckpointError(
            f"{where} is a Hugging Face transformers CLIP, which uses different tensor names; use an OpenAI or "
            f"open_clip checkpoint of the same model.")
    if any(k.startswith(("visual.trunk.", "text.transformer.")) for k in keys):
        return CheckpointError(
            f"{where} is an open_clip model with a timm or Hugging Face tower, which vocabseg's CLIP does not "
            f"implement.")
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return CheckpointError(f"{where} does not look like a CLIP checkpoint (missing visual.* / text keys: {shown}).")


def clip_config_from_state_dict(sd: Mapping[str, torch.Tensor], activation: str = "quick_gelu",
                                *, source: str | None = None) -> CLIPConfig:
    """Infer a CLIP architecture from tensor shapes, as OpenAI's ``build_model`` does.

    A state dict does not record the activation: OpenAI's weights use QuickGELU (the default), LAION-trained
    open_clip weights of the same shapes need ``activation="gelu"``. ``source`` names the file in errors.
    """
    where = f"Checkpoint file {source}" if source else "The state dict"
    if isinstance(sd.get("model"), Mapping) and any(k.startswith(_SAN_PREFIXES) for k in sd["model"]):
        raise _not_clip_error(sd["model"], [], where)
    is_vit = "visual.proj" in sd
    vision_keys = (["visual.conv1.weight", "visual.positional_embedding", "visual.proj"] if is_vit
                   else ["visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding"])
    text_keys = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"]
    missing = [k for k in vision_keys + text_keys if k not in sd]
    if not is_vit:
        missing += [f"visual.layer{i}.*" for i in range(1, 5) if _count_blocks(sd, f"visual.layer{i}.") == 0]
    if _count_blocks(sd, "transformer.resblocks.") == 0:
        missing.append("transformer.resblocks.*")
    if is_vit and _count_blocks(sd, "visual.transformer.resblocks.") == 0:
        missing.append("visual.transformer.resblocks.*")
    if missing:
        raise _not_clip_error(sd, missing, where)

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        s = tuple(sd[key].shape)
        if len(s) != ndim:
            raise CheckpointError(f"{where} has {key} of shape {list(s)}, but CLIP expects a {ndim}-D tensor.")
        return s

    if is_vit:
        width, _, patch, _ = shape("visual.conv1.weight", 4)
        layers: int | tuple[int, int, int, int] = _count_blocks(sd, "visual.transformer.resblocks.")
        grid = round((shape("visual.positional_embedding", 2)[0] - 1) ** 0.5)
        resolution = grid * patch
        # CLIPConfig's default is width // 64; only set the heads where that rule gives an unusable count
        vision_heads = _heads_for(width) if _heads_for(width) != width // 64 else None
    else:
        width = shape("visual.layer1.0.conv1.weight", 4)[0]
        layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))  # type: ignore[assignment]
        patch = None
        grid = round((shape("visual.attnpool.positional_embedding", 2)[0] - 1) ** 0.5)
        resolution = grid * 32
        vision_heads = None  # CLIPConfig's ResNet rule: width * 32 // 64
    text_width = shape("ln_final.weight", 1)[0]
    return CLIPConfig(
        embed_dim=shape("text_projection", 2)[1],
        image_resolution=resolution,
        vision_layers=layers,
        vision_width=width,
        vision_patch_size=patch,
        context_length=shape("positional_embedding", 2)[0],
        vocab_size=shape("token_embedding.weight", 2)[0],
        transformer_width=text_width,
        transformer_heads=_heads_for(text_width),
        transformer_layers=_count_blocks(sd, "transformer.resblocks."),
        activation=activation,
        vision_heads=vision_heads,
        vision_conv_branch=shape("visual.conv_branch.convs.0.weight", 4)[0] if "visual.conv_branch.convs.0.weight" in sd else 0,
    )


def _config_from_metadata(metadata: Mapping[str, str]) -> CLIPConfig | None:
    """The config :func:`save_state_dict` stored (it keeps head counts, which shapes cannot tell)."""
    raw = metadata.get(_CONFIG_METADATA_KEY)
    if not raw:
        return None
    try:
        return CLIPConfig.from_dict(json.loads(raw))
    except (ValueError, TypeError):
        return None  # unreadable metadata: fall back to inferring from shapes


# ----------------------------------------------------------------------------------------------- identity


def _text_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    items = [(n, t) for n, t in model.state_dict(keep_vars=True).items() if n.startswith(TEXT_TOWER_PREFIXES)]
    if not items:  # not an OpenAI-layout CLIP: identify it by all its tensors
        items = list(model.state_dict(keep_vars=True).items())
    return sorted(items, key=lambda item: item[0])


# model -> (fingerprint, digest). Kept outside the model so pickling or deep-copying a model is unaffected.
_WEIGHTS_IDS: "weakref.WeakKeyDictionary[nn.Module, tuple[list, str]]" = weakref.WeakKeyDictionary()


def _text_fingerprint(items: list[tuple[str, torch.Tensor]]) -> list | None:
    """Cheap identity of tensors' current contents: the tensor objects (weakly), storage address and in-place
    version counter. Any replacement or in-place change of a tensor changes it."""
    try:
        return [(n, weakref.ref(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype) for n, t in items]
    except RuntimeError:  # inference tensors have no version counter: do not trust a cached hash
        return None


def _same_tensors(fingerprint: list, items: list[tuple[str, torch.Tensor]]) -> bool:
    if len(fingerprint) != len(items):
        return False
    try:
        return all(n == m and ref() is t and (ptr, ver, shape, dtype) == (t.data_ptr(), t._version, tuple(t.shape), t.dtype)
                   for (n, ref, ptr, ver, shape, dtype), (m, t) in zip(fingerprint, items))
    except RuntimeError:
        return False


def _compute_weights_id(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the text tower's tensors and what changes its output (activation, heads)."""
    items = _text_tensors(model)
    cached = _WEIGHTS_IDS.get(model)
    if cached is not None and _same_tensors(cached[0], items):
        return cached[1]
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    for attr in ("activation", "transformer_heads", "transformer_layers"):
        h.update(f"{attr}={getattr(config, attr, None)};".encode())
    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    digest = h.hexdigest()[:16]
    fingerprint = _text_fingerprint(items)
    if fingerprint is not None:
        _WEIGHTS_IDS[model] = (fingerprint, digest)
    return digest


def weights_id(model: object) -> str:
    """An identifier of a model's text-tower weights, used to key cached text embeddings.

    Uses ``model.weights_id`` when the model carries a string one; otherwise hashes the text tower's tensors
    (``token_embedding``, ``transformer``, ...; all tensors if there are none of those). The hash is cached on
    the model and recomputed only when a tensor is replaced or modified in place.
    """
    given = getattr(model, "weights_id", None)
    if isinstance(given, str) and given:
        return given
    if not isinstance(model, nn.Module):
        raise TypeError(f"cannot identify the weights of a {type(model).__name__}: give it a 'weights_id' string")
    return _compute_weights_id(model)


class LoadedCLIP(CLIP):
    """A :class:`CLIP` read from a file: remembers ``checkpoint_path`` and exposes a lazily computed ``weights_id``."""

    checkpoint_path: Path | None = None
    preprocess_resolution: int | None = None

    @property
    def weights_id(self) -> str:  # type: ignore[override]
        return _compute_weights_id(self)


# ----------------------------------------------------------------------------------------------- loading


def _is_ignored(key: str) -> bool:
    return key in _METADATA_KEYS or key.endswith(_IGNORED_SUFFIXES)


def drop_non_weights(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` without entries that are not learnt weights: OpenAI JIT metadata (``input_resolution``,
    ``context_length``, ``vocab_size``), causal ``attn_mask`` buffers and BatchNorm ``num_batches_tracked``."""
    return {k: v for k, v in sd.items() if not _is_ignored(k)}


def _names(keys: Iterable[str], limit: int = 3) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_match(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise one line naming the missing, unexpected and wrongly shaped tensors, if any."""
    expected = {k: v for k, v in model.state_dict().items() if not _is_ignored(k)}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {list(sd[k].shape)} in the file, {list(expected[k].shape)} expected"
             for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong):
        return

    def count(n: int, what: str) -> str:
        return f"{n} {what}" + ("s" if n > 1 else "")

    parts = []
    if missing:
        parts.append(f"{count(len(missing), 'missing tensor')} ({_names(missing)})")
    if unexpected:
        parts.append(f"{count(len(unexpected), 'unexpected tensor')} ({_names(unexpected)})")
    if wrong:
        parts.append(f"{count(len(wrong), 'tensor')} with the wrong shape ({_names(wrong)})")
    raise CheckpointError(
        f"Checkpoint file {path} does not match the CLIP architecture inferred from its shapes: "
        + "; ".join(parts) + ".")


def load(path: PathLike, device: str | torch.device = "cpu", trust_jit: bool = False,
         activation: str | None = None, image_resolution: int | None = None) -> LoadedCLIP:
    """Build a CLIP from a weights file (OpenAI, open_clip or our own layout), in eval mode and float32.

    ``activation``: None keeps the file's own setting if it stores one (files from :func:`save_state_dict`),
    else OpenAI's "quick_gelu"; LAION-trained open_clip weights need ``activation="gelu"``.
    ``image_resolution`` sets the resolution :func:`vocabseg.clip.preprocess` uses for this model
    (``model.preprocess_resolution``); the weights keep their trained grid, which the model resizes at run time.
    The model gets ``checkpoint_path`` and a lazily computed ``weights_id`` (hash of the text tower).
    A LiT CLIP file (``lit_clip.safetensors``, see :mod:`vocabseg.clip.sentence`) gives a ``LiTCLIP`` instead.
    """
    if activation is not None and activation not in ("quick_gelu", "gelu"):
        raise ConfigError(f"Unknown activation {activation!r} for {path}; use 'quick_gelu' (OpenAI) or 'gelu' (LAION).")
    if image_resolution is not None and (not isinstance(image_resolution, int) or image_resolution <= 0):
        raise ConfigError(f"image_resolution must be a positive integer, got {image_resolution!r}.")
    sd, metadata, path = _read_checkpoint(path, trust_jit)
    if metadata.get("vocabseg.text_tower") == "minilm":  # a LiT CLIP file (sentence.save_lit): image tower only
        from .sentence import load_lit

        lit = load_lit(path, device=device)
        lit.preprocess_resolution = image_resolution or lit.config.image_resolution
        return lit  # type: ignore[return-value]
    sd = drop_non_weights(sd)
    config = _config_from_metadata(metadata) or clip_config_from_state_dict(sd, source=str(path))
    if activation is not None:
        config.activation = activation
    try:
        with torch.device("meta"):  # no random init: every tensor comes from the file
            model = LoadedCLIP(config)
    except ValueError as e:  # e.g. a width the inferred head count does not divide
        raise CheckpointError(f"Checkpoint file {path} has CLIP shapes that cannot be built ({_first_line(e)}).") from e
    _check_match(model, sd, path)
    full = {k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    for key, buf in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            full[key] = torch.zeros((), dtype=buf.dtype)
    model.load_state_dict(full, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a tensor the model has but state_dict() does not list: a bug, not a user error
        raise RuntimeError(f"tensors left uninitialised after loading {path}: {leftover}")
    model.eval().to(device)
    model.checkpoint_path = path
    model.preprocess_resolution = image_resolution or config.image_resolution
    return model


def save_state_dict(model: CLIP, path: PathLike) -> Path:
    """Write a CLIP's weights as OpenAI-layout safetensors, with its config in the file's metadata.

    The metadata keeps what shapes cannot tell (head counts, activation), so :func:`load` rebuilds the exact
    model; other tools see a plain OpenAI-layout state dict. Written atomically (temporary file + rename).
    """
    metadata = {}
    config = getattr(model, "config", None)
    if isinstance(config, CLIPConfig):
        metadata[_CONFIG_METADATA_KEY] = json.dumps(config.to_dict())
    return _write_safetensors(model.state_dict(), path, metadata)


def _write_safetensors(state: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str]) -> Path:
    from safetensors.torch import save_file

    path = Path(os.fspath(path)).expanduser()
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        t = value.detach().to("cpu").contiguous()
        if t.data_ptr() in seen and t.numel():  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[key] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **metadata})
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a weights file is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ------------------------------------------------------------------------------------------------ weight patches
# A patch file holds only what one set of weights changes in another: whole tensors that changed or are new, and
# for a matrix of which few rows changed (a token table after tuning a few words) those rows alone, as the pair
# ``NAME.__rows__`` (int64 row indices) + ``NAME.__values__``. The embedded default ships its shape-tuned CLIP
# this way on top of the CLIP the world-trained models share (2 MB instead of a second 20 MB file).
_ROWS, _VALUES = ".__rows__", ".__values__"


def save_weight_patch(base: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], path: PathLike,
                      dtype: torch.dtype | None = None) -> Path:
    """Write the tensors of ``new`` that differ from ``base`` (cast to ``dtype`` if given) as a patch file."""
    out: dict[str, torch.Tensor] = {}
    for key, value in new.items():
        value = value.detach().cpu()
        cast = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        old = base.get(key)
        if old is not None and old.shape == value.shape and torch.equal(old.to(cast.dtype), cast):
            continue
        if old is not None and old.shape == value.shape and value.ndim == 2:
            rows = (old.to(cast.dtype) != cast).any(dim=1).nonzero().flatten()
            if len(rows) < value.shape[0] // 4:
                out[key + _ROWS], out[key + _VALUES] = rows.to(torch.int64), cast[rows]
                continue
        out[key] = cast
    return _write_safetensors(out, path, {"vocabseg.weight_patch": "1"})


def apply_weight_patch(base: Mapping[str, torch.Tensor], patch: Mapping[str, torch.Tensor],
                       source: str = "the patch") -> dict[str, torch.Tensor]:
    """``base`` with the tensors and rows of a :func:`save_weight_patch` file put in (values in ``base``'s dtype)."""
    out = dict(base)
    for key, value in patch.items():
        if key.endswith(_VALUES):
            continue
        if key.endswith(_ROWS):
            name = key[: -len(_ROWS)]
            values = patch.get(name + _VALUES)
            if name not in out or values is None or values.shape[1:] != out[name].shape[1:]:
                raise CheckpointError(f"{source} changes rows of {name}, which the CLIP it patches does not have "
                                      f"in that shape.")
            table = out[name].clone()
            table[value] = values.to(table.dtype)
            out[name] = table
        else:
            out[key] = value.to(out[key].dtype) if key in out and value.is_floating_point() else value
    return out


def read_patched_state_dict(paths: PathLike | Iterable[PathLike], trust_jit: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one weights file, or of a first file with the patch files that follow it applied in order."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    state = read_state_dict(paths[0], trust_jit=trust_jit)
    if any(k.endswith(_ROWS) for k in state):
        raise CheckpointError(f"{paths[0]} is a weight patch (what tuning changed in another CLIP file); load the "
                              f"CLIP it patches and this patch together.")
    for patch in paths[1:]:
        state = apply_weight_patch(state, read_state_dict(patch), source=str(patch))
    return state
