"""ONNX export with the vocabulary as an input, and an onnxruntime segmenter that mirrors ``Predictor``.

Two files come out of an export:

* ``image.onnx``: ``pixels`` [1, 3, H, W] (normalised and zero-padded like ``model.prepare``) and ``text_embeddings``
  [C, D] (L2-normalised class embeddings) -> ``class_probs`` [1, Q, C] and ``mask_logits`` [1, Q, h, w], exactly what
  ``model.infer`` returns. H, W and C are dynamic: one file serves any vocabulary and any image size.
* ``text.onnx``: ``tokens`` [N, 77] int64 -> ``text_embeddings`` [N, D] (not normalised, like ``CLIP.encode_text``).

SAN's eager forward reads sizes into Python (positional-embedding resizing is skipped when the grid already matches,
fusion maps are resized only when the grids differ, the recognition biases are adaptively max-pooled to CLIP's grid,
the text tower cuts tokens at the longest EOT). A tracer would freeze every such decision at the example's sizes, so
export goes through :class:`SANImageExport`, a wrapper that runs the model's own modules and parameters in the same
order but with every size kept as a graph value and no branch on a size:

* positional tables are always resized (a bicubic resize to the same grid is the identity, bit for bit);
* fusion maps are always bilinearly resized to the side grid (same argument);
* adaptive max pooling becomes ``max_pool2d(k, k)`` when the side grid is exactly ``k`` times CLIP's grid for every
  input whose sides are multiples of the model's ``size_divisibility`` (SAN-B/16, the default model and the tiny test
  model: k = 2), else an exact gather-based adaptive max pool with dynamic bin edges;
* the recognition attention mask is assembled with concatenations instead of in-place slice writes.

The text wrapper runs all 77 positions (the tower is causal, so EOT's feature does not depend on the padding) and
gathers the feature at ``argmax(tokens)``.

The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is the default: it exports the tiny test
model in about half a second. ``exporter="dynamo"`` (torch.export) gives the same graph semantics and parity but takes
tens of seconds; it is there for when the deprecated TorchScript exporter goes away.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.san import object_probs, refine_proposals

__all__ = [
    "FORMAT_VERSION", "CONFIG_NAME", "IMAGE_FILE", "TEXT_FILE", "DEFAULT_OPSET", "DEFAULT_EXPORTER", "EXPORTERS",
    "SANImageExport", "GenericImageExport", "TextEncoderExport", "image_export_module", "input_multiple",
    "supports_text_export",
    "export_image_model", "export_text_encoder",
    "PreprocessConfig", "inference_size", "preprocess",
    "OnnxTextEncoder", "OnnxSegmenter", "export_command", "load_onnx_segmenter",
]

FORMAT_VERSION = 1
CONFIG_NAME = "vocabseg_onnx.json"
IMAGE_FILE = "image.onnx"
TEXT_FILE = "text.onnx"
DEFAULT_OPSET = 17
DEFAULT_EXPORTER = "torchscript"  # torch.onnx.export(..., dynamo=False); "dynamo" also works (slower to export)

IMAGE_INPUTS = ("pixels", "text_embeddings")
MASK_OUTPUTS = ("class_probs", "mask_logits")
DENSE_OUTPUTS = ("dense_logits",)


# ----------------------------------------------------------------------------------------------- trace-safe pieces


def _resize_table(table: torch.Tensor, side: int, size: Sequence[Any]) -> torch.Tensor:
    """Square positional table [side*side, C] -> [h*w, C], always bicubically resized (identity at the same size).

    ``size`` may hold traced sizes; ``side`` is a Python int taken from the parameter's shape at build time.
    """
    g = table.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(size[0], size[1]), mode="bicubic", align_corners=False)
    return g.permute(0, 2, 3, 1).flatten(1, 2)[0].to(table.dtype)


def _isqrt_exact(n: int, what: str) -> int:
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"{what} of {n} tokens is not a square grid")
    return s


def _bin_edges(n_in: Any, n_out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's adaptive-pooling bins: start = floor(i·in/out), end = ceil((i+1)·in/out), for i < out."""
    i = torch.arange(n_out)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode="floor")
    return start, end


def adaptive_max_pool_gather(x: torch.Tensor, size: Sequence[Any], max_bin: int) -> torch.Tensor:
    """``F.adaptive_max_pool2d(x, size)`` for [N, C, H, W] with sizes kept dynamic under tracing.

    Max pooling over rectangles is separable: rows first, then columns. Each output takes the max over ``max_bin``
    gathered positions, clamped to the end of its bin (repeats do not change a max); ``max_bin`` must bound the bin
    length, which is a static property of the model (see :func:`_pool_plan`).
    """
    for axis, n_out in ((2, size[0]), (3, size[1])):
        start, end = _bin_edges(x.shape[axis], n_out)
        out = None
        for k in range(max_bin):
            v = x.index_select(axis, torch.minimum(start + k, end - 1))
            out = v if out is None else torch.maximum(out, v)
        x = out
    return x


def _clip_small_size(n: int, clip_scale: float) -> int:
    return int(math.floor(float(n) * clip_scale))  # F.interpolate(scale_factor=...)'s output size


def _pool_plan(config: Any, max_side: int = 8192) -> tuple[int | None, int]:
    """(k, max_bin) for pooling side-grid biases to CLIP's grid over all sides that are multiples of
    ``size_divisibility`` up to ``max_side``: k when the side grid is always exactly k × CLIP's grid, else None
    with the longest adaptive bin seen (plus one for safety)."""
    d = int(config.size_divisibility)
    clip_patch = int(config.clip.vision_patch_size)
    ratios, longest = set(), 1
    for n in range(d, max_side + 1, d):
        n_in = n // int(config.side_patch)
        n_out = _clip_small_size(n, config.clip_scale) // clip_patch
        if n_in < 1 or n_out < 1:
            continue
        ratios.add(n_in / n_out if n_in % n_out else n_in // n_out)
        for i in range(n_out):
            longest = max(longest, -(-(i + 1) * n_in // n_out) - (i * n_in) // n_out)
    if len(ratios) == 1 and isinstance(next(iter(ratios)), int):
        return next(iter(ratios)), longest
    return None, longest + 1


class SANImageExport(nn.Module):
    """Trace-safe ``SAN.infer``: (pixels [B,3,H,W], text_embeddings [C,D]) -> (class_probs [B,Q,C], mask_logits).

    Holds the SAN itself (no copy of its weights) and replays its eval forward with the substitutions listed in the
    module docstring. Numerically it equals ``model.infer`` (checked by ``tests/test_export.py``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        vis = model.clip.visual
        self.num_queries = int(cfg.num_queries)
        self.heads = int(vis.heads)
        self.rec_start = int(cfg.rec_start)
        self.clip_width = int(vis.width)
        self.clip_scale = float(cfg.clip_scale)
        self.clip_side = _isqrt_exact(vis.positional_embedding.shape[0] - 1, "CLIP's positional embedding")
        self.side_side = _isqrt_exact(model.side.pos_embed.shape[1], "the side network's positional embedding")
        self.pool_kernel, self.max_bin = _pool_plan(cfg)
        q, blocked = self.num_queries, float(cfg.sos_mask_value)
        sos = torch.full((q, q), blocked)
        sos.fill_diagonal_(0.0)
        # [SOS] rows: themselves (diagonal only) and not [CLS]; other rows: no [SOS] column.
        self.register_buffer("sos_rows", torch.cat([sos, torch.full((q, 1), blocked)], dim=1), persistent=False)
        self.register_buffer("other_rows", torch.full((q,), blocked), persistent=False)

    # -- CLIP's feature part --------------------------------------------------------------------------------------
    def clip_tokens(self, small: torch.Tensor) -> tuple[torch.Tensor, tuple[Any, Any]]:
        vis = self.model.clip.visual
        x = vis.conv1(small.to(vis.conv1.weight.dtype))
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        cls = vis.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pe = vis.positional_embedding
        pos = torch.cat([pe[:1], _resize_table(pe[1:], self.clip_side, grid)], dim=0)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return vis.ln_pre(x), grid

    def clip_features(self, images: torch.Tensor):
        vis = self.model.clip.visual
        small = F.interpolate(images, scale_factor=self.clip_scale, mode="bilinear", align_corners=False)
        x, grid = self.clip_tokens(small)
        feats = {0: x}
        for i, block in enumerate(vis.transformer.resblocks[:self.rec_start], start=1):
            x = block(x)
            feats[i] = x
        maps = {layer: vis.tokens_to_map(feats[layer], grid) for layer, _ in self.model.config.fusion_map}
        return maps, feats[self.rec_start], grid

    # -- side network ----------------------------------------------------------------------------------------------
    def _fuse(self, position: int, x: torch.Tensor, clip_maps: dict, grid) -> torch.Tensor:
        side = self.model.side
        if position not in side.fusion_source:
            return x
        fusion = side.fusions[str(position)]
        nq = self.num_queries
        norm = fusion.norm  # LayerNorm2d, with the channel count static (it reads it from the input's shape)
        feat = clip_maps[side.fusion_source[position]].permute(0, 2, 3, 1)
        feat = F.layer_norm(feat, (self.clip_width,), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
        feat = fusion.proj(feat)
        feat = F.interpolate(feat, size=(grid[0], grid[1]), mode="bilinear", align_corners=False)
        return torch.cat([x[:, :nq], x[:, nq:] + feat.flatten(2).transpose(1, 2)], dim=1)

    def side_decode(self, images: torch.Tensor, clip_maps: dict) -> tuple[torch.Tensor, torch.Tensor]:
        side, nq = self.model.side, self.num_queries
        x, grid = side.patch_embed(images)
        b = x.shape[0]
        pos = torch.cat([side.query_pos_embed, _resize_table(side.pos_embed[0], self.side_side, grid)[None]], dim=1)
        x = torch.cat([side.query_embed.expand(b, -1, -1), x], dim=1) + pos
        x = self._fuse(0, x, clip_maps, grid)
        last = side.deep_supervision[-1]
        for i, block in enumerate(side.blocks, start=1):
            x = self._fuse(i, block(x), clip_maps, grid)
            if i == last:
                pixels = x[:, nq:].transpose(1, 2).reshape(b, -1, grid[0], grid[1])
                return side.decoder(x[:, :nq], pixels)
            x = x + pos
        raise ValueError(f"side network has no block {last} to decode")

    # -- recognition -----------------------------------------------------------------------------------------------
    def pool_bias(self, bias: torch.Tensor, grid) -> torch.Tensor:
        """[B, heads, Q, h, w] side-grid biases -> [B, heads, Q, hc*wc] on CLIP's grid (adaptive max pooling)."""
        x = bias.flatten(1, 2)
        if self.pool_kernel is not None:
            x = F.max_pool2d(x, self.pool_kernel, self.pool_kernel) if self.pool_kernel > 1 else x
        else:
            x = adaptive_max_pool_gather(x, grid, self.max_bin)
        return x.flatten(2).unflatten(1, (self.heads, self.num_queries))

    def recognition_mask(self, bias: torch.Tensor, grid, tokens: torch.Tensor) -> torch.Tensor:
        """Same additive mask as ``vocabseg.models.san.recognition_mask``, built from concatenations."""
        pooled = self.pool_bias(bias, grid)  # [B, heads, Q, hw]
        # Shapes come from broadcasting against zeros rather than from sizes read in Python, which the tracer may
        # freeze at the example's values.
        heads_zero = torch.zeros_like(pooled[:, :, :1, :1])  # [B, heads, 1, 1]
        top = torch.cat([self.sos_rows.to(pooled.dtype) + heads_zero, pooled], dim=-1)  # [B, heads, Q, n]
        rest = torch.zeros_like(tokens[:, None, :, :1]).to(pooled.dtype)  # [B, 1, 1 + hw, 1]
        row = torch.cat([self.other_rows.to(pooled.dtype), rest[0, 0, :, 0]])  # [n]
        bottom = row + rest + heads_zero  # [B, heads, 1 + hw, n]
        return torch.cat([top, bottom], dim=2)

    def forward(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model, q = self.model, self.num_queries
        vis = model.clip.visual
        clip_maps, tokens, clip_grid = self.clip_features(pixels)
        masks, bias = self.side_decode(pixels, clip_maps)
        x = torch.cat([tokens[:, :1].expand(-1, q, -1), tokens], dim=1)
        mask = self.recognition_mask(bias, clip_grid, tokens)
        x = vis.run_blocks(x, self.rec_start, None, attn_mask=mask)
        emb = F.normalize(vis.head(x[:, :q]), dim=-1)
        classes = model.classifier(text_embeddings)
        logits = model.clip.logit_scale.exp() * emb @ classes.t()
        return refine_proposals(model, pixels, object_probs(logits, model.config), masks.float(), text_embeddings)


class GenericImageExport(nn.Module):
    """For models other than SAN: their own ``infer`` (run outside inference mode), which must be trace-safe.

    ``infer`` returns (class_probs [1, Q, C], mask_logits [1, Q, h, w]) or dense logits [1, C, h, w]. Whether a
    model's eager code keeps sizes dynamic under tracing is up to the model: check parity on two image sizes.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, text_embeddings: torch.Tensor):
        infer = getattr(type(self.model), "infer", None)
        infer = getattr(infer, "__wrapped__", infer)  # without the @torch.inference_mode() decorator
        if infer is not None:
            out = infer(self.model, pixels, text_embeddings)
        else:
            out = self.model(pixels, text_embeddings)
            if isinstance(out, dict):
                out = (out["pred_logits"].float().softmax(-1)[..., :-1], out["pred_masks"].float())
        if isinstance(out, (tuple, list)):
            return tuple(t.float() for t in out)
        return out.float()


def image_export_module(model: nn.Module) -> nn.Module:
    """The trace-safe wrapper for ``model`` (SAN -> :class:`SANImageExport`; a model may also provide its own
    through an ``onnx_export_module()`` method)."""
    from ..models.san import SAN

    if hasattr(model, "onnx_export_module"):
        return model.onnx_export_module()
    if isinstance(model, SAN):
        return SANImageExport(model)
    return GenericImageExport(model)


def input_multiple(model: nn.Module) -> int:
    """Sides of ``pixels`` must be multiples of this (the model's ``size_divisibility``, which ``prepare`` pads to)."""
    return int(getattr(model.config, "size_divisibility", 32))


class TextEncoderExport(nn.Module):
    """``CLIP.encode_text`` without the data-dependent cut: all context positions, feature gathered at EOT."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        n = int(clip.positional_embedding.shape[0])
        self.register_buffer("causal", torch.full((n, n), float("-inf")).triu_(1), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        x = clip.token_embedding(tokens).to(clip.dtype) + clip.positional_embedding.to(clip.dtype)
        x = clip.ln_final(clip.transformer(x, self.causal.to(x.dtype)))
        eot = tokens.argmax(dim=-1)  # EOT has the largest id
        x = torch.gather(x, 1, eot[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]
        proj = clip.text_projection  # a matrix in CLIP, a module in GroupViT's text tower
        return proj(x) if isinstance(proj, nn.Module) else x @ proj


# ----------------------------------------------------------------------------------------------- export


EXPORTERS = ("torchscript", "dynamo")


def _onnx_export(module: nn.Module, args: tuple, path: Path, input_names, output_names, opset: int, exporter: str,
                 dynamic_axes: dict | None, dynamic_shapes: dict | None) -> None:
    """``torch.onnx.export`` with the TorchScript tracer (``dynamic_axes``) or torch.export (``dynamic_shapes``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter is deprecated
        warnings.filterwarnings("ignore", category=FutureWarning)
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        else:
            torch.onnx.export(module, args, str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_shapes=dynamic_shapes, opset_version=opset,
                              dynamo=True, external_data=False, verbose=False)


DYNAMO_MIN_OPSET = 18  # torch.export's ONNX translation starts at 18; converting down fails on these graphs


def _check_args(opset: int, exporter: str) -> int:
    """The opset actually used (the dynamo exporter raises anything lower to 18)."""
    from ..errors import ConfigError

    if not isinstance(opset, int) or not 14 <= opset <= 20:
        raise ConfigError(f"the ONNX opset must be an integer from 14 to 20 (17 and 18 are tested), got {opset!r}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"the ONNX exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    return max(opset, DYNAMO_MIN_OPSET) if exporter == "dynamo" else opset


def export_image_model(model: nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET, dynamic: bool = True,
                       sample_size: tuple[int, int] | None = None, sample_classes: int = 5,
                       exporter: str = DEFAULT_EXPORTER) -> Path:
    """Export the image part of ``model`` to ``path``: (pixels, text_embeddings) -> (class_probs, mask_logits).

    ``dynamic``: height, width and the number of classes are dynamic axes (else the sample's shapes are fixed); the
    batch is 1 (one image per run, as ``Predictor`` does). The sample traced is ``sample_size`` (default 3 × 5
    multiples of the model's ``size_divisibility``) with ``sample_classes`` random classes; inputs must be padded to
    multiples of :func:`input_multiple`. ``exporter``: "torchscript" (``dynamo=False``, default) or "dynamo" (opset
    18 at least).
    """
    opset = _check_args(opset, exporter)
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        wrapper = image_export_module(model).eval()
        m = input_multiple(model)
        unit = m * -(-16 // m)  # the smallest multiple of m of at least 16 px (release models without padding: m = 1)
        h, w = sample_size if sample_size is not None else (3 * unit, 5 * unit)
        if h % m or w % m:
            raise ValueError(f"sample_size {(h, w)} must be multiples of {m}")
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(1, 3, h, w, generator=gen).to(device)
        dim = int(model.clip.embed_dim)
        text = F.normalize(torch.randn(sample_classes, dim, generator=gen), dim=-1).to(device)
        with torch.no_grad():
            probe = wrapper(pixels, text)
        outputs = MASK_OUTPUTS if isinstance(probe, tuple) else DENSE_OUTPUTS
        axes = shapes = None
        if dynamic:
            axes = {"pixels": {2: "height", 3: "width"}, "text_embeddings": {0: "num_classes"}}
            if outputs == MASK_OUTPUTS:
                axes.update(class_probs={2: "num_classes"}, mask_logits={2: "mask_height", 3: "mask_width"})
                if not isinstance(wrapper, SANImageExport):  # other models may have one query per class (SegViT)
                    axes["class_probs"][1] = axes["mask_logits"][1] = "num_queries"
            else:
                axes.update(dense_logits={1: "num_classes", 2: "mask_height", 3: "mask_width"})
            if exporter == "dynamo":
                from torch.export import Dim

                rows, cols = Dim("rows", min=1, max=65536 // m), Dim("cols", min=1, max=65536 // m)
                shapes = {"pixels": {2: m * rows, 3: m * cols}, "text_embeddings": {0: Dim("num_classes", min=1)}}
        _onnx_export(wrapper, (pixels, text), path, IMAGE_INPUTS, outputs, opset, exporter, axes, shapes)
    finally:
        model.train(was_training)
    return path


def supports_text_export(clip: nn.Module) -> bool:
    """Whether ``clip``'s text tower is CLIP's own (BPE ids, causal transformer read at EOT)."""
    return not callable(getattr(clip, "tokenize", None)) and all(
        hasattr(clip, k) for k in ("token_embedding", "positional_embedding", "transformer", "ln_final",
                                   "text_projection"))


def export_text_encoder(clip: nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                        exporter: str = DEFAULT_EXPORTER) -> Path:
    """Export CLIP's text tower: tokens [N, 77] int64 -> text_embeddings [N, D] (not normalised), N dynamic."""
    from ..clip.tokenizer import tokenize

    opset = _check_args(opset, exporter)
    if not supports_text_export(clip):
        raise ValueError(f"{type(clip).__name__} has its own tokenizer or text tower; ONNX text export covers CLIP's "
                         f"BPE text tower only (pass text embeddings to the exported image model instead)")
    path = Path(path)
    was_training = clip.training
    clip.eval()
    try:
        device = next(clip.parameters()).device
        tokens = tokenize(["a photo of a cat.", "a diagram"]).to(device)
        axes = {"tokens": {0: "batch"}, "text_embeddings": {0: "batch"}}
        shapes = None
        if exporter == "dynamo":
            from torch.export import Dim

            shapes = {"tokens": {0: Dim("batch", min=1)}}
        _onnx_export(TextEncoderExport(clip).eval(), (tokens,), path, ("tokens",), ("text_embeddings",), opset,
                     exporter, axes, shapes)
    finally:
        clip.train(was_training)
    return path


# ----------------------------------------------------------------------------------------------- preprocessing


@dataclass
class PreprocessConfig:
    """What ``model.prepare`` does to an image: resize (short side, capped long side), normalise, pad."""

    short_side: int
    max_side: int
    size_divisibility: int
    mean: tuple[float, float, float]  # on the 0..255 scale, as the model subtracts it
    std: tuple[float, float, float]

    @classmethod
    def from_model(cls, model: nn.Module) -> "PreprocessConfig":
        cfg = model.config
        missing = [k for k in ("short_side", "max_side", "size_divisibility") if not hasattr(cfg, k)]
        if missing or not hasattr(model, "pixel_mean"):
            raise ValueError(f"{type(model).__name__} does not describe its preprocessing "
                             f"(needs config.short_side/max_side/size_divisibility and pixel_mean/pixel_std)")
        return cls(int(cfg.short_side), int(cfg.max_side), int(cfg.size_divisibility),
                   tuple(model.pixel_mean.flatten().tolist()), tuple(model.pixel_std.flatten().tolist()))

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(int(d["short_side"]), int(d["max_side"]), int(d["size_divisibility"]),
                   tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def inference_size(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """Short side -> ``short_side`` unless the long side would exceed ``max_side`` (``SAN.inference_size``'s rule)."""
    scale = cfg.short_side / min(height, width)
    if max(height, width) * scale > cfg.max_side:
        scale = cfg.max_side / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def preprocess(rgb: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """H×W×3 uint8 -> float32 [1, 3, Hp, Wp] (normalised, zero-padded) and the (h, w) of the image inside it.

    Bit-identical to ``model.prepare`` on CPU: the same PIL resize and the same float32 operations.
    """
    from ..predict import resize_image

    h, w = inference_size(*rgb.shape[:2], cfg)
    resized = resize_image(rgb, (h, w))
    x = np.ascontiguousarray(resized).transpose(2, 0, 1)[None].astype(np.float32)
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(1, 3, 1, 1)
    x = (x - mean) / std
    d = cfg.size_divisibility
    out = np.zeros((1, 3, h + (-h) % d, w + (-w) % d), dtype=np.float32)
    out[:, :, :h, :w] = x
    return out, (h, w)


# ----------------------------------------------------------------------------------------------- onnxruntime


def _session(path: str | os.PathLike, providers: Sequence[str] | None, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError:
        from ..errors import UserError

        raise UserError("the ONNX backend needs onnxruntime: pip install onnxruntime") from None
    path = Path(path)
    if not path.is_file():
        from ..errors import CheckpointError

        raise CheckpointError(f"ONNX file {path} does not exist")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class OnnxTextEncoder:
    """An exported text tower behind the ``encode_text`` interface, so ``encode_vocabulary`` (templates, averaging,
    cache) works on it unchanged. ``weights_id`` keys the embedding cache (default: a hash of the file)."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None,
                 weights_id: str | None = None):
        self.path = Path(path)
        self.session = _session(self.path, providers, threads)
        self.weights_id = weights_id or f"onnx-{_file_digest(self.path)}"

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.detach().cpu().numpy().astype(np.int64)
        (emb,) = self.session.run(None, {"tokens": ids})
        return torch.from_numpy(emb)


class OnnxSegmenter:
    """Segment images with an exported image model under onnxruntime, like ``Predictor`` does with PyTorch.

    ``config``: a :class:`PreprocessConfig` (or its dict); or pass ``model`` to take it (and the prompt templates)
    from a PyTorch model. ``text_onnx``: the exported text tower, used (with ``templates`` averaging and the usual
    embedding cache) when ``predict`` gets no ``text_embeddings``.
    """

    def __init__(self, image_onnx: str | os.PathLike, text_onnx: str | os.PathLike | None = None,
                 config: PreprocessConfig | dict | None = None, model: nn.Module | None = None,
                 templates: str | Sequence[str] | None = None, providers: Sequence[str] | None = None,
                 threads: int | None = None, cache: Any = True, text_weights_id: str | None = None,
                 model_name: str = ""):
        if config is None:
            if model is None:
                raise ValueError("OnnxSegmenter needs config=PreprocessConfig(...) or model=... for preprocessing")
            config = PreprocessConfig.from_model(model)
        elif isinstance(config, dict):
            config = PreprocessConfig.from_dict(config)
        if templates is None:
            templates = getattr(getattr(model, "config", None), "templates", "vild") if model is not None else "vild"
        self.config = config
        self.templates = templates if isinstance(templates, str) else tuple(templates)
        self.cache = cache
        self.model_name = model_name or getattr(model, "model_name", "")
        self.image_session = _session(image_onnx, providers, threads)
        self.input_names = [i.name for i in self.image_session.get_inputs()]
        self.output_names = [o.name for o in self.image_session.get_outputs()]
        self.text_encoder = (OnnxTextEncoder(text_onnx, providers, threads, text_weights_id)
                             if text_onnx is not None else None)

    def text_embeddings(self, vocabulary: Sequence[str] | str) -> torch.Tensor:
        """L2-normalised, template-averaged embeddings [C, D] from the ONNX text tower (cached like the model's)."""
        from ..clip.vocabulary import encode_vocabulary, parse_vocabulary

        if self.text_encoder is None:
            from ..errors import ConfigError

            raise ConfigError("this ONNX export has no text encoder (text.onnx); pass text embeddings computed with "
                              "the PyTorch model")
        return encode_vocabulary(self.text_encoder, parse_vocabulary(vocabulary), templates=self.templates,
                                 cache=self.cache, device="cpu")

    def run(self, pixels: np.ndarray, text_embeddings: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        """Raw outputs of the image model for prepared pixels [B, 3, Hp, Wp] and embeddings [C, D]."""
        if isinstance(text_embeddings, torch.Tensor):
            text_embeddings = text_embeddings.detach().cpu().numpy()
        feed = {"pixels": np.ascontiguousarray(pixels, dtype=np.float32),
                "text_embeddings": np.ascontiguousarray(text_embeddings, dtype=np.float32)}
        # A closed-set model ignores the text, and its graph has no text input.
        return self.image_session.run(None, {k: v for k, v in feed.items() if k in self.input_names})

    def predict(self, image: Any, vocabulary: Sequence[str] | str,
                text_embeddings: np.ndarray | torch.Tensor | None = None) -> "Segmentation":  # noqa: F821
        """Segment one image (path, PIL image or H×W×3 array) with any list of class names."""
        from ..clip.vocabulary import parse_vocabulary
        from ..io import load_image

        names = parse_vocabulary(vocabulary)
        rgb = load_image(image)
        if text_embeddings is None:
            text_embeddings = self.text_embeddings(names)
        elif len(text_embeddings) != len(names):
            raise ValueError(f"{len(names)} class names but {len(text_embeddings)} text embeddings")
        return self.predict_array(rgb, names, text_embeddings)

    def predict_array(self, rgb: np.ndarray, names: list[str],
                      text_embeddings: np.ndarray | torch.Tensor) -> "Segmentation":  # noqa: F821
        """Segment an H×W×3 uint8 array with precomputed text embeddings [C, D] (the Predictor's post-processing)."""
        from ..postprocess import DenseScores, MaskScores, labels_and_confidence
        from ..predict import Segmentation

        pixels, crop = preprocess(rgb, self.config)
        outs = self.run(pixels, text_embeddings)
        padded = tuple(pixels.shape[-2:])
        if "dense_logits" in self.output_names:
            scores: Any = DenseScores(torch.from_numpy(outs[0][0]), padded, crop, rgb.shape[:2])
        else:
            probs = outs[self.output_names.index("class_probs")][0]
            masks = outs[self.output_names.index("mask_logits")][0]
            scores = MaskScores(torch.from_numpy(probs), torch.from_numpy(masks), padded, crop, rgb.shape[:2])
        labels, conf = labels_and_confidence(scores)
        return Segmentation(rgb, names, labels, conf, scores)


# ----------------------------------------------------------------------------------------------- files + CLI helpers


def _templates_for_json(templates: Any) -> str | list[str]:
    return templates if isinstance(templates, str) else list(templates)


def export_command(model_name: str | None, checkpoint: str | os.PathLike | None, clip: str | os.PathLike | None,
                   out_dir: str | os.PathLike, opset: int = DEFAULT_OPSET, model: nn.Module | None = None,
                   exporter: str = DEFAULT_EXPORTER) -> Path:
    """Load a registered model (like ``vocabseg segment`` does) and write ``image.onnx``, ``text.onnx`` and
    ``vocabseg_onnx.json`` into ``out_dir``; returns the JSON's path. ``model`` skips loading (tests)."""
    from .. import __version__
    from ..clip.load import weights_id
    from ..models import load_model

    if model is None:
        for label, p in (("checkpoint", checkpoint), ("CLIP weights", clip)):
            if p is not None and not Path(p).exists():
                from ..errors import UserError

                raise UserError(f"{label} file {p} does not exist")
        model = load_model(model_name, checkpoint=checkpoint, clip=clip)
    model = model.eval()
    opset = _check_args(opset, exporter)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export_image_model(model, out / IMAGE_FILE, opset=opset, exporter=exporter)
    text_file = None
    if supports_text_export(model.clip):
        text_file = TEXT_FILE
        export_text_encoder(model.clip, out / text_file, opset=opset, exporter=exporter)
    else:
        warnings.warn(f"{type(model.clip).__name__}'s text tower is not exported (CLIP's BPE tower only): the ONNX "
                      f"segmenter needs text_embeddings=... from the PyTorch model", stacklevel=2)
        (out / TEXT_FILE).unlink(missing_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "vocabseg_version": __version__,
        "model": getattr(model, "model_name", "") or (model_name or ""),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "exporter": exporter,
        "opset": opset,
        "image": IMAGE_FILE,
        "text": text_file,
        "preprocess": PreprocessConfig.from_model(model).to_dict(),
        "templates": _templates_for_json(getattr(model.config, "templates", "vild")),
        "embed_dim": int(model.clip.embed_dim),
        "context_length": int(model.clip.positional_embedding.shape[0]) if text_file else None,
        "num_queries": int(getattr(model.config, "num_queries", 0)) or None,
        "input_multiple": input_multiple(model),
        "text_weights_id": f"{weights_id(model.clip)}+onnx" if text_file else None,
    }
    path = out / CONFIG_NAME
    path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


def load_onnx_segmenter(directory: str | os.PathLike, providers: Sequence[str] | None = None,
                        threads: int | None = None, cache: Any = True) -> OnnxSegmenter:
    """An :class:`OnnxSegmenter` from a folder written by :func:`export_command`."""
    from ..errors import CheckpointError

    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not an ONNX export folder (no {CONFIG_NAME}); run 'vocabseg export'")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        version = int(meta.get("format_version", 0))
        config = PreprocessConfig.from_dict(meta["preprocess"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} is unreadable ({e})") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path} has format version {version}; this vocabseg reads {FORMAT_VERSION}")
    text = directory / meta["text"] if meta.get("text") else None
    templates = meta.get("templates", "vild")
    return OnnxSegmenter(directory / meta.get("image", IMAGE_FILE), text, config=config,
                         templates=templates if isinstance(templates, str) else tuple(templates),
                         providers=providers, threads=threads, cache=cache,
                         text_weights_id=meta.get("text_weights_id"), model_name=meta.get("model", ""))
