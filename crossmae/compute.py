"""Cumulative compute of a pretraining run, recorded in every checkpoint and snapshot.

A probe result of a snapshot can then be placed on a compute axis without re-running anything
(the CrossMAE paper compares MAE and CrossMAE "under the same compute", Sections 1 and 5.2). Each
checkpoint's ``compute`` entry (and each ``snapshots.json`` entry, :mod:`crossmae.checkpoint`)
holds, cumulatively from the start of training (carried over by resume)::

    epoch            0-based index of the last finished epoch
    images_seen      images processed by the optimizer steps (all ranks, all epochs)
    wall_time_s      seconds spent in the training epochs (sum of the epochs' times)
    device_hours     Σ over epochs of devices × epoch seconds / 3600 (devices = processes: GPUs, or
                     CPU processes on a CPU run)
    devices          processes of the latest epoch; device_type: "cpu" or the GPU names (";"-joined
                     when a resumed run moved to another GPU type)
    flops_per_image  forward+backward FLOPs of one image (:func:`crossmae.flops.count_flops`,
                     matmul/conv/attention only, 1 multiply-add = 2 FLOPs)
    flops            images_seen × flops_per_image
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

COMPUTE_KEYS = ("epoch", "images_seen", "wall_time_s", "device_hours", "devices", "device_type",
                "flops_per_image", "flops")


def flops_per_image(model: torch.nn.Module, mask_ratio: float, kept_mask_ratio: float | None,
                    device: torch.device | str = "cpu") -> float:
    """Forward+backward FLOPs of one pretraining image of ``model`` (an unwrapped MAE / CrossMAE,
    before DDP / compile) at mask ratio p and prediction ratio γ (None: γ = p, MAE). Uses its own
    generator: the global RNG streams (and so bit-exact resume) are untouched."""
    from .flops import count_flops
    gamma = mask_ratio if kept_mask_ratio is None else kept_mask_ratio
    return float(count_flops(model, float(mask_ratio), float(gamma), device=device, backward=True)["total_fwdbwd"])


@dataclass
class ComputeMeter:
    """Running totals of a pretraining run (see the module doc for the fields and units).

    Usage in the training loop::

        meter = ComputeMeter.start(state, flops_per_image(model, p, γ, device), device_type)
        ... after each epoch: meter.add_epoch(epoch, stats["images"], stats["time_s"], world)
        state["compute"] = meter.record()
    """

    flops_per_image: float
    device_type: str
    epoch: int = -1
    images_seen: int = 0
    wall_time_s: float = 0.0
    device_hours: float = 0.0
    devices: int = 0

    @classmethod
    def start(cls, state: dict | None, flops_per_image: float, device_type: str) -> "ComputeMeter":
        """A meter for a fresh run (``state`` None or without a ``compute`` entry: an old checkpoint
        starts at 0), or continuing the totals of the checkpoint ``state`` being resumed."""
        prev = state.get("compute") if isinstance(state, dict) else None
        meter = cls(float(flops_per_image), str(device_type))
        if isinstance(prev, dict):
            meter.epoch = int(prev.get("epoch", -1))
            meter.images_seen = int(prev.get("images_seen", 0))
            meter.wall_time_s = float(prev.get("wall_time_s", 0.0))
            meter.device_hours = float(prev.get("device_hours", 0.0))
            meter.devices = int(prev.get("devices", 0))
            old = [t for t in str(prev.get("device_type", "")).split(";") if t]
            meter.device_type = ";".join(dict.fromkeys(old + [str(device_type)]))
        return meter

    def add_epoch(self, epoch: int, images: int, seconds: float, devices: int) -> None:
        """Add one finished epoch: ``images`` processed in ``seconds`` by ``devices`` processes."""
        self.epoch = int(epoch)
        self.images_seen += int(images)
        self.wall_time_s += float(seconds)
        self.device_hours += int(devices) * float(seconds) / 3600.0
        self.devices = int(devices)

    def record(self) -> dict:
        """The checkpoint's ``compute`` entry (plain values, :data:`COMPUTE_KEYS`)."""
        d = asdict(self)
        d["flops"] = float(self.images_seen) * self.flops_per_image
        return {k: d[k] for k in COMPUTE_KEYS}
