"""The embedded default: a small SAN on a small CLIP, both trained by this project on its generated world.

No pretrained CLIP can be downloaded, so the package ships its own: a CLIP (ViT 96 px, patch 8, 6 blocks; text
transformer 4 blocks) trained contrastively on image–caption pairs of ``vocabseg.data.world``, and a SAN trained
on part of the world's classes with that CLIP frozen. It knows the world's vocabulary — shapes (circle, square,
triangle, star, ring, cross, heart, hexagon, arrow, crescent), colours, textures, stuff (sky, grass, water, sand,
wall, road, plain background) — and nothing about real photographs: for those, load the official CLIP/SAN weights
(``vocabseg.load_model("san_vit_b_16", checkpoint="san_vit_b_16.pth")``).

Training it again is one command per stage (see docs/default_model.md).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..clip.model import CLIPConfig
from ..data.world import OBJECT_CATEGORIES
from .registry import DEFAULT_MODEL, register_model
from .san import SAN, SANConfig

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_CLIP_WEIGHTS = WEIGHTS_DIR / "default_clip.safetensors"
DEFAULT_SAN_WEIGHTS = WEIGHTS_DIR / "default_san.safetensors"
# v3 (issue #24): what teaching the CLIP shapes changed (conv branch, text tower), as a patch on the shared CLIP
# file; only the default uses it, the world-trained models keep the CLIP they were trained on. v6: the branch tuned
# further on crops cut as the ensemble cuts them (configs/default_clip_crops.yaml; the text tower unchanged).
DEFAULT_CLIP_SHAPES_PATCH = WEIGHTS_DIR / "default_clip_shapes.safetensors"

# Prompt templates in the phrasing of the world's captions (the tiny CLIP never saw ViLD's "in the scene").
WORLD_TEMPLATES: tuple[str, ...] = ("a {}", "a photo of a {}", "an image of a {}", "a picture showing a {}")


# The names the default SAN's classifier was trained on (configs/default_san_v4.yaml: its scheme less the mask-only
# classes). Sand, wall and every pink, white, black or brown object it knows from masks and CLIP's crops only.
SAN_NAMED_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple")
SAN_TRAINED_CLASSES: tuple[str, ...] = ("sky", "grass", "water", "road", "background") + tuple(
    f"{color} {shape}" for color in SAN_NAMED_COLORS for shape in OBJECT_CATEGORIES)


def default_clip_config() -> CLIPConfig:
    return CLIPConfig(embed_dim=128, image_resolution=96, vision_layers=6, vision_width=192, vision_patch_size=8,
                      context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                      transformer_layers=4)


def default_san_config() -> SANConfig:
    return SANConfig(
        # v3: the CLIP with a conv branch on its image embedding and a text tower that tells shapes apart
        # (configs/default_clip_shapes*.yaml). Crops keep v2's fill (outline crops, mask_crop_fill="surround_mean",
        # measured 12 points lower on drawings: docs/default_model.md)
        clip=replace(default_clip_config(), vision_conv_branch=32), clip_scale=0.5, fusion_map=((0, 0), (2, 1), (4, 2)), rec_start=4,
        side_width=128, side_depth=6, side_heads=2, side_patch=8, side_image_size=192, num_queries=32,
        embed_channels=128, mlp_channels=128, deep_supervision=(5, 6), templates=WORLD_TEMPLATES,
        # v5: inference at short side 256 (trained on 192-px crops; finer masks for small objects and pairs: drawings
        # 84.2 -> 86.8 object mIoU, world seen 60.4 -> 63.0; 1.38 s instead of 1.33 s per 512² scene)
        short_side=256, max_side=768, size_divisibility=32, train_num_points=4096,
        # each mask is also classified by the CLIP on its own crop (v2, docs/default_model.md): the 96-px CLIP
        # recognises a cropped object's colour reliably, a few patches of the whole image much less so. 0.85 scores
        # ~1.5 points more on drawings but 6 less on the world's seen classes (docs/default_model.md)
        mask_crop_ensemble=0.7,
        # v4: a proposal covering two separate objects (two shapes of one colour, which SAN's masks merge) is split
        # into its connected pieces, each named by its own crops, flat and outline; at most the 12 proposals with
        # the largest object share are split (every split costs crops: 0.87 s instead of 1.3-1.6 s per 512² world
        # scene, the same drawings' figures; docs/default_model.md)
        mask_split_parts=2, mask_split_crop_weight=0.85, mask_split_outline=0.5, mask_split_max=12,
        # v5: SAN's "no object" logit lowered (objects of colours it never learned to name were trained as nothing
        # until v4, and their proposals' object share stayed ~0.01-0.3; v6's SAN learnt they are objects, bias 2
        # measures as 4 on drawings and better on the world), and every crop's distribution takes a share (0.3 in v5,
        # 0.5 since v7) from a neutral crop (the mask's own pixels in its shape on grey: a blue hexagon on sky, a
        # brown ring on wall are no longer "sky", "wall"). docs/default_model.md "Version 5", "Version 6"
        no_object_bias=2.0, mask_crop_neutral_share=0.5,
        # v7: a proposal named with ≥ 0.8 confidence is cut out of the larger proposals of other classes covering it
        # (a red star on a red brick wall: two "wall" masks over it outweighed its own; drawings 97.4 -> 99.1 % of
        # objects >= 30 %, docs/default_model.md "Version 7")
        nested_cut_confidence=0.8,
        # v7: the names SAN never learnt take their crop's word with weight 0.95 (FC-CLIP's out-of-vocabulary
        # ensemble), and every crop 0.5 from the neutral crop: a white arrow on grey paper, "background" on its flat
        # (white) crop, is a white arrow on its neutral crop; SAN's ~0 for "white arrow" no longer vetoes it
        # (drawings 99.1 -> 100 % of objects >= 30 %, docs/default_model.md "Version 7")
        mask_crop_ensemble_unseen=0.95, trained_class_names=SAN_TRAINED_CLASSES)


def default_lit_san_config() -> SANConfig:
    """The default SAN on a LiT CLIP: same image tower and side network, frozen MiniLM text tower (384-d); the
    v1/v2 crops (no conv branch: that LiT tower was trained without one). Its SAN learnt other names
    (configs/default_san_world.yaml's seen classes), so one crop weight for all names."""
    cfg = default_san_config()
    return replace(cfg, clip=replace(cfg.clip, embed_dim=384, vision_conv_branch=0), text_tower="minilm",
                   mask_crop_ensemble_unseen=0.0, trained_class_names=())


@register_model(DEFAULT_MODEL, "san", default_san_config(),
                "embedded default: small SAN + small CLIP trained on the generated world (shapes, colours, stuff)",
                weights=DEFAULT_SAN_WEIGHTS, clip_weights=(DEFAULT_CLIP_WEIGHTS, DEFAULT_CLIP_SHAPES_PATCH))
def default(cfg: SANConfig) -> SAN:
    return SAN(cfg)


@register_model("default_lit", "san", default_lit_san_config(),
                "the embedded default's SAN on a LiT CLIP (frozen all-MiniLM-L6-v2 text tower; needs its weights)")
def default_lit(cfg: SANConfig) -> SAN:
    return SAN(cfg)
