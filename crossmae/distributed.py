"""THROWAWAY STUB of the layout API (the real module is the ``multinode`` branch's; at merge the
lead takes that file). Same surface: :class:`Layout`, :func:`layout_from_env`, :func:`setup`,
:func:`barrier`, implemented on the torchrun / submitit environment variables only."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the job."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str | None
    master_port: int | None
    launcher: str

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_metrics(self) -> dict:
        return {"world_size": self.world_size, "num_nodes": self.num_nodes,
                "devices_per_node": self.local_world_size, "device_type": self.device.type,
                "launcher": self.launcher}


def layout_from_env(env=None) -> Layout:
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Layout(0, 1, 0, 1, 0, 1, None, None, "single")
    rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    lws = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    port = env.get("MASTER_PORT")
    return Layout(rank, world, local, lws, rank // max(lws, 1), max(world // max(lws, 1), 1),
                  env.get("MASTER_ADDR"), int(port) if port else None,
                  "slurm" if "SLURM_JOB_ID" in env else "torchrun")


def setup(backend: str | None = None, timeout_s: float | None = None) -> Layout:
    import torch.distributed as dist
    layout = layout_from_env()
    if layout.world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(layout.local_rank)
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), init_method="env://",
                                world_size=layout.world_size, rank=layout.rank,
                                timeout=timedelta(seconds=timeout_s or 1800))
    return layout


def barrier(timeout_s: float | None = None) -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
