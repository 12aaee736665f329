"""Tasks as data (:class:`TaskSpec`) and the requeue-safe callable that runs one (:class:`TaskRunner`).

A task is one ``python -m <module>`` run of the task protocol (``docs/CONTRACTS.md``) in its own
output folder. Files in that folder besides the task's own (``metrics.json``, checkpoints, log):

``task.json``        the spec and where it was submitted (executor, job id, job folder); written by
                     ``slurm.submit`` before and after submission.
``task_state.json``  written by the running task (rank 0): ``state`` (running / requeued / failed /
                     cancelled), ``attempts``, ``job_id``, ``host``, ``pid``, ``log`` (the submitit
                     stderr file), ``error`` (first line) and ``traceback`` when it failed, and
                     ``backbone_meta`` (pretraining metadata read from the backbone checkpoint's
                     ``args`` at task time, for the leaderboard).

Requeue: submitit calls :meth:`TaskRunner.checkpoint` on preemption / time-out; it returns the same
runner and spec, the job is requeued and the module resumes from its own ``checkpoint-latest.pth``.
A task whose ``metrics.json`` exists returns it without running.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from crossmae.utils import UserError, atomic_write_json

TASK_JSON = "task.json"
STATE_JSON = "task_state.json"
METRICS_JSON = "metrics.json"
PRETRAIN_PREFIX = "pretrain:"
#: The marker of a suite's output root (written by ``slurm.submit``): another suite is never launched
#: inside it, nor around it, and the leaderboard of one suite never collects another's results.
SUITE_JSON = "suite.json"


@dataclass
class TaskSpec:
    """Everything needed to run one task; JSON-serialisable.

    Attributes:
        id: unique in an output root: ``<backbone>/<task>-<config>/seed<k>`` or ``pretrain/<name>``.
        suite, task, protocol, module, config: from the suite's :class:`~benchmarks.suites.TaskDef`.
        kind: ``"transfer"`` or ``"pretrain"``.
        backbone_name: the backbone's name (``NAME`` of ``--backbone NAME=CKPT`` / ``--pretrain``).
        backbone: the checkpoint path, or ``pretrain:<dir>`` (resolved when the task starts, after
            the pretraining job has finished), or None for pretraining.
        seed: the task's seed. output_dir: absolute folder. data_root: absolute data root or None.
        resources: :class:`~benchmarks.suites.Resources` as a dict. arch: backbone architecture.
        cfg_options: ``key=value`` overrides passed as ``--cfg-options``. args: extra arguments.
        depends_on: ids of tasks that must finish first (the pretraining of this backbone).
    """

    id: str
    suite: str
    task: str
    protocol: str
    module: str
    config: str
    kind: str
    backbone_name: str
    backbone: str | None
    seed: int
    output_dir: str
    data_root: str | None
    resources: dict
    arch: str = ""
    cfg_options: list = field(default_factory=list)
    args: list = field(default_factory=list)
    depends_on: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def dir(self) -> Path:
        return Path(self.output_dir)

    def argv(self) -> list[str]:
        """The module's command line (backbone resolved): ``--config … --output-dir … --seed …``."""
        argv = ["--config", self.config, "--output-dir", self.output_dir, "--seed", str(self.seed)]
        if self.backbone is not None:
            argv += ["--backbone", str(resolve_backbone(self.backbone))]
        if self.data_root:
            argv += ["--data-root", self.data_root]
        if self.cfg_options:
            argv += ["--cfg-options", *self.cfg_options]
        return argv + list(self.args)


def resolve_backbone(backbone: str) -> Path | str:
    """A checkpoint path; ``pretrain:<dir>`` becomes the finished pretraining's checkpoint; a URI
    (``zoo:``, ``hf://``, ``timm:``, ``http(s)://``) is passed on unchanged.

    For a pretraining folder: ``metrics.json``'s ``checkpoint`` entry when present, else
    ``checkpoint-final.pth``, else ``checkpoint-latest.pth``.

    Raises:
        UserError: the pretraining has no metrics (not finished) or no checkpoint file.
    """
    from crossmae.zoo import is_uri
    if is_uri(backbone):  # zoo: / hf:// / timm: / http(s)://: the task resolves it (crossmae.zoo)
        return backbone
    if not backbone.startswith(PRETRAIN_PREFIX):
        return Path(backbone)
    d = Path(backbone[len(PRETRAIN_PREFIX):])
    m = d / METRICS_JSON
    if not m.is_file():
        raise UserError(f"{m}: pretraining not finished (no metrics.json), cannot run its transfer tasks")
    ck = read_json(m).get("checkpoint")
    for cand in ([Path(ck)] if ck else []) + [d / "checkpoint-final.pth", d / "checkpoint-latest.pth"]:
        if not cand.is_absolute():
            cand = d / cand
        if cand.is_file():
            return cand
    raise UserError(f"{d}: finished pretraining has no checkpoint file")


#: The schema (:data:`crossmae.safeio.SCHEMAS`) of each suite file read back by name.
JSON_KINDS = {TASK_JSON: "task", STATE_JSON: "task_state", METRICS_JSON: "metrics"}


def read_json(path: str | os.PathLike, kind: str | None = None) -> dict:
    """One of the suite's JSON files as a dict; ``{}`` when absent.

    Read through :func:`crossmae.safeio.load_json`: only a regular file (never a symlink, FIFO or
    device), of the shape of its kind (``kind``, else by file name: :data:`JSON_KINDS`; other files
    need only be a JSON object).

    Raises:
        UserError: one line naming the file and the problem (not JSON, nested too deep, a list where
            an object is expected, a field of the wrong type, a symlink or non-regular file).
    """
    from crossmae.safeio import load_json
    path = Path(path)
    return load_json(path, kind or JSON_KINDS.get(path.name, "object"), missing_ok=True) or {}


def nested_suite(out: str | os.PathLike, depth: int = 4) -> str | None:
    """Why a suite may not use ``out`` as its root, or None: a folder above it is a suite root
    (:data:`SUITE_JSON`) or a task's folder (``task.json``), or a folder below it (down to ``depth``
    levels: a suite's task folders are 3 deep) is another suite's root."""
    out = Path(out).resolve()
    for a in out.parents:
        for marker, what in ((SUITE_JSON, "another suite's output folder"), (TASK_JSON, "a task's folder")):
            if os.path.lexists(a / marker):
                return f"lies inside {a}, {what} ({a / marker})"
    if not out.is_dir():
        return None
    for cur, dirs, files in os.walk(out):
        rel = Path(cur).relative_to(out)
        if rel.parts and SUITE_JSON in files:
            return f"holds another suite's output folder {cur} ({SUITE_JSON})"
        if len(rel.parts) >= depth or TASK_JSON in files:
            dirs[:] = []
        else:
            dirs[:] = [d for d in dirs if not (rel == Path(".") and d == "jobs")]
    return None


def process_identity(pid: int) -> dict | None:
    """What identifies a live process beyond its (reusable) id: ``{"pid", "start_ticks", "cmdline_sha256"}``
    with ``start_ticks`` field 22 of ``/proc/<pid>/stat`` (start time since boot, clock ticks) and the
    SHA-256 of ``/proc/<pid>/cmdline``. None when the process does not exist (or no ``/proc``).

    Source: proc(5), ``/proc/[pid]/stat`` field (22) ``starttime``.
    """
    import hashlib
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        fields = stat_line[stat_line.rindex(b")") + 2:].split()  # comm may hold spaces and parentheses
        return {"pid": pid, "start_ticks": int(fields[22 - 3]),
                "cmdline_sha256": hashlib.sha256(cmdline).hexdigest()}
    except (OSError, ValueError, IndexError):
        return None


def own_process(state: dict, key: str) -> tuple[int | None, str]:
    """``(pid, "")`` when ``state[key]`` (``"pid"`` or ``"ppid"`` of a ``task_state.json``) names a live
    process provably the task's own: a positive integer, recorded on this host, whose recorded
    identity (``state["proc"][key]``, :func:`process_identity`) matches the live process's start time
    and command line. Else ``(None, why)``; nothing may then be signalled."""
    pid = state.get(key)
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        return None, f"{key} {pid!r} is not a process id of a task"
    if state.get("host") != socket.gethostname():
        return None, f"{key} {pid} was recorded on host {state.get('host')!r}, not this one"
    rec = (state.get("proc") or {}).get(key)
    if not isinstance(rec, dict) or rec.get("pid") != pid:
        return None, f"no recorded identity for {key} {pid} (start time and command line)"
    live = process_identity(pid)
    if live is None:
        return None, f"process {pid} is not running"
    if live["start_ticks"] != rec.get("start_ticks") or live["cmdline_sha256"] != rec.get("cmdline_sha256"):
        return None, f"process {pid} is not the task's (start time or command line differ from the recorded ones)"
    return pid, ""


def write_state(spec_dir: Path, **fields) -> dict:
    """Merge ``fields`` into ``task_state.json`` (atomic) and return the new state."""
    state = read_json(spec_dir / STATE_JSON)
    state.update(fields, updated_at=time.time())
    atomic_write_json(state, spec_dir / STATE_JSON)
    return state


def _job_env() -> tuple[str | None, str | None, int, int]:
    """(job id, stderr log path, global rank, number of tasks) of the current submitit job."""
    try:
        env = submitit.JobEnvironment()
        return str(env.job_id), str(env.paths.stderr), int(env.global_rank), int(env.num_tasks)
    except Exception:  # not inside a submitit job (debug executor or direct call)
        return None, None, 0, 1


def job_layout(ntasks: int):
    """The :class:`crossmae.distributed.Layout` of this process of a job with ``ntasks`` processes.

    On Slurm it is read from Slurm's own variables (``crossmae.distributed.layout_from_env``:
    rank, local rank and node from ``SLURM_*``, master = first node of the node list, port from the
    job id), on every node alike. submitit's local executor sets no Slurm variables: there the
    ``env://`` variables submitit derives are exported first (one host)."""
    from crossmae.distributed import layout_from_env
    if "SUBMITIT_LOCAL_JOB_ID" in os.environ:  # submitit's local executor launched it, even inside a Slurm step
        for k in ("SLURM_STEP_ID", "SLURM_STEPID"):
            os.environ.pop(k, None)
    layout = layout_from_env()
    if ntasks > 1 and layout.launcher == "single":
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        layout = layout_from_env()
    return layout


class TaskRunner(submitit.helpers.Checkpointable):
    """The callable submitted for every task: ``TaskRunner()(spec_dict) -> metrics dict``.

    Derives the process's distributed layout (:func:`job_layout`: on Slurm from the ``SLURM_*``
    variables of every node; the module's ``init_distributed`` then creates the process group with
    :func:`crossmae.distributed.setup`), sets the torch thread count to ``cpus_per_task``, imports
    ``spec.module`` and calls its (unwrapped) ``main(argv)``. Only global rank 0 writes
    ``task_state.json``.

    Raises:
        whatever the task raised (after recording it in ``task_state.json``), so the scheduler
        marks the job failed; a failed task has no ``metrics.json``.
    """

    def __init__(self) -> None:
        self._requeued = False

    def __call__(self, spec: dict) -> dict:
        s = TaskSpec.from_dict(spec)
        out = s.dir
        out.mkdir(parents=True, exist_ok=True)
        job_id, log, _, ntasks = _job_env()
        layout = job_layout(ntasks)
        rank = layout.rank
        if (out / METRICS_JSON).is_file():
            return read_json(out / METRICS_JSON)
        prev = read_json(out / STATE_JSON) if rank == 0 else {}
        if rank == 0:
            write_state(out, state="running", attempts=int(prev.get("attempts", 0)) + 1, job_id=job_id,
                        log=log, host=socket.gethostname(), pid=os.getpid(), ppid=os.getppid(),
                        proc={"pid": process_identity(os.getpid()), "ppid": process_identity(os.getppid())},
                        started_at=time.time(), error=None, traceback=None, layout=layout.as_metrics())
        try:
            import torch
            torch.set_num_threads(max(1, int(s.resources.get("cpus_per_task", 1))))
            argv = s.argv()
            if rank == 0 and s.backbone is not None and "backbone_meta" not in prev:
                write_state(out, backbone_meta=backbone_meta(argv[argv.index("--backbone") + 1]))
            mod = importlib.import_module(s.module)
            main = getattr(mod.main, "__wrapped__", mod.main)  # let UserError through (no sys.exit)
            metrics = main(argv)
        except BaseException as exc:
            if rank == 0 and read_json(out / STATE_JSON).get("state") == "cancelled":
                raise  # slurm.cancel stopped it: keep that state
            if rank == 0:
                if self._requeued and isinstance(exc, SystemExit):
                    write_state(out, state="requeued", requeued_at=time.time())
                else:
                    write_state(out, state="failed", ended_at=time.time(), error=error_line(exc),
                                traceback="".join(traceback.format_exception(exc))[-4000:])
            raise
        if rank == 0:
            write_state(out, state="done", ended_at=time.time())
            if not (out / METRICS_JSON).is_file():
                write_state(out, state="failed", error=f"{s.module}.main returned without writing metrics.json")
                raise RuntimeError(f"{s.module}.main returned without writing {out / METRICS_JSON}")
        res = dict(metrics) if isinstance(metrics, dict) else read_json(out / METRICS_JSON)
        res["process"] = process_record(layout)  # each process's result says where Slurm put it
        return res

    def checkpoint(self, spec: dict) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption / time-out: requeue the same task; it resumes from its
        own ``checkpoint-latest.pth`` (the module checkpoints as it goes)."""
        self._requeued = True
        try:
            write_state(Path(spec["output_dir"]), state="requeued", requeued_at=time.time())
        except OSError:
            pass
        return submitit.helpers.DelayedSubmission(TaskRunner(), spec)


def process_record(layout) -> dict:
    """Where this process ran: ``rank``, ``local_rank``, ``node_rank`` (from the layout), ``node``
    (Slurm's node name ``SLURMD_NODENAME``, else the host name), ``host``, ``pid``."""
    return {"rank": layout.rank, "local_rank": layout.local_rank, "node_rank": layout.node_rank,
            "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "host": socket.gethostname(),
            "pid": os.getpid()}


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (one line)."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: exit status {exc.code} (bad arguments? see the log)"
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def backbone_meta(path: str | os.PathLike) -> dict:
    """Pretraining metadata of a checkpoint (see :func:`benchmarks.leaderboard.pretrain_meta`);
    ``{"error": ...}`` when it cannot be read (the task itself reports a bad checkpoint)."""
    from benchmarks.leaderboard import pretrain_meta
    try:
        return pretrain_meta(path)
    except UserError as exc:
        return {"error": str(exc)}


def run_leaderboard(root: str) -> str:
    """Job body of the final leaderboard job (Slurm ``afterany`` on every transfer array)."""
    from benchmarks.leaderboard import build
    paths = build(Path(root), Path(root) / "leaderboard.csv")
    return str(paths["csv"])

