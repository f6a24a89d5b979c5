"""Shipping a run's weights (vocabseg/weights): without the frozen CLIP, in fp16, and loadable again."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import vocabseg
from vocabseg.engine.checkpoint import bundle_weights, save_final_model
from vocabseg.errors import CheckpointError
from vocabseg.models import load_strict


def test_bundle_keeps_trained_tensors_in_fp16_and_loads_back(tmp_path):
    torch.manual_seed(0)
    model = vocabseg.create_model("san_tiny_test")
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    save_final_model(model, tmp_path, {"model": "san_tiny_test", "iteration": 7})
    info = bundle_weights(tmp_path / "model_final.safetensors", tmp_path / "ship.safetensors")
    shipped = load_file(str(tmp_path / "ship.safetensors"))
    assert info["tensors"] == len(shipped)
    frozen = [k for k in shipped if k.startswith("clip.")]
    assert frozen == ["clip.visual.positional_embedding"]  # the only CLIP tensor SAN trains
    assert all(v.dtype == torch.float16 for v in shipped.values() if v.is_floating_point())
    # loading the bundle beside the same CLIP gives the model back, up to fp16 rounding
    again = vocabseg.create_model("san_tiny_test")
    load_strict(again.clip, {k[len("clip."):]: v for k, v in model.state_dict().items() if k.startswith("clip.")})
    again.load_checkpoint_state(shipped, allow_missing_clip=True)
    for k, v in model.state_dict().items():
        assert torch.allclose(again.state_dict()[k], v, atol=1e-3, rtol=1e-3), k
    with pytest.raises(CheckpointError, match="model_final"):
        bundle_weights(tmp_path / "ship.safetensors", tmp_path / "x.safetensors")
