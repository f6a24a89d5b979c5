"""Loading CLIP weights from every published format, and one-line errors for every unusable file."""

from __future__ import annotations

import copy
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vocabseg.clip as vc
from vocabseg.clip.load import _WEIGHTS_IDS, clip_config_from_state_dict
from vocabseg.clip.model import CLIPConfig, list_architectures
from vocabseg.errors import CheckpointError, UserError

TINY = {
    "vit": CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                      context_length=77, vocab_size=1000, transformer_width=64, transformer_heads=1,
                      transformer_layers=2),
    "resnet": CLIPConfig(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16,
                         vision_patch_size=None, context_length=77, vocab_size=1000, transformer_width=64,
                         transformer_heads=1, transformer_layers=1),
}
EOT = 999


def make_tokens() -> torch.Tensor:
    tokens = torch.zeros(3, 77, dtype=torch.long)
    for i, e in enumerate((4, 9, 17)):
        tokens[i, 0] = 998
        tokens[i, 1:e] = torch.arange(1, e) * 37 % 990 + 1
        tokens[i, e] = EOT
    return tokens


def build(kind: str, seed: int = 0) -> vc.CLIP:
    torch.manual_seed(seed)
    model = vc.build_clip(copy.deepcopy(TINY[kind])).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
        for m in model.modules():  # random BatchNorm statistics, so ignoring them would be noticed
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def outputs(model: vc.CLIP, kind: str) -> tuple[torch.Tensor, ...]:
    r = TINY[kind].image_resolution
    images = torch.linspace(-1, 1, 2 * 3 * r * r).reshape(2, 3, r, r)
    tokens = make_tokens()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens), model(images, tokens)[0]


def write_jit(model: vc.CLIP, path: Path, half: bool = False) -> None:
    """A TorchScript archive like OpenAI's: traced model, official names, plus metadata entries."""
    m = copy.deepcopy(model)
    m.register_buffer("input_resolution", torch.tensor(m.config.image_resolution))
    m.register_buffer("context_length", torch.tensor(77))
    m.register_buffer("vocab_size", torch.tensor(m.config.vocab_size))
    r = m.config.image_resolution
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, (torch.zeros(1, 3, r, r), make_tokens()[:1]), check_trace=False)
    if half:
        traced = traced.half()  # OpenAI's archives hold fp16 weights
    traced.save(str(path))


@pytest.fixture(scope="module", params=["vit", "resnet"])
def case(request, tmp_path_factory):
    kind = request.param
    model = build(kind)
    d = tmp_path_factory.mktemp(kind)
    sd = model.state_dict()
    files = {}
    files["jit"] = d / "openai.pt"
    write_jit(model, files["jit"])
    files["plain"] = d / "plain.pt"
    torch.save(sd, files["plain"])
    files["legacy"] = d / "legacy.pth"
    torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
    files["open_clip"] = d / "open_clip_model.bin"  # safetensors content, misleading extension
    save_file({**{k: v.contiguous() for k, v in sd.items()},
               "attn_mask": torch.full((77, 77), float("-inf")).triu(1)}, str(files["open_clip"]))
    files["training"] = d / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run-1", "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}}, files["training"])
    files["model_key"] = d / "wrapped.pth"
    torch.save({"model": dict(sd), "iteration": 10}, files["model_key"])
    files["ours"] = d / "ours.safetensors"
    vc.save_state_dict(model, files["ours"])
    return kind, model, files


FORMATS = ["jit", "plain", "legacy", "open_clip", "training", "model_key", "ours"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_reproduces_the_model(case, fmt):
    kind, model, files = case
    loaded = vc.load(files[fmt], trust_jit=(fmt == "jit"))
    assert isinstance(loaded, vc.CLIP)
    assert not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.config == model.config
    for got, want in zip(outputs(loaded, kind), outputs(model, kind)):
        assert torch.equal(got, want)
    assert loaded.checkpoint_path == files[fmt]
    assert loaded.weights_id == vc.weights_id(model)


def test_jit_archive_has_openai_metadata_entries_and_needs_trust(case):
    kind, model, files = case
    sd = vc.read_state_dict(files["jit"], trust_jit=True)
    assert {"input_resolution", "context_length", "vocab_size", "visual.conv1.weight"} <= set(sd)
    with pytest.raises(CheckpointError) as err:
        vc.load(files["jit"])
    msg = str(err.value)
    assert "openai.pt" in msg and "TorchScript" in msg and "trust_jit=True" in msg and "\n" not in msg
    with pytest.raises(CheckpointError):
        vc.read_state_dict(files["jit"])


def test_fp16_jit_archive_loads_as_float32(case, tmp_path):
    kind, model, _ = case
    path = tmp_path / "fp16.pt"
    write_jit(model, path, half=True)
    loaded = vc.load(path, trust_jit=True)
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values() if t.is_floating_point())
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for t in rounded.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    for got, want in zip(outputs(loaded, kind), outputs(rounded, kind)):
        assert torch.equal(got, want)


def test_resnet_loads_without_batchnorm_counters(tmp_path):
    model = build("resnet")
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "rn.pt"
    torch.save(sd, path)
    loaded = vc.load(path)
    for got, want in zip(outputs(loaded, "resnet"), outputs(model, "resnet")):
        assert torch.equal(got, want)


@pytest.mark.parametrize("arch", list_architectures())
def test_config_inferred_from_official_shapes(arch):
    with torch.device("meta"):
        sd = vc.build_clip(arch).state_dict()
    assert clip_config_from_state_dict(sd) == vc.config_for(arch)


def test_saved_config_keeps_head_counts_shapes_cannot_tell(tmp_path):
    cfg = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                     vocab_size=1000, transformer_width=64, transformer_heads=4, transformer_layers=1,
                     vision_heads=8, activation="gelu")
    torch.manual_seed(0)
    model = vc.build_clip(cfg).eval()
    path = vc.save_state_dict(model, tmp_path / "sub" / "small.safetensors")
    loaded = vc.load(path)
    assert loaded.config == cfg
    for got, want in zip(outputs(loaded, "vit"), outputs(model, "vit")):
        assert torch.equal(got, want)
    # the same tensors without the metadata infer OpenAI's rule (1 head per 64 channels) and quick_gelu
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    guessed = vc.load(plain)
    assert guessed.config.transformer_heads == 1 and guessed.config.activation == "quick_gelu"
    assert not torch.allclose(outputs(guessed, "vit")[1], outputs(model, "vit")[1], atol=1e-4)


def test_activation_and_resolution_options(case):
    kind, model, files = case
    gelu = vc.load(files["plain"], activation="gelu")
    assert gelu.config.activation == "gelu"
    assert not torch.allclose(outputs(gelu, kind)[1], outputs(model, kind)[1], atol=1e-5)
    assert gelu.weights_id != vc.load(files["plain"]).weights_id  # cached text embeddings must not be shared
    with pytest.raises(UserError):
        vc.load(files["plain"], activation="relu")
    big = vc.load(files["plain"], image_resolution=96)
    assert big.preprocess_resolution == 96
    assert big.config.image_resolution == TINY[kind].image_resolution  # the weights keep their grid
    assert vc.preprocess(np.zeros((50, 70, 3), np.uint8), model=big).shape == (3, 96, 96)
    with torch.no_grad():
        assert big.encode_image(torch.randn(1, 3, 96, 96)).shape == (1, 32)


def test_weights_id_is_lazy_and_follows_the_text_tower(tmp_path):
    model = build("vit")
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    loaded = vc.load(path)
    assert loaded not in _WEIGHTS_IDS  # not computed at load time
    first = loaded.weights_id
    assert loaded in _WEIGHTS_IDS and loaded.weights_id == first
    with torch.no_grad():
        loaded.visual.proj.mul_(2)  # the image side does not change text embeddings
    assert loaded.weights_id == first
    with torch.no_grad():
        loaded.transformer.resblocks[0].mlp.c_fc.bias.add_(1e-3)
    assert loaded.weights_id != first
    assert vc.weights_id(build("vit", seed=1)) != vc.weights_id(build("vit", seed=0))
    # replacing tensors (not only editing them in place) is noticed too
    again = loaded.weights_id
    loaded.load_state_dict(build("vit", seed=2).state_dict(), assign=True)
    assert loaded.weights_id != again
    copied = copy.deepcopy(loaded)
    assert copied.weights_id == loaded.weights_id
    assert pickle.loads(pickle.dumps(loaded)).weights_id == loaded.weights_id  # nothing unpicklable attached


# ----------------------------------------------------------------------------------------------- errors


class NotATensor:
    pass


def _bad_files(d: Path, valid: dict[str, Path]) -> dict[str, tuple[Path, str, bool]]:
    """name -> (path, expected words in the message, trust_jit)."""
    def half(src: Path, name: str) -> Path:
        data = src.read_bytes()
        out = d / name
        out.write_bytes(data[: len(data) // 2])
        return out

    cases: dict[str, tuple[Path, str, bool]] = {}
    cases["missing"] = (d / "nowhere.pt", "does not exist", False)
    (d / "a_folder").mkdir()
    cases["directory"] = (d / "a_folder", "directory", False)
    (d / "empty.pt").write_bytes(b"")
    cases["empty"] = (d / "empty.pt", "empty", False)
    cases["truncated_zip"] = (half(valid["plain"], "half.pt"), "truncated", False)
    cases["truncated_legacy"] = (half(valid["legacy"], "half_legacy.pth"), "truncated", False)
    cases["truncated_safetensors"] = (half(valid["open_clip"], "half.safetensors"), "truncated", False)
    cases["truncated_jit"] = (half(valid["jit"], "half_jit.pt"), "truncated", True)
    rng = np.random.default_rng(0)
    (d / "noise.bin").write_bytes(b"\x00\x13" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    cases["random"] = (d / "noise.bin", "not in a known weights format", False)
    (d / "config.json").write_text(json.dumps({"model": "ViT-B/16", "embed_dim": 512}))
    cases["json"] = (d / "config.json", "text file", False)
    torch.save({"model": NotATensor(), "w": torch.ones(2)}, d / "custom.pt")
    cases["custom_class"] = (d / "custom.pt", "objects other than tensors", False)
    with open(d / "pickled.pkl", "wb") as f:
        pickle.dump({"w": NotATensor()}, f, protocol=4)
    cases["plain_pickle"] = (d / "pickled.pkl", "pickled.pkl", False)
    sd = torch.load(valid["plain"], weights_only=True)
    torch.save({k: v for k, v in sd.items() if k != "ln_final.bias"}, d / "missing_tensor.pt")
    cases["missing_tensor"] = (d / "missing_tensor.pt", "1 missing tensor (ln_final.bias)", False)
    torch.save({**sd, "ln_final.bias": torch.zeros(65)}, d / "wrong_shape.pt")
    cases["wrong_shape"] = (d / "wrong_shape.pt", "1 tensor with the wrong shape (ln_final.bias [65] in the file, [64] expected)", False)
    torch.save({**sd, "visual.adapter.weight": torch.zeros(3)}, d / "extra.pt")
    cases["unexpected_tensor"] = (d / "extra.pt", "1 unexpected tensor (visual.adapter.weight)", False)
    torch.save({"model": {"side_adapter_network.query_embed": torch.zeros(100, 240),
                          "clip_visual_extractor.conv1.weight": torch.zeros(768, 3, 16, 16),
                          "ov_classifier.token_embedding.weight": torch.zeros(10, 512),
                          "criterion.empty_weight": torch.ones(172)}}, d / "san_vit_b_16.pth")
    cases["san"] = (d / "san_vit_b_16.pth", "SAN checkpoint; load it with vocabseg.load_model('san_vit_b_16'", False)
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, d / "resnet_classifier.pt")
    cases["not_clip"] = (d / "resnet_classifier.pt", "does not look like a CLIP checkpoint (missing visual.* / text keys", False)
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2),
               "text_model.embeddings.token_embedding.weight": torch.zeros(5, 4)}, str(d / "hf.safetensors"))
    cases["hugging_face"] = (d / "hf.safetensors", "Hugging Face", False)
    torch.save(torch.ones(3), d / "tensor.pt")
    cases["bare_tensor"] = (d / "tensor.pt", "not a dict of tensors", False)
    torch.save({"epoch": 3, "name": "run"}, d / "no_tensors.pt")
    cases["no_tensors"] = (d / "no_tensors.pt", "contains no tensors", False)
    with zipfile.ZipFile(d / "archive.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    cases["other_zip"] = (d / "archive.zip", "not a PyTorch checkpoint", False)
    return cases


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    model = build("vit")
    d = tmp_path_factory.mktemp("bad")
    valid = {"plain": d / "valid.pt", "legacy": d / "valid_legacy.pth", "open_clip": d / "valid.safetensors",
             "jit": d / "valid_jit.pt"}
    torch.save(model.state_dict(), valid["plain"])
    torch.save(model.state_dict(), valid["legacy"], _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(valid["open_clip"]))
    write_jit(model, valid["jit"])
    return _bad_files(d, valid)


BAD = ["missing", "directory", "empty", "truncated_zip", "truncated_legacy", "truncated_safetensors",
       "truncated_jit", "random", "json", "custom_class", "plain_pickle", "missing_tensor", "wrong_shape",
       "unexpected_tensor", "san", "not_clip", "hugging_face", "bare_tensor", "no_tensors", "other_zip"]


@pytest.mark.parametrize("name", BAD)
def test_unusable_files_raise_one_line_checkpoint_errors(bad_files, name):
    path, words, trust = bad_files[name]
    with pytest.raises(CheckpointError) as err:
        vc.load(path, trust_jit=trust)
    msg = str(err.value)
    assert path.name in msg
    assert words in msg
    assert "\n" not in msg and "\x1b" not in msg
    assert isinstance(err.value, UserError)


def test_bad_files_list_is_complete(bad_files):
    assert sorted(bad_files) == sorted(BAD)


def test_read_state_dict_unwraps_and_strips(case):
    kind, model, files = case
    sd = vc.read_state_dict(files["training"])
    assert set(sd) == set(model.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert torch.equal(sd["text_projection"], model.text_projection)


def test_conv_branch_starts_silent_and_round_trips(tmp_path):
    """A ViT with the embedded default's convolutional branch: a fresh branch leaves encode_image unchanged, a
    trained one changes it (only the pooled embedding: patch tokens stay), and the file loads with or without the
    saved config (the branch's width is read from its tensors)."""
    cfg = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                     vocab_size=1000, transformer_width=64, transformer_heads=4, transformer_layers=1)
    torch.manual_seed(0)
    plain = vc.build_clip(cfg).eval()
    branched = vc.build_clip(CLIPConfig(**{**cfg.to_dict(), "vision_conv_branch": 8})).eval()
    missing, unexpected = branched.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("visual.conv_branch.") for k in missing) and missing
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(branched.encode_image(images), plain.encode_image(images))
        torch.nn.init.normal_(branched.visual.conv_branch.proj.weight, std=0.1)
        assert not torch.allclose(branched.encode_image(images), plain.encode_image(images), atol=1e-3)
        tokens = branched.visual.forward_features(images, [2])[0][2]
        assert torch.equal(tokens, plain.visual.forward_features(images, [2])[0][2])
    saved = vc.save_state_dict(branched, tmp_path / "branched.safetensors")
    bare = tmp_path / "bare.pt"
    torch.save(branched.state_dict(), bare)
    for path in (saved, bare):
        loaded = vc.load(path)
        assert loaded.config.vision_conv_branch == 8
        with torch.no_grad():
            assert torch.equal(loaded.encode_image(images), branched.encode_image(images))


def test_weight_patch_stores_changed_rows_only_and_rebuilds_the_weights(tmp_path):
    from vocabseg.clip.load import read_patched_state_dict, read_state_dict, save_weight_patch

    cfg = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
                     vocab_size=1000, transformer_width=64, transformer_heads=4, transformer_layers=1)
    torch.manual_seed(0)
    base = vc.build_clip(cfg).eval()
    tuned = vc.build_clip(CLIPConfig(**{**cfg.to_dict(), "vision_conv_branch": 4})).eval()
    tuned.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        tuned.token_embedding.weight[[3, 500]] += 1.0      # two words re-learned
        tuned.ln_final.weight.mul_(1.5)                    # a whole tensor changed
        torch.nn.init.normal_(tuned.visual.conv_branch.proj.weight)  # a new module
    base_file = vc.save_state_dict(base, tmp_path / "base.safetensors")
    patch = save_weight_patch(base.state_dict(), tuned.state_dict(), tmp_path / "patch.safetensors")
    stored = read_state_dict(patch)
    assert stored["token_embedding.weight.__rows__"].tolist() == [3, 500]
    assert "token_embedding.weight" not in stored and "visual.conv1.weight" not in stored  # unchanged: left out
    assert "ln_final.weight" in stored and "visual.conv_branch.proj.weight" in stored
    assert patch.stat().st_size < base_file.stat().st_size / 10
    merged = read_patched_state_dict([base_file, patch])
    want = tuned.state_dict()
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k]) for k in want)
    with pytest.raises(UserError, match="weight patch"):
        read_patched_state_dict(patch)
