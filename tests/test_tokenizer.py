"""Tests for the CLIP BPE tokenizer.

Expected ids are derived here from the merges file itself (an independent vocabulary and a slow
reference BPE written in this file), plus the ids OpenAI publishes for a few prompts.
"""

from __future__ import annotations

import gzip
import html
import random
import string
from pathlib import Path

import ftfy
import pytest
import regex
import torch

import vocabseg.clip.tokenizer as tokmod
from vocabseg.clip.tokenizer import SimpleTokenizer, get_tokenizer, tokenize
from vocabseg.errors import CheckpointError, ConfigError, UserError, VocabularyError

MERGES_PATH = Path(tokmod.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = 49406, 49407


# ----------------------------------------------------------------------------- independent reference


class Reference:
    """A deliberately plain, uncached re-derivation of CLIP's tokenizer from the merges file."""

    PATTERN = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )

    def __init__(self) -> None:
        visible = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
        hidden = [b for b in range(256) if b not in visible]
        self.byte_char = {b: chr(b) for b in visible}
        for k, b in enumerate(hidden):
            self.byte_char[b] = chr(256 + k)
        order = visible + hidden
        with gzip.open(MERGES_PATH, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        assert "#version" in lines[0]  # header line, not a merge
        self.merges = [tuple(line.split()) for line in lines[1 : 1 + 48894]]
        self.vocab = (
            [self.byte_char[b] for b in order]
            + [self.byte_char[b] + "</w>" for b in order]
            + [a + b for a, b in self.merges]
            + ["<|startoftext|>", "<|endoftext|>"]
        )
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.rank = {pair: i for i, pair in enumerate(self.merges)}

    def clean(self, text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def bpe(self, symbols: list[str]) -> list[str]:
        symbols = symbols[:-1] + [symbols[-1] + "</w>"]
        while True:
            candidates = [
                (self.rank[(symbols[i], symbols[i + 1])], i)
                for i in range(len(symbols) - 1)
                if (symbols[i], symbols[i + 1]) in self.rank
            ]
            if not candidates:
                return symbols
            best_rank = min(candidates)[0]
            a, b = self.merges[best_rank]
            out, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == [a, b]:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.PATTERN.findall(self.clean(text)):
            if piece in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.ids[piece])
                continue
            symbols = [self.byte_char[b] for b in piece.encode("utf-8")]
            ids.extend(self.ids[s] for s in self.bpe(symbols))
        return ids


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def tok() -> SimpleTokenizer:
    return get_tokenizer()


def symbols(tok: SimpleTokenizer, ids: list[int]) -> list[str]:
    return [tok.decoder[i] for i in ids]


# ----------------------------------------------------------------------------- vocabulary layout


def test_vocabulary_matches_independent_build(tok: SimpleTokenizer, ref: Reference) -> None:
    assert len(ref.vocab) == tok.vocab_size == 49408
    assert tok.encoder == ref.ids
    assert ref.ids["!"] == 0 and ref.ids["a</w>"] == 320  # printable bytes first, '</w>' copies at 256+
    assert tok.encoder["<|startoftext|>"] == SOT and tok.encoder["<|endoftext|>"] == EOT


def test_published_openai_ids() -> None:
    out = tokenize(["a diagram", "a dog", "a cat"])
    assert out.dtype == torch.long and out.shape == (3, 77)
    assert out[0, :5].tolist() == [SOT, 320, 22697, EOT, 0]
    assert out[1, :5].tolist() == [SOT, 320, 1929, EOT, 0]
    assert out[2, :5].tolist() == [SOT, 320, 2368, EOT, 0]
    assert out[:, 4:].abs().sum().item() == 0


# ----------------------------------------------------------------------------- hand-derived cases


def test_common_word_is_one_vocabulary_entry(tok: SimpleTokenizer, ref: Reference) -> None:
    assert tok.encode("cat") == [ref.ids["cat</w>"]]
    # Word-internal form differs from the word-final form.
    assert ref.ids["cat"] != ref.ids["cat</w>"]


def test_sentence_splits_into_words_and_punctuation(tok: SimpleTokenizer, ref: Reference) -> None:
    ids = tok.encode("a photo of a cat.")
    assert symbols(tok, ids) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", ".</w>"]
    assert ids == [ref.ids[s] for s in ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", ".</w>"]]


def test_contractions_digits_and_punctuation_runs(tok: SimpleTokenizer) -> None:
    assert symbols(tok, tok.encode("don't")) == ["don</w>", "'t</w>"]
    assert symbols(tok, tok.encode("2024")) == ["2</w>", "0</w>", "2</w>", "4</w>"]  # digits one at a time
    assert symbols(tok, tok.encode("wow!!")) == ["wow</w>", "!!</w>"]


def test_emoji_goes_through_byte_symbols_and_ranked_merges(tok: SimpleTokenizer, ref: Reference) -> None:
    # U+1F44D is F0 9F 91 8D in UTF-8: four byte-level symbols.
    syms = [ref.byte_char[b] for b in "👍".encode("utf-8")]
    assert syms == ["ð", "Ł", "ĳ", "į"]
    r1, r2, r3 = ref.rank[("ð", "Ł")], ref.rank[("ðŁ", "ĳ")], ref.rank[("ðŁĳ", "į</w>")]
    # Pairs (Ł, ĳ) and (ĳ, į</w>) either do not exist or rank after (ð, Ł), so the merges go left to right.
    assert r1 < ref.rank.get(("Ł", "ĳ"), 10**9) and r1 < ref.rank.get(("ĳ", "į</w>"), 10**9)
    assert r1 < r2 < r3
    assert tok.encode("👍") == [ref.ids["ðŁĳį</w>"]] == [512 + r3]


def test_rare_character_stays_split_into_bytes(tok: SimpleTokenizer, ref: Reference) -> None:
    ids = tok.encode("𓀀")  # Egyptian hieroglyph A001: rare, not one vocabulary entry
    assert len(ids) > 1
    byte_level = "".join(ref.byte_char[b] for b in "𓀀".encode("utf-8"))
    assert "".join(symbols(tok, ids)) == byte_level + "</w>"
    assert ids == ref.encode("𓀀")


def test_html_entities_are_unescaped(tok: SimpleTokenizer, ref: Reference) -> None:
    assert tok.encode("&amp;") == [ref.ids["&</w>"]]
    assert tok.encode("&amp;amp;") == [ref.ids["&</w>"]]  # unescaped twice
    assert symbols(tok, tok.encode("&lt;cat&gt;")) == ["<</w>", "cat</w>", "></w>"]
    assert tok.encode("salt &amp; pepper") == tok.encode("salt & pepper")
    # ftfy leaves entities alone when the text has '<'; the two html.unescape passes still apply.
    assert tok.encode("<3 &amp;amp; x") == tok.encode("<3 & x")


def test_mojibake_and_unicode_are_fixed(tok: SimpleTokenizer) -> None:
    assert tok.encode("cafÃ©") == tok.encode("café")  # UTF-8 read as Latin-1
    assert tok.encode("ﬁsh") == tok.encode("fish")  # ligature
    assert tok.encode("ｃａｔ") == tok.encode("cat")  # full-width letters
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")  # NFC normalisation


def test_whitespace_is_collapsed_and_case_folded(tok: SimpleTokenizer) -> None:
    plain = tok.encode("a photo of a cat")
    assert tok.encode("  a\t\n photo   of\u00a0a cat  ") == plain
    assert tok.encode("A PHOTO Of a CaT") == plain


def test_special_token_text_maps_to_its_id(tok: SimpleTokenizer) -> None:
    # OpenAI's tokenizer keeps these strings whole (its regex lists them first).
    assert tok.encode("a <|endoftext|>") == [320, EOT]
    assert tok.encode("<|startoftext|>") == [SOT]


# ----------------------------------------------------------------------------- tokenize()


def test_empty_and_blank_text() -> None:
    expected = [SOT, EOT] + [0] * 75
    assert tokenize("").tolist() == [expected]
    assert tokenize("   \n").tolist() == [expected]


def test_shapes_and_context_length() -> None:
    assert tokenize("a cat").shape == (1, 77)
    assert tokenize([]).shape == (0, 77)
    out = tokenize(["a cat", "a dog"], context_length=6)
    assert out.tolist() == [[SOT, 320, 2368, EOT, 0, 0], [SOT, 320, 1929, EOT, 0, 0]]
    with pytest.raises(ConfigError):
        tokenize("a cat", context_length=1)


def test_truncation_keeps_prefix_and_ends_with_eot(tok: SimpleTokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(100))
    ids = tok.encode(text)
    assert len(ids) > 75
    row = tokenize(text)[0].tolist()
    assert len(row) == 77 and row[0] == SOT and row[-1] == EOT
    assert row[1:76] == ids[:75]


def test_exact_fit_is_not_truncated_and_one_more_raises() -> None:
    fits = "cat " * 75  # 75 ids + SOT + EOT = 77
    row = tokenize(fits, truncate=False)[0].tolist()
    assert row == [SOT] + [2368] * 75 + [EOT]
    too_long = "cat " * 76
    with pytest.raises(VocabularyError) as info:
        tokenize(["a dog", too_long], truncate=False)
    assert isinstance(info.value, UserError)
    assert "78 tokens" in str(info.value) and "'cat cat" in str(info.value)


def test_non_string_text_is_a_user_error() -> None:
    with pytest.raises(VocabularyError):
        tokenize(["a cat", 3])  # type: ignore[list-item]


# ----------------------------------------------------------------------------- decode


def test_decode_round_trip(tok: SimpleTokenizer) -> None:
    assert tok.decode(tok.encode("a photo of a cat")) == "a photo of a cat "
    assert tok.decode(tok.encode("Café crème 👍 𓀀")) == "café crème 👍 𓀀 "
    assert tok.decode(tok.encode("a cat.")) == "a cat . "  # punctuation is its own word
    assert tok.decode([SOT, 320, EOT]) == "<|startoftext|>a <|endoftext|>"


def test_decode_rejects_unknown_ids(tok: SimpleTokenizer) -> None:
    with pytest.raises(VocabularyError):
        tok.decode([320, 49408])


# ----------------------------------------------------------------------------- fast path vs reference


def _random_text(rng: random.Random) -> str:
    words = ["cat", "Dog", "traffic light", "potted plant", "sky-scraper", "o'clock", "it's", "we'll",
             "naïve", "Straße", "дом", "猫", "のりもの", "👍", "🐱🏽", "&amp;", "&lt;b&gt;", "cafÃ©", "ﬁ",
             "x\x00y", "\x1b[31mred\x1b[0m", "zero\u200bwidth", "e\u0301", "ＡＢＣ", "3.14", "#1",
             "...", "''"]
    chars = string.ascii_letters + string.digits + string.punctuation + "  \t\néüßçñ—“”’"
    parts = []
    for _ in range(rng.randint(0, 6)):
        if rng.random() < 0.5:
            w = rng.choice(words)
            parts.append(w.upper() if rng.random() < 0.2 else w)
        else:
            parts.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 12))))
    return rng.choice([" ", "", "  ", "\t"]).join(parts)


def test_fast_path_matches_reference_on_random_text(ref: Reference) -> None:
    rng = random.Random(1234)
    fresh = SimpleTokenizer()  # empty caches, so the BPE path itself is exercised
    texts = [_random_text(rng) for _ in range(300)]
    for text in texts:
        assert fresh.encode(text) == ref.encode(text), repr(text)
    # Second pass hits the caches and must not change anything.
    batch = fresh.tokenize(texts, truncate=True)
    for row, text in zip(batch.tolist(), texts):
        expected = [SOT] + ref.encode(text)[:75] + [EOT]
        assert row[: len(expected)] == expected and not any(row[len(expected) :])


def test_printable_ascii_fast_path_matches_ftfy() -> None:
    rng = random.Random(7)
    alphabet = "".join(c for c in string.printable if c.isprintable() and c != "&")
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert ftfy.fix_text(text) == text
        assert tokmod.clean_text(text) == " ".join(text.split()).lower()


# ----------------------------------------------------------------------------- loading


def test_singleton() -> None:
    assert get_tokenizer() is get_tokenizer()


def test_bad_merges_files_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError):
        SimpleTokenizer(tmp_path / "missing.txt.gz")
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(CheckpointError):
        SimpleTokenizer(short)
    monkeypatch.setattr(tokmod, "BPE_SHA256", "0" * 64)
    with pytest.raises(CheckpointError):
        SimpleTokenizer()
