"""SegViT as released (Zhang et al., NeurIPS 2022; zbwxp/SegVit): mmseg ViT-L/16 + closed-set ATM decoder.

The release is an mmsegmentation ``EncoderDecoder``, not our open-vocabulary SegViT (``segvit.py``, on a frozen
CLIP): a plain ImageNet ViT-L/16 and an Attention-to-Mask head whose queries *are* the dataset's classes (one
learnt 512-d query per class, a learnt classifier over those classes + "no object"). It cannot name new classes;
``predict(image, vocabulary)`` accepts any subset of its classes, in any order, and returns those rows of the
official ``seg_logit``.

What the official test path does (``EncoderDecoder.slide_inference`` + ``ATMHead.forward``), reproduced here:

1. resize keeping the ratio to fit ``image_scale`` (mmcv ``imrescale``: ``int(x * s + 0.5)``, OpenCV uint8
   bilinear; the COCO-Stuff and Context configs set ``min_size``, which makes the short side exactly that size);
2. normalise with mean = std = 127.5 (the JAX-trained ViT's convention, not ImageNet's);
3. slide ``crop``-px windows at ``stride`` (windows past the border are shifted back to full crops), sum the
   windows' scores and divide by how many windows cover each pixel;
4. per window: ViT (class token dropped after the positional table is added: mmseg ``with_cls_token=False``, no
   final norm), features of blocks ``out_indices``, deepest first, each through Linear → LayerNorm and 3
   post-norm decoder layers (self-attention of the class queries, then cross-attention to the features whose
   head-averaged, scaled, pre-softmax q·k is the class's mask logit); the class queries carry over from stage to
   stage; the masks of the stages' last layers are summed, resized to the crop; scores =
   Σ_q softmax(class logits)[q, c] · sigmoid(mask_q) with the no-object column dropped (q = c: one query per class);
5. bilinear (align_corners=False) to the original image size.

Shrunk releases (``configs/segvit/shrink``): block 8 down-samples by using every other token of every other row as
its queries (keys/values all tokens), a learnt (crop/16)^2 grid of queries decodes blocks 7 and 23 with torch
``TransformerDecoderLayer`` stages (``TPNATMHead``), and one ATM stage reads that grid (``ATMSingleHead``: no
projection, the mask is its last layer's).

Deviations, only where the official code cannot run: an image whose resized short side is below the crop
(aspect ratio above 3.2 for ADE) makes the official head reshape a non-square grid as a square and fail; here
such a window is zero-padded (in normalised space, as mmseg's training ``Pad``) to a full crop and cut back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, VocabularyError
from .registry import register_model
from .vit import PlainViT, PlainViTConfig
from .weights import assign_strict, rename_key

__all__ = ["SegViTReleaseConfig", "SegViTRelease", "segvit_from_release", "vocabseg_to_release",
           "release_resize_size", "class_names"]


# ----------------------------------------------------------------------------------------------- config


@dataclass
class SegViTReleaseConfig:
    """One released file's architecture and the inference settings of its official config."""

    vit: PlainViTConfig = field(default_factory=lambda: PlainViTConfig(
        width=1024, depth=24, heads=16, patch_size=16, pos_grid=40, norm_eps=1e-6, pos_interpolation="bicubic",
        final_norm=False))
    out_indices: tuple[int, ...] = (7, 15, 23)  # 0-based ViT blocks feeding the ATM stages (deepest is used first)
    embed_dims: int = 512  # ATM width (in_channels // 2)
    decoder_heads: int = 16
    decoder_layers: int = 3  # per stage
    num_classes: int = 150
    classes: str = "ade150"  # class-name list (vocabseg/data/classes), "+background" prepends "background"
    crop: int = 640  # test_cfg crop_size == the head's img_size
    stride: int = 608
    image_scale: tuple[int, int] = (2048, 640)  # mmseg Resize img_scale (long, short), keep_ratio=True
    min_size: int | None = None  # mmseg Resize min_size (COCO-Stuff 512, Context 480)
    mean: float = 127.5
    std: float = 127.5
    release: str = "ade_54.6.pth"  # the file this configuration loads (for messages)
    shrink_idx: int | None = None  # Shrunk: query-based down-sampling (stride-2 queries) at this block


# ----------------------------------------------------------------------------------------------- class names


def class_names(config: SegViTReleaseConfig) -> list[str]:
    """The release's classes in its output order (index = row of ``seg_logit``)."""
    from ..data.datasets import load_class_names

    key, _, extra = config.classes.partition("+")
    names = load_class_names(key)
    return (["background"] + names) if extra == "background" else names


# The names mmseg's datasets give the classes the releases were trained with (their files' meta CLASSES), where
# they differ from ours: accepted too, so a user of the original code can keep their names.
MMSEG_NAMES = {
    "ade150": {"bed ": 7, "windowpane": 8, "bathtub": 37, "railing": 38, "streetlight": 87,
               "television receiver": 89, "airplane": 90, "apparel": 92, "swimming pool": 109, "waterfall": 113,
               "ashcan": 138},
    "pascal_context59+background": {"table": 50},
}


# ----------------------------------------------------------------------------------------------- preprocessing


def release_resize_size(height: int, width: int, image_scale: tuple[int, int],
                        min_size: int | None = None) -> tuple[int, int]:
    """(h, w) the official test pipeline resizes an image to (mmseg ``Resize(keep_ratio=True)`` → mmcv
    ``imrescale``): scale = min(long / max(h, w), short / min(h, w)), sides ``int(x * scale + 0.5)``. With
    ``min_size`` mmseg first rewrites the target as (short side = max(min(image_scale), min_size), long side in
    proportion), i.e. the short side becomes exactly that size whatever the long side."""
    scale = (float(image_scale[0]), float(image_scale[1]))
    if min_size is not None:
        new_short = min_size if min(scale) < min_size else min(scale)
        scale = (new_short * height / width, new_short) if height > width else (new_short, new_short * width / height)
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start of each sliding window along one axis (mmseg: last window shifted back to end at the border)."""
    grids = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(grids)]


# ----------------------------------------------------------------------------------------------- ATM decoder


class CrossAttention(nn.Module):
    """Class queries attend to image tokens; also returns the head-averaged scaled q·k before the softmax (the
    ATM mask logits). Separate q/k/v projections with biases, as released."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, nq, d = queries.shape  # queries [B, Q, D], tokens [B, L, D]
        nk, h = tokens.shape[1], self.heads
        q = self.q(queries).reshape(b, nq, h, d // h).transpose(1, 2)
        k = self.k(tokens).reshape(b, nk, h, d // h).transpose(1, 2)
        v = self.v(tokens).reshape(b, nk, h, d // h).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # [B, heads, Q, L]
        masks = logits.mean(dim=1)  # [B, Q, L]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, nq, d)
        return self.proj(out), masks


class ATMDecoderLayer(nn.Module):
    """Post-norm transformer decoder layer (torch's ``TransformerDecoderLayer`` order, ReLU, LayerNorm eps 1e-5)
    whose cross-attention also yields the mask logits."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = CrossAttention(dim, heads)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.norm1(q + self.self_attn(q, q, q, need_weights=False)[0])
        attended, masks = self.cross_attn(q, tokens)
        q = self.norm2(q + attended)
        q = self.norm3(q + self.linear2(F.relu(self.linear1(q))))
        return q, masks


class ATMHead(nn.Module):
    """Stages of (Linear → LayerNorm → decoder layers) over ViT features; class queries carried across stages."""

    def __init__(self, config: SegViTReleaseConfig, stages: int | None = None, project: bool = True):
        super().__init__()
        c = config
        n = len(c.out_indices) if stages is None else stages
        # the Shrunk model's single ATM stage reads the TPN's 512-d queries as they are (use_proj=False)
        self.input_proj = nn.ModuleList((nn.Linear(c.vit.width, c.embed_dims) if project else nn.Identity())
                                        for _ in range(n))
        self.proj_norm = nn.ModuleList((nn.LayerNorm(c.embed_dims) if project else nn.Identity()) for _ in range(n))
        self.decoders = nn.ModuleList(
            nn.ModuleList(ATMDecoderLayer(c.embed_dims, c.decoder_heads) for _ in range(c.decoder_layers))
            for _ in range(n))
        self.queries = nn.Parameter(torch.randn(c.num_classes, c.embed_dims) * 0.02)  # one query per class
        self.class_embed = nn.Linear(c.embed_dims, c.num_classes + 1)  # + "no object", last

    def forward(self, features: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, L_i, width] in ``out_indices`` order -> (class logits [B, Q, C+1], mask logits
        [B, Q, h, w] at the grid of the shallowest stage, summed over stages)."""
        q = self.queries.unsqueeze(0).expand(features[0].shape[0], -1, -1)
        stages = list(zip(features, grids))[::-1]  # deepest first
        masks = None
        for i, (x, grid) in enumerate(stages):
            tokens = self.proj_norm[i](self.input_proj[i](x))
            for layer in self.decoders[i]:
                q, m = layer(q, tokens)
            m = m.reshape(m.shape[0], m.shape[1], *grid)  # the stage's last layer's masks
            size = stages[-1][1]
            if tuple(grid) != tuple(size):
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            masks = m if masks is None else masks + m
        return self.class_embed(q), masks


class TPNDecoderLayer(nn.Module):
    """torch's post-norm ``TransformerDecoderLayer`` (ReLU, FFN 4x), as the Shrunk model's up-sampling decoder."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.norm1(q + self.self_attn(q, q, q, need_weights=False)[0])
        q = self.norm2(q + self.cross_attn(q, tokens, tokens, need_weights=False)[0])
        return self.norm3(q + self.linear2(F.relu(self.linear1(q))))


class QueryUpsampler(nn.Module):
    """Shrunk's query-based up-sampling (the release's ``TPNATMHead`` before its ATM): a learnt grid of
    (crop/16)^2 queries decodes the shallow full-grid features, then the deep half-grid ones (in that order)."""

    def __init__(self, config: SegViTReleaseConfig):
        super().__init__()
        c = config
        n = len(c.out_indices)
        self.input_proj = nn.ModuleList(nn.Linear(c.vit.width, c.embed_dims) for _ in range(n))
        self.proj_norm = nn.ModuleList(nn.LayerNorm(c.embed_dims) for _ in range(n))
        self.decoders = nn.ModuleList(
            nn.ModuleList(TPNDecoderLayer(c.embed_dims, c.decoder_heads) for _ in range(c.decoder_layers))
            for _ in range(n))
        self.queries = nn.Parameter(torch.randn((c.crop // 16) ** 2, c.embed_dims) * 0.02)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(features[0].shape[0], -1, -1)
        for proj, norm, layers, x in zip(self.input_proj, self.proj_norm, self.decoders, features):
            tokens = norm(proj(x))
            for layer in layers:
                q = layer(q, tokens)
        return q  # [B, (crop/16)^2, dim]


def query_downsample(block: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Shrunk's query-based down-sampling: a ViT block whose queries are every other token of every other row
    (residual from them), keys and values all tokens; the grid halves. Uses the block's own weights."""
    b, n, d = tokens.shape
    down = tokens.reshape(b, grid[0], grid[1], d)[:, ::2, ::2]
    small = (down.shape[1], down.shape[2])
    down = down.reshape(b, -1, d)
    heads = block.attn.heads
    wq, wk, wv = block.attn.qkv.weight.chunk(3)
    bq, bk, bv = block.attn.qkv.bias.chunk(3)
    full = block.norm1(tokens)
    q = F.linear(block.norm1(down), wq, bq).reshape(b, -1, heads, d // heads).transpose(1, 2)
    k = F.linear(full, wk, bk).reshape(b, n, heads, d // heads).transpose(1, 2)
    v = F.linear(full, wv, bv).reshape(b, n, heads, d // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)
    x = down + block.attn.proj(out)
    return x + block.mlp(block.norm2(x)), small


# ----------------------------------------------------------------------------------------------- model


class SegViTRelease(nn.Module):
    """The released SegViT: ``predict(image, vocabulary)`` with names of its classes (closed set)."""

    model_name: str = ""

    def __init__(self, config: SegViTReleaseConfig):
        super().__init__()
        self.config = config
        self.backbone = PlainViT(config.vit)
        if config.shrink_idx is None:
            self.head = ATMHead(config)
        else:
            self.tpn = QueryUpsampler(config)
            self.head = ATMHead(config, stages=1, project=False)

    @property
    def device(self) -> torch.device:
        return self.head.queries.device

    @property
    def class_names(self) -> list[str]:
        return class_names(self.config)

    # -- networks ----------------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Normalised crops [B, 3, H, W] -> patch tokens after each of ``out_indices`` [B, L, width], and their
        grids (halved after the Shrunk model's down-sampling block)."""
        tokens, grid = self.backbone.embed(x)
        tokens = tokens[:, 1:]  # mmseg with_cls_token=False: the class token never enters the blocks
        wanted = set(self.config.out_indices)
        outs: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        for i, block in enumerate(self.backbone.blocks[: max(wanted) + 1]):
            if i == self.config.shrink_idx:
                tokens, grid = query_downsample(block, tokens, grid)
            else:
                tokens = block(tokens)
            if i in wanted:
                outs[i] = (tokens, grid)
        return [outs[i][0] for i in self.config.out_indices], [outs[i][1] for i in self.config.out_indices]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised crops -> (class logits [B, C, C+1], mask logits [B, C, h, w] at patch resolution)."""
        feats, grids = self.features(x)
        if self.config.shrink_idx is None:
            return self.head(feats, grids)
        side = self.config.crop // 16
        return self.head([self.tpn(feats)], [(side, side)])

    def crop_scores(self, crops: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Normalised ``crop``-sized windows [B, 3, crop, crop] -> scores [B, K, crop, crop] of ``classes``."""
        logits, masks = self(crops)
        probs = logits.float().softmax(-1)[..., :-1][..., classes]  # [B, Q, K], no-object column dropped
        size = (self.config.crop, self.config.crop)
        masks = F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False).sigmoid_()
        return torch.einsum("bqk,bqhw->bkhw", probs, masks)

    # -- inference (the Predictor calls text_embeddings, prepare, infer) ----------------------------------------
    def text_embeddings(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """A closed-set model's "embedding" of a name is its class index: [K] int64 (names checked here)."""
        names = self.class_names
        index = {n: i for i, n in enumerate(names)}
        synonyms: dict[str, set[int]] = {}
        for i, n in enumerate(names):  # "road, route" also answers to "road" and to "route"
            for part in n.split(","):
                synonyms.setdefault(part.strip(), set()).add(i)
        for n, i in MMSEG_NAMES.get(self.config.classes, {}).items():
            synonyms.setdefault(n.strip(), set()).add(i)
        rows = []
        for name in vocabulary:
            key = name.strip()
            if key in index:
                rows.append(index[key])
            elif len(synonyms.get(key, ())) == 1:
                rows.append(next(iter(synonyms[key])))
            else:
                raise VocabularyError(
                    f"{name!r} is not one of the {len(names)} classes that {self.model_name or 'this SegViT release'} "
                    f"was trained on (a closed-set model cannot name new classes); the valid names are the lines of "
                    f"vocabseg/data/classes/{self.config.classes.partition('+')[0]}.txt"
                    f"{' plus background' if self.config.classes.endswith('+background') else ''}"
                    f" (in Python: model.class_names).")
        return torch.tensor(rows, dtype=torch.long)

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """H×W×3 uint8 RGB -> the official resized, normalised image [1, 3, h, w] and (h, w)."""
        from ..data.transforms import cv2_resize_bilinear_uint8

        c = self.config
        h, w = release_resize_size(image.shape[0], image.shape[1], c.image_scale, c.min_size)
        resized = cv2_resize_bilinear_uint8(np.ascontiguousarray(image[..., :3]), (h, w))
        x = (resized.astype(np.float64) - c.mean) * (1.0 / c.std)  # mmcv imnormalize: (x - mean) * (1 / std)
        x = torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]
        return x.to(self.device), (h, w)

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Sliding-window scores [B, K, h, w] of ``classes`` over the resized image (mmseg ``slide_inference``)."""
        c = self.config
        classes = classes.to(self.device)
        b, _, h, w = pixels.shape
        total = pixels.new_zeros((b, len(classes), h, w), dtype=torch.float32)
        count = pixels.new_zeros((1, 1, h, w), dtype=torch.float32)
        for y in window_starts(h, c.crop, c.stride):
            for x in window_starts(w, c.crop, c.stride):
                y2, x2 = min(y + c.crop, h), min(x + c.crop, w)
                crop = pixels[:, :, y:y2, x:x2]
                pad = (0, c.crop - (x2 - x), 0, c.crop - (y2 - y))  # only for images below the crop size
                scores = self.crop_scores(F.pad(crop, pad) if any(pad) else crop, classes)
                total[:, :, y:y2, x:x2] += scores[:, :, : y2 - y, : x2 - x]
                count[:, :, y:y2, x:x2] += 1
        return total / count

    def predict(self, image: Any, vocabulary: Sequence[str] | str, **kwargs) -> "Segmentation":  # noqa: F821
        """Segment one image (path, PIL image or H×W×3 array) with names of the release's classes."""
        from ..predict import Predictor

        return Predictor(self).predict(image, vocabulary, **kwargs)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], allow_missing_clip: bool = False) -> None:
        """Load the official mmcv file's ``state_dict`` (or ours), assigning the tensors instead of copying them:
        a memory-mapped 1.4 GB release is then never held twice."""
        if any(k.startswith(("backbone.layers.", "decode_head.")) for k in state):
            state = segvit_from_release(state, self.config)
        assign_strict(self, state)


# ----------------------------------------------------------------------------------------------- release key map

# Official name (regex) -> our name; every tensor of the release is renamed or listed in _IGNORED.
_KEY_MAP: list[tuple[str, str]] = [
    (r"backbone\.patch_embed\.projection\.", "backbone.patch_embed."),
    (r"backbone\.(cls_token|pos_embed)$", r"backbone.\1"),
    (r"backbone\.layers\.(\d+)\.ln1\.", r"backbone.blocks.\1.norm1."),
    (r"backbone\.layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$", r"backbone.blocks.\1.attn.qkv.\2"),
    (r"backbone\.layers\.(\d+)\.attn\.attn\.out_proj\.", r"backbone.blocks.\1.attn.proj."),
    (r"backbone\.layers\.(\d+)\.ln2\.", r"backbone.blocks.\1.norm2."),
    (r"backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"backbone.blocks.\1.mlp.fc1."),
    (r"backbone\.layers\.(\d+)\.ffn\.layers\.1\.", r"backbone.blocks.\1.mlp.fc2."),
    (r"decode_head\.q\.weight$", "head.queries"),
    (r"decode_head\.class_embed\.", "head.class_embed."),
]
_STAGE = re.compile(r"decode_head\.(input_proj|proj_norm)_(\d+)\.(weight|bias)$")
_LAYER = re.compile(r"decode_head\.decoder_(\d+)\.layers\.(\d+)\.(self_attn|multihead_attn|linear1|linear2|norm1|"
                    r"norm2|norm3)\.(.+)$")
_IGNORED = (r"decode_head\.(atm\.)?loss_decode\.",)


def _describe(state: dict[str, torch.Tensor], config: SegViTReleaseConfig) -> str | None:
    """Why a SegViT-looking state dict is another release than ``config`` (None if it could be this one)."""
    shrunk = any(k.startswith("decode_head.atm.") for k in state)
    if shrunk != (config.shrink_idx is not None):
        return ("the Shrunk SegViT release (TPN + ATM head; load it with a *_shrunk model)" if shrunk
                else "the plain SegViT release (ATM head; load it with a model without _shrunk)")
    q = state.get("decode_head.atm.q.weight" if shrunk else "decode_head.q.weight")
    if q is not None and q.shape[0] != config.num_classes:
        known = {150: "ADE20K-150 (segvit_vit_large_16_ade)", 171: "COCO-Stuff-171 (segvit_vit_large_16_coco_stuff)",
                 60: "Pascal Context-59 + background (segvit_vit_large_16_pascal_context)"}
        return f"a SegViT release with {q.shape[0]} classes" + (f", {known[q.shape[0]]}" if q.shape[0] in known else "")
    pos = state.get("backbone.pos_embed")
    if pos is not None and pos.shape[-1] != config.vit.width:
        return f"a SegViT release on a ViT of width {pos.shape[-1]} (this model: {config.vit.width})"
    return None


def segvit_from_release(state: dict[str, torch.Tensor], config: SegViTReleaseConfig) -> dict[str, torch.Tensor]:
    """Rename the release's ``state_dict`` (mmseg ``backbone.*`` + ATM ``decode_head.*``) to our names.

    Tensors are passed through unchanged (no copy): mmseg's fused ``in_proj`` rows are q, k, v like our ``qkv``.
    A file of another variant, or another family, fails with a CheckpointError that says what it is.
    """
    if not any(k.startswith("backbone.layers.") for k in state) or not any(k.startswith("decode_head.") for k in
                                                                           state):
        raise CheckpointError(f"not a SegViT release (expected mmseg backbone.layers.* and decode_head.* tensors; "
                              f"found e.g. {', '.join(list(state)[:3])})")
    other = _describe(state, config)
    if other:
        raise CheckpointError(f"this is {other}, not {config.release} ({config.num_classes} classes)")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    shrunk = config.shrink_idx is not None
    for key, value in state.items():
        if any(re.match(p, key) for p in _IGNORED):
            continue
        target = "head"
        if shrunk:  # decode_head.atm.* is the ATM head, the rest of decode_head the query up-sampler
            if key.startswith("decode_head.atm."):
                key = "decode_head." + key[len("decode_head.atm."):]
            elif key.startswith("decode_head."):
                target = "tpn"
        m = _STAGE.match(key)
        if m:
            out[f"{target}.{m.group(1)}.{int(m.group(2)) - 1}.{m.group(3)}"] = value
            continue
        m = _LAYER.match(key)
        if m:
            part = "cross_attn" if m.group(3) == "multihead_attn" else m.group(3)
            out[f"{target}.decoders.{int(m.group(1)) - 1}.{m.group(2)}.{part}.{m.group(4)}"] = value
            continue
        name = rename_key(key, _KEY_MAP)
        if name is None:
            unknown.append(key)
        else:
            out[name.replace("head.", target + ".", 1) if key.startswith("decode_head.") else name] = value
    if unknown:
        raise CheckpointError(f"{len(unknown)} unknown tensors in the SegViT release, e.g. {', '.join(unknown[:3])}")
    return out


def vocabseg_to_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`segvit_from_release` (tests write release-layout files with it)."""
    inverse = [
        (r"backbone\.patch_embed\.", "backbone.patch_embed.projection."),
        (r"backbone\.(cls_token|pos_embed)$", r"backbone.\1"),
        (r"backbone\.blocks\.(\d+)\.norm1\.", r"backbone.layers.\1.ln1."),
        (r"backbone\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"backbone.layers.\1.attn.attn.in_proj_\2"),
        (r"backbone\.blocks\.(\d+)\.attn\.proj\.", r"backbone.layers.\1.attn.attn.out_proj."),
        (r"backbone\.blocks\.(\d+)\.norm2\.", r"backbone.layers.\1.ln2."),
        (r"backbone\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone.layers.\1.ffn.layers.0.0."),
        (r"backbone\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone.layers.\1.ffn.layers.1."),
    ]
    out: dict[str, torch.Tensor] = {}
    shrunk = any(k.startswith("tpn.") for k in state)
    for key, value in state.items():
        head = "decode_head.atm." if shrunk and key.startswith("head.") else "decode_head."
        if key.startswith("tpn."):
            key = "head." + key[len("tpn."):]
        m = re.match(r"head\.(input_proj|proj_norm)\.(\d+)\.(weight|bias)$", key)
        if m:
            out[f"{head}{m.group(1)}_{int(m.group(2)) + 1}.{m.group(3)}"] = value
            continue
        m = re.match(r"head\.decoders\.(\d+)\.(\d+)\.([a-z_0-9]+)\.(.+)$", key)
        if m:
            part = "multihead_attn" if m.group(3) == "cross_attn" else m.group(3)
            out[f"{head}decoder_{int(m.group(1)) + 1}.layers.{m.group(2)}.{part}.{m.group(4)}"] = value
            continue
        if key.startswith("head."):
            key = key.replace("head.", "decode_head.", 1)
            name = rename_key(key, ((r"decode_head\.queries$", "q.weight"),
                                    (r"decode_head\.class_embed\.", "class_embed.")))
            if name is None:
                raise KeyError(f"no official name for {key}")
            out[head + name] = value
            continue
        name = rename_key(key, inverse)
        if name is None:
            raise KeyError(f"no official name for {key}")
        out[name] = value
    return out


# ----------------------------------------------------------------------------------------------- registered configs


def _vit_large(pos_grid: int) -> PlainViTConfig:
    return PlainViTConfig(width=1024, depth=24, heads=16, patch_size=16, pos_grid=pos_grid, norm_eps=1e-6,
                          pos_interpolation="bicubic", final_norm=False)


def _ade() -> SegViTReleaseConfig:
    # configs/segvit/segvit_vit-l_jax_640x640_160k_ade20k.py: 640 crops, stride 608, Resize (2048, 640)
    return SegViTReleaseConfig()


def _coco_stuff() -> SegViTReleaseConfig:
    # configs/segvit/segvit_vit-l_jax_512x512_80k_cocostuff10k.py: COCO-Stuff-10k's 171 classes, 512 crops,
    # stride 341, Resize (2048, 512) with min_size 512 (the short side always becomes 512)
    return SegViTReleaseConfig(vit=_vit_large(32), num_classes=171, classes="coco_stuff171", crop=512, stride=341,
                               image_scale=(2048, 512), min_size=512, release="COCOstuff_49.9.pth")


def _pascal_context() -> SegViTReleaseConfig:
    # configs/segvit/segvit_vit-l_jax_480x480_80k_pc.py: 60 classes (background + Context-59), 480 crops, stride
    # 320, Resize (520, 520) with min_size 480 (short side 520)
    return SegViTReleaseConfig(vit=_vit_large(30), num_classes=60, classes="pascal_context59+background", crop=480,
                               stride=320, image_scale=(520, 520), min_size=480, release="PC59cls_64.1.pth")


def _tiny() -> SegViTReleaseConfig:
    """Release layout at test size: 4-block ViT of width 64, 2 ATM stages of 2 layers, 64 px crops."""
    vit = PlainViTConfig(width=64, depth=4, heads=4, patch_size=16, pos_grid=4, norm_eps=1e-6,
                         pos_interpolation="bicubic", final_norm=False)
    return SegViTReleaseConfig(vit=vit,
                               out_indices=(1, 3), embed_dims=32, decoder_heads=4, decoder_layers=2, num_classes=150,
                               crop=64, stride=48, image_scale=(160, 64), release="a tiny test release")


def _shrunk(config: SegViTReleaseConfig, release: str) -> SegViTReleaseConfig:
    # configs/segvit/shrink/*: backbone vit_shrink (shrink_idx 8), out_indices (7, 23), TPNATMHead (3 layers)
    return replace(config, out_indices=(7, 23), shrink_idx=8, release=release)


def _tiny_shrunk() -> SegViTReleaseConfig:
    return replace(_tiny(), vit=replace(_tiny().vit, pos_grid=4), shrink_idx=2, release="a tiny Shrunk test release")


@register_model("segvit_vit_large_16_ade", "segvit_release", _ade(),
                "SegViT ViT-L/16 + ATM as released, ADE20K-150 closed set (load ade_54.6.pth)",
                task="closed_set")
def segvit_vit_large_16_ade(cfg: SegViTReleaseConfig) -> SegViTRelease:
    return SegViTRelease(cfg)


@register_model("segvit_vit_large_16_coco_stuff", "segvit_release", _coco_stuff(),
                "SegViT ViT-L/16 + ATM as released, COCO-Stuff-171 closed set (load COCOstuff_49.9.pth)",
                task="closed_set")
def segvit_vit_large_16_coco_stuff(cfg: SegViTReleaseConfig) -> SegViTRelease:
    return SegViTRelease(cfg)


@register_model("segvit_vit_large_16_pascal_context", "segvit_release", _pascal_context(),
                "SegViT ViT-L/16 + ATM as released, Pascal Context-59 + background (load PC59cls_64.1.pth)",
                task="closed_set")
def segvit_vit_large_16_pascal_context(cfg: SegViTReleaseConfig) -> SegViTRelease:
    return SegViTRelease(cfg)


@register_model("segvit_release_tiny_test", "segvit_release", _tiny(), "tiny random SegViT release layout for tests",
                test_only=True, task="closed_set")
def segvit_release_tiny_test(cfg: SegViTReleaseConfig) -> SegViTRelease:
    return SegViTRelease(cfg)


@register_model("segvit_vit_large_16_ade_shrunk", "segvit_release", _shrunk(_ade(), "ade_shrunk_53.9.pth"),
                "SegViT-Shrunk ViT-L/16 as released, ADE20K-150 closed set (load ade_shrunk_53.9.pth)",
                task="closed_set")
def segvit_vit_large_16_ade_shrunk(cfg: SegViTReleaseConfig) -> SegViTRelease:
    return SegViTRelease(cfg)


@register_model("segvit_vit_large_16_coco_stuff_shrunk", "segvit_release",
                _shrunk(_coco_stuff(), "COCOstuff10k_shrunk_49.1.pth"),
                "SegViT-Shrunk ViT-L/16 as released, COCO-Stuff-171 (load COCOstuff10k_shrunk_49.1.pth)",
                task="closed_set")
def segvit_vit_large_16_coco_stuff_shrunk(cfg: SegViTReleaseConfig) -> SegViTRelease:
    return SegViTRelease(cfg)


@register_model("segvit_vit_large_16_pascal_context_shrunk", "segvit_release",
                _shrunk(_pascal_context(), "PC59cls_62.3.pth"),
                "SegViT-Shrunk ViT-L/16 as released, Pascal Context-59 + background (load PC59cls_62.3.pth)",
                task="closed_set")
def segvit_vit_large_16_pascal_context_shrunk(cfg: SegViTReleaseConfig) -> SegViTRelease:
    return SegViTRelease(cfg)


@register_model("segvit_release_shrunk_tiny_test", "segvit_release", _tiny_shrunk(),
                "tiny random SegViT-Shrunk release layout for tests", test_only=True, task="closed_set")
def segvit_release_shrunk_tiny_test(cfg: SegViTReleaseConfig) -> SegViTRelease:
    return SegViTRelease(cfg)
