"""Contrastive (CLIP-style) training of a small CLIP on the generated world's image–caption pairs.

This is how the embedded default gets a CLIP at all: nothing can be downloaded, so the project trains one on
procedurally generated scenes whose captions name shapes, colours, textures and stuff with varied phrasing. The
result is saved in OpenAI's state-dict layout (safetensors), so ``vocabseg.clip.load`` reads it like any CLIP.

:class:`ClipFamily` is what CLIP training plugs into the shared loop (``loop.py``: checkpoints every
``checkpoint_every`` steps, resume, logging, evaluation). The data of step ``k`` is a pure function of (seed, k), so
a resumed run sees exactly the samples an uninterrupted run would; rerunning the command resumes.

``text_tower: minilm`` trains a LiT variant instead (:class:`vocabseg.clip.sentence.LiTCLIP`): the text tower is the
pretrained all-MiniLM-L6-v2 sentence encoder, frozen (captions tokenised with its WordPiece tokenizer), and only the
image tower and the logit scale learn, so words the captions never use still mean something. It writes
``lit_clip.safetensors`` (image tower + logit scale; read it with :func:`load_lit`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..clip.model import CLIP, CLIPConfig, OPENAI_MEAN, OPENAI_STD
from ..clip.sentence import LIT_TEXT_TOWER, LiTCLIP, LiTConfig, load_lit, save_lit  # noqa: F401 (load_lit re-exported)
from ..clip.tokenizer import tokenize
from .loop import Family, RunSpec, run_family

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
    eval_samples: int = 300  # zero-shot report (held-out single-object scenes) at the end; 0: none
    # run (the shared loop's settings)
    eval_every: int = 0  # 0: evaluate only at the end
    keep_checkpoints: int = 2  # numbered checkpoints kept; 0: all
    clip_grad: float = 1.0
    resume: Union[bool, str] = "auto"  # auto: continue from the newest checkpoint in output_dir, if any
    device: str = "cpu"


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


def cosine_factor(step: int, warmup_iters: int, max_iters: int) -> float:
    """Linear warm-up to 1 over ``warmup_iters`` steps, then cosine decay to 0 at ``max_iters``."""
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    progress = (step - warmup_iters) / max(1, max_iters - warmup_iters)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_at(cfg, step: int) -> float:
    return cfg.lr * cosine_factor(step, cfg.warmup_iters, cfg.max_iters)


class StepBatches(torch.utils.data.Sampler):
    """Batch ``k`` is items ``k·B .. (k+1)·B - 1``: the data of a step depends only on its number (exact resume)."""

    def __init__(self, start_step: int, batch_size: int):
        self.start, self.batch = start_step, batch_size

    def __iter__(self):
        step = self.start
        while True:
            yield list(range(step * self.batch, (step + 1) * self.batch))
            step += 1


class WorldCaptionFamily(Family):
    """What the two image-caption trainings on world scenes share (CLIP and GroupViT): their run fields, the
    warm-up + cosine schedule, step ``k`` reading items ``k·B ..``, the logit scale in the log, the end-of-run
    evaluation on ``eval_samples`` held-out scenes."""

    def spec(self) -> RunSpec:
        c = self.config
        return RunSpec(output_dir=c.output_dir, seed=c.seed, max_iters=c.max_iters,
                       stop_at=getattr(c, "stop_after", None), log_every=c.log_every,
                       checkpoint_every=c.checkpoint_every, eval_every=c.eval_every,
                       keep_checkpoints=c.keep_checkpoints, clip_grad=c.clip_grad, device=c.device, resume=c.resume,
                       num_workers=c.num_workers, progress=False)

    def lr_factor(self, step: int) -> float:
        return cosine_factor(step, self.config.warmup_iters, self.config.max_iters)

    def batch_sampler(self, start_step: int, info):
        return StepBatches(start_step, self.config.batch_size)

    def log_extras(self, model) -> dict[str, float]:
        return {"logit_scale": float(model.logit_scale.detach().exp())}

    def has_eval(self) -> bool:
        return self.config.eval_samples > 0


class ClipFamily(WorldCaptionFamily):
    """A small CLIP (or LiT: frozen MiniLM text tower) learning from world scenes and their captions."""

    name = "clip"
    config_cls = ContrastiveConfig
    identity_keys = ("seed", "image_resolution", "patch_size", "vision_width", "vision_layers", "text_width",
                     "text_layers", "embed_dim", "text_tower", "batch_size")

    def describe(self, info, start: int) -> str:
        c = self.config
        return (f"training a CLIP ({c.text_tower} text tower) on world captions: batch {c.batch_size}, steps "
                f"{start}..{self.spec().last_step} of {c.max_iters}, device {info.device}")

    def build_model(self, device):
        if self.config.text_tower not in TEXT_TOWERS:
            from ..errors import ConfigError

            raise ConfigError(f"unknown text_tower {self.config.text_tower!r}; use one of {', '.join(TEXT_TOWERS)}")
        model = build_model(self.config).to(device).train()
        self.labels = torch.arange(self.config.batch_size, device=device)
        return model

    def optimizer(self, model) -> torch.optim.Optimizer:
        # A LiTCLIP's frozen text tower is not among its parameters; the filter keeps any other frozen tensor out too.
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.config.lr, betas=(0.9, 0.98),
                                 eps=1e-6)

    def dataset(self, model):
        return WorldPairs(self.config)

    def collate(self, model):
        return _CollateWith(model.tokenizer) if isinstance(model, LiTCLIP) else _collate

    def losses(self, net, model, batch, step, device, amp):
        images, tokens = batch
        with amp():
            logits, _ = net(images.to(device), tokens.to(device))
        logits = logits.float()
        target = self.labels[: logits.shape[0]]
        return {"total_loss": (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2}

    def after_step(self, model) -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    def evaluate(self, model, step, progress):
        report = zero_shot_report(model, self.config)
        return {f"{task}_acc": r["accuracy"] for task, r in report.items()}, report

    def save_final(self, model, out, step, metrics) -> Path:
        from ..clip.load import save_state_dict

        if isinstance(model, LiTCLIP):
            return save_lit(model, out / "lit_clip.safetensors")
        final = out / "tiny_clip.safetensors"
        save_state_dict(model, final)
        return final


def train_clip(cfg: ContrastiveConfig, resume: bool = True, log=print) -> Path:
    """Train (or continue training) the small CLIP; returns the path of the final safetensors: OpenAI-layout
    ``tiny_clip.safetensors``, or ``lit_clip.safetensors`` (image tower + logit scale) with ``text_tower: minilm``.
    ``resume=False`` starts afresh (refused when output_dir already holds checkpoints)."""
    if not resume:
        cfg = dataclasses.replace(cfg, resume=False)
    return Path(run_family(ClipFamily(cfg), log=log)["final_weights"])


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
