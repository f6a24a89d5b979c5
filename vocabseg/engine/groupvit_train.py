"""Image–caption training of GroupViT on the generated world, and its zero-shot segmentation score there.

GroupViT learns from captions only: every step sees a batch of world scenes, their captions, and K = 3 prompted
nouns per caption ("a photo of a {noun}."). The nouns come from the world's synonym tables
(:func:`vocabseg.data.world.parse_caption`): object categories and stuff classes mentioned in the caption, in their
canonical names ("disc" -> "circle", "lawn" -> "grass"); like the release, a caption with fewer than K nouns is
padded with the caption itself. Losses: image-text contrastive + multi-label contrastive
(:mod:`vocabseg.losses.contrastive`).

The data pipeline is the CLIP one of :mod:`vocabseg.engine.contrastive` (``WorldPairs``: item i is a pure function
of (seed, i); ``StepBatches``: step k reads items k·B .. so a resumed run sees the same data as an uninterrupted
one; its cosine schedule), so both trainings read the same kind of world samples. :class:`GroupViTFamily` is what
GroupViT plugs into the shared loop (``loop.py``).

    vocabseg train configs/groupvit_tiny_world.yaml   (rerun to resume; train-groupvit is the same)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from ..clip.tokenizer import tokenize
from ..errors import ConfigError
from .contrastive import ContrastiveConfig, WorldCaptionFamily, WorldPairs
from .loop import run_family

__all__ = ["GroupViTTrainConfig", "caption_nouns", "prompted_nouns", "WorldCaptionNouns", "train_groupvit",
           "load_groupvit_train_config", "evaluate_world_zero_shot", "build_groupvit", "GroupViTFamily"]

NOUN_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


# ----------------------------------------------------------------------------------------------- nouns


def caption_nouns(caption: str) -> list[str]:
    """Canonical object categories and stuff classes named in a world caption, first mention first.

    Generic mentions ("four shapes") carry no category and are skipped.
    """
    from ..data.world import parse_caption

    mentions, stuff = parse_caption(caption)
    nouns = [m.category for m in mentions if m.category is not None] + list(stuff)
    return list(dict.fromkeys(nouns))


def prompted_nouns(caption: str, k: int = 3, rng: np.random.Generator | None = None,
                   templates: Sequence[str] = NOUN_TEMPLATES) -> list[str]:
    """K texts for the multi-label loss: up to K distinct nouns of the caption drawn at random, each put in a
    random template; padded with the caption itself when it names fewer than K (the release's rule)."""
    rng = rng if rng is not None else np.random.default_rng()
    nouns = caption_nouns(caption)
    chosen = [nouns[i] for i in rng.choice(len(nouns), size=min(k, len(nouns)), replace=False)] if nouns else []
    texts = [templates[int(rng.integers(len(templates)))].format(n) for n in chosen]
    return texts + [caption] * (k - len(texts))


# ----------------------------------------------------------------------------------------------- config


@dataclass
class GroupViTTrainConfig:
    output_dir: str = "runs/groupvit_world"
    seed: int = 0
    # model: a registered GroupViT and overrides of its config fields (``text`` as a dict of text-tower fields)
    model: str = "groupvit_vit_s"
    model_overrides: dict = field(default_factory=dict)
    image_resolution: int = 96  # world scenes are squashed to this square size
    multi_label: int = 3  # prompted nouns per caption; 0 turns the multi-label loss off
    multi_label_weight: float = 1.0
    noun_templates: Any = "simple"  # a template-set name of vocabseg.clip.vocabulary or a list of "{}" strings
    # optimisation (release: AdamW, lr 1.6e-3 for batch 4096, wd 0.05, cosine, warm-up, grad clip 5)
    batch_size: int = 64
    max_iters: int = 2000
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_iters: int = 100
    clip_grad: float = 5.0
    checkpoint_every: int = 100
    log_every: int = 20
    num_workers: int = 1
    # data: world scenes (same fields as vocabseg.engine.contrastive.ContrastiveConfig)
    world_min_size: int = 96
    world_max_size: int = 160
    world_max_objects: int = 3
    single_object_prob: float = 0.4
    world_overrides: dict = field(default_factory=dict)
    # zero-shot evaluation (held-out seeds) at the end and every eval_every steps; eval_samples 0: none
    eval_samples: int = 100
    eval_scheme: Any = "category"
    eval_every: int = 0
    # run (the shared loop's settings)
    keep_checkpoints: int = 2  # numbered checkpoints kept; 0: all
    resume: Union[bool, str] = "auto"  # auto: continue from the newest checkpoint in output_dir, if any
    device: str = "cpu"


def data_config(cfg: GroupViTTrainConfig) -> ContrastiveConfig:
    """The CLIP trainer's data fields, filled from ours (its WorldPairs reads only these)."""
    return ContrastiveConfig(output_dir=cfg.output_dir, seed=cfg.seed, image_resolution=cfg.image_resolution,
                             world_min_size=cfg.world_min_size, world_max_size=cfg.world_max_size,
                             world_max_objects=cfg.world_max_objects, single_object_prob=cfg.single_object_prob,
                             world_overrides=dict(cfg.world_overrides))


def build_groupvit(cfg: GroupViTTrainConfig):
    """A fresh GroupViT of ``cfg`` with every parameter trainable."""
    from ..models import create_model, get_entry
    from ..models import groupvit as _registers  # noqa: F401  (until vocabseg.models imports it)

    if get_entry(cfg.model).family != "groupvit":
        raise ConfigError(f"model {cfg.model!r} is not a GroupViT; use groupvit_vit_s with model_overrides")
    model = create_model(cfg.model, **cfg.model_overrides)
    model.unfreeze_all()
    return model


# ----------------------------------------------------------------------------------------------- data


class WorldCaptionNouns(torch.utils.data.Dataset):
    """Item i = (image tensor (CLIP-normalised), caption, K prompted nouns); a pure function of (seed, i)."""

    def __init__(self, cfg: GroupViTTrainConfig):
        from ..clip.vocabulary import resolve_templates

        self.pairs = WorldPairs(data_config(cfg))
        self.k = cfg.multi_label
        self.seed = cfg.seed
        self.templates = resolve_templates(cfg.noun_templates)[1]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, list[str]]:
        image, caption = self.pairs[index]
        rng = np.random.default_rng([self.seed, int(index), 0x6e6f756e])
        return image, caption, prompted_nouns(caption, self.k, rng, self.templates)


def collate_caption_nouns(items) -> dict[str, torch.Tensor]:
    """-> images [B, 3, S, S], caption ids [B, 77], noun ids [B, K, 77] (None when K = 0)."""
    images = torch.stack([i[0] for i in items])
    captions = tokenize([i[1] for i in items])
    k = len(items[0][2])
    nouns = tokenize([n for i in items for n in i[2]]).view(len(items), k, -1) if k else None
    return {"images": images, "captions": captions, "nouns": nouns}


def to_model_pixels(clip_normalised: torch.Tensor, model) -> torch.Tensor:
    """CLIP-normalised images (WorldPairs) -> the model's own normalisation (e.g. ImageNet's for the release)."""
    from ..clip.model import OPENAI_MEAN, OPENAI_STD

    mean = torch.tensor(OPENAI_MEAN, device=clip_normalised.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=clip_normalised.device).view(1, 3, 1, 1)
    rgb255 = (clip_normalised * std + mean) * 255.0
    return model.normalize_pixels(rgb255)


# ----------------------------------------------------------------------------------------------- training


def _param_groups(model, weight_decay: float) -> list[dict]:
    """No decay for 1-d tensors (norms, biases, logit scales), embeddings and group tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embed" in name or "group_token" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class GroupViTFamily(WorldCaptionFamily):
    """GroupViT from scratch on world captions: image-text + multi-label contrastive losses, zero-shot mIoU."""

    name = "groupvit"
    config_cls = GroupViTTrainConfig
    identity_keys = ("model", "model_overrides", "image_resolution", "multi_label", "noun_templates", "seed",
                     "batch_size")

    def describe(self, info, start: int) -> str:
        return (f"training {self.config.model} on world captions: batch {self.config.batch_size}, steps "
                f"{start}..{self.config.max_iters}, device {info.device}")

    def build_model(self, device):
        from ..losses.contrastive import GroupViTLoss

        if self.config.multi_label < 0:
            raise ConfigError(f"multi_label must be >= 0, got {self.config.multi_label}")
        self.criterion = GroupViTLoss(self.config.multi_label_weight)
        return build_groupvit(self.config).to(device).train()

    def optimizer(self, model) -> torch.optim.Optimizer:
        return torch.optim.AdamW(_param_groups(model, self.config.weight_decay), lr=self.config.lr,
                                 betas=(0.9, 0.999), eps=1e-8)

    def dataset(self, model):
        return WorldCaptionNouns(self.config)

    def collate(self, model):
        return collate_caption_nouns

    def losses(self, net, model, batch, step, device, amp):
        images = to_model_pixels(batch["images"].to(device), model)
        nouns = batch["nouns"].to(device) if batch["nouns"] is not None else None
        with amp():
            outputs = model.contrastive_outputs(images, batch["captions"].to(device), nouns)
        losses = self.criterion(outputs)
        return {**losses, "total_loss": self.criterion.weighted_total(losses)}

    def evaluate(self, model, step, progress):
        """Zero-shot mIoU on held-out scenes and how well the groups follow the objects (:func:`grouping_report`)."""
        from ..data.world import WorldConfig, WorldDataset

        cfg = self.config
        world = {"min_size": cfg.world_min_size, "max_size": cfg.world_max_size,
                 "max_objects": cfg.world_max_objects, **cfg.world_overrides}
        report = evaluate_world_zero_shot(model, cfg.eval_samples, scheme=cfg.eval_scheme, world=world)
        held_out = WorldDataset(cfg.eval_samples, seed=ZERO_SHOT_SEED, config=WorldConfig(**world),
                                scheme=cfg.eval_scheme)
        report["grouping"] = g = grouping_report(model, held_out)
        line = {"mIoU": report["mIoU"], "pACC": report["pACC"], "oracle_mIoU": g["oracle_mIoU"],
                "groups_per_image": g["groups_per_image"]}
        return line, report

    def save_final(self, model, out, step, metrics) -> Path:
        if metrics:
            (out / "zero_shot.json").write_text(json.dumps(metrics, indent=2))
        return save_groupvit(model, self.config, out)


def train_groupvit(cfg: GroupViTTrainConfig, resume: bool = True, log=print) -> Path:
    """Train (or continue) GroupViT on world captions; returns ``groupvit.safetensors`` in ``output_dir``, loadable
    with ``vocabseg.load_model(cfg.model, checkpoint=..., **cfg.model_overrides)`` (``model.json`` records both).
    The zero-shot report of the end goes to ``zero_shot.json``."""
    if not resume:
        cfg = dataclasses.replace(cfg, resume=False)
    return Path(run_family(GroupViTFamily(cfg), log=log)["final_weights"])


def save_groupvit(model, cfg: GroupViTTrainConfig, out: Path) -> Path:
    """Write ``groupvit.safetensors`` and ``model.json`` atomically (a model memory-mapped from an older file keeps
    reading that file, never a half-written one)."""
    from safetensors.torch import save

    from .checkpoint import atomic_write, atomic_write_text

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    final = atomic_write(out / "groupvit.safetensors", lambda f: f.write(save(state)))
    atomic_write_text(out / "model.json", json.dumps({"model": cfg.model, "model_overrides": cfg.model_overrides},
                                                     indent=2))
    return final


# ----------------------------------------------------------------------------------------------- evaluation


ZERO_SHOT_SEED = 20_000_003  # held-out world scenes (training pairs come from other seeds)


@torch.inference_mode()
def evaluate_world_zero_shot(model, num_samples: int = 100, seed: int = ZERO_SHOT_SEED, scheme: Any = "category",
                             world: dict | None = None) -> dict:
    """Zero-shot mIoU of a GroupViT (any segmentation model with ``predict``) on held-out world scenes, classes of
    ``scheme`` (vocabseg.data.world.class_names), with :class:`vocabseg.metrics.ConfusionMatrix`."""
    from ..data.world import WorldConfig, WorldDataset
    from ..metrics import ConfusionMatrix
    from ..predict import Predictor

    ds = WorldDataset(num_samples, seed=seed, config=WorldConfig(**(world or {})), scheme=scheme)
    predictor = Predictor(model)
    text = predictor.text_embeddings(ds.class_names)
    cm = ConfusionMatrix(len(ds.class_names), ignore_index=ds.vocabulary.ignore_index)
    for item in ds:
        seg = predictor.predict_array(item["image"], ds.class_names, text)
        cm.update(seg.labels, item["label"])
    result = cm.compute()
    return {"mIoU": result["mIoU"], "pACC": result["pACC"], "classes": ds.class_names, "IoU": result["IoU"],
            "num_samples": num_samples}


@torch.inference_mode()
def grouping_report(model, dataset, hard: bool = False) -> dict:
    """How well a GroupViT's final groups fit the true segments, independent of naming them: every group takes the
    majority true class of its pixels (an oracle namer) and that label map is scored (``oracle_mIoU``, ``oracle_IoU``
    per class); ``groups_per_image`` is the mean number of distinct final groups that own a pixel. ``hard``
    composes the stages' hard assignments instead of the soft ones zero-shot inference uses.

    Separates the two ways zero-shot segmentation fails: groups that do not follow the objects (low oracle score,
    few groups) vs groups that do but get the wrong name (oracle score far above the zero-shot one)."""
    from ..metrics import ConfusionMatrix

    names = dataset.class_names
    cm = ConfusionMatrix(len(names), ignore_index=dataset.vocabulary.ignore_index)
    counts = []
    for item in dataset:
        rgb = np.ascontiguousarray(np.asarray(item["image"]))
        if rgb.ndim == 3 and rgb.shape[0] == 3 and rgb.shape[-1] != 3:
            rgb = np.ascontiguousarray(rgb.transpose(1, 2, 0))
        label = np.asarray(item["label"], np.int64)
        pixels, (h, w) = model.prepare(rgb)
        _, _, assignments, grid = model.encode_image(pixels, with_groups=True)
        if hard:
            assignments = [(a, a) for a, _ in assignments]
        groups = model.pixel_groups(assignments, grid, tuple(pixels.shape[-2:]))[:, None, :h, :w].float()
        groups = torch.nn.functional.interpolate(groups, size=label.shape, mode="nearest")[0, 0].long().cpu().numpy()
        valid = label != dataset.vocabulary.ignore_index
        oracle = np.zeros_like(label)
        for g in np.unique(groups):
            inside = groups == g
            votes = np.bincount(label[inside & valid], minlength=len(names))
            oracle[inside] = int(votes.argmax())
        counts.append(len(np.unique(groups[valid])) if valid.any() else 0)
        cm.update(oracle, label)
    result = cm.compute()
    return {"oracle_mIoU": result["mIoU"], "oracle_IoU": result["IoU"], "groups_per_image": float(np.mean(counts)),
            "num_groups": int(model.config.num_output_groups[-1]), "hard": hard}


# ----------------------------------------------------------------------------------------------- config files


def load_groupvit_train_config(path: str | Path, overrides: Sequence[str] = ()) -> GroupViTTrainConfig:
    """Read a YAML of GroupViTTrainConfig fields, then ``key=value`` overrides; unknown keys are errors."""
    from .config import load_flat_config

    return load_flat_config(GroupViTTrainConfig, path, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vocabseg.engine.groupvit_train CONFIG [key=value ...] [--eval-only]``"""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    eval_only = "--eval-only" in args
    args = [a for a in args if a != "--eval-only"]
    if not args:
        print(main.__doc__)
        return 2
    cfg = load_groupvit_train_config(args[0], args[1:])
    if not eval_only:
        train_groupvit(cfg)
    elif cfg.eval_samples:
        from ..models import groupvit as _registers  # noqa: F401
        from ..models import load_model

        path = Path(cfg.output_dir) / "groupvit.safetensors"
        model = load_model(cfg.model, checkpoint=path, **cfg.model_overrides)
        line, report = GroupViTFamily(cfg).evaluate(model, cfg.max_iters, False)
        print(json.dumps(line))
        (Path(cfg.output_dir) / "zero_shot.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
