"""Contrastive (CLIP-style) training of a small CLIP on the generated world's image–caption pairs.

This is how the embedded default gets a CLIP at all: nothing can be downloaded, so the project trains one on
procedurally generated scenes whose captions name shapes, colours, textures and stuff with varied phrasing. The
result is saved in OpenAI's state-dict layout (safetensors), so ``vocabseg.clip.load`` reads it like any CLIP.

Resumable: a run writes ``last.pt`` atomically every ``checkpoint_every`` steps; the data of step ``k`` is a pure
function of (seed, k), so a resumed run sees exactly the samples an uninterrupted run would.

``text_tower: minilm`` trains a LiT variant instead (:class:`vocabseg.clip.sentence.LiTCLIP`): the text tower is the
pretrained all-MiniLM-L6-v2 sentence encoder, frozen (captions tokenised with its WordPiece tokenizer), and only the
image tower and the logit scale learn, so words the captions never use still mean something. It writes
``lit_clip.safetensors`` (image tower + logit scale; read it with :func:`load_lit`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..clip.model import CLIP, CLIPConfig, OPENAI_MEAN, OPENAI_STD
from ..clip.sentence import LIT_TEXT_TOWER, LiTCLIP, LiTConfig, load_lit, save_lit  # noqa: F401 (load_lit re-exported)
from ..clip.tokenizer import tokenize

TEXT_TOWERS = ("clip", LIT_TEXT_TOWER)


@dataclass
class ContrastiveConfig:
    output_dir: str = "runs/tiny_clip"
    seed: int = 0
    # model
    image_resolution: int = 96
    patch_size: int = 8
    vision_width: int = 192
    vision_layers: int = 6
    text_width: int = 128
    text_layers: int = 4
    embed_dim: int = 128
    # "clip": train our own text transformer too; "minilm": frozen pretrained MiniLM text tower (LiT; embed_dim 384)
    text_tower: str = "clip"
    # optimisation
    batch_size: int = 64
    max_iters: int = 1800  # length of the LR schedule
    stop_after: int | None = None  # end the run at this step (schedule unchanged); a later stage resumes from it
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_iters: int = 100
    checkpoint_every: int = 100
    log_every: int = 20
    num_workers: int = 1
    # data: world scenes generated at this size range (squashed to image_resolution)
    world_min_size: int = 96
    world_max_size: int = 160
    world_max_objects: int = 3
    single_object_prob: float = 0.4
    # Hard negatives: with this probability a group of ``group_size`` consecutive samples (inside one batch) shows
    # single objects that share colour and background, so only the shape tells their captions apart.
    hard_negative_groups: float = 0.0
    group_size: int = 8
    world_overrides: dict = field(default_factory=dict)
    eval_samples: int = 300


def clip_config(cfg: ContrastiveConfig) -> CLIPConfig:
    return CLIPConfig(embed_dim=cfg.embed_dim, image_resolution=cfg.image_resolution, vision_layers=cfg.vision_layers,
                      vision_width=cfg.vision_width, vision_patch_size=cfg.patch_size, context_length=77,
                      vocab_size=49408, transformer_width=cfg.text_width, transformer_heads=max(1, cfg.text_width // 64),
                      transformer_layers=cfg.text_layers)


def lit_config(cfg: ContrastiveConfig) -> LiTConfig:
    """The LiT model of ``cfg``: the same image tower, MiniLM as the text tower (text_* fields unused)."""
    return LiTConfig(embed_dim=cfg.embed_dim, image_resolution=cfg.image_resolution, vision_layers=cfg.vision_layers,
                     vision_width=cfg.vision_width, vision_patch_size=cfg.patch_size)


def build_model(cfg: ContrastiveConfig) -> CLIP | LiTCLIP:
    """A fresh model for ``cfg.text_tower``: a whole CLIP, or a LiTCLIP whose text tower is frozen MiniLM."""
    from ..errors import ConfigError

    if cfg.text_tower == "clip":
        return CLIP(clip_config(cfg))
    if cfg.text_tower == LIT_TEXT_TOWER:
        return LiTCLIP(lit_config(cfg))
    raise ConfigError(f"unknown text_tower {cfg.text_tower!r}; use one of {', '.join(TEXT_TOWERS)}")


def to_clip_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """H×W×3 uint8 -> normalised [3, size, size] (squashed, not cropped: captions name objects near the edges)."""
    img = Image.fromarray(image).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (x - mean) / std


class WorldPairs(torch.utils.data.Dataset):
    """Item ``i`` = (image tensor, caption) of world scene ``i``; a pure function of (seed, i)."""

    def __init__(self, cfg: ContrastiveConfig, seed_offset: int = 0):
        from ..data.world import WorldConfig

        self.cfg = cfg
        self.seed_offset = seed_offset
        base = dict(min_size=cfg.world_min_size, max_size=cfg.world_max_size, max_objects=cfg.world_max_objects)
        base.update({k: tuple(v) if isinstance(v, list) else v for k, v in cfg.world_overrides.items()})
        self.world = WorldConfig(**base)
        self.single = dataclasses.replace(self.world, max_objects=1)

    def __len__(self) -> int:
        return 2 ** 31 - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        from ..data.world import generate_sample, sample_seed

        seed = sample_seed(self.cfg.seed + self.seed_offset, index)
        rng = np.random.default_rng(seed)
        config = self.single if rng.random() < self.cfg.single_object_prob else self.world
        if self.cfg.hard_negative_groups > 0:
            group_rng = np.random.default_rng(sample_seed(self.cfg.seed + self.seed_offset + 1,
                                                          index // self.cfg.group_size))
            if group_rng.random() < self.cfg.hard_negative_groups:
                color = self.world.colors[int(group_rng.integers(len(self.world.colors)))]
                stuff = [s for s in self.world.stuff if s != "sky"]  # sky-only scenes put objects on the horizon
                config = dataclasses.replace(self.single, colors=(color,),
                                             stuff=(stuff[int(group_rng.integers(len(stuff)))],))
        sample = generate_sample(seed, config)
        caption = sample.captions[int(rng.integers(len(sample.captions)))]
        return to_clip_tensor(sample.image, self.cfg.image_resolution), caption


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # data workers only render scenes; leave the cores to the training step


def _collate(items):
    images = torch.stack([i[0] for i in items])
    return images, tokenize([i[1] for i in items])


class _CollateWith:
    """Collate with a model's own tokenizer (a picklable object, so it also works in worker processes)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items):
        images = torch.stack([i[0] for i in items])
        return images, self.tokenizer([i[1] for i in items])


def lr_at(cfg: ContrastiveConfig, step: int) -> float:
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _last_step(cfg: ContrastiveConfig) -> int:
    return min(cfg.max_iters, cfg.stop_after) if cfg.stop_after else cfg.max_iters


class _StepSampler(torch.utils.data.Sampler):
    """Indices step*batch .. : the data of a step depends only on the step number (exact resume)."""

    def __init__(self, start_step: int, max_iters: int, batch_size: int):
        self.start, self.stop, self.batch = start_step, max_iters, batch_size

    def __iter__(self):
        return iter(range(self.start * self.batch, self.stop * self.batch))

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch


def train_clip(cfg: ContrastiveConfig, resume: bool = True, log=print) -> Path:
    """Train (or continue training) the small CLIP; returns the path of the final safetensors: OpenAI-layout
    ``tiny_clip.safetensors``, or ``lit_clip.safetensors`` (image tower + logit scale) with ``text_tower: minilm``."""
    from ..clip.load import save_state_dict
    from ..errors import ConfigError

    if cfg.text_tower not in TEXT_TOWERS:
        raise ConfigError(f"unknown text_tower {cfg.text_tower!r}; use one of {', '.join(TEXT_TOWERS)}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    # A LiTCLIP's frozen text tower is not among its parameters; the filter keeps any other frozen tensor out too.
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    step = 0
    ckpt = out / "last.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log(f"resumed from {ckpt} at step {step}")
    loader = torch.utils.data.DataLoader(
        WorldPairs(cfg), batch_size=cfg.batch_size, sampler=_StepSampler(step, _last_step(cfg), cfg.batch_size),
        num_workers=cfg.num_workers,
        collate_fn=_CollateWith(model.tokenizer) if isinstance(model, LiTCLIP) else _collate,
        worker_init_fn=_worker_init, persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
    model.train()
    labels = torch.arange(cfg.batch_size)
    t_last, losses = time.perf_counter(), []
    with open(out / "metrics.jsonl", "a") as logf:
        for images, tokens in loader:
            if step >= _last_step(cfg):
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            logits, _ = model(images, tokens)
            target = labels[: logits.shape[0]]
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            losses.append(loss.item())
            if step % cfg.log_every == 0:
                dt = time.perf_counter() - t_last
                t_last = time.perf_counter()
                rec = {"step": step, "loss": float(np.mean(losses)), "lr": lr_at(cfg, step - 1),
                       "logit_scale": float(model.logit_scale.detach().exp()), "img_per_s": cfg.log_every * cfg.batch_size / dt}
                losses = []
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log(json.dumps(rec))
            if step % cfg.checkpoint_every == 0 or step == _last_step(cfg):
                _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, ckpt)
    model.eval()
    if isinstance(model, LiTCLIP):
        return save_lit(model, out / "lit_clip.safetensors")
    final = out / "tiny_clip.safetensors"
    save_state_dict(model, final)
    return final


@torch.inference_mode()
def zero_shot_report(model: CLIP | LiTCLIP, cfg: ContrastiveConfig, num_samples: int | None = None,
                     seed: int = 10_000_019) -> dict:
    """Zero-shot accuracy on held-out single-object scenes (seeds disjoint from training): shape, colour, stuff.

    Scenes use the world's full size range (small objects included), whatever the training overrides were, so
    reports of different runs compare.
    """
    from ..clip.vocabulary import encode_vocabulary
    from ..data.world import COLORS, OBJECT_CATEGORIES, STUFF_CLASSES, WorldConfig, generate_sample, sample_seed

    n = num_samples or cfg.eval_samples
    world = WorldConfig(min_size=cfg.world_min_size, max_size=cfg.world_max_size, max_objects=1, min_objects=1)
    tasks = {
        "shape": (list(OBJECT_CATEGORIES), [f"a photo of a {c}" for c in OBJECT_CATEGORIES]),
        "color": (list(COLORS), [f"a {c} shape" for c in COLORS]),
        "color+shape": ([f"{c} {s}" for c in COLORS for s in OBJECT_CATEGORIES],
                        [f"a {c} {s}" for c in COLORS for s in OBJECT_CATEGORIES]),
        "stuff": (list(STUFF_CLASSES), [f"a photo of {s}" for s in STUFF_CLASSES]),
    }
    text = {k: encode_vocabulary(model, prompts, templates="none", cache=False) for k, (_, prompts) in tasks.items()}
    correct = {k: 0 for k in tasks}
    total = {k: 0 for k in tasks}
    images, truths = [], []
    for i in range(n):
        s = generate_sample(sample_seed(seed, i), world)
        if not s.objects:
            continue
        o = max(s.objects, key=lambda r: r.area)
        main_stuff = max(s.stuff, key=lambda r: r.area).name
        images.append(to_clip_tensor(s.image, cfg.image_resolution))
        truths.append({"shape": o.category, "color": o.color, "color+shape": f"{o.color} {o.category}",
                       "stuff": main_stuff})
    for start in range(0, len(images), 64):
        emb = F.normalize(model.encode_image(torch.stack(images[start:start + 64])), dim=-1)
        for k, (names, _) in tasks.items():
            pred = (emb @ text[k].t()).argmax(-1)
            for j, p in enumerate(pred.tolist()):
                truth = truths[start + j][k]
                correct[k] += int(names[p] == truth)
                total[k] += 1
    chance = {k: 100.0 / len(tasks[k][0]) for k in tasks}
    return {k: {"accuracy": 100.0 * correct[k] / max(1, total[k]), "chance": chance[k], "n": total[k]} for k in tasks}


def load_contrastive_config(path: str | Path, overrides: list[str] = ()) -> ContrastiveConfig:
    """Read a YAML of ContrastiveConfig fields, then apply ``key=value`` overrides; unknown keys are errors."""
    from .config import load_flat_config

    return load_flat_config(ContrastiveConfig, path, overrides)
