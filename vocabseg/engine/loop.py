"""The one training loop every model family runs on: checkpoints, resume, DDP, AMP, clipping, logging, evaluation.

A family (:class:`Family`: segmentation in ``trainer.py``, referring in ``referring.py``, GroupViT in
``groupvit_train.py``, CLIP/LiT in ``contrastive.py``) says what is particular to it: the data of a step, the
losses, the optimizer's parameter groups and LR schedule, the evaluation and the final model files. This module does
the rest, the same way for all.

What a run guarantees (CPU, fixed thread count): a run killed with SIGKILL at any moment and started again with the
same command ends with the same weights, optimizer state and ``metrics.jsonl`` (byte for byte) as an uninterrupted
run. How:

* the data of step ``k`` is a pure function of (seed, k): the family's batch sampler starts at any step, every item
  is a pure function of its key, and DataLoader workers are seeded from (seed, start step, worker);
* a checkpoint (atomic, see ``checkpoint.py``) holds trainable tensors, optimizer, grad scaler, every rank's torch /
  numpy / python RNG state and the log-averaging window of the steps since the last log line; the newest readable
  checkpoint is found by listing the folder, so there is no pointer file to get out of step;
* at a step the log line is written first, then the checkpoint, then the evaluation; a resumed run drops log lines
  after its checkpoint and re-runs the checkpoint step's evaluation when its line is missing (evaluations run under
  a forked RNG, so they change nothing else);
* wall-clock timings stay out of ``metrics.jsonl`` (console and TensorBoard only), so the file is reproducible.

``VOCABSEG_TEST_KILL_AT=POINT:STEP`` makes the process SIGKILL itself at a named point (``step``: gradients
computed, weights not yet updated; ``checkpoint``: checkpoint file written, not yet renamed into place;
``after-checkpoint``; ``eval``: in the middle of an evaluation; ``final``: before the final model files), for the
crash tests.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import CheckpointError, ConfigError
from . import checkpoint as ckpt
from . import distributed as du

__all__ = ["RunSpec", "Family", "Trainer", "run_family", "seed_everything", "kill_point", "METRICS_LOG",
           "KILL_ENV"]

METRICS_LOG = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
CURVES_FILE = "curves.png"
KILL_ENV = "VOCABSEG_TEST_KILL_AT"
LEGACY_CHECKPOINT = "last.pt"  # what the CLIP and GroupViT trainers wrote before the engine was shared


# ---------------------------------------------------------------------------------------------------- pieces


def kill_point(name: str, step: int) -> None:
    """Crash-test hook: SIGKILL this process when ``VOCABSEG_TEST_KILL_AT`` is ``{name}:{step}``."""
    if os.environ.get(KILL_ENV) == f"{name}:{step}":
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(amp: str, device: torch.device):
    """The AMP context of a forward pass (``none``: no change at all)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _check_amp(amp: str, device: torch.device) -> None:
    if amp not in ("none", "bf16", "fp16"):
        raise ConfigError(f"amp must be none, bf16 or fp16, got {amp!r}.")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs a CUDA device; on CPU use amp=bf16 or amp=none.")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("This GPU does not support bfloat16; use amp=fp16.")


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    from .evaluate import _json_safe

    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_json_safe(dict(record)), allow_nan=False) + "\n")
        f.flush()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The complete records of a ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _worker_init(base: int, worker_id: int) -> None:
    """DataLoader workers: one thread each (they only prepare samples), RNGs seeded by (seed, start step, worker)."""
    torch.set_num_threads(1)
    seed_everything(base + worker_id)


class _Console:
    """Rank-0 output: a rich progress bar on a terminal, plain lines otherwise (or a caller's ``log``)."""

    def __init__(self, enabled: bool, show_bar: bool, total: int, start: int,
                 log: Callable[[str], None] | None = None) -> None:
        self.enabled, self.log = enabled, log
        self.progress = None
        if enabled and show_bar and log is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def advance(self, step: int, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.log is not None:
            self.log(message)
        elif self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class _Window:
    """Sums of the logged values since the last log line; part of a checkpoint, so a resumed run averages the same
    steps as an uninterrupted one when ``log_every`` does not divide ``checkpoint_every``."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        self.sums: dict[str, float] = dict((state or {}).get("sums", {}))
        self.n = int((state or {}).get("n", 0))
        self.time = self.data_time = 0.0

    def add(self, values: Mapping[str, float], seconds: float, data_seconds: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.time += seconds
        self.data_time += data_seconds

    def state(self) -> dict[str, Any]:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "n": self.n}


class _Board:
    """TensorBoard scalars when ``tensorboard`` is installed (``tensorboard --logdir runs/``); nothing otherwise."""

    def __init__(self, folder: Path, first_step: int) -> None:
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - tensorboard is optional
            return
        self.writer = SummaryWriter(str(folder), purge_step=first_step)  # a resumed run replaces later events

    def add(self, prefix: str, step: int, values: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "iter":
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------------- plug-in


@dataclass
class RunSpec:
    """What the loop needs from a family's config (each family maps its own field names onto these)."""

    output_dir: str
    seed: int
    max_iters: int  # optimizer steps of the schedule
    stop_at: int | None = None  # end the run at this step (a later run with another config resumes from it)
    log_every: int = 20
    checkpoint_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 0  # numbered checkpoints kept; 0: all
    clip_grad: float | None = None  # max global gradient norm; None or 0: off
    amp: str = "none"
    device: str = "auto"
    resume: bool | str = "auto"  # auto: continue when the folder has a checkpoint; true: it must; false: never
    progress: bool = True  # a progress bar on a terminal
    verbose: bool = True  # log lines on the console (rank 0)
    grad_accum: int = 1
    num_workers: int = 0
    find_unused_parameters: bool = False

    @property
    def last_step(self) -> int:
        return min(self.max_iters, self.stop_at) if self.stop_at else self.max_iters


class Family:
    """The model-specific half of a training run. Override what differs; the loop calls, in this order:
    :meth:`prepare` (data; bad paths fail here), :meth:`build_model`, :meth:`optimizer`, then per step
    :meth:`lr_factor`, :meth:`losses` on :meth:`dataset` items keyed by :meth:`batch_sampler`, :meth:`after_step`;
    :meth:`evaluate` when due; :meth:`save_final` at the end."""

    name = ""
    config_cls: type = object
    # config keys a resumed run must share with the run that wrote the folder (the rest may change between runs)
    identity_keys: tuple[str, ...] = ()
    supports_ddp = False

    def __init__(self, config: Any) -> None:
        self.config = config

    # -- description ---------------------------------------------------------------------------------------
    def spec(self) -> RunSpec:
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        import dataclasses

        return json.loads(json.dumps(dataclasses.asdict(self.config), default=str))

    def describe(self, info: du.DistInfo, start: int) -> str:
        spec = self.spec()
        return f"training {self.name} steps {start}..{spec.last_step}, device {info.device}"

    # -- setup ---------------------------------------------------------------------------------------------
    def prepare(self, info: du.DistInfo) -> None:
        """Build or check the data sets (before the model, so a wrong folder fails in a second)."""

    def build_model(self, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def lr_factor(self, step: int) -> float:
        """Multiplier of every group's initial LR at (0-based) step ``step``."""
        return 1.0

    # -- data ----------------------------------------------------------------------------------------------
    def dataset(self, model: nn.Module) -> Dataset:
        raise NotImplementedError

    def batch_sampler(self, start_step: int, info: du.DistInfo) -> Iterable[list[Any]]:
        """Keys of each micro-batch from step ``start_step`` on; must depend on (seed, step) only."""
        raise NotImplementedError

    def collate(self, model: nn.Module) -> Callable | None:
        return None

    # -- step ----------------------------------------------------------------------------------------------
    def losses(self, net: nn.Module, model: nn.Module, batch: Any, step: int, device: torch.device,
               amp: Callable[[], Any]) -> dict[str, torch.Tensor]:
        """Named loss terms of one micro-batch, with ``total_loss`` the one to minimise. Call ``net`` (the DDP
        wrapper under torchrun) for the forward pass, inside ``with amp():``."""
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """After each optimizer step (e.g. clamp CLIP's logit scale)."""

    def log_extras(self, model: nn.Module) -> dict[str, float]:
        """Values added to each train line of ``metrics.jsonl``."""
        return {}

    # -- evaluation and results ----------------------------------------------------------------------------
    def has_eval(self) -> bool:
        return False

    def evaluate(self, model: nn.Module, step: int, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """(numbers for the ``metrics.jsonl`` line, everything for ``eval_{step}.json``); runs on every rank."""
        raise NotImplementedError

    def eval_summary(self, line: Mapping[str, Any]) -> str:
        keys = [k for k in line if isinstance(line[k], float)][:4]
        return "  ".join(f"{k} {line[k]:.2f}" for k in keys)

    def checkpoint_extras(self, step: int, info: du.DistInfo) -> dict[str, Any]:
        return {}

    def restore_extras(self, state: Mapping[str, Any], path: Path) -> None:
        pass

    def save_final(self, model: nn.Module, out: Path, step: int, metrics: dict[str, Any] | None) -> Path:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------- the loop


class Trainer:
    """Runs a :class:`Family` from its config to its final model, resuming from the folder when it can."""

    def __init__(self, family: Family, info: du.DistInfo, log: Callable[[str], None] | None = None) -> None:
        self.family, self.info, self.log = family, info, log
        self.device = info.device
        self.spec = family.spec()
        self.out = Path(self.spec.output_dir).expanduser()

    # -- resume --------------------------------------------------------------------------------------------
    def _find(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to continue from (rank 0 decides), after checking that this config may continue it."""
        spec, fam = self.spec, self.family
        found, error = None, None
        if self.info.is_main:
            existing = ckpt.list_checkpoints(self.out) or ([(0, self.out / LEGACY_CHECKPOINT)]
                                                           if (self.out / LEGACY_CHECKPOINT).is_file() else [])
            if spec.resume is False and existing:
                error = (f"{self.out} already holds checkpoints of a run; pass resume=auto (--resume) to continue "
                         f"it, or choose another output_dir.")
            elif spec.resume is not False:
                found = ckpt.find_resume_checkpoint(self.out) or self._legacy()
                if found is None and spec.resume is True:
                    error = (f"resume=true but {self.out} holds no complete checkpoint; use resume=auto to start "
                             f"fresh when there is none.")
                if found is not None and error is None:
                    error = self._incompatible(*found)
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
        return Path(path), du.broadcast_object(found[1] if self.info.is_main else None)

    def _legacy(self) -> tuple[Path, dict[str, Any]] | None:
        """A ``last.pt`` of the former CLIP/GroupViT trainers (model, optimizer, step): continued, not restarted."""
        path = self.out / LEGACY_CHECKPOINT
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - unreadable: start fresh
            return None
        if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
            return None
        return path, {"legacy": True, **state, "iteration": int(state["step"])}

    def _incompatible(self, path: Path, state: Mapping[str, Any]) -> str | None:
        """Why this config may not continue the run that wrote ``path`` (one line), or None."""
        if state.get("legacy"):
            return None
        fam = self.family
        if state.get("family", fam.name) != fam.name:
            return f"{self.out} holds a {state.get('family')} run, not a {fam.name} one; use another output_dir."
        saved, now = state.get("config") or {}, fam.config_dict()
        for key in fam.identity_keys:
            if key in saved and saved.get(key) != now.get(key):
                return (f"{self.out} was made by another config: {key} is {saved.get(key)!r} there and "
                        f"{now.get(key)!r} here; use the run's {key} or another output_dir.")
        return None

    def _restore(self, path: Path, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: Any, frozen_id: str) -> tuple[int, _Window]:
        info, spec = self.info, self.spec
        step = int(state["iteration"])
        initial = [g["initial_lr"] for g in optimizer.param_groups]
        if state.get("legacy"):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            seed_everything(spec.seed + 1 + info.rank + 7919 * step)
            window = _Window()
        else:
            if state.get("frozen_fingerprint", state.get("fingerprint")) != frozen_id:  # older referring runs
                raise CheckpointError(f"The frozen weights differ from those of the run that wrote {path}; resume "
                                      f"with the same clip, init_checkpoint and seed.")
            self.family.restore_extras(state, path)
            ckpt.load_trainable_state(model, state["model"])
            try:
                optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"The optimizer state in {path} does not fit this model: {e}.") from None
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            same_world = state.get("world_size", 1) == info.world_size
            rng, windows = state.get("rng") or [], state.get("window") or []
            rng = [rng] if isinstance(rng, dict) else rng  # older referring runs stored one process's states
            if same_world and len(rng) == info.world_size:
                ckpt.restore_rng_state(rng[info.rank])
            else:
                warnings.warn("resuming with another number of processes: the run will differ from an "
                              "uninterrupted one", stacklevel=3)
                seed_everything(spec.seed + 1 + info.rank + 7919 * step)
            window = _Window(windows[info.rank] if same_world and len(windows) == info.world_size else None)
        for group, lr in zip(optimizer.param_groups, initial):  # the config's LR wins: it may change on resume
            group["initial_lr"] = lr
        return step, window

    def _reset_folder(self, step: int | None) -> None:
        """Rank 0: drop what a killed run wrote after checkpoint ``step`` (everything for a fresh start)."""
        log = self.out / METRICS_LOG
        if step is None:
            for p in [log, *self.out.glob("events.out.tfevents.*")]:
                p.unlink(missing_ok=True)
        else:
            ckpt.truncate_log(log, step)
        for p in self.out.glob("eval_*.json"):
            digits = p.stem.split("_")[-1]
            if step is None or (digits.isdigit() and int(digits) > step):
                p.unlink(missing_ok=True)

    # -- main ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        fam, spec, info = self.family, self.spec, self.info
        _check_amp(spec.amp, self.device)
        if info.distributed and not fam.supports_ddp:
            raise ConfigError(f"{fam.name} training runs in one process; launch it without torchrun.")
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        du.barrier()
        found = self._find()
        if info.is_main:
            ckpt.remove_stale_tmp(self.out)
        fam.prepare(info)
        self.spec = spec = fam.spec()  # may depend on the data (epochs -> steps)
        last = spec.last_step

        seed_everything(spec.seed)  # identical initialisation on every rank
        model = fam.build_model(self.device)
        frozen_id = ckpt.frozen_fingerprint(model)
        optimizer = fam.optimizer(model)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        scaler = torch.amp.GradScaler("cuda") if spec.amp == "fp16" else None
        step, window = 0, _Window()
        if found is not None:
            step, window = self._restore(found[0], found[1], model, optimizer, scaler, frozen_id)
        else:
            seed_everything(spec.seed + 1 + info.rank)  # training randomness (e.g. point sampling) differs per rank
        if info.is_main:
            from .config import save_family_config

            save_family_config(fam.name, fam.config_dict(), self.out / CONFIG_FILE)
            self._reset_folder(step if found is not None else None)
        du.barrier()

        net = du.wrap_model(model, info, spec.find_unused_parameters)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        console = _Console(info.is_main and spec.verbose, spec.progress and sys.stdout.isatty(), last, step, self.log)
        board = _Board(self.out, step + 1) if info.is_main else None
        if found is not None:
            console.print(f"resumed from {found[0].name} at step {step}")
        console.print(fam.describe(info, step))
        last_losses: dict[str, float] = {}
        last_eval: dict[str, Any] | None = None
        last_ckpt: Path | None = found[0] if found is not None else None
        started = time.perf_counter()
        if found is not None and self._eval_due(step) and not self._eval_logged(step):
            last_eval = self._evaluate(model, step, console, board)  # the killed run did not finish it
        data_iter = iter(self._loader(model, step)) if step < last else None
        try:
            while step < last:
                t0 = time.perf_counter()
                factor = fam.lr_factor(step)
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor
                lr = optimizer.param_groups[0]["lr"]
                losses, grad_norm, data_time = self._step(net, model, optimizer, scaler, params, data_iter, step)
                fam.after_step(model)
                step += 1
                window.add({**losses, "grad_norm": grad_norm}, time.perf_counter() - t0, data_time)
                done = step == last
                if step % spec.log_every == 0 or done:
                    last_losses = self._log(window, step, lr, model, console, board)
                    window = _Window()
                console.advance(step, f"loss {last_losses['total_loss']:.3f}" if last_losses else "")
                if (spec.checkpoint_every and step % spec.checkpoint_every == 0) or done:
                    last_ckpt = self._checkpoint(model, optimizer, scaler, step, frozen_id, window)
                if self._eval_due(step):
                    last_eval = self._evaluate(model, step, console, board)
        finally:
            console.close()
            if board is not None:
                board.close()
            del data_iter  # stops DataLoader workers

        if last_eval is None and self._eval_due(step):
            last_eval = self._read_eval(step)
        kill_point("final", step)
        final = None
        if info.is_main:
            final = fam.save_final(model, self.out, step, last_eval)
            _write_curves(self.out)
        du.barrier()
        return {"iteration": step, "output_dir": str(self.out), "final_weights": str(final) if final else None,
                "last_checkpoint": str(last_ckpt) if last_ckpt is not None else None, "losses": last_losses,
                "metrics": last_eval, "train_time_s": time.perf_counter() - started, "world_size": info.world_size}

    def _loader(self, model: nn.Module, start: int) -> DataLoader:
        from functools import partial

        fam, spec = self.family, self.spec
        base = int(np.random.default_rng([spec.seed, start, 0x776b]).integers(2**31))
        return DataLoader(fam.dataset(model), batch_sampler=fam.batch_sampler(start, self.info),
                          collate_fn=fam.collate(model), num_workers=spec.num_workers,
                          worker_init_fn=partial(_worker_init, base) if spec.num_workers else None,
                          pin_memory=self.device.type == "cuda",
                          # a private generator: creating the iterator must not draw from the global torch RNG
                          generator=torch.Generator().manual_seed(spec.seed))

    def _step(self, net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
              params: list[nn.Parameter], data_iter: Iterable, step: int) -> tuple[dict[str, float], float, float]:
        """One optimizer step over ``grad_accum`` micro-batches (DDP syncs on the last); returns (mean losses,
        gradient norm before clipping, seconds spent waiting for data)."""
        spec, fam = self.spec, self.family
        accum = spec.grad_accum
        sums: dict[str, torch.Tensor] = {}
        data_time = 0.0
        amp = lambda: autocast(spec.amp, self.device)  # noqa: E731
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(data_iter)
            data_time += time.perf_counter() - t0
            with du.maybe_no_sync(net, micro < accum - 1):
                losses = fam.losses(net, model, batch, step, self.device, amp)
                total = losses["total_loss"]
                if not torch.isfinite(total):
                    raise FloatingPointError(f"the loss is {total.item()} at step {step}; lower lr, or check the "
                                             f"data")
                scaled = total / accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / accum
        kill_point("step", step + 1)
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        max_norm = spec.clip_grad if spec.clip_grad else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if scaler is not None:
            scaler.step(optimizer)  # skipped when the gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in sums.items()}, float(grad_norm), data_time

    def _log(self, window: _Window, step: int, lr: float, model: nn.Module, console: _Console,
             board: _Board | None) -> dict[str, float]:
        """Means over the window (averaged over ranks) -> one metrics.jsonl line on rank 0."""
        keys = sorted(window.sums)
        values = torch.tensor([window.sums[k] / window.n for k in keys], dtype=torch.float64)
        if self.info.distributed:
            values = du.all_reduce_sum(values) / self.info.world_size
        means = dict(zip(keys, values.tolist()))
        if self.info.is_main:
            record = {"type": "train", "iter": step, "lr": lr, **means, **self.family.log_extras(model)}
            _append_jsonl(self.out / METRICS_LOG, record)
            n = max(1, window.n)  # steps timed by this process (those since the resume, after one)
            per_step, data = window.time / n, window.data_time / n
            if board is not None:
                board.add("train", step, {**record, "sec_per_step": per_step, "data_sec_per_step": data})
            console.print(f"step {step}/{self.spec.last_step}  loss {means['total_loss']:.4f}  lr {lr:.3g}  "
                          f"{per_step:.3f}s/step (data {data:.3f}s)")
        return means

    def _checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, step: int,
                    frozen_id: str, window: _Window) -> Path:
        rng = du.all_gather_objects(ckpt.capture_rng_state())
        windows = du.all_gather_objects(window.state())
        path = ckpt.checkpoint_path(self.out, step)
        if self.info.is_main:
            state = {
                "family": self.family.name,
                "model": ckpt.trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "world_size": self.info.world_size,
                "rng": rng,
                "window": windows,
                "config": self.family.config_dict(),
                "frozen_fingerprint": frozen_id,
                **self.family.checkpoint_extras(step, self.info),
            }
            path = ckpt.save_checkpoint(state, self.out, step, keep=self.spec.keep_checkpoints,
                                        before_replace=lambda: kill_point("checkpoint", step))
        du.barrier()
        kill_point("after-checkpoint", step)
        return path

    # -- evaluation ----------------------------------------------------------------------------------------
    def _eval_due(self, step: int) -> bool:
        every = self.spec.eval_every
        return self.family.has_eval() and ((every > 0 and step % every == 0) or step == self.spec.last_step)

    def _eval_logged(self, step: int) -> bool:
        logged = None
        if self.info.is_main:
            logged = any(r.get("type") == "eval" and r.get("iter") == step for r in read_log(self.out / METRICS_LOG))
        return bool(du.broadcast_object(logged))

    def _read_eval(self, step: int) -> dict[str, Any] | None:
        path = self.out / f"eval_{step:07d}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def _evaluate(self, model: nn.Module, step: int, console: _Console, board: _Board | None) -> dict[str, Any]:
        from .evaluate import write_metrics_json

        was_training = model.training
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # an evaluation must not move the training RNG
            model.eval()
            try:
                kill_point("eval", step)
                line, full = self.family.evaluate(model, step, self.spec.progress and console.progress is None)
            finally:
                model.train(was_training)
        if self.info.is_main:
            write_metrics_json(full, self.out / f"eval_{step:07d}.json")
            record = {"type": "eval", "iter": step, **line}
            _append_jsonl(self.out / METRICS_LOG, record)
            if board is not None:
                board.add("eval", step, record)
            console.print(f"eval at step {step}: {self.family.eval_summary(line)}")
        return full


def _write_curves(out: Path) -> None:
    """``curves.png`` of the run when matplotlib is installed (silently nothing otherwise)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    from .plot import plot_runs

    try:
        plot_runs([out], out / CURVES_FILE)
    except Exception as e:  # noqa: BLE001 - a picture must never fail a finished run
        warnings.warn(f"could not draw {out / CURVES_FILE}: {e}", stacklevel=2)


def run_family(family: Family, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``family`` standalone or under torchrun; returns step, output paths, last losses and evaluation."""
    info = du.init_distributed(family.spec().device)
    try:
        return Trainer(family, info, log).run()
    finally:
        du.cleanup(info)
