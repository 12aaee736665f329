"""The distributed layout of a run, derived from the environment, for every launcher.

ONE function, :func:`layout_from_env`, turns the variables a launcher sets into a :class:`Layout`
(global rank, world size, local rank, node rank, number of nodes, master address and port); every
command starts from :func:`setup`, which derives the layout, binds the process to its device and
creates the process group with a timeout. Launchers understood:

``slurm``
    a task of an ``srun`` step (submitit's jobs are): ``SLURM_STEP_ID`` set, ``SLURM_PROCID``,
    ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``), ``SLURM_LOCALID``, ``SLURM_NODEID``,
    ``SLURM_STEP_NUM_NODES`` / ``SLURM_JOB_NUM_NODES``, ``SLURM_STEP_TASKS_PER_NODE`` /
    ``SLURM_TASKS_PER_NODE``, ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST``, ``SLURM_JOB_ID``.
    The batch script's own process (no step) is not a rank: it counts as ``single``. The master is the first node of the node list (``MASTER_ADDR`` wins when
    set, e.g. by ``submitit.helpers.TorchDistributedEnvironment().export()``); the port is
    ``MASTER_PORT``, else derived from the job id (:func:`port_from_job_id`), so every task of a
    job, on every node, agrees on it without talking to the others.
``torchrun``
    ``torch.distributed.run`` (``TORCHELASTIC_RUN_ID``), or any launcher that sets the ``env://``
    variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT`` (torchrun inside an ``srun`` step counts as torchrun).
``single``
    none of the above: one process, no process group.

Failure modes users report most on many nodes are handled here once: a node list such as
``linux[1,2]`` or ``gpu-[01-04]`` is expanded like Slurm does (:func:`parse_nodelist`, leading zeros
kept); the device is always ``cuda:<local rank>``, never the global rank (:func:`pick_device`);
node names that do not resolve as host names fall back to Slurm's ``NodeAddr``
(:func:`resolve_master`); process-group creation and every barrier (:func:`barrier`) have a
timeout (``timeout_s``, else ``$CROSSMAE_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`), so a node
that cannot reach the master ends with one line naming the master address and port
(:class:`~crossmae.utils.UserError`, exit status 2) instead of hanging.

Sources: PyTorch ``torch.distributed`` ``env://`` / ``tcp://`` initialisation and
``torchrun`` environment variables; Slurm ``srun``/``sbatch`` output environment variables and
``hostlist`` expression syntax (slurm.schedmd.com); the MAE reference ``util/misc.py``
``init_distributed_mode`` (one process per GPU, device = local rank).
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .utils import UserError

#: environment variable with the timeout in seconds of process-group creation and barriers.
TIMEOUT_ENV = "CROSSMAE_DIST_TIMEOUT"
#: default timeout (s): generous for a large job whose nodes start minutes apart.
DEFAULT_TIMEOUT_S = 1800.0
#: ports derived from a Slurm job id lie in ``[PORT_BASE, PORT_BASE + PORT_RANGE)``: unprivileged
#: and below Linux's ephemeral range (32768-60999), so no client socket of the host holds them.
PORT_BASE = 20000
PORT_RANGE = 10000


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the run.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes of the run.
        local_rank: rank among the processes on this node (the GPU index).
        local_world_size: processes on this node.
        node_rank: index of this node in ``[0, num_nodes)``.
        num_nodes: nodes of the run.
        master_addr: host of rank 0's rendezvous (None for one process).
        master_port: its TCP port (None for one process).
        launcher: ``"slurm"``, ``"torchrun"`` or ``"single"``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "single"

    @property
    def device(self) -> torch.device:
        """``cuda:<local_rank>`` when CUDA is available, else CPU (see :func:`pick_device`)."""
        return pick_device(self.local_rank, torch.cuda.is_available(),
                           torch.cuda.device_count() if torch.cuda.is_available() else 0)

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the process that writes the run's files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when the run has more than one process (a process group is needed)."""
        return self.world_size > 1

    def as_metrics(self) -> dict:
        """The layout as recorded in ``metrics.json``: ``world_size``, ``num_nodes``,
        ``devices_per_node`` (processes per node: one per GPU, or CPU processes), ``device_type``
        (``cuda`` / ``cpu``) and ``launcher``."""
        return {"world_size": int(self.world_size), "num_nodes": int(self.num_nodes),
                "devices_per_node": int(self.local_world_size), "device_type": self.device.type,
                "launcher": self.launcher}


# --------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------
_HOSTLIST_ITEM = re.compile(r"\[([^\[\]]*)\]")


def _split_top(s: str) -> list[str]:
    """Split at commas outside brackets: ``a[1,2],b3`` → ``["a[1,2]", "b3"]``."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"node list {s!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise UserError(f"node list {s!r}: unbalanced '['")
    out.append("".join(cur))
    return [x.strip() for x in out if x.strip()]


def _expand_range(body: str, whole: str) -> list[str]:
    """``01-03,7`` → ``["01", "02", "03", "7"]``: the width of a range's first number is kept
    (Slurm pads with zeros to it), so ``gpu-[01-04]`` is never ``gpu-1``."""
    out = []
    for part in body.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise UserError(f"node list {whole!r}: bad range {part!r}")
        if not sep:
            out.append(lo)
            continue
        a, b = int(lo), int(hi)
        if b < a:
            raise UserError(f"node list {whole!r}: range {part!r} runs backwards")
        width = len(lo)
        out += [str(i).zfill(width) for i in range(a, b + 1)]
    if not out:
        raise UserError(f"node list {whole!r}: empty brackets")
    return out


def parse_nodelist(s: str) -> list[str]:
    """Expand a Slurm host list expression into host names, in order.

    ``node[1-3,5]`` → node1 node2 node3 node5; ``gpu-[01-04]`` → gpu-01 … gpu-04 (leading zeros
    kept); ``a01,b02`` → a01 b02; ``login`` → login; ``linux[1,2]`` → linux1 linux2 (never split
    at the comma inside the brackets); ``a[1-2],b3`` → a1 a2 b3; ``r[1-2]n[1-2]`` → r1n1 r1n2 r2n1
    r2n2 (several bracket groups: their product, last group fastest, as ``scontrol show hostnames``).

    Raises:
        UserError: unbalanced brackets, a malformed or backwards range, or an empty list.
    """
    if not s or not s.strip():
        raise UserError("node list: empty")
    hosts: list[str] = []
    for item in _split_top(s.strip()):
        names = [""]
        pos = 0
        for m in _HOSTLIST_ITEM.finditer(item):
            lit = item[pos:m.start()]
            names = [n + lit + r for n in names for r in _expand_range(m.group(1), s)]
            pos = m.end()
        tail = item[pos:]
        if "[" in tail or "]" in tail:
            raise UserError(f"node list {s!r}: unbalanced brackets in {item!r}")
        hosts += [n + tail for n in names]
    return hosts


def port_from_job_id(job_id: str | int) -> int:
    """A TCP port every task of a Slurm job derives alike from its job id: ``PORT_BASE + id mod
    PORT_RANGE`` (a non-numeric id is hashed with CRC-32). Stable across requeues (same id)."""
    s = str(job_id).strip()
    n = int(s) if s.isdigit() else zlib.crc32(s.encode())
    return PORT_BASE + n % PORT_RANGE


def pick_device(local_rank: int, cuda_available: bool, device_count: int) -> torch.device:
    """The device of a process: ``cuda:<local_rank>`` when CUDA is available, else CPU.

    The global rank is never used as a GPU index (on node 2 of 8-GPU nodes it would be 8…15: the
    "invalid device ordinal" error). When the launcher shows each process only its own GPU
    (``CUDA_VISIBLE_DEVICES`` per task, ``device_count == 1``) that GPU is ``cuda:0``.

    Raises:
        UserError: the local rank has no GPU (more processes on the node than visible GPUs).
    """
    if not cuda_available:
        return torch.device("cpu")
    if local_rank < device_count:
        return torch.device("cuda", local_rank)
    if device_count == 1:
        return torch.device("cuda", 0)
    raise UserError(f"local rank {local_rank}: only {device_count} GPU(s) visible on this node "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                    f"one process per GPU")


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    v = env.get(name)
    if v is None or str(v).strip() == "":
        return default
    try:
        return int(str(v).strip())
    except ValueError:
        raise UserError(f"environment variable {name}={v!r}: expected an integer") from None


def _tasks_on_node(tasks_per_node: str, node_rank: int) -> int | None:
    """This node's entry of ``SLURM_TASKS_PER_NODE`` (``2(x3),1`` → 2 2 2 1)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_rank] if 0 <= node_rank < len(counts) else None


def in_slurm_step(env: Mapping[str, str]) -> bool:
    """True inside a Slurm job step started by ``srun`` (``SLURM_STEP_ID`` set, and not the batch /
    extern / interactive pseudo-steps, whose ids are 2**32 - 6 and above). A process of the batch
    script itself sees ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``: it is one process, not
    rank 0 of the job's tasks, and must not wait for the others."""
    sid = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if sid is None or not str(sid).strip().isdigit():
        return False
    return int(sid) < 2**32 - 6


def layout_from_env(env: Mapping[str, str] | None = None) -> Layout:
    """The :class:`Layout` described by ``env`` (default ``os.environ``); pure: nothing is resolved,
    no process group is created (the master address is the name the environment gives).

    Raises:
        UserError: a variable that should be an integer is not, a rank outside the world, or a
            malformed node list.
    """
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT")
    torchrun = "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env
    if in_slurm_step(env) and "SLURM_PROCID" in env and not torchrun:
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS") or 1
        node_rank = _int(env, "SLURM_NODEID", 0)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        hosts = parse_nodelist(nodelist) if nodelist else []
        num_nodes = (_int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_JOB_NUM_NODES") or _int(env, "SLURM_NNODES")
                     or len(hosts) or 1)
        local = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "",
                               node_rank)
        if local is None:
            local = _int(env, "LOCAL_WORLD_SIZE") or max(1, world // max(1, num_nodes))
        if addr is None and hosts:
            addr = hosts[0]
        if port is None and env.get("SLURM_JOB_ID"):
            port = port_from_job_id(env["SLURM_JOB_ID"])
        layout = Layout(rank=rank, world_size=world, local_rank=_int(env, "SLURM_LOCALID", 0),
                        local_world_size=local, node_rank=node_rank, num_nodes=num_nodes,
                        master_addr=addr, master_port=port, launcher="slurm")
    elif "RANK" in env or "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", 1)
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        num_nodes = max(1, world // max(1, local_world)) if world % max(1, local_world) == 0 else \
            -(-world // max(1, local_world))
        rank = _int(env, "RANK", 0)
        node_rank = _int(env, "GROUP_RANK", rank // max(1, local_world))
        layout = Layout(rank=rank, world_size=world, local_rank=_int(env, "LOCAL_RANK", 0),
                        local_world_size=local_world, node_rank=node_rank, num_nodes=num_nodes,
                        master_addr=addr, master_port=port, launcher="torchrun")
    else:
        return Layout()
    _check(layout)
    return layout


def _check(l: Layout) -> None:
    if l.world_size < 1 or not 0 <= l.rank < l.world_size:
        raise UserError(f"{l.launcher} environment: rank {l.rank} outside world size {l.world_size}")
    if not 0 <= l.local_rank < max(1, l.local_world_size) or not 0 <= l.node_rank < max(1, l.num_nodes):
        raise UserError(f"{l.launcher} environment: local rank {l.local_rank} of {l.local_world_size} / node "
                        f"{l.node_rank} of {l.num_nodes} out of range")


def timeout_from_env(timeout_s: float | None = None, env: Mapping[str, str] | None = None) -> float:
    """``timeout_s`` when given, else ``$CROSSMAE_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S` (s).

    Raises:
        UserError: the variable is not a positive number.
    """
    if timeout_s is not None:
        return float(timeout_s)
    env = os.environ if env is None else env
    v = env.get(TIMEOUT_ENV)
    if v is None or v.strip() == "":
        return DEFAULT_TIMEOUT_S
    try:
        t = float(v)
        if not t > 0:
            raise ValueError
    except ValueError:
        raise UserError(f"environment variable {TIMEOUT_ENV}={v!r}: expected a positive number of seconds") from None
    return t


# --------------------------------------------------------------------------------------------------
# resolution and process group
# --------------------------------------------------------------------------------------------------
def resolve_master(name: str) -> str:
    """The address to connect to for master host ``name``, resolved as a real cluster does: the
    name itself when it resolves (``socket.getaddrinfo``), else Slurm's ``NodeAddr`` of that node
    (``scontrol show node <name>``; needed where node names are not host names, as on the local
    multi-node test cluster). An unresolvable name is returned unchanged (connecting then fails
    with one line naming it)."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except (socket.gaierror, UnicodeError, OSError):
        pass
    try:
        p = subprocess.run(["scontrol", "show", "node", name], capture_output=True, text=True, timeout=20)
        m = re.search(r"\bNodeAddr=(\S+)", p.stdout) if p.returncode == 0 else None
        if m and m.group(1) not in ("(null)", ""):
            return m.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return name


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


class _cpp_stderr_kept_on_success:
    """Collect what native code writes to file descriptor 2 inside the block (c10d prints a C++
    stack trace per failed connection attempt) and replay it only when the block succeeds, so a
    failed rendezvous ends with the one-line error alone."""

    def __enter__(self):
        import tempfile
        import sys
        sys.stderr.flush()
        self.tmp = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.tmp.fileno(), 2)
        return self

    def __exit__(self, exc_type, exc, tb):
        import sys
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if exc_type is None:
            self.tmp.seek(0)
            data = self.tmp.read()
            if data:
                os.write(2, data)
        self.tmp.close()
        return False


def setup(backend: str | None = None, timeout_s: float | None = None) -> Layout:
    """Derive the layout (:func:`layout_from_env`), bind CUDA to ``cuda:<local rank>``, and with
    more than one process create the default process group (``env://`` on the master address and
    port, so torchrun's agent store is reused as torchrun intends) with a timeout. Exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT`` so code that reads them agrees. Idempotent: a second call
    returns the layout of the existing group.

    Args:
        backend: ``nccl`` / ``gloo``; default ``nccl`` with CUDA, else ``gloo``.
        timeout_s: rendezvous and collective timeout (s); default :func:`timeout_from_env`.

    Returns:
        the :class:`Layout` (``master_addr`` resolved).

    Raises:
        UserError: no master port / address for a multi-process run; the master cannot be reached
            (or a rank does not arrive) within the timeout: ``cannot reach the distributed master
            <addr>:<port> ...`` (one line).
    """
    import torch.distributed as dist

    layout = layout_from_env()
    timeout = timeout_from_env(timeout_s)
    device = layout.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not layout.distributed:
        return layout
    if layout.master_addr is None or layout.master_port is None:
        raise UserError(f"{layout.launcher} environment: {layout.world_size} processes but no "
                        f"{'MASTER_ADDR' if layout.master_addr is None else 'MASTER_PORT'} (nor a Slurm "
                        f"node list / job id to derive it from)")
    addr = resolve_master(layout.master_addr)
    layout = replace(layout, master_addr=addr)
    os.environ.update(RANK=str(layout.rank), WORLD_SIZE=str(layout.world_size), LOCAL_RANK=str(layout.local_rank),
                      LOCAL_WORLD_SIZE=str(layout.local_world_size), MASTER_ADDR=addr,
                      MASTER_PORT=str(layout.master_port))
    if dist.is_initialized():
        return layout
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        with _cpp_stderr_kept_on_success():
            dist.init_process_group(backend=backend, init_method="env://",  # the variables exported above
                                    world_size=layout.world_size, rank=layout.rank,
                                    timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:  # DistStoreError / RuntimeError / TimeoutError from the rendezvous
        what = ("not every rank reached the distributed master" if layout.is_main else
                "cannot reach the distributed master")
        raise UserError(f"{what} {addr}:{layout.master_port} within {timeout:g} s (rank {layout.rank} of "
                        f"{layout.world_size} on node {layout.node_rank} {socket.gethostname()}, {layout.launcher}): "
                        f"{_first_line(exc)}") from None
    return layout


def barrier(timeout_s: float | None = None) -> None:
    """Wait until every rank arrives, at most ``timeout_s`` seconds (default
    :func:`timeout_from_env`); a no-op without a process group.

    On gloo this is ``monitored_barrier`` (its error names the rank that did not arrive); on other
    backends an asynchronous barrier whose work is waited on with the timeout.

    Raises:
        UserError: a rank did not arrive in time (one line with the master address and port).
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    timeout = timeout_from_env(timeout_s)
    td = datetime.timedelta(seconds=timeout)
    try:
        with _cpp_stderr_kept_on_success():
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=td)
            else:
                work = dist.barrier(async_op=True)
                if not work.wait(timeout=td):
                    raise TimeoutError("barrier not complete")
    except Exception as exc:
        raise UserError(f"barrier timed out after {timeout:g} s (rank {dist.get_rank()} of {dist.get_world_size()}, "
                        f"master {os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}): "
                        f"{_first_line(exc)}") from None
