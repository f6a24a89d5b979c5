"""Multi-process training: torchrun environment, DDP, and a sampler that makes data order resumable.

``torchrun --nproc_per_node N -m vocabseg train CONFIG`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_distributed` reads them (gloo on CPU, NCCL on
CUDA). Without them, everything here degrades to a single process.

Data order. All processes walk one global stream of samples: the concatenation of per-epoch permutations of the
dataset, permutation ``e`` seeded by ``(seed, e)``. Micro-step ``m`` consumes the stream positions
``[start + m·B·W, start + (m+1)·B·W)`` (``B`` images per process, ``W`` processes) and rank ``r`` takes its ``B``
consecutive positions of that window. The only state is ``start``, the number of samples consumed so far, so a
resumed run continues at the exact sample an uninterrupted run would have used next: nothing lost, nothing seen
twice. Each sample's augmentation RNG is seeded from ``(seed, epoch, index)`` (:func:`sample_rng`), never from the
worker process that happens to load it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

__all__ = [
    "DistInfo", "init_distributed", "cleanup", "is_distributed", "get_rank", "get_world_size", "is_main_process",
    "barrier", "all_reduce_sum", "all_gather_objects", "broadcast_object", "wrap_model", "unwrap_model",
    "ResumableBatchSampler", "sample_rng", "epoch_permutation",
]


@dataclass
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # whether cleanup() should destroy the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"Environment variable {name}={value!r} must be an integer.") from None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device} was asked for but CUDA is not available; use device=cpu.")
        if ":" in device:
            return torch.device(device)
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    raise ConfigError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's variables (if any) and choose this process's device.

    A process group created by the caller beforehand is used as it is (and left to the caller to destroy).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        dev = _pick_device(device, local_rank)
        if dist.get_backend() == "nccl" and dev.type != "cuda":
            raise ConfigError("The process group uses NCCL, which needs device=cuda.")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank, world, local_rank, dev, initialized_here=False)

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = _pick_device(device, local_rank)
    if world <= 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(0, 1, local_rank, dev)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun.")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise ConfigError(f"WORLD_SIZE={world} but {var} is not set; launch multi-process training with torchrun.")
    if not dist.is_available():
        raise ConfigError("This PyTorch build has no torch.distributed; train with one process.")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, dev, initialized_here=True)


def cleanup(info: DistInfo | None = None) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info is not None and info.initialized_here and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- collectives


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _collective_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (a new tensor on the tensor's device)."""
    if not is_distributed():
        return tensor.clone()
    work = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src``, on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


# ---------------------------------------------------------------------------------------------------- models


def wrap_model(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` when there are several processes; the model itself otherwise.

    DDP only synchronises parameters with ``requires_grad``, so a frozen CLIP costs no communication.
    """
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself if it is not wrapped)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


@contextmanager
def maybe_no_sync(model: nn.Module, skip_sync: bool):
    """Inside, a DDP model accumulates gradients locally (for all but the last micro-step of an accumulation)."""
    if skip_sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------------- data order


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the dataset in ``epoch``: a permutation seeded by (seed, epoch) only."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation RNG of dataset item ``index`` in ``epoch``: the same in any process or worker.

    Equal to ``SegmentationDataset.rng(index)`` after ``set_epoch(epoch)`` with the same seed, so a sample's
    training augmentation can be reproduced from the dataset alone.
    """
    return np.random.default_rng([int(seed), int(epoch), int(index)])


class ResumableBatchSampler:
    """Endless batch sampler yielding lists of ``(epoch, index)`` keys: this rank's share of each micro-step.

    ``start`` is the global number of samples already consumed (by all ranks together). See the module docstring
    for the layout; the data order depends on ``seed`` and the global batch ``batch_size * world_size`` only.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if num_samples < 1:
            raise ConfigError("The training dataset is empty.")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start < 0:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size}, rank={rank}, "
                             f"world_size={world_size}, start={start}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def key_at(self, position: int) -> tuple[int, int]:
        """(epoch, dataset index) at a global stream position."""
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(self.num_samples, self.seed, epoch)
            self._perm_epoch = epoch
        assert self._perm is not None
        return epoch, int(self._perm[offset])

    def batch_at(self, micro_step: int) -> list[tuple[int, int]]:
        """This rank's keys for micro-step ``micro_step`` counted from ``start``."""
        first = self.start + micro_step * self.batch_size * self.world_size + self.rank * self.batch_size
        return [self.key_at(p) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = 0
        while True:
            yield self.batch_at(step)
            step += 1
