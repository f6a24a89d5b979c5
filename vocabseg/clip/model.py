"""CLIP, written for dense prediction: ViT and ModifiedResNet image towers and a causal text tower.

Parameter names follow OpenAI's release (``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``,
...) so the official state dicts load without renaming. Beyond ``encode_image``/``encode_text`` the towers expose
what segmentation models need: the ViT's token features after any block, running blocks ``i..j`` on given tokens
with an additive attention mask (SAN's recognition path), positional embeddings resized to any grid, and the
ResNet's stage features.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    """Shape of a CLIP model. ``vision_layers`` is an int for a ViT, a 4-tuple of block counts for a ResNet."""

    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int | tuple[int, int, int, int] = 12
    vision_width: int = 768
    vision_patch_size: int | None = 16
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    activation: str = "quick_gelu"  # OpenAI weights use QuickGELU; LAION-trained open_clip ViTs use exact "gelu"
    vision_heads: int | None = None  # default: width // 64 (ViT), width * 32 // 64 (ResNet)
    # Base channels of a small convolutional branch whose output is added to the ViT's pooled embedding (0: none,
    # as in every released CLIP). The embedded default has one: its 6-layer ViT, trained on our compute, never
    # learned shapes, which a few 3x3 convolutions pick up quickly (docs/default_model.md).
    vision_conv_branch: int = 0

    @property
    def is_vit(self) -> bool:
        return isinstance(self.vision_layers, int)

    @property
    def resolved_vision_heads(self) -> int:
        if self.vision_heads is not None:
            return self.vision_heads
        return self.vision_width // 64 if self.is_vit else self.vision_width * 32 // 64

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.is_vit:
            d["vision_layers"] = list(self.vision_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        d = dict(d)
        if isinstance(d.get("vision_layers"), list):
            d["vision_layers"] = tuple(d["vision_layers"])
        return cls(**d)


# Named shapes of the OpenAI release (embed, resolution, layers, width, patch, text width, text heads).
_ARCHS: dict[str, tuple] = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 512, 8),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 512, 8),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 640, 10),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 768, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 1024, 16),
    "ViT-B/32": (512, 224, 12, 768, 32, 512, 8),
    "ViT-B/16": (512, 224, 12, 768, 16, 512, 8),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768, 12),
}


def list_architectures() -> list[str]:
    return list(_ARCHS)


def config_for(arch: str, **overrides) -> CLIPConfig:
    """The config of a named OpenAI architecture (``"ViT-B/16"``, ``"RN50"``, ...), optionally with overrides."""
    if arch not in _ARCHS:
        raise KeyError(f"unknown CLIP architecture {arch!r}; known: {', '.join(_ARCHS)}")
    embed, res, layers, width, patch, tw, th = _ARCHS[arch]
    text_layers = 12
    cfg = CLIPConfig(embed_dim=embed, image_resolution=res, vision_layers=layers, vision_width=width,
                     vision_patch_size=patch, transformer_width=tw, transformer_heads=th,
                     transformer_layers=text_layers)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------- building blocks


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (OpenAI's weights were trained with fp16 activations), also with bf16 weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r} (use 'quick_gelu' or 'gelu')")


class MultiheadSelfAttention(nn.Module):
    """Batch-first self-attention with ``nn.MultiheadAttention``'s parameter names (``in_proj_weight``, ...).

    Our own module (instead of ``nn.MultiheadAttention``) so that a per-head additive mask of shape
    [B, heads, L, L] can be passed directly to ``scaled_dot_product_attention``.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L, C] -> stacked queries, keys, values [3, B, heads, L, C/heads]."""
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head outputs [B, heads, L, d] -> projected tokens [B, L, C]."""
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        b, n, c = x.shape  # [B, L, C]
        q, k, v = self.qkv(x)  # 3 x [B, h, L, d]
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)  # additive mask; boolean masks (True = attend) pass unchanged
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, activation: str = "quick_gelu"):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", make_activation(activation)),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal)
        return x + self.mlp(self.ln_2(x))

    def forward_shared(self, x: torch.Tensor, prefix: torch.Tensor, group: torch.Tensor, mask: torch.Tensor,
                       last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal step of rows ``x`` [N, S, C] that continue the shared ``prefix`` [G, P, C] of their ``group`` [N]:
        each row attends to its group's prefix keys and its own earlier tokens (``mask`` [N, 1, S, P + S]).

        ``last`` [N] (the final block): only each row's token at that position is read afterwards, so only it is
        carried through the attention output and the MLP -> [N, 1, C]; the prefix is returned unchanged."""
        qp, kp, vp = self.attn.qkv(self.ln_1(prefix))
        q, k, v = self.attn.qkv(self.ln_1(x))
        keys, values = torch.cat([kp[group], k], dim=2), torch.cat([vp[group], v], dim=2)
        if last is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x = x[rows, last].unsqueeze(1)
            q, mask = q[rows, :, last].unsqueeze(2), mask[rows, :, last].unsqueeze(2)
            x = x + self.attn.merge(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
            return x + self.mlp(self.ln_2(x)), prefix
        prefix = prefix + self.attn.merge(F.scaled_dot_product_attention(qp, kp, vp, is_causal=True))
        x = x + self.attn.merge(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
        return x + self.mlp(self.ln_2(x)), prefix + self.mlp(self.ln_2(prefix))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, activation: str = "quick_gelu"):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, activation) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask, is_causal)
        return x


def resize_grid_embedding(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a square positional-embedding grid [S*S, C] to [h*w, C]."""
    s = int(round(math.sqrt(grid.shape[0])))
    if s * s != grid.shape[0]:
        raise ValueError(f"positional embedding of {grid.shape[0]} tokens is not a square grid")
    if (s, s) == tuple(size):
        return grid
    g = grid.reshape(1, s, s, -1).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=size, mode="bicubic", align_corners=False)
    return g.permute(0, 2, 3, 1).reshape(size[0] * size[1], -1).to(grid.dtype)


# ----------------------------------------------------------------------------------------------- image towers


class ConvBranch(nn.Module):
    """Six 3x3 convolutions with ReLU (three of stride 2), max- and mean-pooled, projected to the embedding.

    Added to a ViT's pooled embedding (``CLIPConfig.vision_conv_branch``), it carries local structure such as an
    outline's corners and curves; its projection starts at zero, so a fresh branch leaves the tower's output as it
    was. Only the pooled embedding (``encode_image``) sees it; the patch tokens that dense models read do not.
    """

    def __init__(self, channels: int, output_dim: int):
        super().__init__()
        c = channels
        plan = ((3, c, 2), (c, c, 1), (c, 2 * c, 2), (2 * c, 2 * c, 1), (2 * c, 4 * c, 2), (4 * c, 4 * c, 1))
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, s, 1) for i, o, s in plan)
        self.proj = nn.Linear(8 * c, output_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, 8 * channels] before the projection (what a training head can read)."""
        x = images.to(self.proj.weight.dtype)
        for conv in self.convs:
            x = F.relu(conv(x))
        return torch.cat([x.amax((2, 3)), x.mean((2, 3))], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(images))


class VisionTransformer(nn.Module):
    """CLIP's ViT. "Layer k" below means the tokens after k blocks (layer 0 = after ``ln_pre``)."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, activation: str = "quick_gelu", conv_branch: int = 0):
        super().__init__()
        self.input_resolution, self.patch_size, self.width, self.output_dim = input_resolution, patch_size, width, output_dim
        scale = width ** -0.5
        grid = input_resolution // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.conv_branch = ConvBranch(conv_branch, output_dim) if conv_branch else None

    @property
    def num_layers(self) -> int:
        return self.transformer.layers

    @property
    def heads(self) -> int:
        return self.transformer.resblocks[0].attn.heads

    def positional_embedding_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embedding [1 + h*w, C] for a patch grid of (h, w), resized bicubically from the trained grid."""
        pe = self.positional_embedding
        return torch.cat([pe[:1], resize_grid_embedding(pe[1:], grid)], dim=0)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images [B, 3, H, W] -> layer-0 tokens [B, 1 + h*w, C] ([CLS] first) and the patch grid (h, w)."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [B, C, h, w]
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding_for(grid).to(x.dtype)
        return self.ln_pre(x), grid

    def run_blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run blocks ``start .. end-1`` on tokens [B, L, C] with an optional additive mask ([L, L] or [B, heads, L, L])."""
        for block in self.transformer.resblocks[start:end]:
            x = block(x, attn_mask)
        return x

    def forward_features(self, images: torch.Tensor, layers: Sequence[int] = (), end: int | None = None
                         ) -> tuple[dict[int, torch.Tensor], tuple[int, int]]:
        """Tokens after each requested layer (0 = after ln_pre); stops after block ``end`` (default: the last requested)."""
        x, grid = self.embed(images)
        wanted = set(layers)
        stop = end if end is not None else max(wanted, default=self.num_layers)
        feats: dict[int, torch.Tensor] = {}
        if 0 in wanted:
            feats[0] = x
        for i, block in enumerate(self.transformer.resblocks[:stop], start=1):
            x = block(x)
            if i in wanted:
                feats[i] = x
        return feats, grid

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final tokens [..., C] -> embedding [..., D]: ``ln_post`` then ``proj`` (what CLIP does to [CLS])."""
        return self.ln_post(tokens) @ self.proj

    @staticmethod
    def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens [B, 1 + h*w, C] (with [CLS]) -> feature map [B, C, h, w]."""
        b, _, c = tokens.shape
        return tokens[:, 1:].transpose(1, 2).reshape(b, c, grid[0], grid[1])

    def vit_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The transformer's own pooled embedding [B, D] (without the conv branch)."""
        x, _ = self.embed(images)
        return self.head(self.run_blocks(x)[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vit_embedding(images)
        return out if self.conv_branch is None else out + self.conv_branch(images).to(out.dtype)


class Bottleneck(nn.Module):
    """ResNet bottleneck with anti-aliased strided convolution (avg-pool before the last conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean token (plus positional embeddings) queries the feature map."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1+HW, C]
        pe = self.positional_embedding
        pe = torch.cat([pe[:1], resize_grid_embedding(pe[1:], (h, w))], dim=0)
        x = x + pe.to(x.dtype)
        heads, d = self.num_heads, c // self.num_heads
        q = self.q_proj(x[:, :1]).view(b, 1, heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, -1, heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, -1, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, d]
        return self.c_proj(out.transpose(1, 2).reshape(b, c))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem with avg-pool, anti-aliased strided blocks, attention pooling."""

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, input_resolution: int = 224, width: int = 64):
        super().__init__()
        self.input_resolution, self.output_dim, self.width = input_resolution, output_dim, width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward_stages(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps of the stem and the four stages (strides 4, 4, 8, 16, 32)."""
        feats = {"stem": self.stem(images)}
        x = feats["stem"]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            feats[name] = x
        return feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.forward_stages(images)["layer4"])


# ----------------------------------------------------------------------------------------------- CLIP


class CLIP(nn.Module):
    """Image tower (``visual``) + causal text tower, with OpenAI's parameter names."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        c = config
        if c.is_vit:
            self.visual: VisionTransformer | ModifiedResNet = VisionTransformer(
                c.image_resolution, c.vision_patch_size, c.vision_width, c.vision_layers,
                c.resolved_vision_heads, c.embed_dim, c.activation, c.vision_conv_branch)
        else:
            self.visual = ModifiedResNet(c.vision_layers, c.embed_dim, c.resolved_vision_heads,
                                         c.image_resolution, c.vision_width)
        self.transformer = Transformer(c.transformer_width, c.transformer_layers, c.transformer_heads, c.activation)
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.transformer_width))
        self.ln_final = LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._init_text()

    def _init_text(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        w, layers = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = (w ** -0.5) * ((2 * layers) ** -0.5), w ** -0.5, (2 * w) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=w ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    @property
    def image_resolution(self) -> int:
        return self.config.image_resolution

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [N, 3, H, W] -> embeddings [N, D] (not L2-normalised)."""
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N, context] -> embeddings [N, D] (not L2-normalised), read at the EOT token.

        The tower is causal, so the EOT feature only depends on the ids up to EOT: the sequence is cut to the
        longest EOT position + 1, which gives identical embeddings at a fraction of the cost.
        """
        eot = tokens.argmax(dim=-1)  # EOT has the largest id
        length = int(eot.max().item()) + 1 if tokens.numel() else 1
        x = self.token_embedding(tokens[:, :length]).to(self.dtype) + self.positional_embedding[:length].to(self.dtype)
        x = self.transformer(x, is_causal=True)  # the fused causal kernel: no mask tensor to read
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def encode_text_grouped(self, tokens: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_text` of prompts where the rows of one ``group`` [N] share their first ids (one template
        filled with many names): each group's common prefix runs through the tower once and its keys/values serve
        all its rows. The tower is causal, so a prefix's states do not depend on what follows; the embeddings
        equal ``encode_text``'s up to float rounding, for about half the token work with the ViLD templates."""
        n, length = tokens.shape
        device = tokens.device
        eot = tokens.argmax(dim=-1)
        groups, row_group = torch.unique(group, return_inverse=True)
        shared = torch.empty(len(groups), dtype=torch.long)
        for g in range(len(groups)):  # longest common prefix of the group, stopping before its first EOT
            rows = tokens[row_group == g]
            same = (rows == rows[:1]).all(dim=0).long().cumprod(dim=0).sum()
            shared[g] = min(int(same), int(eot[row_group == g].min()))
        shared = shared.to(device)
        p = int(shared.max())
        first = torch.stack([tokens[row_group == g][0, :p] for g in range(len(groups))])  # [G, P]
        ar_p = torch.arange(p, device=device)
        first = first * (ar_p[None] < shared[:, None])
        start = shared[row_group]  # [N] where each row's own part begins
        rest_len = eot + 1 - start
        s = int(rest_len.max())
        ar_s = torch.arange(s, device=device)
        pos = (start[:, None] + ar_s[None]).clamp(max=length - 1)  # [N, S] positions in the prompt
        valid = ar_s[None] < rest_len[:, None]
        rest = tokens.gather(1, pos) * valid
        pe = self.positional_embedding.to(self.dtype)
        x = self.token_embedding(rest).to(self.dtype) + pe[pos]
        prefix = self.token_embedding(first).to(self.dtype) + pe[:p]
        see_prefix = (ar_p[None] < start[:, None])[:, None, :].expand(n, s, p)  # [N, S, P]
        causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()[None].expand(n, s, s)
        mask = torch.cat([see_prefix, causal], dim=2)[:, None]  # [N, 1, S, P + S], True = attend
        blocks = self.transformer.resblocks
        for i, block in enumerate(blocks):
            x, prefix = block.forward_shared(x, prefix, row_group, mask,
                                             last=rest_len - 1 if i == len(blocks) - 1 else None)
        return self.ln_final(x[:, 0]) @ self.text_projection

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_clip(config: CLIPConfig | str, **overrides) -> CLIP:
    """A randomly initialised CLIP of the given config or named architecture (``"ViT-B/16"``)."""
    cfg = config_for(config, **overrides) if isinstance(config, str) else copy.deepcopy(config)
    return CLIP(cfg)
