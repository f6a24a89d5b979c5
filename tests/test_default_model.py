"""The embedded default: shipped weights load, and it segments the bundled drawing with a free-text vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import vocabseg
from vocabseg.models.default import DEFAULT_CLIP_SHAPES_PATCH, DEFAULT_CLIP_WEIGHTS, DEFAULT_SAN_WEIGHTS

EXAMPLES = Path(vocabseg.__file__).parent / "examples"
pytestmark = pytest.mark.skipif(not DEFAULT_SAN_WEIGHTS.exists(), reason="default weights not built yet")


@pytest.fixture(scope="module")
def model():
    return vocabseg.load_model()


def test_shipped_weights_are_small_and_load_like_any_clip():
    total = sum(f.stat().st_size for f in (DEFAULT_CLIP_WEIGHTS, DEFAULT_SAN_WEIGHTS, DEFAULT_CLIP_SHAPES_PATCH))
    assert total < 30 * 2 ** 20
    clip = vocabseg.clip.load(DEFAULT_CLIP_WEIGHTS)  # OpenAI state-dict layout, through the ordinary loader
    assert clip.config.vision_patch_size == 8 and clip.config.embed_dim == 128


def test_only_the_default_runs_the_shape_tuned_clip(model):
    """v3: the default's CLIP = the shared file + the shape patch (conv branch, text tower); the world-trained
    models keep the CLIP they were trained on."""
    import torch

    from vocabseg.clip.load import read_state_dict

    shared = vocabseg.clip.load(DEFAULT_CLIP_WEIGHTS)
    assert model.clip.visual.conv_branch is not None
    assert torch.equal(model.clip.visual.conv1.weight, shared.visual.conv1.weight.to(model.clip.visual.conv1.weight.dtype))
    patch = read_state_dict(DEFAULT_CLIP_SHAPES_PATCH)
    assert not any(k.startswith("visual.") and not k.startswith("visual.conv_branch.") for k in patch)
    world = vocabseg.load_model("segvit_world")
    assert world.clip.visual.conv_branch is None
    assert torch.equal(world.clip.token_embedding.weight, shared.token_embedding.weight)
    assert not torch.equal(model.clip.token_embedding.weight, shared.token_embedding.weight)


def test_default_needs_no_arguments_and_is_the_default(model):
    assert model.model_name == "default"
    assert not model.training


def test_segments_the_hand_drawn_example(model):
    """A drawing not made by the generator: red circle (left) and blue square (right) on white."""
    result = model.predict(EXAMPLES / "shapes.png", ["red circle", "blue square", "background"])
    labels = result.labels
    assert labels[170, 130] == 0  # centre of the circle
    assert labels[185, 345] == 1  # centre of the square
    assert labels[20, 20] == 2 and labels[340, 460] == 2  # corners: background
    h, w = labels.shape
    yy, xx = np.mgrid[:h, :w]
    circle = (xx - 130) ** 2 + (yy - 170) ** 2 <= 70 ** 2
    square = (xx >= 280) & (xx <= 410) & (yy >= 120) & (yy <= 250)
    assert (labels[circle] == 0).mean() > 0.8
    assert (labels[square] == 1).mean() > 0.8


def test_world_example_finds_its_backgrounds(model):
    result = model.predict(EXAMPLES / "world_scene.png", ["sky", "grass", "water", "sand", "wall", "road"])
    present = {a["name"] for a in result.areas() if a["fraction"] > 0.1}
    assert {"sky", "water"} <= present


def test_segments_the_plain_drawings_of_issue_24(model):
    """Three drawings made outside the generator (vocabseg.data.drawings): v1 lost four of their seven objects."""
    from vocabseg.data.drawings import issue_drawings
    from vocabseg.engine.world_eval import drawing_scores

    scores = drawing_scores(model, issue_drawings())
    for record in scores["records"]:
        for name, iou in record["IoU"].items():
            assert iou > 70, (record["kind"], name, iou)  # measured: every one >= 84


def test_two_shapes_of_one_colour_are_named_apart(model):
    """v4 (issue #24, item 2): SAN's proposals merge two same-coloured shapes; split into connected pieces, each is
    named by its own crops. Measured on these 8 pair drawings: 14 of 16 objects >= 50 split, 1 of 16 unsplit."""
    from vocabseg.data.drawings import same_color_drawings
    from vocabseg.engine.world_eval import drawing_scores

    pairs = same_color_drawings(8)
    split = drawing_scores(model, pairs)
    whole = drawing_scores(vocabseg.load_model(mask_split_parts=1), pairs)
    assert split["objects_at_least_50"] >= 60
    assert whole["objects_at_least_50"] <= 30


def test_crop_ensemble_is_on_for_the_default_only(model):
    assert model.config.mask_crop_ensemble > 0
    assert vocabseg.models.get_config("san_vit_b_16").mask_crop_ensemble == 0


def test_its_clip_tells_shapes_apart(model):
    """v3: zero-shot 10-way shape accuracy on held-out single-object scenes (56 % on 400; v2's CLIP: 13 %, chance 10)."""
    from vocabseg.engine.contrastive import ContrastiveConfig, zero_shot_report

    report = zero_shot_report(model.clip.float(), ContrastiveConfig(), num_samples=120)
    assert report["shape"]["accuracy"] > 35
    assert report["color"]["accuracy"] > 55
