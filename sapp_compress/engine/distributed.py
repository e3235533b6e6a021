"""Data-parallel fine-tuning under ``torchrun`` (PyTorch DDP).

``torchrun --nproc-per-node N -m sapp_compress ...`` starts N processes with ``RANK``/``WORLD_SIZE`` set;
:func:`init_from_env` joins them into one process group (NCCL on GPUs, gloo on CPU). Every rank fine-tunes
on its own slice of each global batch; DDP all-reduces the gradients, so weights and SA++ logits stay equal
and every rank selects the same blocks. That is checked, not assumed: at every pruning event each rank's mask
digest is gathered and compared (:func:`check_same_masks`). Only rank 0 exports, verifies and writes.

Past one machine, the same command runs under multi-node torchrun, e.g. on each of 2 nodes:
``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400
-m sapp_compress ...``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def mask_digest(masks: list[torch.Tensor]) -> str:
    """sha256 of the 0/1 masks, in layer order (the report carries it too)."""
    h = hashlib.sha256()
    for m in masks:
        h.update((m.detach().cpu() > 0).numpy().tobytes())
        h.update(str(tuple(m.shape)).encode())
    return h.hexdigest()


def gather_digests(digest: str) -> list[str]:
    info = current()
    if not info.active:
        return [digest]
    out: list = [None] * info.world
    dist.all_gather_object(out, digest)
    return out


def check_same_masks(masks: list[torch.Tensor], where: str) -> list[str]:
    """Raise if the ranks hold different masks; returns every rank's digest."""
    digests = gather_digests(mask_digest(masks))
    if len(set(digests)) > 1:
        raise RuntimeError(f"masks differ across ranks at {where}: digests {[d[:12] for d in digests]}")
    return digests


def barrier() -> None:
    if current().active:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
