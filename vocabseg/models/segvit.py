"""SegViT — Attention-to-Mask on a plain ViT (Zhang et al., NeurIPS 2022, arXiv 2210.05844; seed 003).

Class queries (one per class) cross-attend to ViT tokens taken after several backbone blocks. The mask of a class
is the sigmoid of the head-averaged *pre-softmax* similarity q·k/√d of that cross-attention — the very tensor the
attention softmax consumes, computed once here and returned (``MaskingCrossAttention``). Three stages (deepest
tokens first), three decoder layers each; the query carries over from stage to stage, each stage's mask is the
similarity of its last layer, masks are summed across stages, and class scores come from the query outputs.

Two class heads share everything else:

* ``head="closed"`` (the paper): ``num_classes`` learnt queries and a ``Linear(dim, C + 1)`` classifier.
* ``head="open"`` (ours, on the frozen CLIP): the queries are the CLIP text embeddings of any vocabulary through a
  small MLP; a query's class logits are ``scale · cos(proj(query output), [text; no-object])`` — the closed
  classifier with its weight rows replaced by text embeddings and a learnt no-object row. ``C`` is whatever the
  vocabulary is.

Shrunk (paper "Shrunk structure"; release ``vit_shrink`` + ``TPNATMHead``): query-based down-sampling (QD) at
one block — the block's own attention with queries = the tokens at stride 2 and keys/values = all tokens — so
the later blocks run on a quarter of the tokens; query-based up-sampling (QU): a learnt grid of queries at the
full token grid attends (plain transformer decoder layers) to the features before QD and to the last ones; the
ATM head then reads the QU output.

Reads top to bottom: config, attention and decoder layers, class heads, QD/QU, the model, registered configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import CLIP, CLIPConfig, config_for, resize_grid_embedding
from ..errors import ConfigError
from .base import OpenVocabModel
from .default import DEFAULT_CLIP_WEIGHTS, WEIGHTS_DIR
from .registry import register_model
from .weights import load_strict

# ----------------------------------------------------------------------------------------------- config


@dataclass
class SegViTConfig:
    clip: CLIPConfig = field(default_factory=lambda: config_for("ViT-B/16"))
    head: str = "open"  # "open": queries from text embeddings (any vocabulary); "closed": learnt, num_classes fixed
    num_classes: int = 150  # closed head only
    # CLIP layers (= tokens after that many blocks) read by the decoder. Plain: ATM stages, deepest first; the
    # release's out_indices 5/7/11 (B) and 7/15/23 (L) are 0-based block indices, i.e. layers 6/8/12 and 8/16/24.
    # Shrunk: the features the QU queries attend to, in this order (release: before QD, and the last).
    layers: tuple[int, ...] = (6, 8, 12)
    decoder_dim: int = 384  # release: backbone width // 2
    decoder_heads: int = 12
    decoder_layers: int = 3  # per stage
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    text_hidden: int = 0  # open head: hidden width of the text -> query MLP (0: decoder_dim)
    # Shrunk: block ``qd_block`` (0-based) is the QD block; blocks after it run at half grid (None: plain SegViT).
    qd_block: int | None = None
    qd_neighbourhood: bool = False  # True: each QD query sees only its own 2x2 cell (+[CLS]); release: global
    qu_grid: int = 32  # learnt QU query grid (trained image size / patch), resized to the image's grid
    qu_layers: int = 3  # decoder layers per QU stage
    train_backbone: bool = False  # the paper fine-tunes its ViT; here CLIP stays frozen unless this is set
    no_object_weight: float = 0.1
    templates: str = "vild"
    short_side: int = 512  # inference resize (ADE20K: short side 512 for B, 640 for L; long side <= 2048)
    max_side: int = 2048
    size_divisibility: int = 32

    @property
    def shrunk(self) -> bool:
        return self.qd_block is not None


# ----------------------------------------------------------------------------------------------- attention


class SelfAttention(nn.Module):
    """Multi-head self-attention among the queries (own module: separate ``qkv`` and ``proj`` linears)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MaskingCrossAttention(nn.Module):
    """Cross-attention that returns, with its output, the head-averaged pre-softmax logits it attended with.

    ``logits = q·kᵀ/√d (+ bias)`` per head; the output is ``softmax(logits)·v``; the returned mask logits are
    ``logits.mean(heads)``: the same tensor, so ``sigmoid(mask)`` is exactly the attention's similarity map.
    With ``capture = True`` the per-head logits of the last call are kept in ``captured`` (tests).
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.capture = False
        self.captured: torch.Tensor | None = None

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Q, C], memory [B, N, C], optional additive bias broadcastable to [B, heads, Q, N]
        -> (output [B, Q, C], mask logits [B, Q, N])."""
        b, nq, c = queries.shape
        n, h = memory.shape[1], self.heads
        q = self.q(queries).view(b, nq, h, c // h).transpose(1, 2)  # [B, h, Q, d]
        k = self.k(memory).view(b, n, h, c // h).transpose(1, 2)  # [B, h, N, d]
        v = self.v(memory).view(b, n, h, c // h).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # [B, h, Q, N]
        if bias is not None:
            logits = logits + bias
        if self.capture:
            self.captured = logits.detach()
        attn = self.attn_drop(logits.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, nq, c)
        return self.proj(out), logits.mean(dim=1)


class ATMLayer(nn.Module):
    """Post-norm transformer decoder layer (self-attn, cross-attn, FFN; as torch's ``TransformerDecoderLayer`` in
    the release) whose cross-attention also yields the mask logits."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.self_attn = SelfAttention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MaskingCrossAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.norm1(q + self.drop(self.self_attn(q)))
        out, mask_logits = self.cross_attn(q, memory, bias)
        q = self.norm2(q + self.drop(out))
        q = self.norm3(q + self.drop(self.ffn(q)))
        return q, mask_logits


class FeatureProjection(nn.Module):
    """Backbone tokens -> decoder width: Linear + LayerNorm (the release's ``input_proj_i`` / ``proj_norm_i``)."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(width, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def _to_maps(mask_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, Q, h*w] -> [B, Q, h, w]."""
    return mask_logits.unflatten(-1, grid)


# ----------------------------------------------------------------------------------------------- class heads


class ClosedSetHead(nn.Module):
    """The paper's head: ``num_classes`` learnt queries, ``Linear(dim, C + 1)`` class logits (no-object last)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.queries = nn.Parameter(torch.randn(num_classes, dim))  # nn.Embedding's N(0, 1), as the release
        self.class_embed = nn.Linear(dim, num_classes + 1)

    def initial_queries(self, text_embeddings: torch.Tensor | None, batch: int) -> torch.Tensor:
        return self.queries.unsqueeze(0).repeat(batch, 1, 1)  # [B, C, dim] (a copy: no view of a parameter)

    def class_logits(self, q: torch.Tensor, text_embeddings: torch.Tensor | None) -> torch.Tensor:
        return self.class_embed(q)  # [B, C, C+1]


class OpenVocabHead(nn.Module):
    """Queries from text embeddings (MLP), class logits = scale · cos(projected query output, [text; no-object])."""

    def __init__(self, embed_dim: int, dim: int, hidden: int):
        super().__init__()
        self.text_to_query = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.query_to_embed = nn.Linear(dim, embed_dim)
        self.no_object = nn.Parameter(torch.randn(embed_dim) * embed_dim ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def initial_queries(self, text_embeddings: torch.Tensor, batch: int) -> torch.Tensor:
        q = self.text_to_query(text_embeddings.to(self.no_object.dtype))  # [C, dim]
        return q.unsqueeze(0).expand(batch, -1, -1)

    def class_logits(self, q: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(self.query_to_embed(q), dim=-1)  # [B, C, D]
        classes = torch.cat([text_embeddings.to(emb.dtype), F.normalize(self.no_object, dim=-1)[None]], dim=0)
        return self.logit_scale.exp() * emb @ classes.t()  # [B, C, C+1]


# ----------------------------------------------------------------------------------------------- Shrunk: QD and QU


def neighbourhood_mask(grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Boolean attention mask [1 + h'·w', 1 + h·w] (True = attend) for QD restricted to 2×2 cells.

    Rows: [CLS] then the stride-2 queries on the half grid (h', w') = (⌈h/2⌉, ⌈w/2⌉); columns: [CLS] then all
    tokens. A query sees [CLS] and the (up to) four tokens of its own cell; [CLS] sees everything.
    """
    h, w = grid
    hh, ww = -(-h // 2), -(-w // 2)
    rows = torch.arange(h, device=device) // 2
    cols = torch.arange(w, device=device) // 2
    cell = (rows[:, None] * ww + cols[None, :]).flatten()  # [h*w] cell index of each token
    q = torch.arange(hh * ww, device=device)
    patches = q[:, None] == cell[None, :]  # [h'w', hw]
    top = torch.ones(1, 1 + h * w, dtype=torch.bool, device=device)
    body = torch.cat([torch.ones(hh * ww, 1, dtype=torch.bool, device=device), patches], dim=1)
    return torch.cat([top, body], dim=0)


def query_downsample(block: nn.Module, x: torch.Tensor, grid: tuple[int, int], neighbourhood: bool = False
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """QD with a CLIP block's own weights: queries = [CLS] + tokens at stride 2, keys/values = all tokens.

    ``x`` [B, 1 + h·w, C] -> ([B, 1 + h'·w', C], (h', w')) with h' = ⌈h/2⌉: the block's attention (residual on
    the queries) then its MLP, as the release's ``ShrinkLayer`` does with its backbone block.
    """
    b, _, c = x.shape
    h, w = grid
    tokens = x[:, 1:].transpose(1, 2).reshape(b, c, h, w)
    down = tokens[:, :, ::2, ::2]  # nearest sampling of the query positions
    half = (down.shape[-2], down.shape[-1])
    queries = torch.cat([x[:, :1], down.flatten(2).transpose(1, 2)], dim=1)  # [B, 1 + h'w', C]
    attn = block.attn
    heads, d = attn.heads, c // attn.heads
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    qn, kn = block.ln_1(queries), block.ln_1(x)
    q = F.linear(qn, wq, bq).view(b, -1, heads, d).transpose(1, 2)
    k = F.linear(kn, wk, bk).view(b, -1, heads, d).transpose(1, 2)
    v = F.linear(kn, wv, bv).view(b, -1, heads, d).transpose(1, 2)
    mask = neighbourhood_mask(grid, x.device) if neighbourhood else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    y = queries + attn.out_proj(out.transpose(1, 2).reshape(b, -1, c))
    y = y + block.mlp(block.ln_2(y))
    return y, half


class QueryUpsampler(nn.Module):
    """QU: a learnt grid of queries (resized to the full token grid) attends, with plain decoder layers, to each
    feature set in turn; the output is a [B, h·w, dim] token map at full grid for the ATM head."""

    def __init__(self, width: int, dim: int, heads: int, grid: int, stages: int, layers: int, mlp_ratio: float,
                 dropout: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(grid * grid, dim))
        self.inputs = nn.ModuleList(FeatureProjection(width, dim) for _ in range(stages))
        self.stages = nn.ModuleList(
            nn.ModuleList(ATMLayer(dim, heads, mlp_ratio, dropout) for _ in range(layers)) for _ in range(stages))

    def forward(self, features: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        q = resize_grid_embedding(self.queries, grid).unsqueeze(0).repeat(features[0].shape[0], 1, 1)
        for feat, proj, layers in zip(features, self.inputs, self.stages):
            memory = proj(feat)
            for layer in layers:
                q, _ = layer(q, memory)
        return q


# ----------------------------------------------------------------------------------------------- model


def _init_decoder(m: nn.Module) -> None:
    """The release's ``init_weights``: trunc-normal(0.02) linears with zero bias, LayerNorms at 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def used_visual_parameters(visual: nn.Module, last_layer: int) -> tuple[str, ...]:
    """Names (under ``visual.``) of the ViT parameters that tokens up to ``last_layer`` depend on."""
    names = ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
             "visual.ln_pre.bias"]
    for i in range(last_layer):
        block = visual.transformer.resblocks[i]
        names += [f"visual.transformer.resblocks.{i}.{n}" for n, _ in block.named_parameters()]
    return tuple(names)


class SegViT(OpenVocabModel):
    def __init__(self, config: SegViTConfig):
        super().__init__()
        c = config
        if not c.clip.is_vit:
            raise ValueError("SegViT needs a CLIP ViT image tower")
        if c.head not in ("open", "closed"):
            raise ConfigError(f"SegViT head must be 'open' or 'closed', got {c.head!r}")
        if c.shrunk and not 0 <= c.qd_block < c.clip.vision_layers:
            raise ConfigError(f"qd_block {c.qd_block} is not a block of a {c.clip.vision_layers}-block ViT")
        if not c.layers or max(c.layers) > c.clip.vision_layers or min(c.layers) < 1:
            raise ConfigError(f"layers {c.layers} must lie in 1..{c.clip.vision_layers}")
        self.config = c
        self.clip = CLIP(c.clip)
        width, dim = c.clip.vision_width, c.decoder_dim
        if c.shrunk:
            # QU attends to the given features in order; a single ATM stage reads the QU output (no projection).
            self.upsampler = QueryUpsampler(width, dim, c.decoder_heads, c.qu_grid, len(c.layers), c.qu_layers,
                                            c.mlp_ratio, c.dropout)
            self.inputs = nn.ModuleList()
            n_stages = 1
        else:
            self.inputs = nn.ModuleList(FeatureProjection(width, dim) for _ in c.layers)
            n_stages = len(c.layers)
        self.stages = nn.ModuleList(
            nn.ModuleList(ATMLayer(dim, c.decoder_heads, c.mlp_ratio, c.dropout) for _ in range(c.decoder_layers))
            for _ in range(n_stages))
        if c.head == "closed":
            self.head: ClosedSetHead | OpenVocabHead = ClosedSetHead(c.num_classes, dim)
        else:
            self.head = OpenVocabHead(c.clip.embed_dim, dim, c.text_hidden or dim)
        for module in (self.upsampler if c.shrunk else None, self.inputs, self.stages, self.head):
            if module is not None:
                module.apply(_init_decoder)
        keep = used_visual_parameters(self.clip.visual, max(c.layers)) if c.train_backbone else ()
        self.freeze_clip(keep=keep)
        self.register_pixel_statistics()

    # -- backbone ----------------------------------------------------------------------------------------------
    def backbone_features(self, images: torch.Tensor
                          ) -> tuple[dict[int, tuple[torch.Tensor, tuple[int, int]]], tuple[int, int]]:
        """Patch tokens [B, h·w, C] (no [CLS]) and their grid after each wanted layer, and the input grid.

        Shrunk: block ``qd_block`` is the QD block, so layers after it are on the half grid.
        """
        visual, c = self.clip.visual, self.config
        x, grid = visual.embed(images)
        input_grid = grid
        wanted = set(c.layers)
        feats: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        for i, block in enumerate(visual.transformer.resblocks[:max(wanted)]):
            if c.shrunk and i == c.qd_block:
                x, grid = query_downsample(block, x, grid, c.qd_neighbourhood)
            else:
                x = block(x)
            if i + 1 in wanted:
                feats[i + 1] = (x[:, 1:], grid)
        return feats, input_grid

    def _pad_to_patch(self, images: torch.Tensor) -> torch.Tensor:
        p = self.config.clip.vision_patch_size
        pad_h, pad_w = (-images.shape[-2]) % p, (-images.shape[-1]) % p
        return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images

    def _check_vocabulary(self, text_embeddings: torch.Tensor | None) -> None:
        c = self.config
        if c.head == "closed" and text_embeddings is not None and text_embeddings.shape[0] != c.num_classes:
            raise ConfigError(f"this closed-set SegViT knows exactly its {c.num_classes} training classes; got a "
                              f"vocabulary of {text_embeddings.shape[0]} (use head='open' for other vocabularies)")
        if c.head == "open" and text_embeddings is None:
            raise ConfigError("the open-vocabulary SegViT needs text embeddings of the class names")

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor | None = None) -> dict:
        """Normalised images [B, 3, H, W] (padded here to a multiple of the patch) and text embeddings [C, D].

        Returns ``pred_logits`` [B, C, C+1] (query c's logits over the classes and no-object, last),
        ``pred_masks`` [B, C, h, w] (mask logits on the token grid, h = ⌈H/patch⌉) and ``aux_outputs`` (the
        earlier stages; Shrunk: the earlier layers of its single ATM stage), as the release's deep supervision.
        """
        self._check_vocabulary(text_embeddings)
        images = self._pad_to_patch(images)
        feats, grid = self.backbone_features(images)
        c = self.config
        q = self.head.initial_queries(text_embeddings, images.shape[0])
        outs: list[dict[str, torch.Tensor]] = []
        if c.shrunk:
            memory = self.upsampler([feats[layer][0] for layer in c.layers], grid)
            for layer in self.stages[0]:
                q, m = layer(q, memory)
                outs.append({"pred_logits": self.head.class_logits(q, text_embeddings),
                             "pred_masks": _to_maps(m, grid)})  # each layer's own mask (release ATMSingleHead)
        else:
            masks = None
            for layer_idx, proj, stage in zip(reversed(c.layers), reversed(self.inputs), self.stages):
                tokens, g = feats[layer_idx]
                memory = proj(tokens)
                for layer in stage:
                    q, m = layer(q, memory)
                m = _to_maps(m, g)  # the stage's mask = similarity of its last layer
                if masks is not None and masks.shape[-2:] != m.shape[-2:]:
                    masks = F.interpolate(masks, size=m.shape[-2:], mode="bilinear", align_corners=False)
                masks = m if masks is None else masks + m  # summed across stages
                outs.append({"pred_logits": self.head.class_logits(q, text_embeddings), "pred_masks": masks})
        result = dict(outs[-1])
        result["aux_outputs"] = outs[:-1]
        return result

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (class probabilities [B, C, C]: softmax over the C classes + no-object, no-object dropped, as the
        release's ``semantic_inference``; mask logits [B, C, h, w]). One query per class: Q = C."""
        out = self.forward(pixels, text_embeddings)
        return out["pred_logits"].float().softmax(-1)[..., :-1], out["pred_masks"].float()

    # -- training hooks used by the engine ----------------------------------------------------------------------
    def build_criterion(self, num_classes: int):
        """ATM loss: CE 1 + focal 20 + dice 1, queries bound to classes, no-object weight 0.1 (release ATMLoss)."""
        from ..losses.segvit import ATMCriterion

        if self.config.head == "closed" and num_classes != self.config.num_classes:
            raise ConfigError(f"this closed-set SegViT has {self.config.num_classes} classes, the dataset "
                              f"{num_classes}; set num_classes={num_classes}")
        return ATMCriterion(num_classes, no_object_weight=self.config.no_object_weight)

    def training_targets(self, labels: torch.Tensor, ignore_index: int = 255) -> list[dict]:
        """Label maps [B, H, W] -> per image {labels (present classes), masks, valid}."""
        from ..losses.segvit import class_bound_targets

        return [class_bound_targets(lab, ignore_index=ignore_index) for lab in labels]

    # -- checkpoints -------------------------------------------------------------------------------------------
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], allow_missing_clip: bool = False) -> None:
        """Our own key layout (the official release is an mmseg model on a non-CLIP ViT: no key map applies)."""
        load_strict(self, state, allow_missing_prefix="clip." if allow_missing_clip else None)


# ----------------------------------------------------------------------------------------------- registered configs


def _segvit_b16() -> SegViTConfig:
    return SegViTConfig()


def _segvit_l14() -> SegViTConfig:
    # Release ViT-L: out_indices 7/15/23, decoder width 1024 // 2, 16 heads, ADE20K at 640.
    return SegViTConfig(clip=config_for("ViT-L/14"), layers=(8, 16, 24), decoder_dim=512, decoder_heads=16,
                        short_side=640, size_divisibility=28)


def _segvit_shrunk_l14() -> SegViTConfig:
    # Release "shrink8": QD at block index 8, QU on out_indices 7 and 23 (layers 8 and 24), query grid = the
    # full token grid at the training size (640 / 14 -> 45 here; 640 / 16 = 40 in the release).
    return SegViTConfig(clip=config_for("ViT-L/14"), layers=(8, 24), decoder_dim=512, decoder_heads=16,
                        qd_block=8, qu_grid=45, short_side=640, size_divisibility=28)


def _segvit_tiny() -> SegViTConfig:
    """A small SegViT for tests: the 4-block CLIP of ``san_tiny_test`` (width 64, patch 8), decoder width 32."""
    clip = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
                      context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2,
                      transformer_layers=2)
    return SegViTConfig(clip=clip, layers=(2, 3, 4), decoder_dim=32, decoder_heads=2, decoder_layers=2,
                        qu_grid=8, qu_layers=2, num_classes=6, short_side=64, max_side=256, size_divisibility=16)


@register_model("segvit_vit_b_16", "segvit", _segvit_b16(),
                "SegViT (ATM decoder) on a frozen CLIP ViT-B/16, open-vocabulary head, 512 px")
def segvit_vit_b_16(cfg: SegViTConfig) -> SegViT:
    return SegViT(cfg)


@register_model("segvit_vit_large_14", "segvit", _segvit_l14(),
                "SegViT (ATM decoder) on a frozen CLIP ViT-L/14, open-vocabulary head, 640 px")
def segvit_vit_large_14(cfg: SegViTConfig) -> SegViT:
    return SegViT(cfg)


@register_model("segvit_shrunk_vit_large_14", "segvit", _segvit_shrunk_l14(),
                "SegViT-Shrunk (QD at block 8, QU) on a frozen CLIP ViT-L/14, open-vocabulary head, 640 px")
def segvit_shrunk_vit_large_14(cfg: SegViTConfig) -> SegViT:
    return SegViT(cfg)


@register_model("segvit_tiny_test", "segvit", _segvit_tiny(), "tiny random SegViT for tests", test_only=True)
def segvit_tiny_test(cfg: SegViTConfig) -> SegViT:
    return SegViT(cfg)


def _segvit_world() -> SegViTConfig:
    """SegViT on the embedded default's small CLIP (6 blocks, width 192): stages read layers 2/4/6, decoder 96 wide
    (backbone width // 2, as the release); about as many trainable parameters as the default SAN (1.4 M vs 1.6 M)."""
    from .default import WORLD_TEMPLATES, default_clip_config

    return SegViTConfig(clip=default_clip_config(), layers=(2, 4, 6), decoder_dim=96, decoder_heads=4,
                        templates=WORLD_TEMPLATES, short_side=192, max_side=768, size_divisibility=32)


# Trained by configs/world_compare_segvit.yaml (600 steps); shipped in fp16 by engine.checkpoint.bundle_weights.
@register_model("segvit_world", "segvit", _segvit_world(),
                "SegViT (ATM, open head) on the embedded default's small CLIP, for the generated world",
                weights=WEIGHTS_DIR / "segvit_world.safetensors", clip_weights=DEFAULT_CLIP_WEIGHTS)
def segvit_world(cfg: SegViTConfig) -> SegViT:
    return SegViT(cfg)
