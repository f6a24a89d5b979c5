"""CLIMS — cross language image matching for weakly supervised segmentation (Xie et al., CVPR 2022; seed 001).

A CAM network — a ResNet (output stride 16) and a 1×1 classifier, sigmoid per class, no global pooling — is trained
from image-level labels only, with a frozen CLIP as the judge (:mod:`vocabseg.losses.clims`): the foreground-masked
image must match "a photo of {class}.", the background-masked one must not, the foreground must not match
co-occurring background words, and the maps are kept small. Its class activation maps become pseudo-masks
(:func:`vocabseg.engine.cams.write_cams`) that any segmentation model of the toolkit can train on.

Differences from the release (``net/resnet50_clims.py``), each a switch where it matters:

* ``classifier="text"`` (default): the 1×1 classifier of class k is ``W^T t_k`` — a learnt 1×1 map into CLIP's
  space (``classifier``, D×2048) dotted with the frozen CLIP text embedding t_k of the class prompt. It is a 1×1
  classifier as in the paper (of rank ≤ D, not a restriction for K ≤ D classes) and accepts any vocabulary, which
  the toolkit's Predictor, generic trainer and model tests need. ``classifier="free"`` is the paper's K free
  filters (``num_classes`` fixed; the vocabulary must then have exactly those K classes).
* The backbone is our own ResNet with torchvision's parameter names and the release's strides (2, 2, 2, 1):
  :meth:`CLIMS.load_backbone` reads an ImageNet ``resnet50`` state dict (the release starts from one, then from a
  CAM baseline); without one it trains from scratch, as on the generated world. BatchNorm trains normally.
* Images reach CLIP in CLIP's own normalisation (the release feeds ImageNet-normalised pixels to CLIP).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import CLIP, CLIPConfig, OPENAI_MEAN, OPENAI_STD, config_for
from ..errors import CheckpointError, ConfigError
from ..losses.clims import CLIMS_WEIGHTS, VOC_BACKGROUND_WORDS
from .base import OpenVocabModel
from .registry import register_model
from .weights import load_strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ----------------------------------------------------------------------------------------------- config


@dataclass
class CLIMSConfig:
    clip: CLIPConfig | str | dict = field(default_factory=lambda: config_for("ViT-B/32"))  # release default
    # The same, settable through model_overrides (load_model's own ``clip=`` argument is a weights file): an
    # OpenAI architecture name or a dict of CLIPConfig fields; replaces ``clip`` when set.
    clip_arch: str | dict | None = None
    backbone_layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # ResNet-50
    backbone_width: int = 64
    backbone_strides: tuple[int, int, int, int] = (1, 2, 2, 1)  # layer1..4 after the /4 stem: output stride 16
    classifier: str = "text"  # "text": W^T t_k (any vocabulary) | "free": K learnt filters (paper)
    num_classes: int = 0  # "free" only
    freeze_stem: bool = False  # the release freezes conv1/bn1 of its ImageNet-pretrained ResNet
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # the backbone's input statistics
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    templates: str | tuple[str, ...] = ("a photo of {}.",)  # class prompts (release)
    # losses: alpha OTM, beta BTM, gamma CBS, delta REG (VOC values of the paper)
    otm_weight: float = CLIMS_WEIGHTS["loss_otm"]
    btm_weight: float = CLIMS_WEIGHTS["loss_btm"]
    cbs_weight: float = CLIMS_WEIGHTS["loss_cbs"]
    reg_weight: float = CLIMS_WEIGHTS["loss_reg"]
    # A multi-label soft-margin loss on the spatially averaged logits: the classification loss of the CAM baseline
    # the release initialises from, trained jointly here because nothing pretrained exists (0 = the paper's four).
    cls_weight: float = 0.0
    cbs_threshold: float | None = 0.26  # release: only similarities above it are suppressed
    background_words: tuple[str, ...] = VOC_BACKGROUND_WORDS  # suppressed for every class
    class_background_words: dict = field(default_factory=dict)  # {class name: [words]}, that class only
    background_templates: str | tuple[str, ...] = ("a photo of {}.",)
    min_label_pixels: int = 1  # a class is in an image (crop) when it has this many labelled pixels
    cam_threshold: float = 0.15  # background score of the pseudo-masks (release cam_eval_thres)
    short_side: int = 448  # inference resize; long side <= max_side
    max_side: int = 1024
    size_divisibility: int = 16


def _clip_config(value) -> CLIPConfig:
    """A CLIPConfig, a named OpenAI architecture ("ViT-B/32") or a dict of CLIPConfig fields (YAML overrides)."""
    if isinstance(value, CLIPConfig):
        return value
    if isinstance(value, str):
        try:
            return config_for(value)
        except KeyError as e:
            raise ConfigError(str(e).strip("'\"")) from None
    if isinstance(value, dict):
        try:
            return CLIPConfig.from_dict(value)
        except TypeError as e:
            raise ConfigError(f"CLIMS clip config: {e}") from None
    raise ConfigError(f"CLIMS clip config must be a CLIPConfig, an architecture name or a dict, got {value!r}")


# ----------------------------------------------------------------------------------------------- backbone


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3×3), torchvision's names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """7×7/2 stem + 3×3/2 max-pool, four bottleneck stages; ``forward`` -> the last stage's map [B, 32·w, h, w]."""

    def __init__(self, layers: Sequence[int], width: int = 64, strides: Sequence[int] = (1, 2, 2, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for i, (blocks, stride) in enumerate(zip(layers, strides)):
            planes = width * 2 ** i
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.out_channels = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# ----------------------------------------------------------------------------------------------- model


class CLIMS(OpenVocabModel):
    def __init__(self, config: CLIMSConfig):
        super().__init__()
        config = dataclasses.replace(  # YAML overrides arrive as lists, dicts and names
            config, clip=_clip_config(config.clip if config.clip_arch is None else config.clip_arch),
            clip_arch=None, backbone_layers=tuple(config.backbone_layers),
            backbone_strides=tuple(config.backbone_strides), background_words=tuple(config.background_words),
            templates=config.templates if isinstance(config.templates, str) else tuple(config.templates))
        if config.classifier not in ("text", "free"):
            raise ConfigError(f"CLIMS classifier must be 'text' or 'free', got {config.classifier!r}")
        if config.classifier == "free" and config.num_classes < 1:
            raise ConfigError("CLIMS with classifier='free' needs num_classes >= 1")
        self.config = config
        self.clip = CLIP(config.clip)
        self.backbone = ResNet(config.backbone_layers, config.backbone_width, config.backbone_strides)
        out = config.clip.embed_dim if config.classifier == "text" else config.num_classes
        self.classifier = nn.Conv2d(self.backbone.out_channels, out, 1, bias=False)
        self.freeze_clip()
        if config.freeze_stem:
            for p in (*self.backbone.conv1.parameters(), *self.backbone.bn1.parameters()):
                p.requires_grad = False
        self.register_pixel_statistics()
        self.vocabulary: list[str] = []  # names of the last text_embeddings call (class-specific CBS words)

    # -- housekeeping ------------------------------------------------------------------------------------------
    def register_pixel_statistics(self) -> None:
        """The backbone's mean/std × 255 (ImageNet's for a torchvision-initialised ResNet, CLIP's on the world)."""
        mean, std = torch.tensor(self.config.pixel_mean), torch.tensor(self.config.pixel_std)
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1) * 255, persistent=False)

    def text_embeddings(self, vocabulary: Sequence[str]) -> torch.Tensor:
        self.vocabulary = list(vocabulary)
        return super().text_embeddings(vocabulary)

    # -- CAMs --------------------------------------------------------------------------------------------------
    def cam_logits(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> class logits [B, C, H/16, W/16] (before the sigmoid)."""
        feats = self.classifier(self.backbone(pixels))
        if self.config.classifier == "free":
            if text_embeddings.shape[0] != self.config.num_classes:
                raise ConfigError(f"this CLIMS has {self.config.num_classes} fixed classes (classifier='free') "
                                  f"but the vocabulary has {text_embeddings.shape[0]}")
            return feats
        return torch.einsum("bdhw,cd->bchw", feats, text_embeddings.to(feats.dtype))

    def cam_maps(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """The maps pseudo-masks are made of: ReLU of the logits (the release's ``CAM.forward``)."""
        return F.relu(self.cam_logits(pixels, text_embeddings))

    def forward(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> dict:
        """-> ``logits`` [B, C, h, w], ``cams`` = sigmoid(logits), and what the CLIMS loss also needs: the input
        ``pixels`` and the class ``text`` embeddings."""
        logits = self.cam_logits(pixels, text_embeddings)
        return {"logits": logits, "cams": torch.sigmoid(logits), "pixels": pixels, "text": text_embeddings}

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """-> dense class logits [B, C, h, w]; the Predictor takes the arg-max (no background: see write_cams)."""
        return self.cam_logits(pixels, text_embeddings).float()

    # -- training hooks used by the engine ----------------------------------------------------------------------
    def build_criterion(self, num_classes: int, class_names: Sequence[str] | None = None):
        """The CLIMS losses with this model's frozen CLIP as the judge. Class-specific background words need the
        class names: given here, or those of the last :meth:`text_embeddings` call (the trainer makes one)."""
        from ..clip.vocabulary import encode_vocabulary
        from ..losses.clims import CLIMSLoss, background_word_table

        c = self.config
        names = list(class_names) if class_names is not None else (
            self.vocabulary if len(self.vocabulary) == num_classes else None)
        if c.class_background_words and names is None:
            raise ConfigError("class_background_words needs the class names: pass class_names to build_criterion")
        words, table = background_word_table(names, num_classes, c.background_words, c.class_background_words)
        bg_text = None
        if words:
            with torch.no_grad():
                bg_text = encode_vocabulary(self.clip, words, templates=c.background_templates).detach()
        weights = {"loss_otm": c.otm_weight, "loss_btm": c.btm_weight, "loss_cbs": c.cbs_weight,
                   "loss_reg": c.reg_weight}
        if c.cls_weight:
            weights["loss_cls"] = c.cls_weight
        return CLIMSLoss(self.clip.encode_image, c.clip.image_resolution,
                         (self.pixel_mean.flatten()).tolist(), (self.pixel_std.flatten()).tolist(),
                         OPENAI_MEAN, OPENAI_STD, background_text=bg_text, background_mask=table,
                         weight_dict=weights, cbs_threshold=c.cbs_threshold, min_label_pixels=c.min_label_pixels)

    def training_targets(self, labels: torch.Tensor, ignore_index: int = 255) -> dict:
        """Label maps only give image-level labels here (the classes present in each crop)."""
        return {"labels": labels, "ignore_index": ignore_index}

    # -- checkpoints -------------------------------------------------------------------------------------------
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], allow_missing_clip: bool = False) -> None:
        load_strict(self, state, allow_missing_prefix="clip." if allow_missing_clip else None)

    def load_backbone(self, path: str | Path) -> None:
        """Initialise the ResNet from a torchvision-layout state dict (e.g. ImageNet ``resnet50``; ``fc.*`` is
        dropped), strictly."""
        from ..clip.load import drop_non_weights, read_state_dict

        state = drop_non_weights(read_state_dict(path))
        state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()
                 if not k.startswith("fc.")}
        for k, v in self.backbone.state_dict().items():  # BatchNorm counters: absent from older files
            if k.endswith("num_batches_tracked"):
                state.setdefault(k, v)
        try:
            load_strict(self.backbone, state)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------------------------- registered configs


def _clims_r50() -> CLIMSConfig:
    return CLIMSConfig()


def _clims_tiny() -> CLIMSConfig:
    """A tiny CLIMS for tests: one bottleneck per stage (width 8) and the 4-block CLIP of ``san_tiny_test``."""
    clip = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
                      context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2,
                      transformer_layers=2)
    return CLIMSConfig(clip=clip, backbone_layers=(1, 1, 1, 1), backbone_width=8, pixel_mean=OPENAI_MEAN,
                       pixel_std=OPENAI_STD, short_side=64, max_side=256, size_divisibility=16)


@register_model("clims_resnet50", "clims", _clims_r50(),
                "CLIMS CAM network: ResNet-50 + text-tied 1x1 classifier, frozen CLIP ViT-B/32 judge (paper losses)")
def clims_resnet50(cfg: CLIMSConfig) -> CLIMS:
    return CLIMS(cfg)


@register_model("clims_tiny_test", "clims", _clims_tiny(), "tiny random CLIMS for tests", test_only=True)
def clims_tiny_test(cfg: CLIMSConfig) -> CLIMS:
    return CLIMS(cfg)
