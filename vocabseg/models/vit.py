"""A plain pre-norm Vision Transformer (Dosovitskiy et al. 2021), the image encoder of the SegViT and LSeg releases.

Both releases run an ImageNet-21k ViT (timm's ``vit_large_patch16_384`` for LSeg, mmseg's ``VisionTransformer``
for SegViT) rather than a CLIP image tower. The two implementations compute the same thing — patch conv, class
token, learnt positional table resized to the input's grid, blocks of LayerNorm → fused-qkv attention → LayerNorm
→ GELU MLP — and differ only in tensor names and in how the positional table is resized, which is a config field
here. Each release's key map (beside its model) renames its file onto these names:

    patch_embed.weight/bias, cls_token [1,1,D], pos_embed [1,1+G*G,D],
    blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}, norm.{weight,bias}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PlainViTConfig:
    """Shape of a plain ViT. ``pos_grid`` is the side of the stored positional table (24 for 384 px / 16)."""

    width: int = 1024
    depth: int = 24
    heads: int = 16
    patch_size: int = 16
    pos_grid: int = 24
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    pos_interpolation: str = "bilinear"  # timm/LSeg resize the table bilinearly, mmseg bicubically
    final_norm: bool = True


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's layout; mmseg's in_proj is the same)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, L, D]
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, D/heads]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PlainViT(nn.Module):
    """Patch embedding + class token + positional table + blocks; returns the tokens after chosen blocks."""

    def __init__(self, config: PlainViTConfig):
        super().__init__()
        c = self.config = config
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + c.pos_grid ** 2, c.width) * 0.02)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio, c.norm_eps) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps) if c.final_norm else nn.Identity()

    def positional(self, grid: tuple[int, int]) -> torch.Tensor:
        """The positional table for a ``grid`` of patches: [1, 1 + gh*gw, D] (class position kept as is)."""
        table = self.pos_embed
        side = int(math.isqrt(table.shape[1] - 1))
        if (side, side) == tuple(grid):
            return table
        patches = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode=self.config.pos_interpolation, align_corners=False)
        return torch.cat([table[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image [B,3,H,W] → tokens [B, 1+gh*gw, D] with positions added, and the grid (the remainder of H, W
        that does not fill a patch is dropped by the strided conv, as in both releases)."""
        x = self.patch_embed(x)  # [B, D, gh, gw]
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.positional(grid), grid

    def forward(self, x: torch.Tensor, out_indices: Sequence[int]) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Tokens after each block in ``out_indices`` (0-based; the last block's output gets the final norm if
        ``-1`` is asked), and the patch grid."""
        tokens, grid = self.embed(x)
        wanted = set(out_indices)
        outs: dict[int, torch.Tensor] = {}
        last = max(i for i in wanted if i >= 0) if any(i >= 0 for i in wanted) else len(self.blocks) - 1
        for i, block in enumerate(self.blocks[: (len(self.blocks) if -1 in wanted else last + 1)]):
            tokens = block(tokens)
            if i in wanted:
                outs[i] = tokens
        if -1 in wanted:
            outs[-1] = self.norm(tokens)
        return [outs[i] for i in out_indices], grid
