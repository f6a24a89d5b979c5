"""LSeg — language-driven semantic segmentation (Li et al., ICLR 2022, arXiv 2201.03546; seed 001).

A DPT decoder (Ranftl et al. 2021) turns ViT tokens from four layers into per-pixel embeddings in CLIP's text
space; a pixel's class logits are ``temperature · cos(pixel embedding, text embedding)``, trained with a plain
pixel-wise cross-entropy. Swapping the label set at test time is zero-shot segmentation: nothing in the model
depends on the number or order of classes (the optional spatial-regularisation blocks share one 3×3 kernel over
all class channels for that reason).

Here the image encoder is the shared CLIP ViT (``self.clip``); the release uses a timm ViT-L/16 (ImageNet-21k)
next to CLIP ViT-B/32's text tower. DPT parts, in the release's order:

* reassemble: readout (``project``: concat [CLS] to every token, ``Linear(2C, C)`` + GELU), tokens -> map,
  1×1 conv to ``reassemble_channels[i]``, then resample to 4×, 2×, 1×, ½× the token grid (4×4/2 transposed conv,
  2×2/2 transposed conv, identity, 3×3/2 conv) = 1/4, 1/8, 1/16, 1/32 of the image for patch 16;
* ``layer_rn``: 3×3 conv (no bias) of each level to ``features`` (256);
* four fusion blocks (residual conv units with BatchNorm, ×2 bilinear upsampling with align_corners, 1×1 conv),
  coarse to fine, ending at 8× the token grid (1/2 of the image for patch 16);
* ``head``: 1×1 conv to CLIP's embedding width, L2-normalised per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import CLIP, CLIPConfig, config_for
from ..errors import ConfigError
from .base import OpenVocabModel
from .default import DEFAULT_CLIP_WEIGHTS, WEIGHTS_DIR
from .registry import register_model
from .segvit import used_visual_parameters
from .weights import load_strict

# ----------------------------------------------------------------------------------------------- config


@dataclass
class LSegConfig:
    clip: CLIPConfig = field(default_factory=lambda: config_for("ViT-B/16"))
    # CLIP layers (tokens after that many blocks) reassembled into the pyramid; the release's hooks are 0-based
    # block indices: ViT-L 5/11/17/23 -> layers 6/12/18/24, ViT-B 2/5/8/11 -> layers 3/6/9/12.
    layers: tuple[int, int, int, int] = (3, 6, 9, 12)
    readout: str = "project"  # how [CLS] enters the maps: "ignore", "add" or "project" (release default)
    reassemble_channels: tuple[int, int, int, int] = (96, 192, 384, 768)  # DPT ViT-B; ViT-L: 256/512/1024/1024
    features: int = 256
    use_bn: bool = True  # LSegNet builds its residual conv units with BatchNorm
    temperature: float = 1 / 0.07  # initial logit scale; learnt in log space when learn_temperature
    learn_temperature: bool = True
    spatial_reg: str | None = None  # None, "depthwise" or "bottleneck" (release arch_option 2 / 1)
    spatial_reg_depth: int = 2
    spatial_reg_activation: str = "lrelu"  # "relu", "lrelu" or "tanh"
    train_image_encoder: bool = False  # the release trains its image ViT; CLIP stays frozen unless this is set
    templates: str = "none"  # the release embeds the bare label text
    short_side: int = 480  # inference resize (release crop size 480); long side <= max_side
    max_side: int = 2048
    size_divisibility: int = 32


# ----------------------------------------------------------------------------------------------- DPT parts


class Readout(nn.Module):
    """[CLS] into the patch tokens: ``ignore`` (drop it), ``add`` (add it) or ``project`` (concat + Linear + GELU)."""

    def __init__(self, mode: str, width: int):
        super().__init__()
        if mode not in ("ignore", "add", "project"):
            raise ConfigError(f"readout must be 'ignore', 'add' or 'project', got {mode!r}")
        self.mode = mode
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU()) if mode == "project" else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, C] -> [B, N, C]."""
        patches, cls = tokens[:, 1:], tokens[:, :1]
        if self.mode == "ignore":
            return patches
        if self.mode == "add":
            return patches + cls
        return self.project(torch.cat([patches, cls.expand_as(patches)], dim=-1))


def _resample(channels: int, factor: float) -> nn.Module:
    """4×, 2× (transposed conv, kernel = stride = factor), 1× (identity) or ½× (3×3 conv, stride 2)."""
    if factor > 1:
        f = int(factor)
        return nn.ConvTranspose2d(channels, channels, kernel_size=f, stride=f)
    if factor == 1:
        return nn.Identity()
    return nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)


class Reassemble(nn.Module):
    """One level: readout, tokens -> map, 1×1 conv to ``channels``, resample, 3×3 conv to ``features``."""

    def __init__(self, width: int, channels: int, features: int, factor: float, readout: str):
        super().__init__()
        self.readout = Readout(readout, width)
        self.proj = nn.Conv2d(width, channels, kernel_size=1)
        self.resample = _resample(channels, factor)
        self.to_features = nn.Conv2d(channels, features, kernel_size=3, padding=1, bias=False)  # scratch.layerN_rn

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.readout(tokens).transpose(1, 2).unflatten(2, grid)  # [B, C, h, w]
        return self.to_features(self.resample(self.proj(x)))


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int, use_bn: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        self.bn1 = nn.BatchNorm2d(features) if use_bn else nn.Identity()
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        self.bn2 = nn.BatchNorm2d(features) if use_bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(F.relu(x)))
        out = self.bn2(self.conv2(F.relu(out)))
        return x + out


class FusionBlock(nn.Module):
    """path (+ RCU(skip)) -> RCU -> ×2 bilinear (align_corners) -> 1×1 conv. A path whose size differs from the
    skip's (odd token grids) is resized to it first."""

    def __init__(self, features: int, use_bn: bool):
        super().__init__()
        self.skip_unit = ResidualConvUnit(features, use_bn)
        self.unit = ResidualConvUnit(features, use_bn)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, path: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            if path.shape[-2:] != skip.shape[-2:]:
                path = F.interpolate(path, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            path = path + self.skip_unit(skip)
        path = self.unit(path)
        path = F.interpolate(path, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(path)


def _activation(name: str) -> nn.Module:
    acts = {"relu": nn.ReLU, "lrelu": nn.LeakyReLU, "tanh": nn.Tanh}
    if name not in acts:
        raise ConfigError(f"spatial_reg_activation must be one of {', '.join(acts)}, got {name!r}")
    return acts[name]()


class SpatialRegularization(nn.Module):
    """Blocks on the class logits [B, C, h, w]: one 3×3 kernel shared by every class channel (so any C works).

    ``depthwise``: x -> act(conv(x)); ``bottleneck``: x -> act(conv(x) + max over classes of x). The last block
    has no activation (release ``head_block(out, False)``).
    """

    def __init__(self, kind: str, depth: int, activation: str):
        super().__init__()
        if kind not in ("depthwise", "bottleneck"):
            raise ConfigError(f"spatial_reg must be None, 'depthwise' or 'bottleneck', got {kind!r}")
        if depth < 1:
            raise ConfigError(f"spatial_reg_depth must be >= 1, got {depth}")
        self.kind, self.depth = kind, depth
        self.conv = nn.Conv2d(1, 1, kernel_size=3, padding=1)  # the release reuses one block `depth` times
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            b, c, h, w = x.shape
            y = self.conv(x.reshape(b * c, 1, h, w)).view(b, c, h, w)
            if self.kind == "bottleneck":
                y = y + x.max(dim=1, keepdim=True).values
            x = self.act(y) if i < self.depth - 1 else y
        return x


# ----------------------------------------------------------------------------------------------- model


class LSeg(OpenVocabModel):
    def __init__(self, config: LSegConfig):
        super().__init__()
        c = config
        if not c.clip.is_vit:
            raise ValueError("LSeg needs a CLIP ViT image tower")
        if len(c.layers) != 4 or len(c.reassemble_channels) != 4:
            raise ConfigError("LSeg reassembles exactly four layers (layers and reassemble_channels of length 4)")
        if max(c.layers) > c.clip.vision_layers or min(c.layers) < 1:
            raise ConfigError(f"layers {c.layers} must lie in 1..{c.clip.vision_layers}")
        self.config = c
        self.clip = CLIP(c.clip)
        width = c.clip.vision_width
        self.reassemble = nn.ModuleList(
            Reassemble(width, ch, c.features, f, c.readout) for ch, f in zip(c.reassemble_channels, (4, 2, 1, 0.5)))
        self.fusion = nn.ModuleList(FusionBlock(c.features, c.use_bn) for _ in range(4))  # fine (0) .. coarse (3)
        self.head = nn.Conv2d(c.features, c.clip.embed_dim, kernel_size=1)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(c.temperature))),
                                        requires_grad=c.learn_temperature)
        self.spatial_reg = (SpatialRegularization(c.spatial_reg, c.spatial_reg_depth, c.spatial_reg_activation)
                            if c.spatial_reg else None)
        keep = used_visual_parameters(self.clip.visual, max(c.layers)) if c.train_image_encoder else ()
        self.freeze_clip(keep=keep)
        self.register_pixel_statistics()

    # -- pieces ------------------------------------------------------------------------------------------------
    def pixel_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> per-pixel embeddings [B, D, 8h, 8w] (not normalised), h = ⌈H/patch⌉."""
        p = self.config.clip.vision_patch_size
        pad_h, pad_w = (-images.shape[-2]) % p, (-images.shape[-1]) % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        feats, grid = self.clip.visual.forward_features(images, self.config.layers)
        levels = [r(feats[layer], grid) for r, layer in zip(self.reassemble, self.config.layers)]
        path = self.fusion[3](levels[3])
        for i in (2, 1, 0):
            path = self.fusion[i](path, levels[i])
        return self.head(path)

    def dense_logits(self, pixel_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """temperature · cos(pixel, text): [B, D, h, w] × [C, D] -> [B, C, h, w]."""
        pix = F.normalize(pixel_embeddings, dim=1)
        text = F.normalize(text_embeddings.to(pix.dtype), dim=-1)
        return self.logit_scale.exp() * torch.einsum("bdhw,cd->bchw", pix, text)

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> dict:
        """Normalised images [B, 3, H, W] and text embeddings [C, D] -> ``{"logits": [B, C, 8h, 8w]}`` (h = ⌈H /
        patch⌉: 1/2 of the input for patch 16), after the optional spatial regularisation."""
        logits = self.dense_logits(self.pixel_embeddings(images), text_embeddings)
        if self.spatial_reg is not None:
            logits = self.spatial_reg(logits)
        return {"logits": logits}

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """-> dense class logits [B, C, h, w] on the padded input (the Predictor resizes and crops them)."""
        return self.forward(pixels, text_embeddings)["logits"].float()

    # -- training hooks used by the engine ----------------------------------------------------------------------
    def build_criterion(self, num_classes: int):
        """Pixel-wise cross-entropy over the text logits (ignored pixels left out)."""
        from ..losses.pixel import PixelCrossEntropy

        return PixelCrossEntropy(num_classes)

    def training_targets(self, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """Label maps [B, H, W] -> int64 maps with ignored pixels marked for the criterion."""
        from ..losses.pixel import pixel_targets

        return pixel_targets(labels, ignore_index)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], allow_missing_clip: bool = False) -> None:
        """Our own key layout (the release pairs a timm ViT-L/16 with CLIP ViT-B/32's text tower: no key map)."""
        load_strict(self, state, allow_missing_prefix="clip." if allow_missing_clip else None)


# ----------------------------------------------------------------------------------------------- registered configs


def _lseg_b16() -> LSegConfig:
    return LSegConfig()


def _lseg_l14() -> LSegConfig:
    return LSegConfig(clip=config_for("ViT-L/14"), layers=(6, 12, 18, 24), reassemble_channels=(256, 512, 1024, 1024),
                      size_divisibility=28)


def _lseg_tiny() -> LSegConfig:
    """A small LSeg for tests: the 4-block CLIP of ``san_tiny_test`` (width 64, patch 8), 16 decoder features."""
    clip = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
                      context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2,
                      transformer_layers=2)
    return LSegConfig(clip=clip, layers=(1, 2, 3, 4), reassemble_channels=(8, 16, 32, 32), features=16,
                      short_side=64, max_side=256, size_divisibility=16)


@register_model("lseg_vit_b_16", "lseg", _lseg_b16(),
                "LSeg (DPT decoder, pixel-text logits) on a frozen CLIP ViT-B/16")
def lseg_vit_b_16(cfg: LSegConfig) -> LSeg:
    return LSeg(cfg)


@register_model("lseg_vit_large_14", "lseg", _lseg_l14(),
                "LSeg (DPT decoder, pixel-text logits) on a frozen CLIP ViT-L/14")
def lseg_vit_large_14(cfg: LSegConfig) -> LSeg:
    return LSeg(cfg)


@register_model("lseg_tiny_test", "lseg", _lseg_tiny(), "tiny random LSeg for tests", test_only=True)
def lseg_tiny_test(cfg: LSegConfig) -> LSeg:
    return LSeg(cfg)


def _lseg_world() -> LSegConfig:
    """LSeg on the embedded default's small CLIP (6 blocks, width 192): pyramid from layers 2/3/5/6, 64 features;
    about as many trainable parameters as the default SAN (1.5 M vs 1.6 M)."""
    from .default import WORLD_TEMPLATES, default_clip_config

    return LSegConfig(clip=default_clip_config(), layers=(2, 3, 5, 6), reassemble_channels=(24, 48, 96, 192),
                      features=64, templates=WORLD_TEMPLATES, short_side=192, max_side=768, size_divisibility=32)


# Trained by configs/lseg_world.yaml (300 steps); shipped in fp16 by engine.checkpoint.bundle_weights.
@register_model("lseg_world", "lseg", _lseg_world(),
                "LSeg (DPT decoder) on the embedded default's small CLIP, for the generated world",
                weights=WEIGHTS_DIR / "lseg_world.safetensors", clip_weights=DEFAULT_CLIP_WEIGHTS)
def lseg_world(cfg: LSegConfig) -> LSeg:
    return LSeg(cfg)
