"""submitit executors for the three back-ends: ``slurm`` (a real cluster), ``local`` (submitit's local
executor: one subprocess per task on this machine), ``debug`` (in-process, for a debugger).

Nothing cluster-specific is hard-coded: partition, account, QoS, constraint, array parallelism and
job name come from the user; resources come from the suite (:class:`benchmarks.suites.Resources`).
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import submitit

from benchmarks.suites import Resources
from crossmae.utils import UserError

EXECUTORS = ("auto", "slurm", "local", "debug")


@dataclass
class ClusterOptions:
    """User-settable scheduler options (all optional; None leaves the cluster's default).

    Attributes:
        partition, account, qos, constraint: sent as ``--partition`` … ``--constraint``.
        array_parallelism: at most this many tasks of one array run at once (Slurm ``%N``;
            also the number of concurrent local processes).
        job_name: Slurm job name prefix (the task name is appended).
        max_num_timeout: how many time-outs a task may hit before it is not requeued again.
        signal_delay_s: seconds before the time limit at which Slurm sends USR2 (checkpoint).
        exclusive: request whole nodes.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 256
    job_name: str = "crossmae"
    max_num_timeout: int = 3
    signal_delay_s: int = 120
    exclusive: bool = False

    def __post_init__(self) -> None:
        """Raises UserError (naming the command-line option) for a count out of range."""
        for name, value, low in (("array-parallelism", self.array_parallelism, 1),
                                 ("max-num-timeout", self.max_num_timeout, 0),
                                 ("signal-delay-s", self.signal_delay_s, 0)):
            check_int(f"--{name}", value, low)


def check_int(option: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``.

    Raises:
        UserError: ``<option> <value>: must be an integer >= low`` (one line) otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low or high is not None and value > high:
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise UserError(f"{option} {value}: must be an integer {rng}")
    return value


def slurm_available() -> bool:
    """True when ``sbatch`` exists AND ``scontrol ping`` reaches a controller (submitit alone picks
    Slurm whenever the client tools exist, even with the daemons down)."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and "UP" in p.stdout


def resolve_executor(kind: str) -> str:
    """``auto`` → ``slurm`` when a controller answers, else ``local``.

    Raises:
        UserError: unknown kind, or ``slurm`` asked for and no controller answers.
    """
    if kind not in EXECUTORS:
        raise UserError(f"--executor {kind}: unknown (choose from {', '.join(EXECUTORS)})")
    if kind == "auto":
        return "slurm" if slurm_available() else "local"
    if kind == "slurm" and not slurm_available():
        raise UserError("--executor slurm: no Slurm controller answers `scontrol ping` "
                        "(start one: python -m slurm.local_cluster ensure, or use --executor local)")
    return kind


def local_resources(res: Resources, cpus: int | None = None, gpus: int | None = None) -> Resources:
    """``res`` scaled to this one machine (the ``local`` / ``debug`` executors run one node):
    the processes of every node are folded onto it (``nodes × tasks_per_node``, so a CPU job keeps
    its world size and its numbers), capped at one process per visible GPU when the job asks for
    GPUs (none visible: one CPU process), else at the CPU count. The recipes keep their global batch
    on fewer processes by gradient accumulation, so a paper layout (e.g. COCO's 8 nodes × 8 GPUs)
    runs unchanged, only slower.

    Args:
        cpus, gpus: this machine's CPU / visible CUDA device counts (default: detected).
    """
    import dataclasses
    import os
    if cpus is None:
        cpus = os.cpu_count() or 1
    if gpus is None:
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    procs = int(res.nodes) * int(res.tasks_per_node)
    if res.gpus_per_node:
        procs = max(1, min(procs, gpus))
        return dataclasses.replace(res, nodes=1, tasks_per_node=procs, gpus_per_node=procs if gpus else 0)
    return dataclasses.replace(res, nodes=1, tasks_per_node=max(1, min(procs, cpus)))


def make_executor(kind: str, folder: str | Path, res: Resources, opts: ClusterOptions, name: str,
                  dependency: str | None = None) -> submitit.Executor:
    """An executor for jobs with resources ``res`` whose logs go to ``folder/%j``.

    Args:
        kind: ``slurm`` / ``local`` / ``debug`` (already resolved).
        dependency: Slurm dependency string (``afterok:12:13``); ignored off Slurm (the local graph
            runs in order instead).

    Off Slurm the resources are scaled to this machine first (:func:`local_resources`).
    """
    if kind != "slurm":
        res = local_resources(res)
    ex = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=kind,
                               slurm_max_num_timeout=opts.max_num_timeout)
    params = dict(name=f"{opts.job_name}-{name}", timeout_min=int(res.timeout_min), nodes=int(res.nodes),
                  tasks_per_node=int(res.tasks_per_node), cpus_per_task=int(res.cpus_per_task),
                  mem_gb=res.mem_gb)
    if res.gpus_per_node:
        params["gpus_per_node"] = int(res.gpus_per_node)
    if kind == "slurm":
        extra = {}
        if dependency:
            extra["kill-on-invalid-dep"] = "yes"
        params.update(slurm_partition=opts.partition, slurm_account=opts.account, slurm_qos=opts.qos,
                      slurm_constraint=opts.constraint, slurm_array_parallelism=int(opts.array_parallelism),
                      slurm_signal_delay_s=int(opts.signal_delay_s), slurm_dependency=dependency,
                      slurm_additional_parameters=extra)
        if opts.exclusive:
            params["slurm_exclusive"] = True
        params = {k: v for k, v in params.items() if v is not None}
    ex.update_parameters(**params)
    return ex
