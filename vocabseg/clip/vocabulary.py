"""Class names -> CLIP text embeddings: prompt templates, batched encoding and a persistent cache.

A class's embedding is the mean of its L2-normalised prompt embeddings over a template set (e.g. SAN's 14 ViLD
templates), re-normalised. Encoding names x templates prompts dominates the cost of a new vocabulary, so
results are cached in memory and on disk, keyed by the text tower's weights, the templates and the name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vocabseg.errors import VocabularyError

from ..runtime import adaptive_threads
from .load import weights_id

__all__ = [
    "VILD_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "SIMPLE_TEMPLATES",
    "TEMPLATE_SETS",
    "parse_vocabulary",
    "resolve_templates",
    "TextEmbeddingCache",
    "default_cache",
    "default_cache_dir",
    "encode_vocabulary",
    "weights_id",
]

log = logging.getLogger(__name__)

# The 14 ViLD prompt templates (Gu et al. 2021), as used by SAN's open-vocabulary classifier.
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

# OpenAI's 80 ImageNet prompt templates (CLIP repository, notebooks/Prompt_Engineering_for_ImageNet.ipynb).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "vild": VILD_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
    "none": ("{}",),
}

_SPLIT_RE = re.compile(r"[,\r\n]+")


# ----------------------------------------------------------------------------------------------- names and templates


def parse_vocabulary(vocabulary: str | Iterable[str]) -> list[str]:
    """Class names from a comma/newline separated string or a list: stripped, empties dropped, exact
    duplicates removed, order kept. Raises :class:`VocabularyError` if nothing is left."""
    if isinstance(vocabulary, str):
        items: list[object] = list(_SPLIT_RE.split(vocabulary))
    else:
        try:
            items = list(vocabulary)
        except TypeError:
            raise VocabularyError(
                f"The vocabulary must be a string or a list of class names, got a {type(vocabulary).__name__}.") from None
    names: dict[str, None] = {}
    for item in items:
        if not isinstance(item, str):
            raise VocabularyError(f"Class names must be strings, got {item!r} ({type(item).__name__}) in the vocabulary.")
        name = item.strip()
        if name:
            names.setdefault(name, None)
    if not names:
        raise VocabularyError(
            "The vocabulary is empty; give class names separated by commas or newlines, e.g. 'cat, dog, grass'.")
    return list(names)


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """(label, templates) for a registered set name ("vild", "imagenet", "simple", "none") or a list of
    strings with a ``{}`` where the class name goes. A list equal to a registered set gets that set's label."""
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return templates, TEMPLATE_SETS[templates]
        if "{}" not in templates:
            raise VocabularyError(
                f"Unknown template set {templates!r}; use one of {', '.join(TEMPLATE_SETS)} or a list of "
                f"templates containing '{{}}'.")
        templates = [templates]
    templates = tuple(templates)
    if not templates:
        raise VocabularyError("The list of prompt templates is empty; give at least one, e.g. ['a photo of a {}.'].")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise VocabularyError(f"Prompt template {t!r} has no '{{}}' placeholder for the class name.")
    for label, registered in TEMPLATE_SETS.items():
        if templates == registered:
            return label, registered
    return "custom", templates


def templates_key(label: str, templates: Sequence[str]) -> str:
    """Cache key of a template set: its label plus a hash of the exact strings (so edits never hit stale entries)."""
    digest = hashlib.sha256(json.dumps(list(templates)).encode("utf-8")).hexdigest()[:12]
    return f"{label}-{digest}"


# ----------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$VOCABSEG_CACHE/text``, else ``$XDG_CACHE_HOME/vocabseg/text``, else ``~/.cache/vocabseg/text``."""
    root = os.environ.get("VOCABSEG_CACHE")
    if root:
        return Path(root).expanduser() / "text"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vocabseg" / "text"


def _safe_component(text: str) -> str:
    """A file-name-safe version of ``text`` (hash-suffixed when characters had to be replaced)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:64]
    if safe != text or safe in ("", ".", ".."):
        safe = f"{safe}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"
    return safe


class _Shard:
    """The embeddings of one (weights, templates) pair: name -> [D] float32 row."""

    __slots__ = ("rows", "disk_state")

    def __init__(self) -> None:
        self.rows: dict[str, torch.Tensor] = {}
        self.disk_state: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read


class TextEmbeddingCache:
    """In-memory cache of class-name embeddings with an optional on-disk store.

    Keys are (weights id, templates key, class name). On disk there is one safetensors file per
    (weights id, templates key) holding all its names as one [N, D] tensor (names in the metadata), so
    vocabularies of tens of thousands of names cost one file. Writes are atomic and merge with what another
    process may have written meanwhile; unreadable files are ignored and rewritten.

    ``cache_dir``: True (default) for :func:`default_cache_dir`, a path, or None/False for memory only.
    """

    FORMAT_VERSION = "1"

    def __init__(self, cache_dir: str | os.PathLike | bool | None = True) -> None:
        if cache_dir is True:
            self.directory: Path | None = default_cache_dir()
        elif cache_dir is None or cache_dir is False:
            self.directory = None
        else:
            self.directory = Path(os.fspath(cache_dir)).expanduser()
        self._shards: dict[tuple[str, str], _Shard] = {}
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"TextEmbeddingCache(cache_dir={str(self.directory) if self.directory else None!r})"

    # -- files

    def shard_path(self, weights_id: str, templates_key: str) -> Path | None:
        """Where the shard of (weights, templates) lives on disk (None for a memory-only cache)."""
        if self.directory is None:
            return None
        return self.directory / _safe_component(weights_id) / f"{_safe_component(templates_key)}.safetensors"

    @staticmethod
    def _file_state(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _read_file(self, path: Path) -> dict[str, torch.Tensor]:
        """Rows stored in a shard file; an empty dict if it is missing or unreadable (it will be rewritten)."""
        if not path.is_file():
            return {}
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                table = f.get_tensor("embeddings")
            names = json.loads(meta["names"])
            if (meta.get("format_version") != self.FORMAT_VERSION or not isinstance(names, list)
                    or not all(isinstance(n, str) for n in names) or table.ndim != 2
                    or table.shape[0] != len(names) or table.dtype != torch.float32
                    or not torch.isfinite(table).all()):
                raise ValueError("unexpected contents")
        except Exception as e:  # corrupt, truncated, foreign or partially written: recompute instead
            log.warning("ignoring unreadable text-embedding cache file %s (%s)", path, e)
            return {}
        return dict(zip(names, table.unbind(0)))

    def _write_file(self, path: Path, weights_id: str, templates_key: str, rows: Mapping[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        names = list(rows)
        table = torch.stack([rows[n] for n in names]).to(torch.float32).contiguous()
        meta = {"format_version": self.FORMAT_VERSION, "weights_id": weights_id, "templates": templates_key,
                "names": json.dumps(names, ensure_ascii=False)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"embeddings": table}, tmp, metadata=meta)
            os.chmod(tmp, 0o644)  # mkstemp makes files private; let a shared cache directory stay shared
            os.replace(tmp, path)  # atomic: readers see the old or the new file, never half of one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- shards

    def _shard(self, weights_id: str, templates_key: str) -> _Shard:
        """The in-memory shard, (re)reading its file when it changed on disk since we last looked."""
        key = (weights_id, templates_key)
        shard = self._shards.get(key)
        if shard is None:
            shard = self._shards[key] = _Shard()
        path = self.shard_path(weights_id, templates_key)
        if path is not None:
            state = self._file_state(path)
            if state is not None and state != shard.disk_state:
                for name, row in self._read_file(path).items():
                    shard.rows.setdefault(name, row)
                shard.disk_state = state
        return shard

    def get(self, weights_id: str, templates_key: str, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The cached embeddings among ``names`` (missing names are simply absent from the result)."""
        names = list(names)
        with self._lock:
            rows = self._shards.get((weights_id, templates_key))
            if rows is None or any(n not in rows.rows for n in names):
                rows = self._shard(weights_id, templates_key)  # only touch the disk when something is missing
            found = {n: rows.rows[n] for n in names if n in rows.rows}
        self.hits += len(found)
        self.misses += len(names) - len(found)
        return found

    def put(self, weights_id: str, templates_key: str, embeddings: Mapping[str, torch.Tensor],
            persist: bool = True) -> None:
        """Store embeddings ([D] each) in memory and, with ``persist``, merge them into the shard file."""
        with self._lock:
            shard = self._shard(weights_id, templates_key)
            for name, row in embeddings.items():
                shard.rows[name] = row.detach().to("cpu", torch.float32).reshape(-1).clone()
            if persist:
                self.persist(weights_id, templates_key)

    def persist(self, weights_id: str, templates_key: str) -> None:
        """Write the shard to disk, merged with the file's current contents. Failures only log a warning:
        the cache is an optimisation, never a reason to fail a prediction."""
        path = self.shard_path(weights_id, templates_key)
        if path is None:
            return
        with self._lock:
            shard = self._shard(weights_id, templates_key)
            if not shard.rows:
                return
            dims = {r.shape[0] for r in shard.rows.values()}
            if len(dims) != 1:  # cannot happen for one weights id; keep the newest consistent set
                log.warning("text-embedding cache shard %s mixes dimensions %s; not writing it", path, dims)
                return
            try:
                self._write_file(path, weights_id, templates_key, shard.rows)
                shard.disk_state = self._file_state(path)
            except OSError as e:
                log.warning("could not write text-embedding cache file %s (%s)", path, e)

    def clear(self) -> None:
        """Forget the in-memory entries (files on disk are kept)."""
        with self._lock:
            self._shards.clear()

    def __len__(self) -> int:
        return sum(len(s.rows) for s in self._shards.values())


_default_caches: dict[Path, TextEmbeddingCache] = {}
_default_lock = threading.Lock()


def default_cache() -> TextEmbeddingCache:
    """The process-wide cache in :func:`default_cache_dir` (a new one if ``$VOCABSEG_CACHE`` changed)."""
    directory = default_cache_dir()
    with _default_lock:
        cache = _default_caches.get(directory)
        if cache is None:
            cache = _default_caches[directory] = TextEmbeddingCache(directory)
        return cache


# ----------------------------------------------------------------------------------------------- encoding


def _model_device(model: object) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _check_names(names: str | Iterable[str]) -> list[str]:
    """Requested names in order (a string is parsed; list entries are stripped but duplicates are kept)."""
    if isinstance(names, str):
        return parse_vocabulary(names)
    out = []
    for item in names:
        if not isinstance(item, str) or not item.strip():
            raise VocabularyError(f"Class names must be non-empty strings, got {item!r} in the vocabulary.")
        out.append(item.strip())
    if not out:
        raise VocabularyError(
            "The vocabulary is empty; give class names separated by commas or newlines, e.g. 'cat, dog, grass'.")
    return out


# Prompts tokenised at once: bounds memory (77 int64 ids each) for vocabularies of tens of thousands of names.
_PROMPTS_PER_CHUNK = 16384
_PERSIST_EVERY_S = 30.0


def _encode_names(model: object, names: Sequence[str], templates: Sequence[str], batch_size: int,
                  device: torch.device, shared_prefix: bool = True) -> torch.Tensor:
    """[len(names), D] template-averaged, L2-normalised embeddings, computed without any cache."""
    prompts = [t.replace("{}", name) for name in names for t in templates]
    from .tokenizer import tokenize  # here, not at import: ftfy and regex cost 0.1 s that cached text never needs

    own_tokenize = getattr(model, "tokenize", None)
    if callable(own_tokenize):  # a model with its own tokenizer (e.g. LiTCLIP's WordPiece): its ids, its padding
        tokens = own_tokenize(prompts)  # [P, L]
        pad = getattr(model, "pad_token_id", None)
        # Sort by length so each batch holds prompts of similar length (less padding to run through the tower).
        order = (torch.argsort((tokens != pad).sum(dim=-1), stable=True) if pad is not None
                 else torch.arange(len(prompts)))
    elif shared_prefix and callable(getattr(model, "encode_text_grouped", None)) and len(templates) > 1:
        return _encode_grouped(model, names, templates, tokenize(prompts), batch_size, device)
    else:
        tokens = tokenize(prompts)  # [P, 77] CLIP BPE
        # Sort by EOT position so each batch is cut to a short length (encode_text stops at the batch's last EOT).
        order = torch.argsort(tokens.argmax(dim=-1), stable=True)
    outputs: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = tokens[order[start:start + batch_size]].to(device)
            outputs.append(F.normalize(model.encode_text(batch).float(), dim=-1).cpu())
    # Leave inference mode before assembling, so the result is a normal tensor usable in autograd graphs.
    emb = torch.empty(len(prompts), outputs[0].shape[-1])
    emb[order] = torch.cat(outputs).clone()
    per_class = emb.view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def _encode_grouped(model: object, names: Sequence[str], templates: Sequence[str], tokens: torch.Tensor,
                    batch_size: int, device: torch.device) -> torch.Tensor:
    """The CLIP path of :func:`_encode_names`: each template's shared beginning runs once per batch
    (``encode_text_grouped``), and prompts are batched by the length of what follows it (little padding)."""
    t = len(templates)
    group = torch.arange(t).repeat(len(names))  # prompts are name-major: row i uses template i % t
    eot = tokens.argmax(dim=-1)
    shared = torch.zeros(len(tokens), dtype=torch.long)
    for g in range(t):  # the template's common prefix over all names (never reaching an EOT)
        rows = tokens[g::t]
        same = int((rows == rows[:1]).all(dim=0).long().cumprod(dim=0).sum())
        shared[g::t] = min(same, int(eot[g::t].min()))
    order = torch.argsort(eot + 1 - shared, stable=True)
    outputs: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            rows = order[start:start + batch_size]
            emb = model.encode_text_grouped(tokens[rows].to(device), group[rows].to(device))
            outputs.append(F.normalize(emb.float(), dim=-1).cpu())
    emb = torch.empty(len(tokens), outputs[0].shape[-1])
    emb[order] = torch.cat(outputs).clone()  # outside inference mode: a normal tensor
    return F.normalize(emb.view(len(names), t, -1).mean(dim=1), dim=-1)


def encode_vocabulary(model: object, names: str | Iterable[str], templates: str | Sequence[str] = "vild",
                      cache: TextEmbeddingCache | bool | None = True, batch_size: int = 128,
                      device: str | torch.device | None = None, shared_prefix: bool = True) -> torch.Tensor:
    """Text embeddings [C, D] (float32, L2-normalised, rows in the order of ``names``) of class names.

    Each class embedding is the mean of its prompts' normalised embeddings over ``templates`` (a name from
    ``TEMPLATE_SETS`` or a list of strings with ``{}``), re-normalised. Only names missing from ``cache``
    are encoded (True: the default on-disk cache; False/None: no caching). ``model`` is anything with
    ``encode_text(tokens)``; its ``weights_id`` (or a hash of its text tensors) keys the cache. Prompts are
    tokenised by the model's own ``tokenize`` method when it has one (e.g. :class:`~vocabseg.clip.sentence.LiTCLIP`'s
    WordPiece), else with CLIP's BPE. The result is on ``device`` (default: the model's).

    ``shared_prefix``: run each template's common beginning once for all names (``encode_text_grouped``; about
    half the work with the ViLD templates, equal up to float rounding, ~5e-8); False gives the bits of the plain
    path (each prompt through ``encode_text``).
    """
    wanted = _check_names(names)
    label, template_list = resolve_templates(templates)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    if cache is True:
        cache = default_cache()
    elif cache is False:
        cache = None
    unique = list(dict.fromkeys(wanted))
    found: dict[str, torch.Tensor] = {}
    wid = key = ""
    if cache is not None:
        wid, key = weights_id(model), templates_key(label, template_list)
        found = cache.get(wid, key, unique)
    todo = [n for n in unique if n not in found]
    if todo:
        with adaptive_threads():  # many small operators: use only the cores other processes leave free
            _encode_missing(model, todo, template_list, batch_size, device, cache, wid, key, found, shared_prefix)
    return torch.stack([found[n] for n in wanted]).to(device=device, dtype=torch.float32)


def _encode_missing(model: object, todo: list[str], template_list: Sequence[str], batch_size: int,
                    device: torch.device, cache: TextEmbeddingCache | None, wid: str, key: str,
                    found: dict[str, torch.Tensor], shared_prefix: bool = True) -> None:
    """Encode ``todo`` chunk by chunk into ``found`` (and the cache, saved every 30 s on long runs)."""
    if todo:
        per_chunk = max(1, _PROMPTS_PER_CHUNK // len(template_list))
        last_persist = time.monotonic()
        for start in range(0, len(todo), per_chunk):
            chunk = todo[start:start + per_chunk]
            emb = _encode_names(model, chunk, template_list, batch_size, device, shared_prefix)
            new = dict(zip(chunk, emb.unbind(0)))
            found.update(new)
            if cache is not None:
                save_now = time.monotonic() - last_persist > _PERSIST_EVERY_S  # keep progress on long runs
                cache.put(wid, key, new, persist=save_now)
                if save_now:
                    last_persist = time.monotonic()
        if cache is not None:
            cache.persist(wid, key)
