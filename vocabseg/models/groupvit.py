"""GroupViT — semantic segmentation emerges from text supervision (Xu et al., CVPR 2022, arXiv 2202.11094; seed 001).

A ViT whose token sequence carries learnable *group tokens*. After each stage a grouping block assigns every input
token to one group (straight-through hard Gumbel-softmax over the groups: a one-hot assignment forward, the soft
assignment's gradients backward) and replaces the tokens by one "segment" token per group. ViT-S (width 384):
64 groups after 6 blocks, 8 groups after 3 more, then 3 blocks on the 8 segments; the image embedding is their mean.
Image and text towers are trained from scratch on image–caption pairs only (``vocabseg.engine.groupvit_train``).

Zero-shot segmentation (official ``GroupViTSegInference``): each pixel takes the group of its (soft, composed over
the two stages) assignment, each group's embedding is classified against the vocabulary's text embeddings, and a
pixel is background when its group's best class score is below a threshold (0.95 VOC/COCO, 0.35 Context).

Background in a vocabulary: names listed in ``config.background_names`` (default ``("background",)``) are not
encoded as text. :meth:`GroupViT.text_embeddings` gives them a row of zeros, and a zero row means "background by
threshold" everywhere in this file: its channel is 1 where the pixel's best foreground score is below the threshold
and 0 elsewhere. A vocabulary without such a name has no background: every pixel gets a class. Set
``background_names=()`` when "background" is a real visual class (the generated world's plain backdrop).

Parameter names inside the towers follow the official release (``img_encoder.layers.0.downsample.assign.q_proj``,
``text_encoder.transformer.resblocks.0.attn.in_proj_weight``, ...) so its checkpoint maps on by prefix
(:func:`official_to_vocabseg`). Reads top to bottom: assignment, blocks, grouping, image tower, text tower, model,
key map, registered configs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import Transformer, resize_grid_embedding
from ..errors import CheckpointError, ConfigError
from .base import OpenVocabModel
from .registry import register_model
from .weights import load_strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the official GroupViT normalises with timm's ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)

# ----------------------------------------------------------------------------------------------- config


@dataclass
class GroupViTTextConfig:
    """The text tower: a causal transformer (CLIP's) read at the EOT token, then a projection MLP."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 256
    layers: int = 12
    heads: int = 4  # official: width // 64
    activation: str = "quick_gelu"
    embed_dim: int = 256  # the shared image-text space (output of both projection MLPs)
    proj_layers: int = 2  # projection MLP: (Conv1d + BN + ReLU) x (proj_layers - 1), then Conv1d
    proj_hidden: int = 4096

    # names used by vocabseg.clip.load's weights id (it hashes ``config.transformer_*``)
    @property
    def transformer_heads(self) -> int:
        return self.heads

    @property
    def transformer_layers(self) -> int:
        return self.layers


@dataclass
class GroupViTConfig:
    image_size: int = 224  # the positional table's grid = image_size / patch_size (resized for other inputs)
    patch_size: int = 16
    width: int = 384  # all stages share it (the release's embed_factors = [1, 1, 1])
    depths: tuple[int, ...] = (6, 3, 3)
    heads: int = 6
    num_group_tokens: tuple[int, ...] = (64, 8, 0)  # learnable group tokens per stage (none in the last)
    num_output_groups: tuple[int, ...] = (64, 8)  # segments out of each grouping block
    mlp_ratio: float = 4.0
    drop_path: float = 0.1  # stochastic depth, linear over all blocks (training only)
    hard_assignment: bool = True  # straight-through hard assignment (False: soft attention)
    gumbel: bool = True  # Gumbel noise on the assignment logits while training
    gumbel_tau: float = 1.0
    assign_eps: float = 1.0  # a segment = sum of its tokens / (count + eps)
    text: GroupViTTextConfig = field(default_factory=GroupViTTextConfig)
    freeze_text: bool = True  # as a segmentation model the text tower is frozen; image-text training unfreezes it
    contrast_temperature: float = 0.07  # initial 1 / logit scale (both scales), clamped at 100 when used
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    # zero-shot segmentation
    templates: str | tuple[str, ...] = "simple"  # "a photo of a {}." (the release's segmentation template)
    background_names: tuple[str, ...] = ("background",)  # vocabulary names handled by the threshold
    background_threshold: float = 0.95  # 0.95 VOC / COCO, 0.35 Pascal Context
    topk_classes: int = 5  # group scores restricted to the image's top-k classes (release); 0: off
    mask_stride: int = 2  # dense output at 1/mask_stride of the (padded) input; the release uses 1
    short_side: int = 448  # inference resize (release: VOC/Context at short side 448, long side <= 2048)
    max_side: int = 2048
    size_divisibility: int = 16  # zero-pad the input to a multiple of this; 1: no padding (the release)
    # How the image is resized to ``inference_size``: "pil" (ours: sides rounded to nearest, PIL bilinear) or
    # "mmcv" (the release's mmcv ``imrescale``: sides int(x * scale + 0.5), OpenCV INTER_LINEAR on uint8).
    resize_backend: str = "pil"

    @property
    def clip(self) -> GroupViTTextConfig:
        """The text tower's config under the name the other families use (``config.clip.embed_dim``)."""
        return self.text


def _text_config(value) -> GroupViTTextConfig:
    """Accept a GroupViTTextConfig or a dict of its fields (YAML ``model_overrides: {text: {...}}``)."""
    if isinstance(value, GroupViTTextConfig):
        return value
    if isinstance(value, dict):
        try:
            return GroupViTTextConfig(**value)
        except TypeError as e:
            raise ConfigError(f"GroupViT text config: {e}") from None
    raise ConfigError(f"GroupViT text config must be a GroupViTTextConfig or a dict, got {type(value).__name__}")


def check_config(c: GroupViTConfig) -> None:
    n = len(c.depths)
    if len(c.num_group_tokens) != n or len(c.num_output_groups) != n - 1 or n < 2:
        raise ConfigError(f"GroupViT needs len(num_group_tokens) == len(depths) == len(num_output_groups) + 1 >= 2, "
                          f"got depths {c.depths}, group tokens {c.num_group_tokens}, outputs {c.num_output_groups}")
    if any(g < 1 for g in c.num_group_tokens[:-1]) or c.num_group_tokens[-1] != 0:
        raise ConfigError("every stage but the last needs group tokens, and the last stage none "
                          f"(got {c.num_group_tokens})")
    if c.width % c.heads:
        raise ConfigError(f"width {c.width} is not divisible by heads {c.heads}")
    if c.image_size % c.patch_size:
        raise ConfigError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
    if c.resize_backend not in ("pil", "mmcv"):
        raise ConfigError(f"GroupViT resize_backend must be 'pil' or 'mmcv', got {c.resize_backend!r}")
    if c.mask_stride < 1 or c.size_divisibility < 1:
        raise ConfigError(f"GroupViT mask_stride and size_divisibility must be >= 1, got {c.mask_stride}, "
                          f"{c.size_divisibility}")


# ----------------------------------------------------------------------------------------------- assignment


class _StraightThrough(torch.autograd.Function):
    """Returns ``hard`` in the forward pass and passes the gradient to ``soft`` unchanged in the backward pass.

    (``hard - soft.detach() + soft`` does the same but rounds: 1 - 0.3 + 0.3 need not be exactly 1.)
    """

    @staticmethod
    def forward(ctx, soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return hard

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


def straight_through_assign(logits: torch.Tensor, dim: int, hard: bool = True, gumbel: bool = False,
                            tau: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Assignment probabilities along ``dim``: softmax((logits + g) / tau), g ~ Gumbel(0, 1) when ``gumbel``.

    With ``hard`` the forward value is exactly the one-hot of the arg-max and the backward pass uses the soft
    probabilities' gradient (straight-through estimator, Jang et al. 2017), as GroupViT's grouping block does.
    """
    if gumbel:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        u = u.clamp(torch.finfo(logits.dtype).tiny, 1.0 - torch.finfo(logits.dtype).eps)
        logits = logits - torch.log(-torch.log(u))
    soft = (logits / tau).softmax(dim)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    if not (torch.is_grad_enabled() and soft.requires_grad):
        return one_hot  # nothing to differentiate (inference, ONNX export)
    return _StraightThrough.apply(soft, one_hot)


# ----------------------------------------------------------------------------------------------- blocks


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm names)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TokenMlp(Mlp):
    """An Mlp over the token axis: [B, N_in, C] -> [B, N_out, C] (maps a set of group tokens to another)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual branch with probability p (rescaling the kept ones)."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype) >= p
    return x * keep / (1.0 - p)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ / √d)·v over [B, heads, N, d], written out as the release computes it (not a fused kernel):
    the same float operations give the same soft assignments, and the group arg-max of a pixel where two groups
    tie to 1e-8 then falls the same way as the official code's."""
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Queries attend to a separate key/value set (separate q/k/v projections)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        b, n, c = query.shape
        s, h = key.shape[1], self.heads
        q = self.q_proj(query).view(b, n, h, c // h).transpose(1, 2)
        k = self.k_proj(key).view(b, s, h, c // h).transpose(1, 2)
        v = self.v_proj(key).view(b, s, h, c // h).transpose(1, 2)
        return self.proj(_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block over [image tokens, group tokens]."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class CrossBlock(nn.Module):
    """Group tokens gather image context before the assignment: attention, MLP, then a final LayerNorm."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = CrossAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.norm_post = nn.LayerNorm(width)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        x = query + self.attn(query, key)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


# ----------------------------------------------------------------------------------------------- grouping


class GroupAssign(nn.Module):
    """Assign every token to one group; a group's new feature is the mean of its tokens' values.

    Logits = q(groups) · k(tokens) / sqrt(C), normalised over the *groups* for each token. Returns the new
    group features [B, G, C], the assignment used [B, G, N] (one-hot while ``hard``) and the soft one.
    """

    def __init__(self, width: int, hard: bool, gumbel: bool, tau: float, eps: float):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.hard, self.gumbel, self.tau, self.eps = hard, gumbel, tau, eps
        self.scale = width ** -0.5

    def forward(self, groups: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.q_proj(groups) @ self.k_proj(tokens).transpose(1, 2) * self.scale  # [B, G, N]
        assign = straight_through_assign(logits, dim=1, hard=self.hard, gumbel=self.gumbel and self.training,
                                         tau=self.tau)
        soft = logits.softmax(dim=1)
        weights = assign / (assign.sum(dim=-1, keepdim=True) + self.eps)  # mean over each group's tokens
        return self.proj(weights @ self.v_proj(tokens)), assign, soft


class GroupingBlock(nn.Module):
    """Grouping block: G_in group tokens -> G_out projected tokens, which gather context and then take the tokens."""

    def __init__(self, width: int, heads: int, num_group_tokens: int, num_output_groups: int, cfg: GroupViTConfig):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(width)
        self.mlp_inter = Mlp(num_group_tokens, width // 2, num_output_groups)  # over the token axis
        self.norm_post_tokens = nn.LayerNorm(width)
        self.norm_x = nn.LayerNorm(width)
        self.pre_assign_attn = CrossBlock(width, heads)
        self.assign = GroupAssign(width, cfg.hard_assignment, cfg.gumbel, cfg.gumbel_tau, cfg.assign_eps)
        self.norm_new_x = nn.LayerNorm(width)
        self.mlp_channels = Mlp(width, int(width * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, C], group tokens [B, G_in, C] -> segments [B, G_out, C], assignment and soft one [B, G_out, N]."""
        x = self.norm_x(x)
        groups = self.mlp_inter(self.norm_tokens(group_tokens).transpose(1, 2)).transpose(1, 2)
        groups = self.pre_assign_attn(self.norm_post_tokens(groups), x)
        new, assign, soft = self.assign(groups, x)
        new = new + groups
        return new + self.mlp_channels(self.norm_new_x(new)), assign, soft


class GroupingStage(nn.Module):
    """Blocks over [tokens, group tokens], then (except in the last stage) a grouping block."""

    def __init__(self, cfg: GroupViTConfig, index: int, drop_paths: Sequence[float]):
        super().__init__()
        w, g = cfg.width, cfg.num_group_tokens[index]
        self.num_group_tokens = g
        self.group_token = nn.Parameter(torch.zeros(1, g, w)) if g else None
        if g and index == 0:
            nn.init.trunc_normal_(self.group_token, std=0.02)  # later stages start from projected tokens (zeros)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio, p) for p in drop_paths)
        self.downsample = (GroupingBlock(w, cfg.heads, g, cfg.num_output_groups[index], cfg)
                           if index < len(cfg.depths) - 1 else None)
        prev = cfg.num_group_tokens[index - 1] if index > 0 else 0
        # The previous stage's group tokens, mapped to this stage's count, are added to the learnt ones.
        self.group_projector = (nn.Sequential(nn.LayerNorm(w), TokenMlp(prev, w // 2, g)) if g and index > 0
                                else None)

    def forward(self, x: torch.Tensor, prev_groups: torch.Tensor | None):
        """-> (tokens out, this stage's group tokens after the blocks, assignment, soft assignment)."""
        b, n = x.shape[:2]
        groups = None
        if self.group_token is not None:
            groups = self.group_token.expand(b, -1, -1)
            if self.group_projector is not None:
                groups = groups + self.group_projector(prev_groups)
            x = torch.cat([x, groups], dim=1)
        for block in self.blocks:
            x = block(x)
        if groups is not None:
            x, groups = x[:, :n], x[:, n:]
        if self.downsample is None:
            return x, groups, None, None
        x, assign, soft = self.downsample(x, groups)
        return x, groups, assign, soft


# ----------------------------------------------------------------------------------------------- image tower


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


class GroupViTVisionTransformer(nn.Module):
    """Patch tokens through grouping stages; returns the final segment tokens (after ``norm``) and assignments."""

    def __init__(self, cfg: GroupViTConfig):
        super().__init__()
        check_config(cfg)
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        n = sum(cfg.depths)
        rates = [cfg.drop_path * i / max(1, n - 1) for i in range(n)]  # linear 0 .. drop_path (python: meta-safe)
        starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        self.layers = nn.ModuleList(GroupingStage(cfg, i, rates[s:s + d])
                                    for i, (s, d) in enumerate(zip(starts, cfg.depths)))
        self.norm = nn.LayerNorm(cfg.width)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]],
                                                     tuple[int, int]]:
        """Images [B, 3, H, W] -> segments [B, G_last, C], per grouping stage (assignment, soft) [B, G_i, N_i],
        and the patch grid (h, w)."""
        x, grid = self.patch_embed(images)
        x = x + resize_grid_embedding(self.pos_embed[0], grid)[None]
        groups, assignments = None, []
        for layer in self.layers:
            x, groups, assign, soft = layer(x, groups)
            if assign is not None:
                assignments.append((assign, soft))
        return self.norm(x), assignments, grid


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ProjectMLP(nn.Module):
    """Projection into the shared space: (1×1 Conv1d + BatchNorm1d + ReLU) × (layers - 1), then a 1×1 Conv1d.

    Applied to [B, C] or [B, L, C]. 1×1 Conv1d rather than Linear to keep the release's tensor shapes.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int):
        super().__init__()
        hidden_layers: list[nn.Module] = []
        for i in range(layers - 1):
            hidden_layers += [nn.Conv1d(in_dim if i == 0 else hidden, hidden, 1), nn.BatchNorm1d(hidden),
                              nn.ReLU(inplace=True)]
        self.linear_hidden = nn.Sequential(*hidden_layers)
        self.linear_out = nn.Conv1d(in_dim if layers == 1 else hidden, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 2
        if squeeze:
            x = x[:, None]
        x = self.linear_out(self.linear_hidden(x.transpose(1, 2))).transpose(1, 2)
        return x[:, 0] if squeeze else x


# ----------------------------------------------------------------------------------------------- text tower


class GroupViTTextTower(nn.Module):
    """Token ids -> embedding: token + positional embedding, causal transformer, LayerNorm, EOT feature, MLP.

    It is the object ``vocabseg.clip.vocabulary.encode_vocabulary`` encodes with (``encode_text``). The
    projection MLP is named ``text_projection`` so that the weights id used to key cached text embeddings
    (a hash of the ``token_embedding``/``transformer``/``ln_final``/``text_projection`` tensors) covers it.
    """

    def __init__(self, cfg: GroupViTTextConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.activation)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = ProjectMLP(cfg.width, cfg.proj_hidden, cfg.embed_dim, cfg.proj_layers)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        w, layers = cfg.width, max(1, cfg.layers)
        for block in self.transformer.resblocks:  # CLIP's text initialisation
            nn.init.normal_(block.attn.in_proj_weight, std=w ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=(w ** -0.5) * ((2 * layers) ** -0.5))
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=(w ** -0.5) * ((2 * layers) ** -0.5))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.positional_embedding.dtype

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] (CLIP BPE, EOT = largest id) -> embeddings [N, D], not L2-normalised.

        Causal, so the sequence is cut after the batch's last EOT (same result, less work).
        """
        eot = tokens.argmax(dim=-1)
        length = int(eot.max().item()) + 1 if tokens.numel() else 1
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = self.ln_final(self.transformer(x, mask))
        return self.text_projection(x[torch.arange(x.shape[0], device=x.device), eot])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text(tokens)


# ----------------------------------------------------------------------------------------------- model


class GroupViT(OpenVocabModel):
    """GroupViT image tower + image projection MLP; the text tower is ``self.clip`` (what the vocabulary cache
    encodes with). Trainable by default: the image side; :mod:`vocabseg.engine.groupvit_train` trains all."""

    def __init__(self, config: GroupViTConfig):
        super().__init__()
        config = dataclasses.replace(  # YAML overrides arrive as lists and dicts
            config, text=_text_config(config.text), depths=tuple(config.depths),
            num_group_tokens=tuple(config.num_group_tokens), num_output_groups=tuple(config.num_output_groups),
            background_names=tuple(config.background_names),
            templates=config.templates if isinstance(config.templates, str) else tuple(config.templates))
        check_config(config)
        self.config = config
        t = config.text
        self.visual = GroupViTVisionTransformer(config)
        self.img_projector = ProjectMLP(config.width, t.proj_hidden, t.embed_dim, t.proj_layers)
        self.clip = GroupViTTextTower(t)
        init = math.log(1.0 / config.contrast_temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init))
        self.multi_label_logit_scale = nn.Parameter(torch.tensor(init))
        if config.freeze_text:
            self.freeze_clip()
        self.register_pixel_statistics()
        self.train()  # a frozen text tower starts (and stays) in eval mode

    # -- housekeeping ------------------------------------------------------------------------------------------
    def register_pixel_statistics(self) -> None:
        """The model's own mean/std (× 255): ImageNet's for the release, CLIP's for models trained on the world.

        Scaled in float64, then rounded: 255 · 0.224 in float32 is one ulp off the release's 57.12, enough to move
        a pixel whose two best groups tie to 1e-8."""
        mean = torch.tensor(self.config.pixel_mean, dtype=torch.float64) * 255
        std = torch.tensor(self.config.pixel_std, dtype=torch.float64) * 255
        self.register_buffer("pixel_mean", mean.float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.float().view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "GroupViT":
        """The text tower (its projection has BatchNorm) follows ``mode`` only while it is trainable."""
        nn.Module.train(self, mode)
        if not any(p.requires_grad for p in self.clip.parameters()):
            self.clip.eval()
        return self

    def unfreeze_all(self) -> None:
        """Make every parameter trainable (image-text training)."""
        for p in self.parameters():
            p.requires_grad = True

    # -- pixels ------------------------------------------------------------------------------------------------
    def inference_size(self, height: int, width: int) -> tuple[int, int]:
        """Size fitting (short_side, max_side) with the aspect kept; "mmcv" rounds as mmcv's ``rescale_size``."""
        c = self.config
        if c.resize_backend == "mmcv":
            scale = min(c.max_side / max(height, width), c.short_side / min(height, width))
            return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
        return super().inference_size(height, width)

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """H×W×3 uint8 -> resized (``resize_backend``), normalised, zero-padded to ``size_divisibility`` [1, 3, Hp, Wp]
        and the (h, w) of the image inside it. The release pads nothing: its stride-16 patch convolution drops
        the last h % 16 rows and w % 16 columns, and its group masks still cover the whole input."""
        from ..data.transforms import cv2_resize_bilinear_uint8
        from ..predict import resize_image

        resizers = {"pil": resize_image, "mmcv": cv2_resize_bilinear_uint8}
        h, w = self.inference_size(*image.shape[:2])
        resized = resizers[self.config.resize_backend](image, (h, w))
        x = torch.from_numpy(np.ascontiguousarray(resized)).to(self.device).permute(2, 0, 1)[None].float()
        x = self.normalize_pixels(x)
        d = self.config.size_divisibility
        return F.pad(x, (0, (-w) % d, 0, (-h) % d)), (h, w)

    # -- text --------------------------------------------------------------------------------------------------
    def is_background(self, name: str) -> bool:
        return name.strip().lower() in {n.strip().lower() for n in self.config.background_names}

    def text_embeddings(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """[C, D] L2-normalised template-averaged embeddings from GroupViT's own text tower (cached like CLIP's);
        background names (``config.background_names``) get a row of zeros = "background by threshold"."""
        from ..clip.vocabulary import encode_vocabulary

        names = list(vocabulary)
        out = torch.zeros(len(names), self.config.text.embed_dim, device=self.device)
        real = [i for i, n in enumerate(names) if not self.is_background(n)]
        if real:
            was_training = self.clip.training
            self.clip.eval()  # encoding a vocabulary is inference: BatchNorm uses its running statistics
            try:
                emb = encode_vocabulary(self.clip, [names[i] for i in real], templates=self.config.templates)
            finally:
                self.clip.train(was_training)
            out[real] = emb.to(out.device)
        return out

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)

    # -- image -------------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, with_groups: bool = False):
        """Normalised images -> image embedding [B, D] (projected mean of the final segments), and with
        ``with_groups`` also the segments' embeddings [B, G, D] and the per-stage assignments."""
        tokens, assignments, grid = self.visual(images)
        if not with_groups:
            return self.img_projector(tokens.mean(dim=1))
        # One projector call over [segments, mean]: the same values as two calls in eval mode, and BatchNorm
        # sees B * (G + 1) samples in training mode, so a batch of one image works too.
        both = self.img_projector(torch.cat([tokens, tokens.mean(dim=1, keepdim=True)], dim=1))
        return both[:, -1], both[:, :-1], assignments, grid

    @staticmethod
    def pixel_groups(assignments: list[tuple[torch.Tensor, torch.Tensor]], grid: tuple[int, int],
                     size: tuple[int, int]) -> torch.Tensor:
        """Final-group index of every pixel [B, H, W] at ``size``: the soft assignments of all stages composed
        (token -> group 1 -> ... -> last group), resized bilinearly, arg-max (official inference)."""
        composed = None
        for _, soft in assignments:  # soft [B, G_i, N_i], normalised over G_i
            t = soft.transpose(1, 2)  # [B, N_i, G_i]: token-major, the release's order of the same products
            composed = t if composed is None else composed @ t  # [B, N_0, G_i] (bit-identical to the release's)
        b, g = composed.shape[0], composed.shape[2]
        maps = composed.transpose(1, 2).reshape(b, g, grid[0], grid[1])
        if tuple(size) != tuple(grid):
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return maps.argmax(dim=1)

    def group_class_scores(self, group_emb: torch.Tensor, image_emb: torch.Tensor, text: torch.Tensor
                           ) -> torch.Tensor:
        """Scores [B, G, C] in [0, 1] of each segment for each foreground class (official affinity):
        softmax over classes of scaled cosine similarities, times the same softmax restricted to the image's
        ``topk_classes`` best classes. Zero rows of ``text`` (background) score 0."""
        # No data-dependent Python branches below, so the ONNX trace serves any vocabulary.
        text = text.to(group_emb.dtype)
        fg = text.abs().sum(dim=-1) > 0  # [C]
        scale = self.logit_scale.exp().clamp(max=100)
        blocked = torch.finfo(group_emb.dtype).min
        logits = scale * F.normalize(group_emb, dim=-1) @ text.t()  # [B, G, C]
        logits = logits.masked_fill(~fg, blocked)
        pre = logits.softmax(dim=-1)
        k = self.config.topk_classes
        if k:
            whole = (scale * F.normalize(image_emb, dim=-1) @ text.t()).masked_fill(~fg, blocked)  # [B, C]
            # rank = number of classes scoring higher: the top k (all classes when there are fewer) are kept
            rank = (whole[:, None, :] > whole[:, :, None]).sum(dim=-1)  # [B, C]
            logits = logits.masked_fill(~(rank < k)[:, None], blocked)
        return (logits.softmax(dim=-1) * pre).masked_fill(~fg, 0.0)

    def segment(self, images: torch.Tensor, text_embeddings: torch.Tensor,
                background_threshold: float | None = None) -> torch.Tensor:
        """Dense scores [B, C, H/s, W/s] (s = ``mask_stride``): channel c of a pixel is its group's score for
        class c. Zero rows of ``text_embeddings`` are background channels: 1 where the pixel's best foreground
        score is below min(threshold, the image's best group score), else 0."""
        s = self.config.mask_stride
        size = (images.shape[-2] // s, images.shape[-1] // s)
        image_emb, group_emb, assignments, grid = self.encode_image(images, with_groups=True)
        scores = self.group_class_scores(group_emb, image_emb, text_embeddings)  # [B, G, C]
        groups = self.pixel_groups(assignments, grid, size)  # [B, h, w]
        out = torch.gather(scores, 1, groups.flatten(1)[..., None].expand(-1, -1, scores.shape[-1]))
        out = out.transpose(1, 2).reshape(images.shape[0], -1, *size)  # [B, C, h, w]
        bg = text_embeddings.abs().sum(dim=-1) == 0  # [C]
        thr = self.config.background_threshold if background_threshold is None else background_threshold
        limit = torch.clamp(scores.flatten(1).max(dim=1).values, max=thr)  # [B]: the best group stays foreground
        is_bg = (out.max(dim=1, keepdim=True).values < limit[:, None, None, None]).to(out.dtype)  # [B, 1, h, w]
        return torch.where(bg[None, :, None, None], is_bg, out)

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> dict:
        """Normalised images [B, 3, H, W] and text embeddings [C, D] -> ``{"logits": [B, C, H/s, W/s]}`` (scores
        in [0, 1], see :meth:`segment`). Image-text training uses :meth:`contrastive_outputs` instead."""
        return {"logits": self.segment(images, text_embeddings)}

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """-> dense scores [B, C, h, w] on the padded input (the Predictor resizes and crops them)."""
        return self.segment(pixels, text_embeddings).float()

    def contrastive_outputs(self, images: torch.Tensor, captions: torch.Tensor, nouns: torch.Tensor | None = None
                            ) -> dict[str, torch.Tensor]:
        """Image-text training: images [B, 3, H, W], caption ids [B, L], prompted-noun ids [B, K, L] ->
        ``image`` [B, D], ``text`` [B, D], ``nouns`` [B, K, D] (not normalised) and both logit scales."""
        out = {"image": self.encode_image(images), "logit_scale": self.logit_scale,
               "multi_label_logit_scale": self.multi_label_logit_scale}
        b = captions.shape[0]
        ids = captions if nouns is None else torch.cat([captions, nouns.flatten(0, 1)], dim=0)
        text = self.clip.encode_text(ids)  # one pass: the projection's BatchNorm sees captions and nouns together
        out["text"] = text[:b]
        if nouns is not None:
            out["nouns"] = text[b:].view(b, nouns.shape[1], -1)
        return out

    # -- training hooks ----------------------------------------------------------------------------------------
    def build_criterion(self, num_classes: int):
        raise ConfigError("GroupViT learns from image-caption pairs, not label maps: train it with "
                          "vocabseg.engine.groupvit_train (configs/groupvit_tiny_world.yaml)")

    # -- checkpoints -------------------------------------------------------------------------------------------
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], allow_missing_clip: bool = False) -> None:
        """Our own key layout or the release's (``img_encoder.*``, ``text_encoder.*``, ...), strictly."""
        load_strict(self, checkpoint_filter(state, self), allow_missing_prefix="clip." if allow_missing_clip else None)


# ----------------------------------------------------------------------------------------------- official key map

# Release (NVlabs/GroupViT, MultiLabelContrastive) prefix -> ours. Names below the prefixes are identical; the
# release's Identity modules (``img_encoder.head``, ``downsample.reduction`` with equal widths) hold no tensors.
_PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("img_encoder.", "visual."),
    ("img_projector.", "img_projector."),
    ("text_encoder.", "clip."),
    ("text_projector.", "clip.text_projection."),
    ("logit_scale", "logit_scale"),
    ("multi_label_logit_scale", "multi_label_logit_scale"),
)
_OFFICIAL_PREFIXES = ("img_encoder.", "text_encoder.", "text_projector.")
_OWN_PREFIXES = ("visual.", "clip.")
_RELEASE = "a GroupViT checkpoint (NVlabs/GroupViT group_vit_gcc_*.pth: img_encoder.*, text_encoder.* tensors)"


def checkpoint_filter(state: dict[str, torch.Tensor], model: "GroupViT") -> dict[str, torch.Tensor]:
    """Any GroupViT checkpoint -> our names (timm's ``checkpoint_filter_fn``): our own layout passes unchanged,
    the release's is renamed by :func:`official_to_vocabseg`; anything else is refused by name.

    The RedCaps release (trained with ``multi_label=0``) has no ``multi_label_logit_scale``: that scale only
    weighs the multi-label training loss, so the model keeps its initial value (log(1 / 0.07)).
    """
    if any(k.startswith(_OFFICIAL_PREFIXES) for k in state):
        out = official_to_vocabseg(state)
        out.setdefault("multi_label_logit_scale", model.multi_label_logit_scale.detach().clone())
        own = model.state_dict()
        unexpected = [k for k in state if _renamed(k) not in own]
        missing = [_official_name(k) for k in own if k not in out]
        if unexpected or missing:  # named as the release names them (load_strict would use our names)
            parts = ([f"{len(unexpected)} tensors this GroupViT does not have (e.g. {', '.join(unexpected[:3])})"]
                     if unexpected else []) + ([f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"]
                                               if missing else [])
            raise CheckpointError(f"not the GroupViT release layout this model expects: {'; '.join(parts)}")
        return out
    if any(k.startswith(_OWN_PREFIXES) for k in state):
        return state
    shown = ", ".join(list(state)[:3])
    raise CheckpointError(f"not {_RELEASE} nor a vocabseg GroupViT (visual.*, clip.*); its tensors are e.g. {shown}")


def official_to_vocabseg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a GroupViT release state dict to our names; unknown keys raise a CheckpointError by name.

    Every name was checked against the official model built from the release configs (407 tensors for YFCC, 406
    for RedCaps, the same names and shapes as ours); no release file was at hand.
    """
    out, unknown = {}, []
    for key, value in state.items():
        name = _renamed(key)
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    if unknown:
        raise CheckpointError(f"{len(unknown)} unknown tensors in the GroupViT checkpoint, e.g. "
                              f"{', '.join(unknown[:3])}")
    return out


def _renamed(key: str) -> str | None:
    """Our name of a release tensor name (None when no prefix matches)."""
    for old, new in _PREFIX_MAP:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return None


def _official_name(key: str) -> str:
    """The release's name of one of our tensor names."""
    for old, new in sorted(_PREFIX_MAP, key=lambda p: -len(p[1])):  # clip.text_projection. before clip.
        if key == new or (new.endswith(".") and key.startswith(new)):
            return old + key[len(new):]
    raise KeyError(f"no official name for {key}")


def vocabseg_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_vocabseg`."""
    return {_official_name(key): value for key, value in state.items()}


# ----------------------------------------------------------------------------------------------- registered configs


def _groupvit_s() -> GroupViTConfig:
    """The release (NVlabs/GroupViT ``group_vit_gcc_{yfcc,redcap}_30e``) with its demo's VOC inference: resize to
    fit (2048, 448) as mmcv does (OpenCV bilinear on uint8), ImageNet statistics, no padding, group masks at the
    full input (stride 1), "a photo of a {}.", background below 0.95, group scores limited to the top-5 classes."""
    return GroupViTConfig(short_side=448, max_side=2048, resize_backend="mmcv", size_divisibility=1, mask_stride=1,
                          templates="simple", background_threshold=0.95, topk_classes=5)


def _groupvit_tiny() -> GroupViTConfig:
    """A ~0.1 M-parameter GroupViT for tests: 32 px / patch 8 (16 tokens), 8 then 4 groups, width 32."""
    text = GroupViTTextConfig(width=32, layers=1, heads=2, embed_dim=32, proj_hidden=64)
    return GroupViTConfig(image_size=32, patch_size=8, width=32, depths=(1, 1, 1), heads=2, num_group_tokens=(8, 4, 0),
                          num_output_groups=(8, 4), text=text, short_side=32, max_side=128, size_divisibility=8,
                          mask_stride=4)


def _groupvit_release_tiny() -> GroupViTConfig:
    """The release's layout and inference settings at test size: positional grid 4×4 (32 px / patch 8), width 32,
    8 then 4 groups, a 1-layer text tower of width 64 (one head, as the release's width // 64) with the release's
    4096-wide projector; inputs fit to (96, 40) as the release fits them to (2048, 448)."""
    text = GroupViTTextConfig(width=64, layers=1, heads=1, embed_dim=32, proj_hidden=4096)
    return dataclasses.replace(_groupvit_s(), image_size=32, patch_size=8, width=32, depths=(1, 1, 1), heads=2,
                               num_group_tokens=(8, 4, 0), num_output_groups=(8, 4), text=text, short_side=40,
                               max_side=96)


@register_model("groupvit_vit_s", "groupvit", _groupvit_s(),
                "GroupViT ViT-S (64/8 groups) with its own text tower; loads the release group_vit_gcc_*.pth and "
                "runs its VOC demo inference")
def groupvit_vit_s(cfg: GroupViTConfig) -> GroupViT:
    return GroupViT(cfg)


@register_model("groupvit_tiny_test", "groupvit", _groupvit_tiny(), "tiny random GroupViT for tests", test_only=True)
def groupvit_tiny_test(cfg: GroupViTConfig) -> GroupViT:
    return GroupViT(cfg)


@register_model("groupvit_release_tiny_test", "groupvit", _groupvit_release_tiny(),
                "tiny random GroupViT in the release layout with the release inference, for tests", test_only=True)
def groupvit_release_tiny_test(cfg: GroupViTConfig) -> GroupViT:
    return GroupViT(cfg)
