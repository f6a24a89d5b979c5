"""The training loop: AdamW on the trainable parameters, poly LR with warm-up, accumulation, AMP, clipping.

``train(config)`` runs in one process or under torchrun (see ``distributed.py``). What it guarantees:

* only ``model.trainable_parameters()`` get optimizer state and updates: the frozen CLIP stays bit-identical;
* the data order is a pure function of (seed, samples consumed) and every sample's augmentation of
  (seed, epoch, index), so a run resumed from a checkpoint continues exactly like an uninterrupted one;
* checkpoints are written atomically by rank 0 and contain everything needed to continue (incl. RNG states);
* ``metrics.jsonl`` gets one JSON line per log step (and per evaluation), ``model_final.safetensors`` +
  ``model_final.json`` are the trained model, loadable with ``vocabseg.load_model(name, checkpoint=...)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import CheckpointError, ConfigError, DatasetError
from . import checkpoint as ckpt
from . import distributed as du
from .config import TrainConfig, config_from_dict, config_to_dict, load_config, save_config

__all__ = ["train", "lr_factor", "WarmupPolyLR", "TrainSamples", "collate_samples", "build_optimizer", "prepare_world",
           "seed_everything"]

METRICS_LOG = "metrics.jsonl"
_DEFAULT = object()


# ---------------------------------------------------------------------------------------------------- schedule


def lr_factor(iteration: int, max_iters: int, warmup_iters: int = 0, warmup_factor: float = 0.001,
              power: float = 0.9) -> float:
    """LR multiplier for optimizer step ``iteration`` (0-based): linear warm-up times poly decay.

    Poly: ``(1 - iteration / max_iters) ** power`` (detectron2's WarmupPolyLR, which SAN uses); warm-up ramps
    linearly from ``warmup_factor`` at step 0 to 1 at step ``warmup_iters``.
    """
    poly = max(0.0, 1.0 - iteration / max_iters) ** power
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        return poly * (warmup_factor * (1.0 - alpha) + alpha)
    return poly


class WarmupPolyLR:
    """Sets each param group's LR to ``base_lr · lr_factor(iteration)``; its state is just the iteration."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, warmup_iters: int = 0,
                 warmup_factor: float = 0.001, power: float = 0.9) -> None:
        self.optimizer = optimizer
        self.max_iters, self.warmup_iters = max_iters, warmup_iters
        self.warmup_factor, self.power = warmup_factor, power
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.iteration = 0

    def factor(self, iteration: int) -> float:
        return lr_factor(iteration, self.max_iters, self.warmup_iters, self.warmup_factor, self.power)

    def apply(self, iteration: int) -> float:
        """Set the LRs for step ``iteration``; returns the first group's LR."""
        self.iteration = iteration
        f = self.factor(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "max_iters": self.max_iters, "warmup_iters": self.warmup_iters,
                "warmup_factor": self.warmup_factor, "power": self.power}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.iteration = int(state["iteration"])


# ---------------------------------------------------------------------------------------------------- optimizer


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, in three groups: default, normalisation layers, embeddings.

    As in SAN's ``build_optimizer``: a parameter whose own name contains one of ``embed_keywords`` gets
    ``weight_decay_embed``, parameters of torch normalisation layers get ``weight_decay_norm``.
    """
    trainable = {id(p) for p in model.trainable_parameters()}
    groups: dict[str, list[nn.Parameter]] = {"default": [], "norm": [], "embed": []}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) not in trainable or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NORM_TYPES):
                groups["norm"].append(p)
            elif any(k in p_name for k in config.embed_keywords) or isinstance(module, nn.Embedding):
                groups["embed"].append(p)
            else:
                groups["default"].append(p)
    if len(seen) != len(trainable):
        raise RuntimeError("some trainable parameters are not registered in the model's modules")
    if not seen:
        raise ConfigError(f"Model {config.model!r} has no trainable parameters.")
    decay = {"default": config.weight_decay, "norm": config.weight_decay_norm, "embed": config.weight_decay_embed}
    param_groups = [{"params": ps, "weight_decay": decay[name], "group_name": name}
                    for name, ps in groups.items() if ps]
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


# ---------------------------------------------------------------------------------------------------- data


class TrainSamples(Dataset):
    """Wraps a dataset so keys ``(epoch, index)`` from the sampler give augmented samples.

    The augmentation RNG comes from :func:`~vocabseg.engine.distributed.sample_rng` (seed, epoch, index), so a
    sample looks the same whichever process or DataLoader worker loads it, and after a resume.
    ``transform(image HWC uint8, label HW, rng) -> (image, label)``; None keeps items as they are.
    """

    def __init__(self, dataset: Any, transform: Callable | None, seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        item = self.dataset[index]
        image, label = item["image"], item["label"]
        if self.transform is not None:
            image = _hwc_numpy(image)
            label = label.numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
            image, label = self.transform(image, label, du.sample_rng(self.seed, epoch, index))
        if not isinstance(label, torch.Tensor):
            label = torch.from_numpy(np.ascontiguousarray(label))  # flips may return negative-stride views
        return {"image": _chw_tensor(image), "label": label.to(torch.int64),
                "index": int(index), "epoch": int(epoch)}


def _hwc_numpy(image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    return np.ascontiguousarray(image)


def _chw_tensor(image: Any) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        t = image
        if t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
            t = t.permute(2, 0, 1)
    else:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[-1] == 3 and arr.shape[0] != 3:
            arr = arr.transpose(2, 0, 1)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype != torch.uint8:
        raise DatasetError(f"Training images must be uint8 RGB, got {t.dtype}.")
    return t.contiguous()


def collate_samples(items: list[dict[str, Any]], ignore_index: int = 255, size_divisibility: int = 1
                    ) -> dict[str, Any]:
    """Stack samples into ``image`` uint8 [B,3,H,W] and ``label`` int64 [B,H,W].

    Samples of different sizes are zero-padded bottom/right (labels with ``ignore_index``) to the largest one,
    rounded up to ``size_divisibility``, so padding never counts in the loss.
    """
    h = max(int(it["image"].shape[1]) for it in items)
    w = max(int(it["image"].shape[2]) for it in items)
    d = max(1, size_divisibility)
    h, w = -(-h // d) * d, -(-w // d) * d
    images = torch.zeros(len(items), 3, h, w, dtype=torch.uint8)
    labels = torch.full((len(items), h, w), ignore_index, dtype=torch.int64)
    for i, it in enumerate(items):
        ih, iw = it["image"].shape[1:]
        images[i, :, :ih, :iw] = it["image"]
        labels[i, :ih, :iw] = it["label"]
    return {"image": images, "label": labels, "index": torch.tensor([it["index"] for it in items]),
            "epoch": torch.tensor([it["epoch"] for it in items])}


def _build_dataset(name: str, root: str | None, split: str) -> Any:
    if not root:
        raise ConfigError(f"Dataset {name!r} needs a folder: set data_root (and val_root for another val folder).")
    from ..data.datasets import build_dataset

    return build_dataset(name, root, split, transform=None)


def _default_transform(config: TrainConfig, ignore_index: int) -> Callable:
    """SAN's pipeline (resize choice, crop, photometric, flip, pad) at ``crop_size``, options from ``augment``."""
    from ..data.transforms import build_train_transform

    try:
        return build_train_transform(config.crop_size, **{"ignore_index": ignore_index, **config.augment})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"augment: {e}.") from None


def prepare_world(config: TrainConfig) -> None:
    """Generate the ``world`` data set into ``data_root`` (and ``val_root``) unless it is already there.

    ``world`` keys: ``num_samples`` (train images), ``val_samples``, ``seed`` (the val set uses seed + 1, so its
    images differ), ``scheme`` (class scheme of vocabseg.data.world) and any ``WorldConfig`` field such as
    ``min_size``/``max_size``. Generation is deterministic and resumable; a folder made with other settings is
    refused by the generator.
    """
    from ..data.world import WorldConfig, write_dataset

    spec = dict(config.world or {})
    n_train = int(spec.pop("num_samples", 400))
    n_val = int(spec.pop("val_samples", 0))
    seed = int(spec.pop("seed", 0))
    scheme = spec.pop("scheme", "category")
    if not config.data_root:
        raise ConfigError("world: set data_root to the folder the generated training images go to.")
    try:
        world_cfg = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    except TypeError as e:
        raise ConfigError(f"world has an option the generator does not know: {e}.") from None
    write_dataset(Path(config.data_root).expanduser(), n_train, seed=seed, config=world_cfg, scheme=scheme)
    if n_val > 0:
        if not config.val_root or Path(config.val_root) == Path(config.data_root):
            raise ConfigError("world.val_samples needs a val_root folder different from data_root.")
        write_dataset(Path(config.val_root).expanduser(), n_val, seed=seed + 1, config=world_cfg, scheme=scheme)


# ---------------------------------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_amp(config: TrainConfig, device: torch.device) -> None:
    if config.amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs a CUDA device; on CPU use amp=bf16 or amp=none.")
    if config.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("This GPU does not support bfloat16; use amp=fp16.")


class _Console:
    """Rank-0 output: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool, show_bar: bool, total: int, start: int) -> None:
        self.enabled = enabled
        self.progress = None
        if enabled and show_bar:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def advance(self, iteration: int, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=iteration, info=info)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    from .evaluate import _json_safe

    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_json_safe(dict(record)), allow_nan=False) + "\n")
        f.flush()


# ---------------------------------------------------------------------------------------------------- one step


class _Step:
    """One optimizer step: ``grad_accum`` micro-batches (DDP syncs on the last), AMP, clipping, AdamW."""

    def __init__(self, config: TrainConfig, net: nn.Module, model: nn.Module, criterion: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: Any, text: torch.Tensor, ignore_index: int,
                 device: torch.device) -> None:
        self.config, self.net, self.model, self.criterion = config, net, model, criterion
        self.optimizer, self.scaler, self.text = optimizer, scaler, text
        self.ignore_index, self.device = ignore_index, device
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def __call__(self, data_iter: Iterable, iteration: int) -> tuple[dict[str, float], float, float]:
        """Returns (losses averaged over micro-batches, gradient norm before clipping, seconds waiting for data)."""
        cfg, accum = self.config, self.config.grad_accum
        sums: dict[str, torch.Tensor] = {}
        data_time = 0.0
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(data_iter)
            data_time += time.perf_counter() - t0
            images = batch["image"].to(self.device, non_blocking=True).float()
            labels = batch["label"].to(self.device, non_blocking=True)
            pixels = self.model.normalize_pixels(images)
            targets = self.model.training_targets(labels, ignore_index=self.ignore_index)
            with du.maybe_no_sync(self.net, micro < accum - 1):
                with _autocast(cfg, self.device):
                    outputs = self.net(pixels, self.text)
                losses = self.criterion(outputs, targets)  # in float32: the criterion casts its inputs
                total = self.criterion.weighted_total(losses)
                if not torch.isfinite(total):
                    raise FloatingPointError(f"the loss is {total.item()} at iteration {iteration}; lower lr, or "
                                             f"check the data (labels outside the class range?)")
                scaled = total / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for key, value in {**losses, "total_loss": total}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / accum
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        max_norm = cfg.clip_grad if cfg.clip_grad_enabled else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in sums.items()}, float(grad_norm), data_time


class _Window:
    """Sums of logged values since the last log line."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.time = self.data_time = 0.0

    def add(self, values: Mapping[str, float], seconds: float, data_seconds: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.time += seconds
        self.data_time += data_seconds


# ---------------------------------------------------------------------------------------------------- trainer


class _Trainer:
    def __init__(self, config: TrainConfig, info: du.DistInfo, train_dataset: Any, val_dataset: Any,
                 transform: Any) -> None:
        self.config = config
        self.info = info
        self.device = info.device
        self.out = Path(config.output_dir).expanduser()
        self._train_dataset = train_dataset
        self._val_dataset = val_dataset
        self._transform = transform

    # -- setup ---------------------------------------------------------------------------------------------
    def _resolve_resume(self) -> tuple[Path, dict[str, Any]] | None:
        """Find the checkpoint to continue from: rank 0 decides, the other ranks follow (reading the same file if
        they can see it, i.e. on a shared filesystem, else receiving its contents from rank 0)."""
        cfg = self.config
        found, error = None, None
        if self.info.is_main:
            existing = ckpt.list_checkpoints(self.out)
            if cfg.resume is False and existing:
                error = (f"{self.out} already holds checkpoints of a run; pass resume=auto (--resume) to continue "
                         f"it, or choose another output_dir.")
            elif cfg.resume is not False:
                found = ckpt.find_resume_checkpoint(self.out)
                if found is None and cfg.resume is True:
                    error = (f"resume=true but {self.out} holds no complete checkpoint; use resume=auto to start "
                             f"fresh when there is none.")
        if self.info.distributed:
            error = du.broadcast_object(error)
        if error:
            raise ConfigError(error)
        if not self.info.distributed:
            return found
        path = du.broadcast_object(str(found[0]) if found else None)
        if path is None:
            return None
        if all(du.all_gather_objects(Path(path).is_file())):
            return (Path(path), found[1]) if self.info.is_main else (Path(path), ckpt.load_checkpoint(path))
        state = du.broadcast_object(found[1] if self.info.is_main else None)
        return Path(path), state

    def _build_model(self) -> nn.Module:
        from ..models import get_entry, load_model

        cfg = self.config
        entry = get_entry(cfg.model)  # ConfigError for an unknown name, before any loading
        seed_everything(cfg.seed)  # identical random init on every rank
        with warnings.catch_warnings():
            # a randomly initialised side network is what training starts from: no warning for that
            warnings.filterwarnings("ignore", message=".*randomly initiali[sz]ed.*")
            model = load_model(cfg.model, checkpoint=cfg.init_checkpoint, clip=cfg.clip, device="cpu",
                               trust_jit=cfg.trust_jit, **cfg.model_overrides)
        bundled = getattr(entry, "weights", None) is not None or getattr(entry, "clip_weights", None) is not None
        if cfg.clip is None and cfg.init_checkpoint is None and not bundled and self.info.is_main:
            warnings.warn(f"training {cfg.model!r} on a randomly initialised CLIP (no clip or init_checkpoint "
                          f"given): fine for tests, useless otherwise", stacklevel=3)
        return model.to(self.device).train()

    # -- main ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, info = self.config, self.info
        _check_amp(cfg, self.device)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        du.barrier()
        resume = self._resolve_resume()
        if info.is_main:
            ckpt.remove_stale_tmp(self.out)
        train_ds, val_ds, transform = self._prepare_data()  # before the model: a wrong folder fails in a second
        class_names = [str(n) for n in train_ds.class_names]
        ignore_index = int(getattr(train_ds, "ignore_index", 255))

        model = self._build_model()
        frozen_id = ckpt.frozen_fingerprint(model)
        with torch.no_grad():
            text = model.text_embeddings(class_names).detach().to(self.device)  # once per run
        val_text = text if val_ds is not None and [str(n) for n in val_ds.class_names] == class_names else None
        criterion = model.build_criterion(num_classes=len(class_names)).to(self.device)
        optimizer = build_optimizer(model, cfg)
        scheduler = WarmupPolyLR(optimizer, cfg.max_iters, cfg.warmup_iters, cfg.warmup_factor, cfg.poly_power)
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

        iteration, samples_seen = 0, 0
        if resume is not None:
            iteration, samples_seen = self._restore(resume[1], resume[0], model, optimizer, scheduler, scaler,
                                                    frozen_id, class_names)
        else:
            seed_everything(cfg.seed + 1 + info.rank)  # training randomness (point sampling) differs per rank
        if info.is_main:
            save_config(cfg, self.out / "config.yaml")
            if resume is not None:
                ckpt.truncate_log(self.out / METRICS_LOG, iteration)
            elif (self.out / METRICS_LOG).exists():
                (self.out / METRICS_LOG).unlink()
        du.barrier()

        net = du.wrap_model(model, info, cfg.find_unused_parameters)
        step = _Step(cfg, net, model, criterion, optimizer, scaler, text, ignore_index, self.device)
        console = _Console(info.is_main and cfg.progress, sys.stdout.isatty(), cfg.max_iters, iteration)
        console.print(f"training {cfg.model} on {len(train_ds)} images, {len(class_names)} classes: "
                      f"{cfg.total_batch_size(info.world_size)} images/step ({cfg.batch_size} x {info.world_size} "
                      f"processes x {cfg.grad_accum} accumulation), iterations {iteration}..{cfg.max_iters}, "
                      f"device {self.device}")
        window = _Window()
        last_losses: dict[str, float] = {}
        last_eval: dict[str, Any] | None = None
        last_ckpt: Path | None = resume[0] if resume is not None else None
        started = time.perf_counter()
        loader = self._loader(train_ds, transform, samples_seen, ignore_index,
                              getattr(getattr(model, "config", None), "size_divisibility", 1))
        data_iter = iter(loader) if iteration < cfg.max_iters else None
        try:
            while iteration < cfg.max_iters:
                t0 = time.perf_counter()
                lr = scheduler.apply(iteration)
                losses, grad_norm, data_time = step(data_iter, iteration)
                iteration += 1
                samples_seen += cfg.batch_size * info.world_size * cfg.grad_accum
                scheduler.iteration = iteration
                window.add({**losses, "grad_norm": grad_norm}, time.perf_counter() - t0, data_time)
                done = iteration == cfg.max_iters
                if iteration % cfg.log_every == 0 or done:
                    last_losses = self._log(window, iteration, lr, console)
                    window = _Window()
                console.advance(iteration, f"loss {last_losses['total_loss']:.3f}" if last_losses else "")
                if (cfg.checkpoint_every and iteration % cfg.checkpoint_every == 0) or done:
                    last_ckpt = self._checkpoint(model, optimizer, scheduler, scaler, iteration, samples_seen,
                                                 frozen_id, class_names)
                if val_ds is not None and ((cfg.eval_every and iteration % cfg.eval_every == 0) or done):
                    last_eval = self._evaluate(model, val_ds, iteration, val_text, console)
        finally:
            console.close()
            del data_iter  # stops DataLoader workers

        if info.is_main:
            meta = {"model": cfg.model, "model_overrides": dict(cfg.model_overrides), "class_names": class_names,
                    "ignore_index": ignore_index, "iteration": iteration, "dataset": cfg.dataset,
                    "clip": cfg.clip, "init_checkpoint": cfg.init_checkpoint}
            ckpt.save_final_model(model, self.out, meta)
        du.barrier()
        return {
            "iteration": iteration,
            "output_dir": str(self.out),
            "final_weights": str(self.out / ckpt.FINAL_WEIGHTS),
            "final_meta": str(self.out / ckpt.FINAL_META),
            "last_checkpoint": str(last_ckpt) if last_ckpt is not None else None,
            "losses": last_losses,
            "metrics": last_eval,
            "train_time_s": time.perf_counter() - started,
            "world_size": info.world_size,
        }

    def _prepare_data(self) -> tuple[Any, Any, Callable | None]:
        cfg = self.config
        if self._train_dataset is not None:
            train_ds, val_ds = self._train_dataset, self._val_dataset
        else:
            if cfg.world:
                if self.info.local_rank == 0:
                    prepare_world(cfg)
                du.barrier()
            train_ds = _build_dataset(cfg.dataset, cfg.data_root, cfg.train_split)
            val_ds = None
            if cfg.val_split:
                val_ds = _build_dataset(cfg.val_dataset or cfg.dataset, cfg.val_root or cfg.data_root, cfg.val_split)
        if len(train_ds) == 0:
            raise DatasetError(f"The training split {cfg.train_split!r} of {cfg.data_root} has no images.")
        ignore_index = int(getattr(train_ds, "ignore_index", 255))
        transform = _default_transform(cfg, ignore_index) if self._transform is _DEFAULT else self._transform
        return train_ds, val_ds, transform

    def _loader(self, train_ds: Any, transform: Callable | None, samples_seen: int, ignore_index: int,
                size_divisibility: int) -> DataLoader:
        """Batches from global stream position ``samples_seen`` on; this rank's share of each micro-step."""
        cfg, info = self.config, self.info
        sampler = du.ResumableBatchSampler(len(train_ds), cfg.batch_size, cfg.seed, samples_seen, info.rank,
                                           info.world_size)
        return DataLoader(TrainSamples(train_ds, transform, cfg.seed), batch_sampler=sampler,
                          num_workers=cfg.num_workers,
                          collate_fn=partial(collate_samples, ignore_index=ignore_index,
                                             size_divisibility=int(size_divisibility or 1)),
                          pin_memory=self.device.type == "cuda",
                          # a private generator: creating the iterator must not draw from the global torch RNG
                          generator=torch.Generator().manual_seed(cfg.seed))

    # -- pieces --------------------------------------------------------------------------------------------
    def _restore(self, state: dict[str, Any], path: Path, model: nn.Module, optimizer, scheduler, scaler,
                 frozen_id: str, class_names: list[str]) -> tuple[int, int]:
        """Load a checkpoint into the run; returns (iteration, samples consumed)."""
        cfg, info = self.config, self.info
        saved = state.get("config", {})
        if state.get("class_names") not in (None, class_names):
            warnings.warn(f"{path} was trained on other class names than the dataset's", stacklevel=3)
        if saved.get("model") != cfg.model:
            raise CheckpointError(f"{path} was trained with model {saved.get('model')!r}, not {cfg.model!r}.")
        if state.get("frozen_fingerprint") != frozen_id:
            raise CheckpointError(f"The frozen weights differ from those of the run that wrote {path}; resume with "
                                  f"the same clip, init_checkpoint and seed.")
        if saved.get("seed") != cfg.seed or saved.get("batch_size", cfg.batch_size) * state.get("world_size", 1) \
                != cfg.batch_size * info.world_size:
            warnings.warn("resuming with another seed or global batch size: the data order will differ from an "
                          "uninterrupted run", stacklevel=3)
        ckpt.load_trainable_state(model, state["model"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"The optimizer state in {path} does not fit this model: {e}.") from None
        for group in optimizer.param_groups:  # the config's lr wins, so lr can be changed on resume
            group["initial_lr"] = cfg.lr
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng = state.get("rng") or []
        if state.get("world_size") == info.world_size and len(rng) == info.world_size:
            ckpt.restore_rng_state(rng[info.rank])
        else:
            seed_everything(cfg.seed + 1 + info.rank + 7919 * int(state["iteration"]))
        return int(state["iteration"]), int(state["samples_seen"])

    def _checkpoint(self, model, optimizer, scheduler, scaler, iteration: int, samples_seen: int, frozen_id: str,
                    class_names: list[str]) -> Path:
        rng = du.all_gather_objects(ckpt.capture_rng_state())
        path = ckpt.checkpoint_path(self.out, iteration)
        if self.info.is_main:
            state = {
                "model": ckpt.trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "samples_seen": samples_seen,
                "world_size": self.info.world_size,
                "rng": rng,
                "config": config_to_dict(self.config),
                "class_names": class_names,
                "frozen_fingerprint": frozen_id,
            }
            path = ckpt.save_checkpoint(state, self.out, iteration, keep=self.config.keep_checkpoints)
        du.barrier()
        return path

    def _log(self, window: _Window, iteration: int, lr: float, console: _Console) -> dict[str, float]:
        """Means over the window (averaged over ranks) -> one metrics.jsonl line on rank 0."""
        keys = sorted(window.sums)
        values = torch.tensor([window.sums[k] / window.n for k in keys], dtype=torch.float64)
        if self.info.distributed:
            values = du.all_reduce_sum(values) / self.info.world_size
        means = dict(zip(keys, values.tolist()))
        if self.info.is_main:
            per_iter, data = window.time / window.n, window.data_time / window.n
            _append_jsonl(self.out / METRICS_LOG, {"type": "train", "iter": iteration, "lr": lr, **means,
                                                   "time": per_iter, "data_time": data})
            console.print(f"iter {iteration}/{self.config.max_iters}  loss {means['total_loss']:.4f}  "
                          f"lr {lr:.3g}  {per_iter:.3f}s/it (data {data:.3f}s)")
        return means

    def _evaluate(self, model: nn.Module, val_ds: Any, iteration: int, text: torch.Tensor | None,
                  console: _Console) -> dict[str, Any]:
        from .evaluate import evaluate, write_metrics_json

        with torch.random.fork_rng(devices=[self.device.index] if self.device.type == "cuda" else []):
            metrics = evaluate(model, val_ds, max_images=self.config.val_max_images,
                               progress=self.config.progress and console.progress is None, text_embeddings=text)
        model.train()
        if self.info.is_main:
            write_metrics_json(metrics, self.out / f"eval_{iteration:07d}.json")
            _append_jsonl(self.out / METRICS_LOG, {"type": "eval", "iter": iteration,
                                                   **{k: v for k, v in metrics.items() if not isinstance(v, dict)}})
            console.print(f"eval at iter {iteration}: mIoU {metrics['mIoU']:.2f}  pACC {metrics['pACC']:.2f}")
        return metrics


# ---------------------------------------------------------------------------------------------------- entry point


def train(config: TrainConfig | Mapping[str, Any] | str | os.PathLike, *, train_dataset: Any = None,
          val_dataset: Any = None, transform: Any = _DEFAULT) -> dict[str, Any]:
    """Train a model as ``config`` says; returns iteration, output paths, last losses and last eval metrics.

    ``config``: a TrainConfig, a mapping or a YAML path. Works standalone or under torchrun. ``train_dataset`` /
    ``val_dataset`` replace the datasets named in the config (tests, notebooks); ``transform`` replaces the
    training transform (None: use items unchanged).
    """
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    elif isinstance(config, Mapping):
        config = config_from_dict(dict(config))
    elif not isinstance(config, TrainConfig):
        raise ConfigError(f"train() takes a TrainConfig, a mapping or a YAML path, not {type(config).__name__}.")
    config.validate()
    info = du.init_distributed(config.device)
    try:
        return _Trainer(config, info, train_dataset, val_dataset, transform).run()
    finally:
        du.cleanup(info)
