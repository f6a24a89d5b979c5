"""The "shapes" training family (issue #24): a conv branch on a frozen ViT plus the text tower, through the engine."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
import yaml

import vocabseg.clip as vc
from vocabseg.clip.tokenizer import tokenize
from vocabseg.data.world import WorldConfig, generate_sample
from vocabseg.engine.config import load_family
from vocabseg.engine.loop import run_family
from vocabseg.engine.shape_tuning import _object_and_stuff_crops
from vocabseg.models.default import DEFAULT_CLIP_WEIGHTS

TINY = dict(family="shapes", crop_scenes=4, scene_samples=8, eval_crop_scenes=2, eval_scene_samples=6,
            max_iters=4, warmup_iters=1, batch_crops=4, batch_scenes=2, log_every=2, checkpoint_every=2,
            eval_every=4, branch_channels=8)


def _run(tmp_path, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "shapes.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "run"), **extra}))
    return run_family(load_family(path), log=lambda *a, **k: None)


def test_tiny_run_trains_branch_and_text_only_and_resumes(tmp_path):
    torch.set_num_threads(1)
    result = _run(tmp_path)
    base = vc.load(DEFAULT_CLIP_WEIGHTS)
    tuned = vc.load(result["final_weights"])
    assert tuned.config.vision_conv_branch == 8 and base.config.vision_conv_branch == 0
    tuned_sd, base_sd = tuned.state_dict(), base.state_dict()
    for k, v in base_sd.items():  # the ViT and the logit scale are frozen; the text tower moved
        if k.startswith("visual.") or k == "logit_scale":
            assert torch.equal(tuned_sd[k], v), k
    assert not torch.equal(tuned_sd["token_embedding.weight"], base_sd["token_embedding.weight"])
    assert tuned_sd["visual.conv_branch.proj.weight"].abs().sum() > 0  # the branch left zero
    report = json.loads((tmp_path / "run" / "eval_0000004.json").read_text())
    for key in ("crops_shape_acc", "scenes_color_acc", "zero_shot_shape_acc", "shape_text_cosine"):
        assert key in report
    with torch.no_grad():  # the reported drift of the kept prompts is the drift of the written file
        tokens = tokenize(["a photo of sky", "red"])
        cos = (F.normalize(tuned.encode_text(tokens), dim=-1) * F.normalize(base.encode_text(tokens), dim=-1)).sum(-1)
    assert report["kept_prompt_cosine_min"] <= cos.min().item() + 1e-5
    pool = (tmp_path / "run" / "pool.pt").stat().st_mtime_ns
    again = _run(tmp_path, max_iters=6)  # same folder, longer schedule: resumes, the pool is read, not rebuilt
    assert again["iteration"] == 6
    assert (tmp_path / "run" / "pool.pt").stat().st_mtime_ns == pool


def test_branch_only_run_keeps_the_text_tower_and_continues_an_init_branch(tmp_path):
    """train_text False: from a CLIP that already has a branch, only the branch moves (the text embeddings a SAN was
    trained on stay exact); crops are cut once per fill from coarse masks."""
    from vocabseg.clip.load import save_state_dict
    from vocabseg.clip.model import CLIP, CLIPConfig

    torch.set_num_threads(1)
    base = vc.load(DEFAULT_CLIP_WEIGHTS)
    with_branch = CLIP(CLIPConfig.from_dict({**base.config.to_dict(), "vision_conv_branch": 8}))
    with_branch.load_state_dict(base.state_dict(), strict=False)
    torch.nn.init.normal_(with_branch.visual.conv_branch.proj.weight, std=0.1)  # a branch that already learnt
    first = save_state_dict(with_branch, tmp_path / "init.safetensors")
    result = _run(tmp_path / "b", init_clip=str(first), train_text=False, crop_fills=["mask_mean", "neutral"],
                  crop_mask_stride=8, crop_world={"ground_color_prob": 0.5})
    init, tuned = vc.load(first).state_dict(), vc.load(result["final_weights"]).state_dict()
    assert not torch.equal(tuned["visual.conv_branch.proj.weight"], init["visual.conv_branch.proj.weight"])
    for k, v in init.items():
        if not k.startswith("visual.conv_branch."):
            assert torch.equal(tuned[k], v), k
    images, frozen, labels = torch.load(tmp_path / "b" / "run" / "pool.pt", weights_only=True)["crops"]
    assert len(images) == len(labels) == len(frozen)
    sample = generate_sample(3, WorldConfig(min_size=128, max_size=160, min_objects=2))
    one, one_labels = _object_and_stuff_crops(sample, 32)
    two, two_labels = _object_and_stuff_crops(sample, 32, ("mask_mean", "neutral"), mask_stride=8)
    n = len(one)  # each region once per fill, labelled alike
    assert len(two) == 2 * n and two_labels == one_labels * 2 and not torch.equal(two[:n], two[n:])
    # the pool's embedding is the ViT's own: the init branch is added by training, not baked in
    clip = vc.load(first)
    with torch.no_grad():
        x = images[:4].float()  # (the pool keeps the crops in fp16, their embeddings from fp32)
        assert torch.allclose(frozen[:4], clip.visual.vit_embedding(x), atol=5e-3)
        assert not torch.allclose(frozen[:4], clip.encode_image(x), atol=5e-3)


def test_shape_tuning_rejects_unknown_crop_fills(tmp_path):
    import pytest

    from vocabseg.errors import ConfigError

    with pytest.raises(ConfigError, match="crop_fills"):
        _run(tmp_path, crop_fills=["outline"])
