"""Vocabularies: parsing, template-averaged text embeddings, and the in-memory / on-disk embedding cache."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import vocabseg.clip as vc
from vocabseg.clip.model import CLIPConfig
from vocabseg.clip.vocabulary import (
    IMAGENET_TEMPLATES,
    SIMPLE_TEMPLATES,
    VILD_TEMPLATES,
    TextEmbeddingCache,
    encode_vocabulary,
    parse_vocabulary,
    weights_id,
)
from vocabseg.errors import VocabularyError

# Full 49,408-token vocabulary (real tokenizer ids), tiny everything else.
CFG = CLIPConfig(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=2,
                 transformer_layers=2)
NAMES = ["cat", "traffic light", "grass", "a very long class name with many words in it", "sky"]


@pytest.fixture(scope="module")
def model() -> vc.CLIP:
    torch.manual_seed(0)
    return vc.build_clip(CFG).eval()


class Counting:
    """A text encoder that counts its calls and prompts, to prove what the cache saved."""

    def __init__(self, model: vc.CLIP):
        self.model = model
        self.weights_id = weights_id(model)
        self.calls = 0
        self.prompts = 0
        self.batch_lengths: list[int] = []

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.prompts += tokens.shape[0]
        self.batch_lengths.append(int(tokens.argmax(dim=-1).max()) + 1)
        return self.model.encode_text(tokens)


def by_hand(model: vc.CLIP, names: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for name in names:
            prompts = [F.normalize(model.encode_text(vc.tokenize([t.format(name)]))[0], dim=-1) for t in templates]
            rows.append(F.normalize(torch.stack(prompts).mean(dim=0), dim=-1))
    return torch.stack(rows)


@pytest.fixture(autouse=True)
def private_default_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache from tests."""
    monkeypatch.setenv("VOCABSEG_CACHE", str(tmp_path / "default-cache"))


# ----------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("given, expected", [
    ("cat, dog,grass", ["cat", "dog", "grass"]),
    ("cat\ndog\r\n\n  traffic light  ,", ["cat", "dog", "traffic light"]),
    ("sky, cat, sky, Sky", ["sky", "cat", "Sky"]),
    (["  cat ", "dog", "", "cat", "dog, with comma"], ["cat", "dog", "dog, with comma"]),
    (("wall",), ["wall"]),
])
def test_parse_vocabulary(given, expected):
    assert parse_vocabulary(given) == expected


@pytest.mark.parametrize("given", ["", " , ,\n", [], ["", "  "]])
def test_parse_empty_vocabulary(given):
    with pytest.raises(VocabularyError, match="The vocabulary is empty"):
        parse_vocabulary(given)


def test_parse_rejects_non_strings():
    with pytest.raises(VocabularyError):
        parse_vocabulary(["cat", 3])
    with pytest.raises(VocabularyError):
        parse_vocabulary(42)


def test_template_sets():
    assert len(VILD_TEMPLATES) == 14 and len(IMAGENET_TEMPLATES) == 80 and SIMPLE_TEMPLATES == ("a photo of a {}.",)
    assert len(set(IMAGENET_TEMPLATES)) == 80 and len(set(VILD_TEMPLATES)) == 14
    assert vc.TEMPLATE_SETS["vild"] == VILD_TEMPLATES and vc.TEMPLATE_SETS["none"] == ("{}",)
    for templates in vc.TEMPLATE_SETS.values():
        assert all(t.count("{}") == 1 for t in templates)
    assert VILD_TEMPLATES[0] == "a photo of a {}." and IMAGENET_TEMPLATES[0] == "a bad photo of a {}."


# ----------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("templates", ["vild", "simple", "none", ["a {} on a table", "{} at night"]])
def test_encode_vocabulary_matches_hand_computation(model, templates):
    got = encode_vocabulary(model, NAMES, templates=templates, cache=False, batch_size=5)
    resolved = vc.TEMPLATE_SETS[templates] if isinstance(templates, str) else tuple(templates)
    want = by_hand(model, NAMES, resolved)
    assert got.shape == (5, 16) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(5), atol=1e-6)


def test_batches_are_sorted_by_length_and_results_are_normal_tensors(model):
    counting = Counting(model)
    names = ["a very long class name with many words in it", "cat", "another quite long multi word name", "dog"]
    out = encode_vocabulary(counting, names, templates="simple", cache=False, batch_size=2)
    assert counting.batch_lengths == sorted(counting.batch_lengths)
    assert counting.batch_lengths[0] < counting.batch_lengths[-1]
    assert torch.allclose(out, encode_vocabulary(model, names, templates="simple", cache=False), atol=1e-5)
    assert not out.is_inference()
    w = torch.ones(16, 2, requires_grad=True)
    (out @ w).sum().backward()  # usable as a constant in a training graph
    assert w.grad is not None


def test_names_string_and_duplicates(model):
    a = encode_vocabulary(model, "cat, grass", templates="simple", cache=False)
    b = encode_vocabulary(model, ["cat", "grass", "cat"], templates="simple", cache=False)
    assert a.shape == (2, 16) and b.shape == (3, 16)
    assert torch.equal(b[0], b[2]) and torch.allclose(a, b[:2], atol=1e-6)
    with pytest.raises(VocabularyError):
        encode_vocabulary(model, ", ,", cache=False)
    with pytest.raises(VocabularyError):
        encode_vocabulary(model, ["cat", ""], cache=False)
    with pytest.raises(VocabularyError, match="Unknown template set"):
        encode_vocabulary(model, ["cat"], templates="vlid", cache=False)
    with pytest.raises(VocabularyError, match="placeholder"):
        encode_vocabulary(model, ["cat"], templates=["a photo"], cache=False)


# ----------------------------------------------------------------------------------------------- cache


def test_second_call_does_no_text_work(model):
    cache = TextEmbeddingCache(None)
    counting = Counting(model)
    first = encode_vocabulary(counting, NAMES, cache=cache)
    assert counting.prompts == len(NAMES) * 14
    calls = counting.calls
    second = encode_vocabulary(counting, NAMES, cache=cache)
    assert counting.calls == calls
    assert torch.equal(first, second)
    assert cache.directory is None and len(cache) == len(NAMES)


def test_disk_round_trip_uses_one_file_per_shard(model, tmp_path):
    first = encode_vocabulary(model, NAMES[:3], templates="simple", cache=TextEmbeddingCache(tmp_path))
    encode_vocabulary(model, NAMES[3:], templates="simple", cache=TextEmbeddingCache(tmp_path))
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1  # all names of one (weights, templates) pair share a file
    counting = Counting(model)
    again = encode_vocabulary(counting, NAMES, templates="simple", cache=TextEmbeddingCache(tmp_path))
    assert counting.calls == 0
    assert torch.equal(again[:3], first)
    assert not list(tmp_path.rglob("*.tmp"))


def test_concurrent_writers_merge(model, tmp_path):
    a, b = TextEmbeddingCache(tmp_path), TextEmbeddingCache(tmp_path)
    encode_vocabulary(model, ["x"], templates="simple", cache=b)
    encode_vocabulary(model, ["a"], templates="simple", cache=a)  # a reads b's file, adds "a"
    encode_vocabulary(model, ["b"], templates="simple", cache=b)  # b's memory lacks "a"; the write must merge
    counting = Counting(model)
    encode_vocabulary(counting, ["x", "a", "b"], templates="simple", cache=TextEmbeddingCache(tmp_path))
    assert counting.calls == 0


def test_weights_or_templates_change_misses(model, tmp_path):
    cache = TextEmbeddingCache(tmp_path)
    base = encode_vocabulary(model, NAMES, templates="simple", cache=cache)

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.transformer.resblocks[1].mlp.c_proj.bias.add_(torch.linspace(-1, 1, 64))
    assert weights_id(other) != weights_id(model)
    counting = Counting(other)
    changed = encode_vocabulary(counting, NAMES, templates="simple", cache=cache)
    assert counting.prompts == len(NAMES)
    assert not torch.allclose(changed, base, atol=1e-4)

    counting = Counting(model)
    encode_vocabulary(counting, NAMES, templates=["a photo of a {}!"], cache=cache)
    assert counting.prompts == len(NAMES)
    counting = Counting(model)
    encode_vocabulary(counting, NAMES, templates="vild", cache=cache)
    assert counting.prompts == len(NAMES) * 14
    # the same templates given as a list are the same set
    counting = Counting(model)
    encode_vocabulary(counting, NAMES, templates=list(VILD_TEMPLATES), cache=cache)
    assert counting.calls == 0

    # the image tower does not change text embeddings: still a hit
    visual_only = copy.deepcopy(model)
    with torch.no_grad():
        visual_only.visual.proj.mul_(3)
    counting = Counting(visual_only)
    assert torch.equal(encode_vocabulary(counting, NAMES, templates="simple", cache=cache), base)
    assert counting.calls == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_cache_file_is_ignored_and_rewritten(model, tmp_path, damage):
    good = encode_vocabulary(model, NAMES, templates="simple", cache=TextEmbeddingCache(tmp_path))
    (path,) = tmp_path.rglob("*.safetensors")
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x07not a cache file" * 10, "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    counting = Counting(model)
    again = encode_vocabulary(counting, NAMES, templates="simple", cache=TextEmbeddingCache(tmp_path))
    assert counting.prompts == len(NAMES)
    assert torch.allclose(again, good, atol=1e-6)
    counting = Counting(model)
    encode_vocabulary(counting, NAMES, templates="simple", cache=TextEmbeddingCache(tmp_path))
    assert counting.calls == 0  # the file was repaired


def test_mixed_cached_and_new_names_keep_order(model):
    cache = TextEmbeddingCache(None)
    encode_vocabulary(model, ["traffic light", "sky"], templates="simple", cache=cache)
    counting = Counting(model)
    names = ["cat", "traffic light", "grass", "sky", "cat"]
    got = encode_vocabulary(counting, names, templates="simple", cache=cache)
    assert counting.prompts == 2  # only "cat" and "grass" were encoded
    assert torch.allclose(got, by_hand(model, names, SIMPLE_TEMPLATES), atol=1e-5)


def test_default_cache_lives_under_vocabseg_cache(model, tmp_path):
    encode_vocabulary(model, ["cat"], templates="simple")
    files = list((tmp_path / "default-cache" / "text").rglob("*.safetensors"))
    assert len(files) == 1
    assert vc.default_cache() is vc.default_cache()
    counting = Counting(model)
    encode_vocabulary(counting, ["cat"], templates="simple")
    assert counting.calls == 0


def test_memory_only_and_disabled_caches_write_nothing(model, tmp_path):
    counting = Counting(model)
    encode_vocabulary(counting, ["cat"], templates="simple", cache=False)
    encode_vocabulary(counting, ["cat"], templates="simple", cache=None)
    assert counting.calls == 2
    encode_vocabulary(model, ["cat"], templates="simple", cache=TextEmbeddingCache(False))
    assert not list(tmp_path.rglob("*.safetensors"))


def test_weights_id_helper(model):
    twin = vc.build_clip(CFG)
    twin.load_state_dict(model.state_dict())
    assert weights_id(twin) == weights_id(model)
    assert len(weights_id(model)) == 16
    gelu = vc.build_clip(dataclasses.replace(CFG, activation="gelu"))
    gelu.load_state_dict(model.state_dict())
    assert weights_id(gelu) != weights_id(model)  # same tensors, different text embeddings

    class Named:
        weights_id = "my-model-v1"

        def encode_text(self, tokens):
            return torch.ones(tokens.shape[0], 4)

    assert weights_id(Named()) == "my-model-v1"
    out = encode_vocabulary(Named(), ["cat", "dog"], templates="simple", cache=TextEmbeddingCache(None))
    assert torch.allclose(out, torch.full((2, 4), 0.5))
