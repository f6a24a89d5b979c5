"""CLIP's byte-level BPE tokenizer, giving ids identical to OpenAI's ``clip.tokenize``.

The text tower was trained on these exact ids, so every detail below (cleaning, the pre-tokenising
regex, the byte-to-unicode table, vocabulary order, merge ranks, ``</w>`` on a word's last symbol,
truncation keeping EOT) is part of the model's contract, not a free choice.

Vocabulary layout (49,408 entries): the 256 byte symbols, the same with ``</w>`` appended, the
first 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz`` joined, then ``<|startoftext|>`` (49406)
and ``<|endoftext|>`` (49407).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import re
import threading
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch

from vocabseg.errors import CheckpointError, ConfigError, VocabularyError

__all__ = ["SimpleTokenizer", "get_tokenizer", "tokenize", "SOT_ID", "EOT_ID", "VOCAB_SIZE"]

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894 merges are used; the file holds more.
END_OF_WORD = "</w>"

# Compiled once: CLIP splits text into special tokens, common English contractions, runs of letters,
# single digits, and runs of other non-space characters.
_PIECE_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE_RE = re.compile(r"\s+")

_TEXT_CACHE_SIZE = 1 << 16


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, so BPE can work on strings without spaces
    or control characters.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68 bytes map,
    in byte order, to code points 256, 257, ... The dict's insertion order (printable bytes first)
    is the order of the first 256 vocabulary entries.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """Clean text as CLIP did before training: ftfy, HTML-unescape twice, collapse whitespace, lower-case."""
    # Fast path: ftfy and html.unescape leave printable ASCII without '&' unchanged (no mojibake,
    # entities, control characters or line breaks are possible), and ftfy dominates the cost.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    text = _WHITESPACE_RE.sub(" ", text.strip()).strip()
    return text.lower()


def _default_bpe_bytes() -> bytes:
    data = resources.files("vocabseg.clip").joinpath(BPE_FILENAME).read_bytes()
    if hashlib.sha256(data).hexdigest() != BPE_SHA256:
        raise CheckpointError(
            f"The packaged BPE merges file {BPE_FILENAME} is corrupt (sha256 mismatch); reinstall vocabseg."
        )
    return data


def _read_merges(data: bytes) -> list[tuple[str, str]]:
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP uses the next NUM_MERGES lines.
    chosen = lines[1 : NUM_MERGES + 1]
    merges = []
    for line in chosen:
        parts = line.split()
        if len(parts) != 2:
            raise CheckpointError(f"The BPE merges file has a malformed line {line!r}; use CLIP's {BPE_FILENAME}.")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise CheckpointError(
            f"The BPE merges file holds {len(merges)} merges, fewer than the {NUM_MERGES} CLIP needs; "
            f"use CLIP's {BPE_FILENAME}."
        )
    return merges


class SimpleTokenizer:
    """Encode text to CLIP token ids and back.

    BPE results are cached per word and whole-text encodings in an LRU cache, because vocabularies
    repeat the same words across prompt templates.
    """

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        if bpe_path is None:
            data = _default_bpe_bytes()
        else:
            try:
                data = Path(bpe_path).read_bytes()
            except OSError as exc:
                raise CheckpointError(f"Cannot read the BPE merges file {bpe_path}: {exc.strerror}.") from exc
        merges = _read_merges(data)

        self.byte_encoder: dict[int, str] = bytes_to_unicode()
        self.byte_decoder: dict[str, int] = {c: b for b, c in self.byte_encoder.items()}
        # bytes -> byte-level string, via a 256-entry translation table (fast str.translate path).
        self._byte_table = [self.byte_encoder[b] for b in range(256)]

        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.sot_id: int = self.encoder[SOT_TOKEN]
        self.eot_id: int = self.encoder[EOT_TOKEN]
        # Per-piece cache: byte-level piece -> ids. Special tokens are never split.
        self._word_cache: dict[str, tuple[int, ...]] = {SOT_TOKEN: (self.sot_id,), EOT_TOKEN: (self.eot_id,)}
        self._encode_cached = functools.lru_cache(maxsize=_TEXT_CACHE_SIZE)(self._encode_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, piece: str) -> list[str]:
        """Split one byte-level piece into vocabulary symbols by repeatedly merging the lowest-ranked pair.

        The last symbol carries '</w>' so word-final pieces differ from word-internal ones.
        """
        word = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best_rank = NUM_MERGES
            best = None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair, NUM_MERGES)
                if rank < best_rank:
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            # Merge every occurrence of the best pair, scanning left to right without overlaps.
            merged = []
            i, n = 0, len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        ids = self._word_cache.get(piece)
        if ids is None:
            encoder = self.encoder
            ids = tuple(encoder[s] for s in self.bpe(piece))
            self._word_cache[piece] = ids
        return ids

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        out: list[int] = []
        table = self._byte_table
        for piece in _PIECE_RE.findall(clean_text(text)):
            # Printable ASCII maps to itself in the byte table, so only other pieces need mapping.
            if not (piece.isascii() and piece.isprintable()):
                piece = "".join([table[b] for b in piece.encode("utf-8")])
            out.extend(self._encode_piece(piece))
        return tuple(out)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end markers."""
        if not isinstance(text, str):
            raise VocabularyError(f"Expected text as a string, got {type(text).__name__}; pass class names as str.")
        return list(self._encode_cached(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the given ids (special tokens included as written); each '</w>' becomes a space."""
        pieces = []
        for i in ids:
            tok = self.decoder.get(int(i))
            if tok is None:
                raise VocabularyError(f"Token id {int(i)} is outside CLIP's vocabulary of {self.vocab_size} ids.")
            pieces.append(tok)
        text = "".join(pieces)
        data = bytes(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def tokenize(self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
        """Ids of each text as a LongTensor [N, context_length]: SOT, text, EOT, then 0 padding."""
        if context_length < 2:
            raise ConfigError(
                f"context_length must be at least 2 to hold the start and end tokens, got {context_length}."
            )
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), context_length), dtype=np.int64)  # [N, context_length], 0 = padding
        for n, text in enumerate(texts):
            if not isinstance(text, str):
                raise VocabularyError(
                    f"Text number {n} is a {type(text).__name__}, not a string; pass class names as str."
                )
            ids = self._encode_cached(text)
            length = len(ids) + 2
            if length > context_length:
                if not truncate:
                    short = text if len(text) <= 40 else text[:37] + "..."
                    raise VocabularyError(
                        f"Text {short!r} is {length} tokens long with start/end tokens, more than the context "
                        f"length {context_length}; shorten it or pass truncate=True."
                    )
                ids = ids[: context_length - 2]
                length = context_length
            row = out[n]
            row[0] = self.sot_id
            row[1 : length - 1] = ids
            row[length - 1] = self.eot_id
        return torch.from_numpy(out)

_TOKENIZER: SimpleTokenizer | None = None
_TOKENIZER_LOCK = threading.Lock()


def get_tokenizer() -> SimpleTokenizer:
    """The process-wide tokenizer; the merges file is read on first use only."""
    global _TOKENIZER
    if _TOKENIZER is None:
        with _TOKENIZER_LOCK:
            if _TOKENIZER is None:
                _TOKENIZER = SimpleTokenizer()
    return _TOKENIZER


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """CLIP token ids for one text or a list: LongTensor [N, context_length], like OpenAI's ``clip.tokenize``.

    Too-long texts keep their first ``context_length - 1`` ids followed by EOT when ``truncate`` is
    true; otherwise a :class:`VocabularyError` names the text.
    """
    return get_tokenizer().tokenize(texts, context_length=context_length, truncate=truncate)
