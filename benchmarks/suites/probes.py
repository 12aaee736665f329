"""The probes ``slurm.watch`` can run on each pretraining snapshot: suite-style task entries.

Each probe is a :class:`~benchmarks.suites.TaskDef` of ``transfer.linprobe`` with one of its
protocols (``transfer/classification/linprobe.py``; docs/classification.md): ``knn`` (DINO's
weighted kNN on cached features), ``linprobe_fast`` (cached multi-head probe, head chosen on a
train hold-out), ``linprobe_blocks`` (the fast probe on every block) and ``linprobe`` (the MAE
protocol, 90 epochs at full size). The config preset follows the snapshot's architecture: the
paper preset of ``configs/linprobe`` for ViT-S/B/L, ``smoke`` for the tiny test ViT.
"""
from __future__ import annotations

from crossmae.utils import UserError

from . import Resources, TaskDef

#: architecture -> ``configs/linprobe`` preset
PRESETS = {"vit_tiny_patch16": "smoke", "vit_small_patch16": "paper_vit_small",
           "vit_base_patch16": "paper_vit_base", "vit_large_patch16": "paper_vit_large"}
CPU = Resources(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1, mem_gb=4, timeout_min=20, gpu_type="cpu")
GPU = Resources(nodes=1, gpus_per_node=1, tasks_per_node=1, cpus_per_task=10, mem_gb=64, timeout_min=240,
                gpu_type="A100-80GB")
_RES = {arch: (CPU if preset == "smoke" else GPU) for arch, preset in PRESETS.items()}


def _probe(name: str, protocol: str) -> TaskDef:
    return TaskDef(name=name, module="transfer.linprobe", protocol=f"linprobe_{protocol}", configs=dict(PRESETS),
                   resources=dict(_RES), args=("--protocol", protocol))


PROBES: dict[str, TaskDef] = {
    "knn": _probe("knn", "knn"),
    "linprobe_fast": _probe("linprobe_fast", "fast"),
    "linprobe_blocks": _probe("linprobe_blocks", "blocks"),
    "linprobe": _probe("linprobe", "mae"),
}


def get_probe(name: str) -> TaskDef:
    """The probe called ``name``.

    Raises:
        UserError: ``--probe <name>: unknown probe (known: ...)``.
    """
    if name not in PROBES:
        raise UserError(f"--probe {name}: unknown probe (known: {', '.join(PROBES)})")
    return PROBES[name]
