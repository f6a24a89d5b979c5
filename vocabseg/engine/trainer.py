"""Semantic segmentation on the shared loop (``loop.py``): SAN, SegViT, LSeg, CLIMS on label maps and class names.

The family's part: AdamW on ``model.trainable_parameters()`` (the frozen CLIP stays bit-identical), poly LR with
warm-up, SAN's augmentation pipeline, the model's own criterion, mIoU evaluation. The data order is a pure function
of (seed, samples consumed) and every sample's augmentation of (seed, epoch, index) (``distributed.py``).
``train(config)`` runs in one process or under torchrun; ``model_final.safetensors`` + ``model_final.json`` load
with ``vocabseg.load_model(name, checkpoint=...)``.
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DatasetError
from . import checkpoint as ckpt
from . import distributed as du
from .config import TrainConfig, config_from_dict, config_to_dict, load_config
from .loop import Family, RunSpec, run_family, seed_everything

__all__ = ["train", "lr_factor", "WarmupPolyLR", "TrainSamples", "collate_samples", "build_optimizer", "prepare_world",
           "seed_everything", "SegmentationFamily", "mask_only_remap", "RemappedLabels"]

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


def mask_only_remap(class_names: Sequence[str], mask_only: Sequence[str], ignore_index: int, *,
                    keep_mask_only: bool = True, where: str = "the dataset") -> tuple[list[str], np.ndarray]:
    """The taught vocabulary and a label lookup table for ``mask_only_classes``.

    Returns ``(taught, lut)``: ``taught`` is ``class_names`` without the mask-only ones (order kept, K of them) and
    ``lut[old_id]`` the new id: taught classes ``0..K-1``; mask-only classes ``K, K+1, ...`` in dataset order when
    ``keep_mask_only`` (training: the set criterion masks them but teaches no class), else ``ignore_index``
    (validation); ``lut[ignore_index] = ignore_index``. A name not among ``class_names`` is a ConfigError.
    """
    names = [str(n) for n in class_names]
    wanted = list(dict.fromkeys(str(n) for n in mask_only))
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ConfigError(f"mask_only_classes: {', '.join(repr(n) for n in unknown)} "
                          f"{'is' if len(unknown) == 1 else 'are'} not a class of {where} "
                          f"({len(names)} classes, e.g. {', '.join(repr(n) for n in names[:3])}).")
    hidden = set(wanted)
    taught = [n for n in names if n not in hidden]
    if not taught:
        raise ConfigError(f"mask_only_classes names every class of {where}; leave at least one to teach.")
    lut = np.full(max(len(names), ignore_index + 1), ignore_index, dtype=np.int64)
    k = len(taught)
    extra = 0
    for old, name in enumerate(names):
        if name not in hidden:
            lut[old] = taught.index(name)
        elif keep_mask_only:
            lut[old] = k + extra
            extra += 1
    if keep_mask_only and k + extra > ignore_index:
        raise ConfigError(f"mask_only_classes: {k + extra} label ids do not fit below ignore_index {ignore_index}.")
    return taught, lut


class RemappedLabels(Dataset):
    """A dataset whose labels go through a lookup table (``mask_only_remap``) and whose ``class_names`` are the
    taught ones; items are otherwise the wrapped dataset's."""

    def __init__(self, dataset: Any, lut: np.ndarray, class_names: Sequence[str]) -> None:
        self.dataset = dataset
        self.lut = torch.from_numpy(np.asarray(lut, dtype=np.int64))
        self.class_names = [str(n) for n in class_names]
        self.ignore_index = int(getattr(dataset, "ignore_index", 255))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        label = item["label"]
        if not isinstance(label, torch.Tensor):
            label = torch.from_numpy(np.ascontiguousarray(label))
        item["label"] = self.lut[label.long()]
        return item


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


# ---------------------------------------------------------------------------------------------------- family


class SegmentationFamily(Family):
    """Label maps in, per-class masks out: the models of ``vocabseg.models`` that segment a vocabulary."""

    name = "segmentation"
    config_cls = TrainConfig
    identity_keys = ("model", "model_overrides", "dataset", "train_split", "crop_size", "augment", "world", "seed",
                     "batch_size", "grad_accum", "mask_only_classes")
    supports_ddp = True

    def __init__(self, config: TrainConfig, train_dataset: Any = None, val_dataset: Any = None,
                 transform: Any = _DEFAULT) -> None:
        super().__init__(config)
        self._given = (train_dataset, val_dataset, transform)

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def spec(self) -> RunSpec:
        c = self.config
        return RunSpec(output_dir=c.output_dir, seed=c.seed, max_iters=c.max_iters, log_every=c.log_every,
                       checkpoint_every=c.checkpoint_every, eval_every=c.eval_every,
                       keep_checkpoints=c.keep_checkpoints, clip_grad=c.clip_grad if c.clip_grad_enabled else None,
                       amp=c.amp, device=c.device, resume=c.resume, progress=c.progress, verbose=c.progress, grad_accum=c.grad_accum,
                       num_workers=c.num_workers, find_unused_parameters=c.find_unused_parameters)

    def describe(self, info: du.DistInfo, start: int) -> str:
        c = self.config
        return (f"training {c.model} on {len(self.train_ds)} images, {len(self.class_names)} classes: "
                f"{c.total_batch_size(info.world_size)} images/step ({c.batch_size} x {info.world_size} processes x "
                f"{c.grad_accum} accumulation), iterations {start}..{c.max_iters}, device {info.device}")

    # -- setup ---------------------------------------------------------------------------------------------
    def prepare(self, info: du.DistInfo) -> None:
        cfg = self.config
        train_ds, val_ds, transform = self._given
        if train_ds is None:
            if cfg.world:
                if info.local_rank == 0:
                    prepare_world(cfg)
                du.barrier()
            train_ds = _build_dataset(cfg.dataset, cfg.data_root, cfg.train_split)
            if cfg.val_split:
                val_ds = _build_dataset(cfg.val_dataset or cfg.dataset, cfg.val_root or cfg.data_root, cfg.val_split)
        if len(train_ds) == 0:
            raise DatasetError(f"The training split {cfg.train_split!r} of {cfg.data_root} has no images.")
        self.ignore_index = int(getattr(train_ds, "ignore_index", 255))
        self.transform = _default_transform(cfg, self.ignore_index) if transform is _DEFAULT else transform
        if cfg.mask_only_classes:
            # taught vocabulary only; mask-only objects become labels K, K+1, ... (train) or ignore (val)
            where = f"{cfg.data_root}/classes.txt" if cfg.data_root else "the training dataset"
            taught, lut = mask_only_remap(train_ds.class_names, cfg.mask_only_classes, self.ignore_index,
                                          where=where)
            train_ds = RemappedLabels(train_ds, lut, taught)
            if val_ds is not None:
                val_names = [str(n) for n in val_ds.class_names]
                present = [n for n in cfg.mask_only_classes if n in val_names]
                val_taught, val_lut = mask_only_remap(val_names, present, int(getattr(val_ds, "ignore_index", 255)),
                                                      keep_mask_only=False, where="the validation dataset")
                val_ds = RemappedLabels(val_ds, val_lut, val_taught)
        self.train_ds, self.val_ds = train_ds, val_ds
        self.class_names = [str(n) for n in train_ds.class_names]
        self.world_size = info.world_size

    def build_model(self, device: torch.device) -> nn.Module:
        from ..models import get_entry, load_model

        cfg = self.config
        entry = get_entry(cfg.model)  # ConfigError for an unknown name, before any loading
        with warnings.catch_warnings():
            # a randomly initialised side network is what training starts from: no warning for that
            warnings.filterwarnings("ignore", message=".*randomly initiali[sz]ed.*")
            model = load_model(cfg.model, checkpoint=cfg.init_checkpoint, clip=cfg.clip, device="cpu",
                               trust_jit=cfg.trust_jit, **cfg.model_overrides)
        bundled = getattr(entry, "weights", None) is not None or getattr(entry, "clip_weights", None) is not None
        if cfg.clip is None and cfg.init_checkpoint is None and not bundled and du.is_main_process():
            warnings.warn(f"training {cfg.model!r} on a randomly initialised CLIP (no clip or init_checkpoint "
                          f"given): fine for tests, useless otherwise", stacklevel=3)
        model = model.to(device).train()
        with torch.no_grad():
            self.text = model.text_embeddings(self.class_names).detach().to(device)  # once per run
        same = self.val_ds is not None and [str(n) for n in self.val_ds.class_names] == self.class_names
        self.val_text = self.text if same else None
        self.criterion = model.build_criterion(num_classes=len(self.class_names)).to(device)
        if cfg.mask_only_classes and not getattr(self.criterion, "supports_mask_only", False):
            raise ConfigError(f"mask_only_classes needs a set-criterion model (SAN); {cfg.model!r} trains with "
                              f"{type(self.criterion).__name__}, which has no mask-only targets.")
        if cfg.mask_only_objectness:
            if not cfg.mask_only_classes:
                raise ConfigError("mask_only_objectness needs mask_only_classes (the objects it applies to).")
            self.criterion.mask_only_objectness = float(cfg.mask_only_objectness)
        return model

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        optimizer = build_optimizer(model, cfg)
        self.scheduler = WarmupPolyLR(optimizer, cfg.max_iters, cfg.warmup_iters, cfg.warmup_factor, cfg.poly_power)
        return optimizer

    def lr_factor(self, step: int) -> float:
        self.scheduler.iteration = step + 1
        return self.scheduler.factor(step)

    # -- data and step -------------------------------------------------------------------------------------
    def dataset(self, model: nn.Module) -> Dataset:
        return TrainSamples(self.train_ds, self.transform, self.config.seed)

    def _per_step(self, world_size: int) -> int:
        return self.config.total_batch_size(world_size)

    def batch_sampler(self, start_step: int, info: du.DistInfo) -> du.ResumableBatchSampler:
        cfg = self.config
        return du.ResumableBatchSampler(len(self.train_ds), cfg.batch_size, cfg.seed,
                                        start_step * self._per_step(info.world_size), info.rank, info.world_size)

    def collate(self, model: nn.Module) -> Callable:
        divisor = getattr(getattr(model, "config", None), "size_divisibility", 1)
        return partial(collate_samples, ignore_index=self.ignore_index, size_divisibility=int(divisor or 1))

    def losses(self, net, model, batch, step, device, amp) -> dict[str, torch.Tensor]:
        images = batch["image"].to(device, non_blocking=True).float()
        labels = batch["label"].to(device, non_blocking=True)
        pixels = model.normalize_pixels(images)
        targets = model.training_targets(labels, ignore_index=self.ignore_index)
        with amp():
            outputs = net(pixels, self.text)
        losses = self.criterion(outputs, targets)  # in float32: the criterion casts its inputs
        return {**losses, "total_loss": self.criterion.weighted_total(losses)}

    # -- results -------------------------------------------------------------------------------------------
    def has_eval(self) -> bool:
        return self.val_ds is not None

    def evaluate(self, model, step, progress) -> tuple[dict[str, Any], dict[str, Any]]:
        from .evaluate import evaluate

        metrics = evaluate(model, self.val_ds, max_images=self.config.val_max_images, progress=progress,
                           text_embeddings=self.val_text)
        return {k: v for k, v in metrics.items() if not isinstance(v, dict)}, metrics

    def eval_summary(self, line) -> str:
        return f"mIoU {line['mIoU']:.2f}  pACC {line['pACC']:.2f}"

    def checkpoint_extras(self, step: int, info: du.DistInfo) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "samples_seen": step * self._per_step(info.world_size),
                "class_names": self.class_names}

    def restore_extras(self, state, path) -> None:
        if state.get("class_names") not in (None, self.class_names):
            warnings.warn(f"{path} was trained on other class names than the dataset's", stacklevel=3)

    def save_final(self, model, out, step, metrics) -> Path:
        cfg = self.config
        meta = {"model": cfg.model, "model_overrides": dict(cfg.model_overrides), "class_names": self.class_names,
                "ignore_index": self.ignore_index, "iteration": step, "dataset": cfg.dataset, "clip": cfg.clip,
                "init_checkpoint": cfg.init_checkpoint}
        return ckpt.save_final_model(model, out, meta)[0]


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
    return run_family(SegmentationFamily(config, train_dataset, val_dataset, transform))
