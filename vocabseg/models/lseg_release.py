"""LSeg as released by its authors (isl-org/lang-seg: ``demo_e200.ckpt``, ``lseg_ade20k_l16.ckpt``).

The release is not our :mod:`~vocabseg.models.lseg` (a DPT on a frozen CLIP image tower): its image encoder is
timm's ``vit_large_patch16_384`` (ImageNet-21k, trained end to end with the decoder), beside CLIP ViT-B/32 of
which only the text tower is used. Parts, in the order of the official ``LSeg.forward`` (``lseg_net.py``,
``lseg_vit.py:forward_flex``, ``lseg_blocks.py``):

* :class:`~vocabseg.models.vit.PlainViT` (ViT-L/16, LayerNorm eps 1e-6, exact GELU), its 24×24 positional grid
  resized bilinearly (align_corners False) to H/16 × W/16; tokens after blocks 5/11/17/23 (0-based);
* DPT reassemble with the "project" readout, ``layerN_rn``, four fusion blocks with BatchNorm, each ending in a ×2
  bilinear upsampling with align_corners=True (these are :class:`~vocabseg.models.lseg.Reassemble` and
  :class:`~vocabseg.models.lseg.FusionBlock`, whose maths are the release's exactly);
* ``head1`` (1×1 conv 256 → 512) at H/2; pixel and text features L2-normalised; logits = (1/0.07)·pixel·text,
  computed in fp32 (the release multiplies in fp16 on the GPU);
* ``output_conv``: ×2 bilinear, align_corners=True, back to the network input's H × W.

Text: the bare label (no prompt template) through CLIP's tokenizer and ``encode_text``; here through
``vocabseg.clip.vocabulary`` with the single template "{}" so the embeddings are cached like every model's.

What is dropped on load, knowingly: CLIP's image tower (``net.clip_pretrained.visual.*``, 152 tensors; LSeg never
runs it), timm's 1000-class ``head`` and the final ``norm`` (computed by ``forward_flex`` but unused). Everything
else of the 730 tensors is loaded; CLIP's fp16 tensors are upcast to fp32.

Reads top to bottom: config, the model (single-scale forward), the official evaluation geometry (single scale and
``LSeg_MultiEvalModule``'s multi-scale + flip), the release key map, registered configs.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import CLIP, CLIPConfig, config_for
from ..errors import CheckpointError
from .base import OpenVocabModel
from .lseg import FusionBlock, Reassemble
from .registry import register_model
from .vit import PlainViT, PlainViTConfig
from .weights import assign_strict, rename_key

# ----------------------------------------------------------------------------------------------- config


@dataclass
class LSegReleaseConfig:
    encoder: PlainViTConfig = field(default_factory=lambda: PlainViTConfig(
        width=1024, depth=24, heads=16, patch_size=16, pos_grid=24, norm_eps=1e-6, pos_interpolation="bilinear",
        final_norm=False))
    clip: CLIPConfig = field(default_factory=lambda: config_for("ViT-B/32"))
    hooks: tuple[int, int, int, int] = (5, 11, 17, 23)  # 0-based blocks whose outputs are reassembled
    reassemble_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    features: int = 256
    readout: str = "project"
    logit_scale: float = 1 / 0.07  # fixed in the release (LSeg.logit_scale is a plain tensor, never trained)
    templates: str = "none"  # the bare label, as the release tokenises it
    # Image geometry. "release": the official evaluation code's conventions (see docs/models_segvit_lseg.md):
    # x = (rgb/255 - 0.5)/0.5 as floats, short side resized to `short_side` (bilinear, align_corners=True),
    # padded with `pad_value` to multiples of `size_divisibility`, logits cropped and resized back
    # (align_corners=True). "vocabseg": the package's generic Predictor/ONNX path (PIL resize of the uint8 image,
    # zero padding, align_corners=False), used by the tiny test config so the generic ONNX parity tests apply.
    geometry: str = "release"
    short_side: int = 480
    max_side: int = 1 << 30  # no cap in the release; the generic path needs a number
    size_divisibility: int = 32
    pad_value: float = -1.0  # pad_image's value: -mean/std, i.e. a black pixel
    # LSeg_MultiEvalModule (additional_utils/models.py): long side base_size*scale, crop windows, flips
    base_size: int = 520
    crop_size: int = 480
    stride_rate: float = 2.0 / 3.0
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = True
    # Build the big modules on the meta device until weights are loaded (a 1.7 GB release is then never held twice).
    deferred_init: bool = False


def _text_only_clip(config: CLIPConfig) -> CLIP:
    """Our CLIP with its image tower removed: the release only runs ``encode_text``."""
    clip = CLIP(config)
    clip.visual = None  # type: ignore[assignment]
    return clip


def _in_meta_context() -> bool:
    return torch.empty(()).device.type == "meta"


# ----------------------------------------------------------------------------------------------- model


class LSegRelease(OpenVocabModel):
    """The released LSeg: ViT-L/16 + DPT image side, CLIP ViT-B/32 text side, scaled cosine logits."""

    def __init__(self, config: LSegReleaseConfig):
        super().__init__()
        if config.geometry not in ("release", "vocabseg"):
            from ..errors import ConfigError

            raise ConfigError(f"geometry must be 'release' or 'vocabseg', got {config.geometry!r}")
        self.config = config
        self._deferred = config.deferred_init and not _in_meta_context()
        with torch.device("meta") if self._deferred else nullcontext():
            self._build_parts()
        scale = torch.tensor(float(np.log(config.logit_scale)), dtype=torch.float32).exp()  # as LSeg computes it
        self.register_buffer("logit_scale", scale, persistent=False)
        self.register_buffer("pixel_mean", torch.full((1, 3, 1, 1), 127.5), persistent=False)  # (x/255-0.5)/0.5
        self.register_buffer("pixel_std", torch.full((1, 3, 1, 1), 127.5), persistent=False)

    def _build_parts(self) -> None:
        c = self.config
        self.encoder = PlainViT(c.encoder)
        width = c.encoder.width
        self.reassemble = nn.ModuleList(Reassemble(width, ch, c.features, f, c.readout)
                                        for ch, f in zip(c.reassemble_channels, (4, 2, 1, 0.5)))
        self.fusion = nn.ModuleList(FusionBlock(c.features, use_bn=True) for _ in range(4))  # refinenet1..4
        self.head = nn.Conv2d(c.features, c.clip.embed_dim, kernel_size=1)  # scratch.head1
        self.clip = _text_only_clip(c.clip)
        self.freeze_clip()

    # -- deferred initialisation ---------------------------------------------------------------------------------
    def materialize(self) -> "LSegRelease":
        """Give a model built on the meta device (``deferred_init``) real, randomly initialised weights. Loading a
        checkpoint does this by assignment instead; ``.to()``/``.float()``/``forward`` call it when needed."""
        if self._deferred and not _in_meta_context():
            self._deferred = False
            training = self.training
            self._build_parts()
            self.train(training)
        return self

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .float(), ... on a never-loaded deferred model
        self.materialize()
        return super()._apply(fn, recurse)

    # -- forward -----------------------------------------------------------------------------------------------
    def pixel_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] (H, W multiples of 32) -> ``head1`` features [B, 512, H/2, W/2]."""
        feats, grid = self.encoder(images, self.config.hooks)
        levels = [r(f, grid) for r, f in zip(self.reassemble, feats)]  # 1/4, 1/8, 1/16, 1/32 of the image
        path = self.fusion[3](levels[3])
        for i in (2, 1, 0):
            path = self.fusion[i](path, levels[i])
        return self.head(path)

    def dense_logits(self, pixel_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """scale · cos(pixel, text) in fp32: [B, D, h, w] × [C, D] -> [B, C, h, w]."""
        pix = pixel_embeddings.float()
        text = text_embeddings.float()
        text = text / text.norm(dim=-1, keepdim=True)
        # (p/|p|)·t = (p·t)/|p|: dividing the C logits instead of the 512 channels saves a [B, 512, h, w] copy
        return torch.einsum("bdhw,cd->bchw", pix, text) / pix.norm(dim=1, keepdim=True) * self.logit_scale

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> dict:
        """Normalised images [B, 3, H, W] (H, W multiples of 32) and text embeddings [C, D] ->
        ``{"logits": [B, C, H, W]}`` (``output_conv``: ×2 bilinear with align_corners=True from H/2)."""
        self.materialize()
        logits = self.dense_logits(self.pixel_embeddings(images), text_embeddings)
        return {"logits": F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True)}

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """-> dense logits [B, C, H, W] on the padded input (the generic Predictor/ONNX path)."""
        return self.forward(pixels, text_embeddings)["logits"].float()

    # -- the official evaluation geometry -----------------------------------------------------------------------
    def normalize_rgb(self, rgb: np.ndarray) -> torch.Tensor:
        """H×W×3 uint8 -> [1, 3, H, W] float32 = (rgb/255 − 0.5)/0.5 (torchvision ToTensor + Normalize(0.5, 0.5))."""
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1)[None].float()
        return x.div(255).sub(0.5).div(0.5)

    def release_size(self, height: int, width: int) -> tuple[int, int]:
        """Short side -> ``short_side``, the other side rounded as the official evaluator rounds (int(x + 0.5))."""
        s = self.config.short_side
        if min(height, width) == s:
            return height, width
        if height <= width:
            return s, int(1.0 * width * s / height + 0.5)
        return int(1.0 * height * s / width + 0.5), s

    def _pad(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Pad bottom/right with ``pad_value`` up to (height, width) (pad_image of the official evaluator)."""
        ph, pw = max(0, height - x.shape[-2]), max(0, width - x.shape[-1])
        return F.pad(x, (0, pw, 0, ph), value=self.config.pad_value) if ph or pw else x

    def single_scale_logits(self, x: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Normalised image [1, 3, H, W] at its own size -> logits [C, h, w] on the image resized to ``release_size``
        (cropped out of the padded network output; :class:`AlignedScores` brings them to H × W)."""
        h, w = self.release_size(*x.shape[-2:])
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)
        d = self.config.size_divisibility
        x = self._pad(x, -(-h // d) * d, -(-w // d) * d)
        return self.forward(x, text_embeddings)["logits"][0, :, :h, :w]

    def _window(self, x: torch.Tensor, text_embeddings: torch.Tensor, flip: bool) -> torch.Tensor:
        """module_inference: the network's logits, plus those of the mirrored image mirrored back when ``flip``."""
        out = self.forward(x, text_embeddings)["logits"]
        if flip:
            out = out + self.forward(x.flip(-1), text_embeddings)["logits"].flip(-1)
        return out

    def multi_scale_logits(self, x: torch.Tensor, text_embeddings: torch.Tensor,
                           scales: Sequence[float] | None = None, flip: bool | None = None,
                           base_size: int | None = None, crop_size: int | None = None) -> torch.Tensor:
        """``LSeg_MultiEvalModule.forward``: normalised image [1, 3, H, W] -> summed scores [C, H, W].

        For each scale the image is resized (align_corners=True) so its long side is ⌈base_size·scale⌉; if that
        fits one ``crop_size`` window it is padded (``pad_value``) to crop × crop, else padded where shorter than
        a window and covered by crop × crop windows at stride ⌊crop·2/3⌋ (last windows clipped to the image and
        padded), overlapping scores averaged. Each window's logits (plus the flipped window's, flipped back) are
        cropped to the resized image, resized to H × W (align_corners=True) and summed over scales.
        """
        c = self.config
        scales = c.scales if scales is None else tuple(scales)
        flip = c.flip if flip is None else flip
        base = c.base_size if base_size is None else base_size
        crop = c.crop_size if crop_size is None else crop_size
        if crop % c.size_divisibility:
            raise ValueError(f"crop_size {crop} must be a multiple of {c.size_divisibility}")
        _, _, h, w = x.shape
        stride = int(crop * c.stride_rate)
        scores = x.new_zeros(1, text_embeddings.shape[0], h, w)
        for scale in scales:
            long_size = int(math.ceil(base * scale))
            if h > w:
                height, width = long_size, int(1.0 * w * long_size / h + 0.5)
                short_size = width
            else:
                height, width = int(1.0 * h * long_size / w + 0.5), long_size
                short_size = height
            cur = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)
            if long_size <= crop:
                out = self._window(self._pad(cur, crop, crop), text_embeddings, flip)[:, :, :height, :width]
            else:
                padded = self._pad(cur, crop, crop) if short_size < crop else cur
                ph, pw = padded.shape[-2:]
                rows = int(math.ceil(1.0 * (ph - crop) / stride)) + 1
                cols = int(math.ceil(1.0 * (pw - crop) / stride)) + 1
                acc = x.new_zeros(1, text_embeddings.shape[0], ph, pw)
                count = x.new_zeros(1, 1, ph, pw)
                for i in range(rows):
                    for j in range(cols):
                        h0, w0 = i * stride, j * stride
                        h1, w1 = min(h0 + crop, ph), min(w0 + crop, pw)
                        win = self._pad(padded[:, :, h0:h1, w0:w1], crop, crop)
                        acc[:, :, h0:h1, w0:w1] += self._window(win, text_embeddings, flip)[:, :, :h1 - h0, :w1 - w0]
                        count[:, :, h0:h1, w0:w1] += 1
                out = (acc / count)[:, :, :height, :width]
            scores += F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return scores[0]

    # -- prediction ----------------------------------------------------------------------------------------------
    def predict(self, image: Any, vocabulary: Sequence[str] | str, multi_scale: bool = False,
                scales: Sequence[float] | None = None, flip: bool | None = None, base_size: int | None = None,
                crop_size: int | None = None) -> "Segmentation":  # noqa: F821
        """Segment one image with any list of class names.

        Single scale by default (the release's forward on the image with its short side at 480); ``multi_scale``
        runs the official evaluator (``scales``, ``flip``, ``base_size``, ``crop_size`` default to the config's:
        0.5–1.75, flip, 520, 480), whose ``logits`` are scores summed over scales and flips.
        """
        from ..clip.vocabulary import parse_vocabulary
        from ..io import load_image

        self.materialize()
        names = parse_vocabulary(vocabulary)
        rgb = load_image(image)
        return self.predict_array(rgb, names, self.text_embeddings(names), multi_scale=multi_scale, scales=scales,
                                  flip=flip, base_size=base_size, crop_size=crop_size)

    @torch.inference_mode()
    def predict_array(self, rgb: np.ndarray, names: list[str], text_embeddings: torch.Tensor,
                      multi_scale: bool = False, **options: Any) -> "Segmentation":  # noqa: F821
        """Segment an H×W×3 uint8 array with precomputed text embeddings [C, D] in the config's geometry."""
        from ..postprocess import labels_and_confidence
        from ..predict import Segmentation

        scores = self.release_scores(rgb, text_embeddings, multi_scale=multi_scale, **options)
        if scores is None:  # the generic geometry: the Predictor's own path
            from ..predict import Predictor

            return Predictor(self).predict_array(rgb, names, text_embeddings)
        labels, conf = labels_and_confidence(scores)
        return Segmentation(rgb, names, labels, conf, scores)

    @torch.inference_mode()
    def release_scores(self, rgb: np.ndarray, text_embeddings: torch.Tensor, multi_scale: bool = False,
                       **options: Any) -> "AlignedScores | None":
        """Scores of an H×W×3 uint8 image in the official geometry (what ``Predictor`` uses for this model), or
        None under the generic geometry (``geometry="vocabseg"``), which the Predictor then runs itself."""
        if self.config.geometry != "release" and not multi_scale:
            return None
        self.eval().materialize()
        x = self.normalize_rgb(rgb)
        text = text_embeddings.to(self.device)
        if multi_scale:
            return AlignedScores(self.multi_scale_logits(x, text, **options), rgb.shape[:2])
        return AlignedScores(self.single_scale_logits(x, text), rgb.shape[:2])

    # -- checkpoints -------------------------------------------------------------------------------------------
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], allow_missing_clip: bool = False) -> None:
        """The release file's ``state_dict`` (``net.*``) or our own key layout, loaded by assignment (no copy of a
        memory-mapped file's tensors; fp16 tensors upcast to fp32), failing by name on any mismatch."""
        if any(k.startswith("net.") for k in state):
            state = release_to_vocabseg(state)
            pos, own = state["encoder.pos_embed"], self.encoder.pos_embed
            if pos.shape != own.shape or state["head.weight"].shape != self.head.weight.shape:
                raise CheckpointError(
                    f"an LSeg checkpoint of another variant (image ViT positional table {tuple(pos.shape)}, "
                    f"{state['head.weight'].shape[0]}-d pixel features), not the one {self.model_name or 'this model'} "
                    f"loads (table {tuple(own.shape)}, {self.head.weight.shape[0]}-d: the ViT-L/16 release "
                    f"demo_e200.ckpt / lseg_ade20k_l16.ckpt)")
        elif not any(k.startswith(("encoder.", "reassemble.", "fusion.")) for k in state):
            shown = ", ".join(list(state)[:3])
            raise CheckpointError(
                f"not an LSeg release (a lang-seg Lightning checkpoint whose state_dict holds net.pretrained.*, "
                f"net.scratch.* and net.clip_pretrained.*) nor a vocabseg {self.model_name or 'lseg_release'} state "
                f"dict; its tensors are named like {shown}")
        assign_strict(self, state, allow_missing_prefix="clip." if allow_missing_clip else None)
        self._deferred = False


@dataclass
class AlignedScores:
    """Dense logits [C, h, w] of the image resized to (h, w), reported at ``out`` = (H, W) with the release's
    bilinear align_corners=True resize, band by band (see ``postprocess.labels_and_confidence``)."""

    logits: torch.Tensor  # [C, h, w]
    out: tuple[int, int]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[0]

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Scores [C, r1 - r0, W] for output rows r0..r1."""
        (hc, wc), (ho, wo) = self.logits.shape[-2:], self.out
        m = self.logits
        if hc == ho:
            m = m[:, r0:r1]
        else:
            src = torch.arange(r0, r1, dtype=torch.float32) * ((hc - 1) / (ho - 1) if ho > 1 else 0.0)
            i0 = src.floor().long().clamp(max=hc - 1)
            i1 = (i0 + 1).clamp(max=hc - 1)
            t = (src - i0).to(m.device).view(1, -1, 1)
            m = m[:, i0.to(m.device)] * (1 - t) + m[:, i1.to(m.device)] * t
        if wc != wo:
            m = F.interpolate(m, size=wo, mode="linear", align_corners=True)
        return m


# ----------------------------------------------------------------------------------------------- release key map

# Release name (regex, after "net.") -> our name. Every tensor of the file is mapped or dropped by _DROPPED.
_KEY_MAP: list[tuple[str, Any]] = [
    (r"pretrained\.model\.patch_embed\.proj\.", "encoder.patch_embed."),
    (r"pretrained\.model\.(cls_token|pos_embed)$", r"encoder.\1"),
    (r"pretrained\.model\.blocks\.", "encoder.blocks."),
    (r"pretrained\.act_postprocess([1-4])\.0\.project\.0\.", lambda m: f"reassemble.{int(m[1]) - 1}.readout.project.0."),
    (r"pretrained\.act_postprocess([1-4])\.3\.", lambda m: f"reassemble.{int(m[1]) - 1}.proj."),
    (r"pretrained\.act_postprocess([1-4])\.4\.", lambda m: f"reassemble.{int(m[1]) - 1}.resample."),
    (r"scratch\.layer([1-4])_rn\.", lambda m: f"reassemble.{int(m[1]) - 1}.to_features."),
    (r"scratch\.refinenet([1-4])\.resConfUnit1\.", lambda m: f"fusion.{int(m[1]) - 1}.skip_unit."),
    (r"scratch\.refinenet([1-4])\.resConfUnit2\.", lambda m: f"fusion.{int(m[1]) - 1}.unit."),
    (r"scratch\.refinenet([1-4])\.out_conv\.", lambda m: f"fusion.{int(m[1]) - 1}.out_conv."),
    (r"scratch\.head1\.", "head."),
    (r"clip_pretrained\.(token_embedding\.|positional_embedding$|transformer\.|ln_final\.|text_projection$"
     r"|logit_scale$)", r"clip.\1"),
]
# Tensors of the release LSeg never uses: CLIP's image tower, timm's classifier and final norm.
_DROPPED = (r"clip_pretrained\.visual\.", r"pretrained\.model\.head\.", r"pretrained\.model\.norm\.")
_TELLTALES = ("net.pretrained.model.pos_embed", "net.scratch.head1.weight", "net.clip_pretrained.text_projection")


def release_to_vocabseg(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the release's ``net.*`` tensors to ours, dropping the unused ones; unknown keys fail by name."""
    missing = [k for k in _TELLTALES if k not in state]
    if missing:
        raise CheckpointError(f"not the LSeg ViT-L/16 release (a lang-seg checkpoint with net.pretrained.model.*, "
                              f"net.scratch.* and net.clip_pretrained.*): it has no {', '.join(missing)}")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        name = key[len("net."):] if key.startswith("net.") else key
        if any(re.match(p, name) for p in _DROPPED):
            continue
        ours = rename_key(name, _KEY_MAP)
        if ours is None:
            unknown.append(key)
        else:
            out[ours] = value
    if unknown:
        raise CheckpointError(f"{len(unknown)} unknown tensors in the LSeg release checkpoint, "
                              f"e.g. {', '.join(unknown[:3])}")
    return out


def vocabseg_to_release(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`release_to_vocabseg` for the tensors we keep (tests write release files with it)."""
    inverse: list[tuple[str, Any]] = [
        (r"encoder\.patch_embed\.", "pretrained.model.patch_embed.proj."),
        (r"encoder\.(cls_token|pos_embed)$", r"pretrained.model.\1"),
        (r"encoder\.blocks\.", "pretrained.model.blocks."),
        (r"reassemble\.(\d)\.readout\.project\.0\.", lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.0.project.0."),
        (r"reassemble\.(\d)\.proj\.", lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.3."),
        (r"reassemble\.(\d)\.resample\.", lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.4."),
        (r"reassemble\.(\d)\.to_features\.", lambda m: f"scratch.layer{int(m[1]) + 1}_rn."),
        (r"fusion\.(\d)\.skip_unit\.", lambda m: f"scratch.refinenet{int(m[1]) + 1}.resConfUnit1."),
        (r"fusion\.(\d)\.unit\.", lambda m: f"scratch.refinenet{int(m[1]) + 1}.resConfUnit2."),
        (r"fusion\.(\d)\.out_conv\.", lambda m: f"scratch.refinenet{int(m[1]) + 1}.out_conv."),
        (r"head\.", "scratch.head1."),
        (r"clip\.", "clip_pretrained."),
    ]
    out = {}
    for key, value in state.items():
        name = rename_key(key, inverse)
        if name is None:
            raise KeyError(f"no release name for {key}")
        out["net." + name] = value
    return out


# ----------------------------------------------------------------------------------------------- registered configs


def _lseg_release_l16() -> LSegReleaseConfig:
    return LSegReleaseConfig(deferred_init=True)


def _lseg_release_tiny() -> LSegReleaseConfig:
    """The release's layout at toy widths for tests: ViT width 64, 4 blocks (hooks 0-3), patch 16, 4×4 table;
    CLIP text width 32, 2 blocks. Generic geometry by default (see ``geometry``); tests switch to "release"."""
    encoder = PlainViTConfig(width=64, depth=4, heads=2, patch_size=16, pos_grid=4, final_norm=False)
    clip = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16,
                      context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2,
                      transformer_layers=2)
    return LSegReleaseConfig(encoder=encoder, clip=clip, hooks=(0, 1, 2, 3), reassemble_channels=(8, 16, 32, 32),
                             features=16, geometry="vocabseg", short_side=64, max_side=256, base_size=72,
                             crop_size=64)


@register_model("lseg_vit_large_16", "lseg", _lseg_release_l16(),
                "LSeg as released (ViT-L/16 + DPT, CLIP ViT-B/32 text): load demo_e200.ckpt / lseg_ade20k_l16.ckpt")
def lseg_vit_large_16(cfg: LSegReleaseConfig) -> LSegRelease:
    return LSegRelease(cfg)


@register_model("lseg_release_tiny_test", "lseg", _lseg_release_tiny(), "tiny random LSeg release layout for tests",
                test_only=True)
def lseg_release_tiny_test(cfg: LSegReleaseConfig) -> LSegRelease:
    return LSegRelease(cfg)
