"""Teach a small CLIP shapes: a convolutional branch on its image embedding, and its text tower (issue #24).

The embedded default's CLIP, trained contrastively on world captions, never learned shapes, on *both* sides: its
6-layer ViT does not see outlines, and its text tower gives every shape word nearly the same embedding ("a photo of
a circle" vs "... star": cosine 0.996). Neither side can then learn from the other (image embeddings that do not
differ by shape give the text tower nothing to separate, and the reverse), which is why longer contrastive runs and
hard negatives stayed at chance. This family breaks the deadlock with direct signals:

* the ViT stays frozen; a :class:`~vocabseg.clip.model.ConvBranch` (zero-initialised, so training starts from the
  CLIP as it was) is added to its pooled embedding, with a 10-way shape head on the branch's features to get it
  going;
* the text tower is trained, with a term pushing the embeddings of different shapes apart, and a term that keeps
  every prompt *without* a shape word (colours, backgrounds, their synonyms) where it was, so what the segmenter
  learned on top of them stays valid;
* the main loss classifies each image among every "colour shape" name and every background name at once, as the
  embedded default's mask-crop ensemble does at inference.

Data: crops of world objects and background regions cut exactly as the default's crop ensemble cuts them
(:func:`~vocabseg.models.san.mask_crops`, outline on its surroundings), plus whole single-object scenes (the zero-shot
report's kind). The frozen ViT's embeddings are computed once into ``pool.pt`` in the run folder (a pure function of
the seed and sizes), so a step costs only the branch and the text tower.

    vocabseg train configs/default_clip_shapes.yaml
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .loop import Family, RunSpec


@dataclass
class ShapeTuningConfig:
    output_dir: str = "runs/default_clip_shapes"
    seed: int = 26
    init_clip: str = ""  # CLIP file to start from; empty: the bundled default CLIP
    branch_channels: int = 32
    # the data pool (built once into output_dir/pool.pt)
    crop_scenes: int = 2500  # scenes whose objects and background regions are cropped (about 3.5 crops each)
    scene_samples: int = 8000  # whole single-object scenes
    eval_crop_scenes: int = 200
    eval_scene_samples: int = 300
    crop_min_size: int = 192  # sizes of the scenes whose regions are cropped (the default segments at about this)
    crop_max_size: int = 320
    # how regions are cropped: each region once per fill (mask_crops' fills; the default's ensemble uses all three),
    # its mask first pooled to 1/crop_mask_stride of the scene (SAN's proposals are that coarse; 1: exact)
    crop_fills: tuple[str, ...] = ("surround_mean",)
    crop_mask_stride: int = 1
    crop_world: Optional[dict] = None  # WorldConfig overrides for the cropped scenes (e.g. ground_color_prob)
    # False: only the conv branch learns; the text tower (and so every text embedding a SAN was trained on) stays
    train_text: bool = True
    # optimisation
    max_iters: int = 2000
    stop_after: Optional[int] = None
    warmup_iters: int = 100
    batch_crops: int = 48
    batch_scenes: int = 16
    lr: float = 2e-3  # branch and shape head
    text_lr: float = 5e-4
    weight_decay: float = 0.05
    keep_weight: float = 20.0  # prompts without shape words stay where they were
    apart_weight: float = 10.0  # different shapes' prompts pushed below a cosine of 0.6 (0.8 within a colour)
    shape_head_weight: float = 1.0
    # run (the shared loop's settings)
    log_every: int = 50
    checkpoint_every: int = 200
    eval_every: int = 400
    keep_checkpoints: int = 2
    clip_grad: float = 0.0
    resume: Union[bool, str] = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        from ..errors import ConfigError
        from ..models.san import CROP_FILLS

        self.crop_fills = tuple(self.crop_fills)
        unknown = [f for f in self.crop_fills if f not in CROP_FILLS]
        if unknown or not self.crop_fills:
            raise ConfigError(f"crop_fills {list(self.crop_fills)}: give one or more of {list(CROP_FILLS)}.")
        if self.crop_mask_stride < 1:
            raise ConfigError(f"crop_mask_stride must be >= 1, got {self.crop_mask_stride}.")


def _object_and_stuff_crops(sample, size: int, fills: tuple[str, ...] = ("surround_mean",),
                            mask_stride: int = 1) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Crops [N, 3, size, size] of a scene's visible objects (>= 30 px) and background regions (>= 10 % of the
    scene), cut as the crop ensemble cuts them (once per fill, from masks pooled by ``mask_stride``); labels
    (shape, colour, stuff) with -1 where not applicable."""
    from ..clip.transforms import normalize
    from ..data.world import COLORS, OBJECT_CATEGORIES, STUFF_CLASSES
    from ..models.san import mask_crops

    masks, labels = [], []
    for k, o in enumerate(sample.objects, start=1):
        m = sample.instance_map == k
        if m.sum() >= 30:
            masks.append(m)
            labels.append((OBJECT_CATEGORIES.index(o.category), COLORS.index(o.color), -1))
    for j in range(len(STUFF_CLASSES)):
        m = (sample.stuff_map == j) & (sample.instance_map == 0)
        if m.mean() >= 0.1:
            masks.append(m)
            labels.append((-1, -1, j))
    if not masks:
        return torch.zeros(0, 3, size, size), []
    pixels = normalize(sample.image)[None]  # [1, 3, H, W]
    cover = torch.from_numpy(np.stack(masks)).float()[None]
    if mask_stride > 1:
        cover = F.avg_pool2d(cover, mask_stride, ceil_mode=True)
    logits = cover * 10 - 5
    crops = torch.cat([mask_crops(pixels, logits, size, fill=fill)[0] for fill in fills])
    return crops, labels * len(fills)


@torch.no_grad()
def build_pool(cfg: ShapeTuningConfig, clip: nn.Module, log=print) -> dict[str, tuple[torch.Tensor, ...]]:
    """{"crops", "scenes", "eval_crops", "eval_scenes"}: (images fp16, frozen image embeddings, labels [N, 3])."""
    from ..data.world import COLORS, OBJECT_CATEGORIES, STUFF_CLASSES, WorldConfig, generate_sample, sample_seed
    from .contrastive import to_clip_tensor

    size = clip.visual.input_resolution
    crop_world = WorldConfig(**{"max_objects": 3, "huge_prob": 0.1, "hard_edge_prob": 0.3, "jpeg_prob": 0.3,
                                "plain_tones": True, "plain_prob": 0.3, **(cfg.crop_world or {}),
                                "min_size": cfg.crop_min_size, "max_size": cfg.crop_max_size})
    scene_world = WorldConfig(min_size=96, max_size=160, max_objects=1, min_objects=1, huge_prob=0.1,
                              hard_edge_prob=0.3, jpeg_prob=0.3, plain_tones=True)

    def embed(x: torch.Tensor) -> torch.Tensor:  # the frozen ViT's own embedding (the branch is added in training)
        return torch.cat([clip.visual.vit_embedding(x[i:i + 256]) for i in range(0, len(x), 256)])

    def crops(n: int, stream: int):
        xs, labels = [], []
        for i in range(n):
            x, lab = _object_and_stuff_crops(generate_sample(sample_seed(cfg.seed * 100 + stream, i), crop_world),
                                             size, cfg.crop_fills, cfg.crop_mask_stride)
            xs.append(x)
            labels += lab
        x = torch.cat(xs)
        return x.half(), embed(x), torch.tensor(labels, dtype=torch.long).view(-1, 3)

    def scenes(n: int, stream: int):
        xs, labels = [], []
        for i in range(n):
            s = generate_sample(sample_seed(cfg.seed * 100 + stream, i), scene_world)
            if not s.objects:
                continue
            o = max(s.objects, key=lambda r: r.area)
            stuff = max(s.stuff, key=lambda r: r.area).name
            xs.append(to_clip_tensor(s.image, size))
            labels.append((OBJECT_CATEGORIES.index(o.category), COLORS.index(o.color), STUFF_CLASSES.index(stuff)))
        x = torch.stack(xs)
        return x.half(), embed(x), torch.tensor(labels, dtype=torch.long)

    pool = {}
    for name, fn, n, stream in (("crops", crops, cfg.crop_scenes, 1), ("scenes", scenes, cfg.scene_samples, 2),
                                ("eval_crops", crops, cfg.eval_crop_scenes, 3),
                                ("eval_scenes", scenes, cfg.eval_scene_samples, 4)):
        pool[name] = fn(n, stream)
        log(f"pool: {len(pool[name][0])} {name}")
    return pool


class ShapeTuning(nn.Module):
    """The CLIP being tuned (its ViT frozen, its conv branch and text tower trained) and the branch's shape head."""

    def __init__(self, clip: nn.Module, channels: int):
        super().__init__()
        self.clip = clip
        self.shape_head = nn.Linear(8 * channels, 10)



class _Prompts:
    """Training and evaluation prompt sets (different wording, so evaluation is not on the training sentences)."""

    def __init__(self) -> None:
        from ..data.world import COLORS, OBJECT_CATEGORIES, STUFF_CLASSES, STUFF_SYNONYMS

        c, s, st = COLORS, OBJECT_CATEGORIES, STUFF_CLASSES
        self.train = {"shape": [f"a {x}" for x in s], "color": [f"something {x}" for x in c],
                      "color_shape": [f"the {a} {b}" for a in c for b in s], "stuff": list(st)}
        self.eval = {"shape": [f"a photo of a {x}" for x in s], "color": [f"a {x} shape" for x in c],
                     "color_shape": [f"a {a} {b}" for a in c for b in s], "stuff": [f"a photo of {x}" for x in st]}
        names = (list(c) + [f"{x} shape" for x in c] + [f"{x} object" for x in c] + list(st)
                 + [w for v in STUFF_SYNONYMS.values() for w in v])
        self.keep = sorted({f"{t}{n}" for n in names for t in ("", "a photo of ", "a photo of a ", "there is a ", "a ")})
        self.num_colors, self.num_shapes = len(c), len(s)


def _targets(labels: torch.Tensor, num_shapes: int, num_color_shapes: int) -> dict[str, torch.Tensor]:
    shape, color, stuff = labels.unbind(-1)
    obj = shape >= 0
    color_shape = torch.where(obj, color * num_shapes + shape, -1)
    return {"shape": shape, "color": color, "color_shape": color_shape, "stuff": stuff,
            "joint": torch.where(obj, color_shape, num_color_shapes + stuff)}


class ShapeTuningFamily(Family):
    name = "shapes"
    config_cls = ShapeTuningConfig
    identity_keys = ("seed", "init_clip", "branch_channels", "crop_scenes", "scene_samples", "eval_crop_scenes",
                     "eval_scene_samples", "crop_min_size", "crop_max_size", "crop_fills", "crop_mask_stride",
                     "crop_world", "train_text")

    def spec(self) -> RunSpec:
        c = self.config
        return RunSpec(output_dir=c.output_dir, seed=c.seed, max_iters=c.max_iters, stop_at=c.stop_after,
                       log_every=c.log_every, checkpoint_every=c.checkpoint_every, eval_every=c.eval_every,
                       keep_checkpoints=c.keep_checkpoints, clip_grad=c.clip_grad or None, device=c.device,
                       resume=c.resume, progress=False)

    def describe(self, info, start: int) -> str:
        c = self.config
        text = ", text tower" if c.train_text else ", text tower frozen"
        return (f"teaching the CLIP shapes (conv branch {c.branch_channels}{text}): batch {c.batch_crops} crops "
                f"+ {c.batch_scenes} scenes, steps {start}..{self.spec().last_step} of {c.max_iters}")

    def _init_path(self) -> Path:
        from ..models.default import DEFAULT_CLIP_WEIGHTS

        return Path(self.config.init_clip).expanduser() if self.config.init_clip else DEFAULT_CLIP_WEIGHTS

    def build_model(self, device):
        from ..clip.load import load
        from ..clip.model import CLIP, CLIPConfig
        from ..clip.tokenizer import tokenize

        c = self.config
        base = load(self._init_path())
        clip = CLIP(CLIPConfig.from_dict({**base.config.to_dict(), "vision_conv_branch": c.branch_channels}))
        clip.load_state_dict(base.state_dict(), strict=False)  # a new branch starts at zero: the same CLIP
        for p in clip.parameters():
            p.requires_grad_(False)
        self.text_params = [clip.token_embedding.weight, clip.positional_embedding, clip.text_projection,
                            *clip.transformer.parameters(), *clip.ln_final.parameters()] if c.train_text else []
        for p in [*self.text_params, *clip.visual.conv_branch.parameters()]:
            p.requires_grad_(True)
        model = ShapeTuning(clip, c.branch_channels).to(device)
        self.prompts = _Prompts()
        self.tokens = {k: tokenize(v) for k, v in self.prompts.train.items()}
        self._fixed_text = None
        self.keep_tokens = tokenize(self.prompts.keep)
        with torch.no_grad():
            self.keep_reference = F.normalize(base.encode_text(self.keep_tokens), dim=-1)
            pool_path = Path(c.output_dir) / "pool.pt"
            if pool_path.exists():
                self.pool = torch.load(pool_path, weights_only=True)
            else:
                from .checkpoint import atomic_write_bytes

                self.pool = build_pool(c, clip)  # before any step: the branch is still zero
                buffer = io.BytesIO()
                torch.save(self.pool, buffer)
                atomic_write_bytes(pool_path, buffer.getvalue())
        return model

    def optimizer(self, model) -> torch.optim.Optimizer:
        c = self.config
        image = [*model.clip.visual.conv_branch.parameters(), *model.shape_head.parameters()]
        groups = [{"params": image, "lr": c.lr, "weight_decay": c.weight_decay}]
        if self.text_params:
            groups.append({"params": self.text_params, "lr": c.text_lr, "weight_decay": 0.0})
        return torch.optim.AdamW(groups)

    def lr_factor(self, step: int) -> float:
        from .contrastive import cosine_factor

        return cosine_factor(step, self.config.warmup_iters, self.config.max_iters)

    def dataset(self, model):
        return _PoolItems(self.pool)

    def batch_sampler(self, start_step: int, info):
        return _PoolBatches(start_step, self.config, len(self.pool["crops"][0]), len(self.pool["scenes"][0]))

    def collate(self, model):
        return _collate

    def _encode(self, clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(clip.encode_text(tokens), dim=-1)

    def losses(self, net, model, batch, step, device, amp):
        c, p = self.config, self.prompts
        images, frozen, labels = (t.to(device) for t in batch)
        if step % 2:
            images = images.flip(3)
        clip = model.clip
        text = self._fixed_text if not c.train_text else None  # a frozen tower's prompts are encoded once
        if text is None:
            with torch.set_grad_enabled(c.train_text):
                text = {k: self._encode(clip, t.to(device)) for k, t in self.tokens.items()}
            if not c.train_text:
                self._fixed_text = text
        feats = clip.visual.conv_branch.features(images)
        emb = F.normalize(frozen + clip.visual.conv_branch.proj(feats), dim=-1)
        scale = clip.logit_scale.exp().detach()
        t = _targets(labels, p.num_shapes, len(p.train["color_shape"]))
        joint = torch.cat([text["color_shape"], text["stuff"]])
        terms = {"joint": F.cross_entropy(scale * emb @ joint.t(), t["joint"])}
        for k in ("shape", "color", "stuff"):
            ok = t[k] >= 0
            terms[k] = F.cross_entropy(scale * emb[ok] @ text[k].t(), t[k][ok]) if ok.any() else emb.sum() * 0
        obj = t["shape"] >= 0
        terms["shape_head"] = F.cross_entropy(model.shape_head(feats[obj]), t["shape"][obj])
        total = (terms["joint"] + terms["shape"] + terms["color"] + terms["stuff"]
                 + c.shape_head_weight * terms["shape_head"])
        if c.train_text:  # the text tower's own terms: shapes apart, prompts without shape words kept
            off = ~torch.eye(p.num_shapes, dtype=torch.bool, device=emb.device)
            shapes = text["shape"]
            per_color = text["color_shape"].view(p.num_colors, p.num_shapes, -1)
            terms["apart"] = (F.relu(shapes @ shapes.t() - 0.6)[off].mean()
                              + F.relu(per_color @ per_color.transpose(1, 2) - 0.8)[:, off].mean())
            kept = self._encode(clip, self.keep_tokens.to(device))
            terms["keep"] = (1 - (kept * self.keep_reference.to(device)).sum(-1)).mean()
            total = total + c.apart_weight * terms["apart"] + c.keep_weight * terms["keep"]
        return {"total_loss": total, **{f"{k}_loss": v.detach() for k, v in terms.items()}}

    def has_eval(self) -> bool:
        return True

    @torch.no_grad()
    def evaluate(self, model, step, progress):
        from ..clip.tokenizer import tokenize
        from .contrastive import ContrastiveConfig, zero_shot_report

        clip, p = model.clip.eval(), self.prompts
        text = {k: self._encode(clip, tokenize(v)) for k, v in p.eval.items()}
        text["joint"] = torch.cat([text["color_shape"], text["stuff"]])
        out: dict[str, Any] = {}
        for split in ("eval_crops", "eval_scenes"):
            images, frozen, labels = self.pool[split]
            emb = torch.cat([frozen[i:i + 256] + clip.visual.conv_branch(images[i:i + 256].float())
                             for i in range(0, len(images), 256)])
            emb = F.normalize(emb, dim=-1)
            t = _targets(labels, p.num_shapes, len(p.eval["color_shape"]))
            for k in ("shape", "color", "color_shape", "stuff", "joint"):
                ok = t[k] >= 0
                if ok.any():
                    hit = (emb[ok] @ text[k].t()).argmax(-1) == t[k][ok]
                    out[f"{split[5:]}_{k}_acc"] = 100.0 * hit.float().mean().item()
        shapes = text["shape"]
        out["shape_text_cosine"] = (shapes @ shapes.t())[~torch.eye(p.num_shapes, dtype=torch.bool)].mean().item()
        kept = (self._encode(clip, self.keep_tokens) * self.keep_reference).sum(-1)
        out["kept_prompt_cosine_min"] = kept.min().item()  # prompts without shape words vs the initial CLIP
        report = zero_shot_report(clip, ContrastiveConfig(image_resolution=clip.visual.input_resolution),
                                  num_samples=self.config.eval_scene_samples)
        out.update({f"zero_shot_{k}_acc": r["accuracy"] for k, r in report.items()})
        model.train()
        return out, {**out, "zero_shot_report": report}

    def save_final(self, model, out, step, metrics) -> Path:
        from ..clip.load import save_state_dict

        return save_state_dict(model.clip, out / "clip_shapes.safetensors")


class _PoolItems(torch.utils.data.Dataset):
    def __init__(self, pool: dict) -> None:
        self.pool = pool

    def __getitem__(self, key: tuple[str, int]):
        images, frozen, labels = self.pool[key[0]]
        return images[key[1]].float(), frozen[key[1]], labels[key[1]]


def _collate(items):
    return tuple(torch.stack(parts) for parts in zip(*items))


class _PoolBatches(torch.utils.data.Sampler):
    """Step ``k``'s batch: crops and scenes drawn with a generator seeded by (seed, k), so resume is exact."""

    def __init__(self, start_step: int, cfg: ShapeTuningConfig, num_crops: int, num_scenes: int) -> None:
        self.start, self.cfg, self.sizes = start_step, cfg, (num_crops, num_scenes)

    def __iter__(self):
        step = self.start
        while True:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
            crops = torch.randint(0, self.sizes[0], (self.cfg.batch_crops,), generator=g).tolist()
            scenes = torch.randint(0, self.sizes[1], (self.cfg.batch_scenes,), generator=g).tolist()
            yield [("crops", i) for i in crops] + [("scenes", i) for i in scenes]
            step += 1
