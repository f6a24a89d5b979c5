"""Training and evaluating referring-segmentation models (ETRIS): ``train_referring(config)``,
``evaluate_referring(model, dataset)``.

The semantic-segmentation trainer (``trainer.py``) works on label maps and class vocabularies; a referring model
takes (image, sentence) pairs and predicts one mask, so it gets this small loop of its own. What it shares with
the main trainer: atomic, resumable checkpoints (``checkpoint.py``: trainable tensors, optimizer, RNG states, a
fingerprint of the frozen CLIP), ``metrics.jsonl`` logging, ``model_final.safetensors`` + ``model_final.json``
loadable by ``vocabseg.load_model(name, checkpoint=...)``.

The recipe (paper, ``configs/etris_vit_b_16_refcoco.yaml``): Adam, lr 1e-4 (Bridgers 1e-3), no weight decay,
×0.1 after epoch 35 of 50, batch 32, images letterboxed to 416 px, BCE at 1/4 resolution. Epochs are converted to
optimizer steps (``floor(items / batch)`` per epoch). The data order is a pure function of (seed, epoch): batch b of
epoch e is ``permutation(seed, e)[b·B:(b+1)·B]``, and a ref's sentence for epoch e is drawn from (seed, e, index),
so a resumed run continues exactly where it stopped without storing sampler state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import CheckpointError, ConfigError
from ..metrics import ReferringMeter
from . import checkpoint as ckpt

__all__ = ["ReferringTrainConfig", "load_referring_config", "train_referring", "evaluate_referring",
           "build_referring_dataset", "referring_lr_factor"]

METRICS_LOG = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


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


def _autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _log(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(record)) + "\n")


# ----------------------------------------------------------------------------------------------- training


def train_referring(config: ReferringTrainConfig | Mapping[str, Any] | str | os.PathLike,
                    overrides: Iterable[str] = (), *, train_dataset=None,
                    val_datasets: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train a referring model; resumable (``resume: auto`` continues from the newest checkpoint in output_dir).

    ``train_dataset`` / ``val_datasets`` replace the datasets the config names (items as in
    :mod:`vocabseg.data.refcoco`). Returns ``{"iteration", "final_weights", "last_checkpoint", "losses",
    "metrics": {split: {...}}}``.
    """
    import yaml

    cfg = load_referring_config(config, overrides)
    device = _device(cfg.device)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs a CUDA device; use bf16 or none")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.remove_stale_tmp(out)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if cfg.verbose else (lambda msg: None)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = _build_model(cfg, device)
    model.train()
    size = model.config.input_size
    train_ds = train_dataset if train_dataset is not None else build_referring_dataset(cfg, cfg.train_split, True)
    if val_datasets is None:
        val_datasets = {s: build_referring_dataset(cfg, s) for s in cfg.val_splits}
    if len(train_ds) == 0:
        raise ConfigError("the training split is empty")
    per_epoch = max(1, len(train_ds) // cfg.batch_size)
    total = cfg.max_iters if cfg.max_iters is not None else max(1, int(round(cfg.epochs * per_epoch)))
    milestones = [int(round(m * per_epoch)) for m in cfg.milestones]

    groups = model.parameter_groups(cfg.lr, cfg.bridger_lr)
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    criterion = model.build_criterion(dice_weight=cfg.dice_weight)

    start = 0
    found = ckpt.find_resume_checkpoint(out) if cfg.resume else None
    if cfg.resume is True and found is None:
        raise CheckpointError(f"resume=true but {out} holds no checkpoint")
    if found is not None:
        path, state = found
        if state.get("model_name") != cfg.model:
            raise CheckpointError(f"{path} was written for model {state.get('model_name')!r}, not {cfg.model!r}")
        if state.get("fingerprint") != ckpt.frozen_fingerprint(model):
            raise CheckpointError(f"{path} was trained on other frozen CLIP weights; pass the same clip: file")
        ckpt.load_trainable_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])
        start = int(state["iteration"])
        ckpt.truncate_log(out / METRICS_LOG, start)
        say(f"resumed from {path.name} at step {start}")
    ckpt.atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def save(iteration: int) -> Path:
        state = {"model": ckpt.trainable_state(model), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else {}, "rng": ckpt.capture_rng_state(),
                 "config": cfg.to_dict(), "fingerprint": ckpt.frozen_fingerprint(model), "model_name": cfg.model}
        return ckpt.save_checkpoint(state, out, iteration, keep=cfg.keep_checkpoints)

    baselines: dict[str, dict[str, float]] = {}

    def evaluate_all(iteration: int) -> dict[str, dict[str, float]]:
        results = {}
        for split, ds in val_datasets.items():
            results[split] = evaluate_referring(model, ds, cfg.val_max_items)
            _log(out / METRICS_LOG, {"iter": iteration, "split": split, **results[split]})
            r = results[split]
            say(f"step {iteration} {split}: mIoU {r['mIoU']:.2f} oIoU {r['oIoU']:.2f} Prec@0.5 {r['Prec@0.5']:.2f}")
            if hasattr(ds, "referring_sample"):  # generated world: the answer-the-biggest-object baseline
                if split not in baselines:  # does not depend on the model: computed once per run
                    baselines[split] = largest_object_baseline(ds, cfg.val_max_items)
                b = results[f"{split} (largest-object baseline)"] = baselines[split]
                _log(out / METRICS_LOG, {"iter": iteration, "split": f"{split} (largest-object baseline)", **b})
                say(f"  largest-object baseline on {split}: mIoU {b['mIoU']:.2f} oIoU {b['oIoU']:.2f} "
                    f"Prec@0.5 {b['Prec@0.5']:.2f}")
        return results

    loader = DataLoader(_TrainItems(train_ds, size, cfg.seed), batch_sampler=_Batches(
        len(train_ds), cfg.batch_size, cfg.seed, start, total), collate_fn=_collate, num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed))  # own generator: the global RNG stays as restored
    losses: list[float] = []
    metrics: dict[str, dict[str, float]] = {}
    last = None
    t0, window = time.perf_counter(), []
    it = start
    for it, (pixels, masks, sentences) in enumerate(loader, start=start):
        factor = referring_lr_factor(it, milestones, cfg.lr_decay)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        pixels = model.normalize_pixels(pixels.to(device, non_blocking=True))
        tokens = model.tokenize(sentences)
        targets = model.training_targets(masks).to(device)
        with _autocast(cfg.amp, device):
            outputs = model(pixels, tokens)
        loss_dict = criterion({k: v.float() for k, v in outputs.items()}, targets)
        loss = criterion.weighted_total(loss_dict)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} at step {it}; lower lr or use amp=none")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        losses.append(float(loss.item()))
        window.append(losses[-1])
        step = it + 1
        if step % cfg.log_every == 0 or step == total:
            dt = (time.perf_counter() - t0) / len(window)
            record = {"iter": step, "loss": float(np.mean(window)), "lr": cfg.lr * factor, "sec_per_step": dt}
            _log(out / METRICS_LOG, record)
            say(f"step {step}/{total} loss {record['loss']:.4f} lr {record['lr']:.2e} {dt:.2f} s/step")
            t0, window = time.perf_counter(), []
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            last = save(step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            metrics = evaluate_all(step)
    final_step = max(total, start)
    if start < total or last is None:
        last = save(final_step)
    metrics = evaluate_all(final_step) if val_datasets else {}
    meta = {"model": cfg.model, "model_overrides": cfg.model_overrides, "iteration": final_step,
            "task": "referring", "metrics": metrics}
    weights, _ = ckpt.save_final_model(model, out, meta)
    return {"iteration": final_step, "final_weights": str(weights), "last_checkpoint": str(last),
            "losses": losses, "metrics": metrics}


def bundle_referring_weights(final_weights: str | os.PathLike, out_path: str | os.PathLike) -> dict[str, int]:
    """Write a trained referring run's weights as they ship in ``vocabseg/weights`` (fp32, without the frozen CLIP:
    :func:`vocabseg.engine.checkpoint.bundle_weights`). Returns tensor and byte counts."""
    src = Path(final_weights)
    if ckpt.read_final_meta(src).get("task") != "referring":
        raise ConfigError(f"{src}: expected model_final.safetensors of a referring run (model_final.json beside it)")
    return ckpt.bundle_weights(src, out_path, dtype=None)
