"""Benchmark suites: which task modules to run, with which config preset and which resources.

A suite is data: a list of :class:`TaskDef` (task name, ``python -m`` module following the task
protocol of ``docs/CONTRACTS.md``, config preset per backbone architecture, Slurm resources per
architecture) plus the resources of the pretraining jobs it can be chained after. ``slurm.submit``
expands a suite into tasks × backbones × seeds.

Suites: ``smoke`` (every task, tiny settings for 2 CPU cores), ``paper`` (the reference protocols of
REFERENCE.md for ViT-B and ViT-L on A100 nodes), ``selftest`` (a synthetic protocol task that checks
a cluster's array / requeue / failure handling in seconds, used by the Slurm tests). The probes that
``slurm.watch`` runs on pretraining snapshots are task entries too (:mod:`benchmarks.suites.probes`).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Mapping

from crossmae.utils import UserError

SUITE_NAMES = ("smoke", "paper", "selftest")
#: the key of a per-architecture mapping that applies to every architecture not listed.
ANY_ARCH = "*"


@dataclass(frozen=True)
class Resources:
    """What one task needs from the scheduler.

    Attributes:
        nodes: number of nodes (multi-node DDP when > 1).
        gpus_per_node: GPUs per node (0 on CPU).
        tasks_per_node: processes per node (one per GPU for DDP; 1 on CPU).
        cpus_per_task: CPU cores per process (also the task's torch thread count).
        mem_gb: memory per node, GB.
        timeout_min: wall-clock limit per attempt, minutes (a time-out requeues and resumes).
        gpu_type: the GPU the protocol targets, for the leaderboard and docs (e.g. "A100-80GB");
            never sent to Slurm — use ``--constraint`` for that.
    """

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    mem_gb: float = 4.0
    timeout_min: int = 30
    gpu_type: str = "cpu"

    def replace(self, option: str = "--resources", /, **overrides) -> "Resources":
        """A copy with ``overrides`` (field name → value, strings converted to the field's type);
        ``option`` names the command-line option in errors.

        Raises:
            UserError: unknown field, a value of the wrong type, or out of range (nodes,
                tasks_per_node, cpus_per_task, timeout_min >= 1; gpus_per_node >= 0; mem_gb > 0).
        """
        fields = {f.name: f for f in dataclasses.fields(self)}
        conv = {}
        for k, v in overrides.items():
            if k not in fields:
                raise UserError(f"{option} {k}={v}: unknown resource (known: {', '.join(fields)})")
            typ = {"int": int, "float": float, "str": str}[str(fields[k].type)]
            try:
                conv[k] = typ(v)
            except (TypeError, ValueError):
                raise UserError(f"{option} {k}={v}: expected {typ.__name__}")
            low = 0 if k == "gpus_per_node" else 1
            if typ is int and conv[k] < low or typ is float and not 0 < conv[k] < float("inf"):
                raise UserError(f"{option} {k}={v}: must be " + (f">= {low}" if typ is int else "a positive number"))
        return dataclasses.replace(self, **conv)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TaskDef:
    """One task of a suite.

    Attributes:
        name: the task's name in paths and the leaderboard (``finetune``, ``linprobe``, ``inat``,
            ``places``, ``coco``, ``ade20k``, ``pretrain``, ``selftest``).
        module: the importable module with ``main(argv) -> dict`` (``transfer.finetune``, …).
        protocol: the protocol label in the leaderboard (``finetune``, ``linprobe``, ``vitdet``, …).
        configs: architecture → config preset (``configs/<name>/<preset>.py``); ``"*"`` matches any.
        resources: architecture → :class:`Resources`; ``"*"`` matches any.
        args: extra command-line arguments passed to the module (after the standard ones).
        needs_backbone: False for pretraining (no ``--backbone``).
    """

    name: str
    module: str
    protocol: str
    configs: Mapping[str, str]
    resources: Mapping[str, Resources]
    args: tuple[str, ...] = ()
    needs_backbone: bool = True

    def config_for(self, arch: str) -> str:
        """The config preset for ``arch``. Raises UserError when the task has none for it."""
        return _pick(self.configs, arch, f"task {self.name!r}: no config preset for arch {arch!r}")

    def resources_for(self, arch: str) -> Resources:
        return _pick(self.resources, arch, f"task {self.name!r}: no resources for arch {arch!r}")

    @property
    def config_dir(self) -> str:
        """``configs/<dir>`` where the module's presets live (the module's last name)."""
        return self.module.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Suite:
    """A named list of tasks plus the pretraining resources used by ``slurm.submit --pretrain``."""

    name: str
    description: str
    tasks: tuple[TaskDef, ...]
    pretrain: TaskDef | None = None
    default_arch: str = "vit_base_patch16"
    extra: dict = field(default_factory=dict)

    def task(self, name: str) -> TaskDef:
        for t in self.tasks:
            if t.name == name:
                return t
        raise UserError(f"--tasks {name}: not a task of suite {self.name!r} "
                        f"(tasks: {', '.join(t.name for t in self.tasks)})")

    def select(self, names: list[str] | None) -> list[TaskDef]:
        """The tasks named in ``names`` (all when None / empty), in suite order."""
        if not names:
            return list(self.tasks)
        wanted = [self.task(n).name for n in names]
        return [t for t in self.tasks if t.name in wanted]


def _pick(mapping: Mapping, arch: str, msg: str):
    if arch in mapping:
        return mapping[arch]
    if ANY_ARCH in mapping:
        return mapping[ANY_ARCH]
    raise UserError(f"{msg} (has: {', '.join(mapping)})")


def get_suite(name: str) -> Suite:
    """The suite called ``name`` (module ``benchmarks.suites.<name>``, attribute ``SUITE``).

    Raises:
        UserError: unknown suite name.
    """
    if name not in SUITE_NAMES:
        raise UserError(f"--suite {name}: unknown suite (known: {', '.join(SUITE_NAMES)})")
    return importlib.import_module(f"{__name__}.{name}").SUITE
