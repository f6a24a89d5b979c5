"""Every registered segmentation model: builds, forward shapes on odd sizes, gradients only where trainable,
save/load. (Referring models, which take a sentence instead of a vocabulary, are tested in test_etris.py.)

Registering a model adds it here (timm's habit). Models too large to run in CI time (> 200 M parameters) are
built on the meta device and checked for shapes and the save/load key set only.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vocabseg
from vocabseg.models import get_config, list_models

ALL = list_models(include_test=True, task="semantic")
LARGE = 200e6


def _num_params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in vocabseg.create_model(name).parameters())


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = vocabseg.create_model(name)
        return cache[name]

    return get


def _small_input(name: str, height: int, width: int) -> torch.Tensor:
    d = get_config(name).size_divisibility
    return torch.randn(1, 3, -(-height // d) * d, -(-width // d) * d)


@pytest.mark.parametrize("name", ALL)
def test_builds_and_has_trainable_parameters(name):
    with torch.device("meta"):
        model = vocabseg.create_model(name)
    trainable = model.trainable_parameters()
    assert trainable and len(trainable) < len(list(model.parameters()))
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if n.startswith("clip.") and n != "clip.visual.positional_embedding")


@pytest.mark.parametrize("name", [n for n in ALL if _num_params(n) < LARGE])
def test_forward_shapes_and_gradients(name, built):
    model = built(name).train()
    dim = model.config.clip.embed_dim
    x = _small_input(name, 70, 98)
    text = F.normalize(torch.randn(5, dim), dim=-1)
    out = model(x, text)
    if "logits" in out:  # dense per-pixel models (LSeg)
        assert out["logits"].shape[:2] == (1, 5) and torch.isfinite(out["logits"]).all()
        loss = out["logits"].mean()
    else:  # mask classification (SAN, SegViT): background/no-object column last
        assert out["pred_logits"].shape[-1] == 6 and torch.isfinite(out["pred_logits"]).all()
        assert out["pred_masks"].shape[0] == 1 and torch.isfinite(out["pred_masks"]).all()
        loss = out["pred_logits"].mean() + out["pred_masks"].mean()
        for aux in out["aux_outputs"]:
            loss = loss + aux["pred_logits"].mean() + aux["pred_masks"].mean()
    loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", [n for n in ALL if _num_params(n) < LARGE])
def test_predict_at_odd_size(name, built):
    model = built(name).eval()
    rgb = np.random.default_rng(0).integers(0, 256, (37, 81, 3), dtype=np.uint8)
    result = model.predict(rgb, ["one", "two", "three"])
    assert result.labels.shape == (37, 81)
    assert set(np.unique(result.labels)) <= {0, 1, 2}


@pytest.mark.parametrize("name", [n for n in ALL if _num_params(n) < LARGE])
def test_save_load_round_trip(name, built, tmp_path):
    model = built(name).eval()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differ from a fresh init
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint was given: no "random weights" warning
        loaded = vocabseg.load_model(name, checkpoint=path)
    x = _small_input(name, 64, 64)
    text = F.normalize(torch.randn(3, model.config.clip.embed_dim), dim=-1)
    with torch.no_grad():
        a, b = model(x, text), loaded(x, text)
    keys = ("logits",) if "logits" in a else ("pred_logits", "pred_masks")
    assert all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("name", [n for n in ALL if _num_params(n) >= LARGE])
def test_large_models_state_dict_keys_round_trip(name):
    with torch.device("meta"):
        model = vocabseg.create_model(name)
        other = vocabseg.create_model(name)
    assert set(model.state_dict()) == set(other.state_dict())
    for k, v in model.state_dict().items():
        assert other.state_dict()[k].shape == v.shape


def test_clip_weights_for_a_model_without_a_clip_is_a_one_line_error():
    """Release models whose files hold everything (CLIMS's CAM network) refuse separate CLIP weights by name."""
    from vocabseg.errors import ConfigError

    with pytest.raises(ConfigError, match="takes no separate CLIP weights") as err:
        vocabseg.load_model("clims_resnet50_voc", clip="vocabseg/weights/default_clip.safetensors")
    assert "\n" not in str(err.value)
