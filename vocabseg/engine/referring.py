"""Training and evaluating referring-segmentation models (ETRIS): ``train_referring(config)``,
``evaluate_referring(model, dataset)``.

A referring model takes (image, sentence) pairs and predicts one mask; :class:`ReferringFamily` is what it plugs
into the shared loop (``loop.py``: checkpoints, resume, logging, evaluation). ``model_final.safetensors`` +
``model_final.json`` load with ``vocabseg.load_model(name, checkpoint=...)``.

The recipe (paper, ``configs/etris_vit_b_16_refcoco.yaml``): Adam, lr 1e-4 (Bridgers 1e-3), no weight decay,
×0.1 after epoch 35 of 50, batch 32, images letterboxed to 416 px, BCE at 1/4 resolution. Epochs are converted to
optimizer steps (``floor(items / batch)`` per epoch). The data order is a pure function of (seed, epoch): batch b of
epoch e is ``permutation(seed, e)[b·B:(b+1)·B]``, and a ref's sentence for epoch e is drawn from (seed, e, index),
so a resumed run continues exactly where it stopped without storing sampler state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import CheckpointError, ConfigError
from ..metrics import ReferringMeter
from . import checkpoint as ckpt
from .loop import Family, RunSpec, run_family

__all__ = ["ReferringTrainConfig", "load_referring_config", "train_referring", "evaluate_referring",
           "build_referring_dataset", "referring_lr_factor", "ReferringFamily"]


# ----------------------------------------------------------------------------------------------- config


@dataclass
class ReferringTrainConfig:
    """Everything a referring training run needs; defaults follow the ETRIS paper (ViT-B/16, RefCOCO)."""

    model: str = "etris_vit_b_16_gated"  # etris_vit_b_16 is the release architecture (inference only)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    clip: str | None = None  # CLIP weights (OpenAI / open_clip file) for the frozen towers
    init_checkpoint: str | None = None
    trust_jit: bool = False
    # -- data
    dataset: str = "refcoco"  # refcoco | refcoco+ | refcocog | world
    data_root: str | None = None
    split_by: str | None = None  # unc (RefCOCO/+), umd or google (RefCOCOg)
    train_split: str = "train"
    val_splits: list[str] = field(default_factory=lambda: ["val"])
    val_max_items: int | None = None
    world: dict[str, Any] = field(default_factory=dict)  # num_train, num_val, seed + WorldConfig fields
    num_workers: int = 0
    # -- optimisation
    batch_size: int = 32
    epochs: float = 50.0
    max_iters: int | None = None  # overrides epochs
    milestones: list[float] = field(default_factory=lambda: [35.0])  # in epochs: lr × lr_decay after each
    lr_decay: float = 0.1
    lr: float = 1e-4
    bridger_lr: float | None = 1e-3  # paper: 1e-3 for the ViT Bridgers (null: same as lr)
    weight_decay: float = 0.0
    clip_grad: float | None = None
    dice_weight: float = 0.0  # a Dice term next to the BCE (paper: none); helps when targets cover a few % of the image
    amp: str = "none"  # none | bf16 | fp16 (fp16: CUDA only, with a GradScaler)
    # -- run
    device: str = "auto"
    seed: int = 0
    output_dir: str = "runs/etris"
    resume: bool | str = "auto"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end
    log_every: int = 20
    verbose: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_iters is not None and self.max_iters < 1:
            raise ConfigError(f"max_iters must be at least 1 (or null), got {self.max_iters}")
        if self.epochs <= 0 and self.max_iters is None:
            raise ConfigError("epochs must be positive (or give max_iters)")
        if self.lr <= 0 or (self.bridger_lr is not None and self.bridger_lr <= 0):
            raise ConfigError("lr and bridger_lr must be positive")
        if self.dice_weight < 0:
            raise ConfigError(f"dice_weight must be >= 0, got {self.dice_weight}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if not (isinstance(self.resume, bool) or self.resume == "auto"):
            raise ConfigError(f"resume must be true, false or auto, got {self.resume!r}")
        if self.dataset not in ("refcoco", "refcoco+", "refcocog", "world"):
            raise ConfigError(f"dataset must be refcoco, refcoco+, refcocog or world, got {self.dataset!r}")
        if isinstance(self.val_splits, str):
            self.val_splits = [self.val_splits]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def load_referring_config(source: ReferringTrainConfig | Mapping[str, Any] | str | os.PathLike,
                          overrides: Iterable[str] = ()) -> ReferringTrainConfig:
    """A config from a YAML file, a dict or a config, with ``key=value`` overrides (YAML values, dots for dicts).
    Values are converted to the fields' types (``lr=1e-3`` works) by the engine's shared config parser."""
    from .config import apply_overrides, dataclass_from_mapping, read_yaml_config

    if isinstance(source, ReferringTrainConfig):
        data = source.to_dict()
    elif isinstance(source, Mapping):
        data = json.loads(json.dumps(dict(source)))
    else:
        data = read_yaml_config(source)
    data = apply_overrides(data, list(overrides), ReferringTrainConfig)
    return dataclass_from_mapping(ReferringTrainConfig, data)


# ----------------------------------------------------------------------------------------------- data


def build_referring_dataset(config: ReferringTrainConfig, split: str, training: bool = False):
    """The dataset of one split: RefCOCO-family readers or the generated referring world."""
    if config.dataset == "world":
        from ..data.referring_world import REFERRING_WORLD_CONFIG, ReferringWorldDataset
        from ..data.world import WorldConfig

        w = dict(config.world)
        num_train, num_val = int(w.pop("num_train", 2000)), int(w.pop("num_val", 200))
        seed = int(w.pop("seed", 0))
        fields = {f.name for f in dataclasses.fields(WorldConfig)}
        bad = sorted(set(w) - fields)
        if bad:
            raise ConfigError(f"unknown world keys {bad}; use num_train, num_val, seed or WorldConfig fields")
        base = REFERRING_WORLD_CONFIG.to_dict()
        base.update(w)
        world_cfg = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in base.items()})
        return ReferringWorldDataset(num_train if split == "train" else num_val, split, seed, world_cfg)
    from ..data.refcoco import RefCOCODataset

    if not config.data_root:
        raise ConfigError(f"data_root must point at the folder holding {config.dataset}/ and the COCO images")
    return RefCOCODataset(config.data_root, config.dataset, split, config.split_by,
                          per="ref" if training else "sentence")


class _TrainItems(Dataset):
    """Letterboxed training items addressed by (epoch, index); the sentence of a ref is drawn per epoch."""

    def __init__(self, dataset, size: int, seed: int):
        self.dataset, self.size, self.seed = dataset, size, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, str]:
        from ..models.etris import letterbox, letterbox_mask

        epoch, index = key
        item = self.dataset[index]
        sentences = item.get("sentences") or [item["sentence"]]
        rng = np.random.default_rng([self.seed, epoch, index])
        sentence = sentences[int(rng.integers(len(sentences)))]
        image = np.ascontiguousarray(np.asarray(item["image"]).transpose(1, 2, 0))
        boxed, _ = letterbox(image, self.size)
        return boxed, letterbox_mask(np.asarray(item["mask"], bool), self.size), sentence


def _collate(batch: list[tuple[np.ndarray, np.ndarray, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    pixels = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([b[1] for b in batch]))
    return pixels, masks, [b[2] for b in batch]


class _Batches(Sampler):
    """Batches of (epoch, index) for optimizer steps ``start .. total-1`` (pure function of seed and step)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int):
        self.n, self.bs, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self.per_epoch = max(1, n // batch_size)

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self):
        cache: tuple[int, np.ndarray] | None = None
        for it in range(self.start, self.total):
            epoch, b = divmod(it, self.per_epoch)
            if cache is None or cache[0] != epoch:
                cache = (epoch, np.random.default_rng([self.seed, epoch, 7]).permutation(self.n))
            idx = cache[1][b * self.bs:(b + 1) * self.bs]
            if len(idx) < self.bs:  # fewer items than one batch: wrap around
                idx = np.resize(cache[1], self.bs)
            yield [(epoch, int(i)) for i in idx]


# ----------------------------------------------------------------------------------------------- schedule


def referring_lr_factor(iteration: int, milestones: Sequence[int], decay: float) -> float:
    """Step schedule: ``decay ** (number of milestones <= iteration)``."""
    return decay ** sum(1 for m in milestones if iteration >= m)


# ----------------------------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate_referring(model, dataset, max_items: int | None = None, batch_size: int = 8,
                       threshold: float | None = None) -> dict[str, float]:
    """mIoU, oIoU and Prec@0.5..0.9 (percent, :class:`vocabseg.metrics.ReferringMeter`) of ``model.refer`` on the
    items of ``dataset`` (dicts with ``image`` [3, H, W] uint8, ``mask`` [H, W], ``sentence``), at each image's own
    resolution. Also ``num_items``; where items carry a ``kind``, ``mIoU/{kind}`` and ``items/{kind}``; on the
    generated world, ``object_acc`` (see :class:`_Breakdown`)."""
    was_training = model.training
    model.eval()
    breakdown = _Breakdown()
    n = len(dataset) if max_items is None else min(len(dataset), max_items)
    try:
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            images = [np.ascontiguousarray(np.asarray(it["image"]).transpose(1, 2, 0)) for it in items]
            results = model.refer_batch(images, [it["sentence"] for it in items], threshold=threshold)
            for it, r in zip(items, results):
                breakdown.update(r.mask, it)
    finally:
        model.train(was_training)
    return breakdown.compute()


class _Breakdown:
    """Referring metrics overall, per expression kind (items with a ``kind``), and — for items that carry their
    scene's objects (``instance_map``, ``object_ids``, ``target_id``: the generated world) — ``object_acc``: the
    percentage of items whose prediction overlaps the target more than any other object (IoU with each object's
    visible pixels). It separates "chose the wrong object" from "chose the right one with a rough outline", which
    mIoU mixes."""

    def __init__(self) -> None:
        self.overall = ReferringMeter()
        self.by_kind: dict[str, ReferringMeter] = {}
        self.picked: list[bool] = []

    def update(self, pred: np.ndarray, item: Mapping[str, Any]) -> None:
        gt = np.asarray(item["mask"], bool)
        self.overall.update(pred, gt)
        if item.get("kind") is not None:
            self.by_kind.setdefault(str(item["kind"]), ReferringMeter()).update(pred, gt)
        if "instance_map" in item:
            ids = item["object_ids"]
            objects = [item["instance_map"] == k for k in ids]
            ious = [np.count_nonzero(pred & m) / max(1, np.count_nonzero(pred | m)) for m in objects]
            self.picked.append(bool(pred.any()) and ids[int(np.argmax(ious))] == item["target_id"])

    def compute(self) -> dict[str, float]:
        out = self.overall.compute()
        out["num_items"] = float(len(self.overall))
        for kind in sorted(self.by_kind):
            out[f"mIoU/{kind}"] = self.by_kind[kind].compute()["mIoU"]
            out[f"items/{kind}"] = float(len(self.by_kind[kind]))
        if self.picked:
            out["object_acc"] = 100.0 * float(np.mean(self.picked))
        return out


def largest_object_baseline(dataset, max_items: int | None = None) -> dict[str, float]:
    """The most-salient-object baseline on the generated referring world: whatever the sentence says, answer the
    object with the most visible pixels in the scene. Same metrics as :func:`evaluate_referring`."""
    if not hasattr(dataset, "referring_sample"):
        raise ConfigError("the largest-object baseline needs the generated referring world (scene instance maps)")
    breakdown = _Breakdown()
    n = len(dataset) if max_items is None else min(len(dataset), max_items)
    for i in range(n):
        item = dataset[i]
        ids = item["object_ids"]
        areas = [np.count_nonzero(item["instance_map"] == k) for k in ids]
        breakdown.update(item["instance_map"] == ids[int(np.argmax(areas))], item)
    return breakdown.compute()


def evaluate_referring_checkpoint(config: ReferringTrainConfig | Mapping[str, Any] | str | os.PathLike,
                                  checkpoint: str | os.PathLike, thresholds: Sequence[float | None] = (None,),
                                  overrides: Iterable[str] = (), *, val_datasets: Mapping[str, Any] | None = None,
                                  ) -> dict[str, dict[str, float]]:
    """Score trained weights on the config's validation splits at each mask threshold (None: the model's own), next
    to the largest-object baseline on the generated world. Keys ``"{split} @ {threshold}"`` and
    ``"{split} (largest-object baseline)"``; nothing is trained or written."""
    cfg = load_referring_config(config, overrides)
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    cfg = dataclasses.replace(cfg, init_checkpoint=str(checkpoint))
    model = _build_model(cfg, _device(cfg.device))
    if val_datasets is None:
        val_datasets = {s: build_referring_dataset(cfg, s) for s in cfg.val_splits}
    results: dict[str, dict[str, float]] = {}
    for split, ds in val_datasets.items():
        for t in thresholds:
            label = "model" if t is None else f"{t:g}"
            results[f"{split} @ {label}"] = evaluate_referring(model, ds, cfg.val_max_items, threshold=t)
        if hasattr(ds, "referring_sample"):
            results[f"{split} (largest-object baseline)"] = largest_object_baseline(ds, cfg.val_max_items)
    return results


# ----------------------------------------------------------------------------------------------- model


def _build_model(config: ReferringTrainConfig, device: torch.device):
    from ..clip.load import drop_non_weights, read_state_dict
    from ..clip.model import CLIPConfig
    from ..models import create_model, get_config
    from ..models.weights import load_strict

    overrides = dict(config.model_overrides)
    if isinstance(overrides.get("clip"), Mapping):
        overrides["clip"] = CLIPConfig.from_dict(overrides["clip"])
    for k, v in list(overrides.items()):
        if isinstance(v, list):
            overrides[k] = tuple(v)
    model = create_model(config.model, get_config(config.model, **overrides))
    if not hasattr(model, "refer_batch"):
        raise ConfigError(f"model {config.model!r} is not a referring model; use an etris_* model")
    if config.clip:
        state = drop_non_weights(read_state_dict(config.clip, trust_jit=config.trust_jit))
        try:
            load_strict(model.clip, state)
        except CheckpointError as e:
            raise CheckpointError(f"{config.clip}: {e}") from None
    if config.init_checkpoint:
        model.load_checkpoint_state(read_state_dict(config.init_checkpoint, trust_jit=config.trust_jit),
                                    allow_missing_clip=bool(config.clip))
    return model.to(device)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------- family


class ReferringFamily(Family):
    """(image, sentence) -> one mask: ETRIS models on RefCOCO-style data or the generated referring world."""

    name = "referring"
    config_cls = ReferringTrainConfig
    identity_keys = ("model", "model_overrides", "dataset", "split_by", "train_split", "world", "seed", "batch_size")

    def __init__(self, config: ReferringTrainConfig, train_dataset=None,
                 val_datasets: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.train_ds, self.val_datasets = train_dataset, val_datasets
        self.total: int | None = None
        self._baselines: dict[str, dict[str, float]] = {}

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def spec(self) -> RunSpec:
        c = self.config
        total = self.total or c.max_iters or 1
        return RunSpec(output_dir=c.output_dir, seed=c.seed, max_iters=total, log_every=c.log_every,
                       checkpoint_every=c.checkpoint_every, eval_every=c.eval_every,
                       keep_checkpoints=c.keep_checkpoints, clip_grad=c.clip_grad, amp=c.amp, device=c.device,
                       resume=c.resume, progress=c.verbose, verbose=c.verbose, num_workers=c.num_workers)

    def describe(self, info, start: int) -> str:
        return (f"training {self.config.model} on {len(self.train_ds)} referring items, batch "
                f"{self.config.batch_size}, steps {start}..{self.total}, device {info.device}")

    def prepare(self, info) -> None:
        cfg = self.config
        if self.train_ds is None:
            self.train_ds = build_referring_dataset(cfg, cfg.train_split, True)
        if self.val_datasets is None:
            self.val_datasets = {s: build_referring_dataset(cfg, s) for s in cfg.val_splits}
        if len(self.train_ds) == 0:
            raise ConfigError("the training split is empty")
        per_epoch = max(1, len(self.train_ds) // cfg.batch_size)
        self.total = cfg.max_iters if cfg.max_iters is not None else max(1, int(round(cfg.epochs * per_epoch)))
        self.milestones = [int(round(m * per_epoch)) for m in cfg.milestones]

    def build_model(self, device: torch.device):
        model = _build_model(self.config, device).train()
        self.criterion = model.build_criterion(dice_weight=self.config.dice_weight)
        return model

    def optimizer(self, model) -> torch.optim.Optimizer:
        cfg = self.config
        return torch.optim.Adam(model.parameter_groups(cfg.lr, cfg.bridger_lr), lr=cfg.lr,
                                weight_decay=cfg.weight_decay)

    def lr_factor(self, step: int) -> float:
        return referring_lr_factor(step, self.milestones, self.config.lr_decay)

    def dataset(self, model) -> Dataset:
        return _TrainItems(self.train_ds, model.config.input_size, self.config.seed)

    def batch_sampler(self, start_step: int, info) -> Sampler:
        return _Batches(len(self.train_ds), self.config.batch_size, self.config.seed, start_step, self.total)

    def collate(self, model):
        return _collate

    def losses(self, net, model, batch, step, device, amp) -> dict[str, torch.Tensor]:
        pixels, masks, sentences = batch
        pixels = model.normalize_pixels(pixels.to(device, non_blocking=True))
        tokens = model.tokenize(sentences)
        targets = model.training_targets(masks).to(device)
        with amp():
            outputs = net(pixels, tokens)
        losses = self.criterion({k: v.float() for k, v in outputs.items()}, targets)
        return {**losses, "total_loss": self.criterion.weighted_total(losses)}

    def has_eval(self) -> bool:
        return bool(self.val_datasets)

    def evaluate(self, model, step, progress) -> tuple[dict[str, Any], dict[str, Any]]:
        """Each validation split, and on the generated world the answer-the-biggest-object baseline next to it."""
        results: dict[str, dict[str, float]] = {}
        for split, ds in self.val_datasets.items():
            results[split] = evaluate_referring(model, ds, self.config.val_max_items)
            if hasattr(ds, "referring_sample"):
                if split not in self._baselines:  # does not depend on the model: computed once per run
                    self._baselines[split] = largest_object_baseline(ds, self.config.val_max_items)
                results[f"{split} (largest-object baseline)"] = self._baselines[split]
        line = {f"{split}/{k}": v for split, r in results.items() if "baseline" not in split for k, v in r.items()}
        return line, results

    def eval_summary(self, line) -> str:
        return "  ".join(f"{split}: mIoU {line[f'{split}/mIoU']:.2f} oIoU {line[f'{split}/oIoU']:.2f}"
                         for split in self.val_datasets)

    def save_final(self, model, out, step, metrics) -> Path:
        cfg = self.config
        meta = {"model": cfg.model, "model_overrides": cfg.model_overrides, "iteration": step, "task": "referring",
                "metrics": metrics or {}}
        return ckpt.save_final_model(model, out, meta)[0]


def train_referring(config: ReferringTrainConfig | Mapping[str, Any] | str | os.PathLike,
                    overrides: Iterable[str] = (), *, train_dataset=None,
                    val_datasets: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train a referring model; resumable (``resume: auto`` continues from the newest checkpoint in output_dir).

    ``train_dataset`` / ``val_datasets`` replace the datasets the config names (items as in
    :mod:`vocabseg.data.refcoco`). Returns ``{"iteration", "final_weights", "last_checkpoint", "losses",
    "metrics": {split: {...}}}`` (losses: the last log line's means).
    """
    cfg = load_referring_config(config, overrides)
    result = run_family(ReferringFamily(cfg, train_dataset, val_datasets))
    result["metrics"] = result["metrics"] or {}
    return result


def bundle_referring_weights(final_weights: str | os.PathLike, out_path: str | os.PathLike) -> dict[str, int]:
    """Write a trained referring run's weights as they ship in ``vocabseg/weights`` (fp32, without the frozen CLIP:
    :func:`vocabseg.engine.checkpoint.bundle_weights`). Returns tensor and byte counts."""
    src = Path(final_weights)
    if ckpt.read_final_meta(src).get("task") != "referring":
        raise ConfigError(f"{src}: expected model_final.safetensors of a referring run (model_final.json beside it)")
    return ckpt.bundle_weights(src, out_path, dtype=None)
