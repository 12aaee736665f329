"""Install, configure, start and stop a real Slurm cluster on this machine: one node named after the
host plus ``--nodes N`` (default 2) more nodes ``node1`` … ``nodeN`` for multi-node jobs.

For tests and CI on one Debian/Ubuntu host (root, no systemd needed): munge, MariaDB, slurmdbd
(accounting is required: submitit reads job states through ``sacct``), slurmctld and one slurmd per
node, all on loopback. Every step is idempotent and every wait is bounded::

    python -m slurm.local_cluster ensure     # install (apt-get, once) + configure + start; ~3 s when installed
    python -m slurm.local_cluster ensure --nodes 4   # four nodes in the ``multi`` partition
    python -m slurm.local_cluster status     # daemons, node state; exit 0 iff the cluster accepts jobs
    python -m slurm.local_cluster stop       # stops only the daemons this script started (PID files)

State (PID files, logs, spool, MariaDB datadir) lives in ``--state-dir`` (default
``$CROSSMAE_SLURM_STATE`` or ``/var/tmp/crossmae-slurm``). ``/etc/slurm/slurm.conf`` and
``slurmdbd.conf`` are written with a marker line; a configuration without the marker (someone
else's cluster) is never overwritten — the command fails instead.

Three partitions: ``debug`` (default, PriorityTier 1, preemptable with REQUEUE) and ``high``
(PriorityTier 2) on the host's node: a job on ``high`` preempts ``debug`` jobs, which is how tests
exercise real preemption; ``multi`` (REQUEUE) on ``node1`` … ``nodeN``: a real multi-node allocation
(``srun -N2`` gives ``SLURM_NODEID`` 0/1 and ``SLURM_JOB_NODELIST=node[1-2]``). Several nodes on one
host use Debian slurmd's multiple-slurmd support: ``slurmd -N <node>`` per node, each with its own
``Port=`` and ``%n`` spool / PID / log paths, all ``NodeAddr=127.0.0.1``; every node gets every CPU
of the host and a 1/N share of the memory (nothing is enforced: no cgroups). The node names do not
resolve as host names: :func:`crossmae.distributed.master_address` falls back to the ``NodeAddr``
that ``scontrol show node`` reports, as on a real cluster whose names do not resolve either.
Nothing here is used by the benchmark dispatch itself, which runs on any cluster.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from crossmae.utils import UserError, atomic_write_text, cli_entry

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
MARKER = "# managed by crossmae slurm/local_cluster.py"
CLUSTER = "localcluster"
DB_PORT = 3307
DB_PASS = "crossmae-local-slurmdbd"
CONF_DIR = Path(os.environ.get("CROSSMAE_SLURM_CONF_DIR", "/etc/slurm"))
#: daemons in start order before the slurmd's (one per node, ``slurmd-<node>``); stop goes in reverse.
DAEMONS = ["munged", "mariadbd", "slurmdbd", "slurmctld"]
#: nodes of the ``multi`` partition (``node1`` … ``nodeN``) when ``--nodes`` is not given.
DEFAULT_NODES = 2
#: slurmd port of ``node<i>`` is ``NODE_PORT_BASE + i``; the host's node keeps Slurm's default 6818.
NODE_PORT_BASE = 17000
MULTI_PARTITION = "multi"


class ClusterError(UserError):
    """The local cluster could not be installed / started (one line naming the step and the log)."""


def default_state_dir() -> Path:
    return Path(os.environ.get("CROSSMAE_SLURM_STATE", "/var/tmp/crossmae-slurm"))


def node_name() -> str:
    return socket.gethostname().split(".")[0]


def _run(cmd: list[str], timeout: float = 30, check: bool = False, **kw) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{' '.join(cmd)}: timed out after {timeout} s")
    if check and p.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed ({p.returncode}): {(p.stderr or p.stdout).strip()[:300]}")
    return p


def _wait(pred, timeout: float, what: str, log: Path | None = None, interval: float = 0.25) -> None:
    """Poll ``pred()`` until true; raise :class:`ClusterError` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(interval)
    hint = f" (see {log})" if log else ""
    raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}{hint}")


# --------------------------------------------------------------------------------------------------
# install
# --------------------------------------------------------------------------------------------------
def missing_packages() -> list[str]:
    """Debian packages of :data:`PACKAGES` that are not installed (``dpkg-query``)."""
    if shutil.which("dpkg-query") is None:
        return list(PACKAGES)
    out = []
    for pkg in PACKAGES:
        p = _run(["dpkg-query", "-W", "-f=${Status}", pkg])
        if p.returncode != 0 or "install ok installed" not in p.stdout:
            out.append(pkg)
    return out


def install(verbose: bool = True) -> None:
    """``apt-get install`` the missing packages (``apt-get update`` first). No-op when installed.

    Raises:
        ClusterError: not root, no apt-get, or apt failed.
    """
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterError(f"cannot install {' '.join(missing)}: needs root and apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if verbose:
        print(f"installing {' '.join(missing)} (apt-get)", flush=True)
    _run(["apt-get", "update", "-qq"], timeout=300, check=True, env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], timeout=600,
         check=True, env=env)


# --------------------------------------------------------------------------------------------------
# configure
# --------------------------------------------------------------------------------------------------
def real_memory_mb() -> int:
    """85 % of ``slurmd -C``'s RealMemory (MB); more than the real amount marks the node INVAL."""
    p = _run(["slurmd", "-C"], check=True)
    for tok in p.stdout.split():
        if tok.startswith("RealMemory="):
            return int(int(tok.split("=", 1)[1]) * 0.85)
    raise ClusterError("`slurmd -C` printed no RealMemory")


def multi_nodes(n: int) -> list[str]:
    """The names of the multi-node partition's nodes: ``node1`` … ``node<n>``."""
    return [f"node{i}" for i in range(1, n + 1)]


def slurm_conf(state: Path, node: str, cpus: int, mem_mb: int, nodes: int = DEFAULT_NODES) -> str:
    """The text of ``slurm.conf``: the host's node ``node`` (partitions ``debug`` and ``high``) and
    ``nodes`` more nodes ``node1`` … (partition ``multi``), each with its own slurmd port, all on
    127.0.0.1, each ``cpus`` CPUs and ``mem_mb // nodes`` MB (see ``../shared/docs/SLURM.md``)."""
    multi = multi_nodes(nodes)
    node_lines = "".join(f"NodeName={m} NodeHostname={node} NodeAddr=127.0.0.1 Port={NODE_PORT_BASE + i} "
                         f"CPUs={cpus} RealMemory={max(1, mem_mb // max(1, nodes))} State=UNKNOWN\n"
                         for i, m in enumerate(multi, 1))
    multi_part = (f"PartitionName={MULTI_PARTITION} Nodes={','.join(multi)} Default=NO MaxTime=INFINITE State=UP "
                  f"PriorityTier=1 PreemptMode=REQUEUE GraceTime=10\n") if multi else ""
    return f"""{MARKER}
ClusterName={CLUSTER}
SlurmctldHost={node}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
KillWait=5
MinJobAge=300
MailProg=/bin/true
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d/%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/d/%n.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdLogFile={state}/log/slurmd-%n.log
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
{node_lines}PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=high  Nodes={node} Default=NO  MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
{multi_part}"""


def slurmdbd_conf(state: Path) -> str:
    return f"""{MARKER}
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={DB_PORT}
StorageUser=slurm
StoragePass={DB_PASS}
StorageLoc=slurm_acct_db
PidFile={state}/slurmdbd.pid
LogFile={state}/log/slurmdbd.log
"""


def _write_managed(path: Path, text: str, mode: int, owner: str | None = None) -> bool:
    """Write ``text`` to ``path`` unless it already holds it; True when the file changed."""
    if path.exists() and MARKER not in path.read_text(errors="replace"):
        raise ClusterError(f"{path}: exists and is not managed by this script; not overwriting "
                           "(move it away to use the local test cluster)")
    changed = not path.exists() or path.read_text() != text
    if changed:
        atomic_write_text(text, path)
    os.chmod(path, mode)
    if owner:
        shutil.chown(path, owner, owner)
    return changed


def all_nodes(nodes: int) -> list[str]:
    """Every node of the cluster: the host's node, then ``node1`` … ``node<nodes>``."""
    return [node_name(), *multi_nodes(nodes)]


def configured_nodes() -> int:
    """How many ``node<i>`` the current ``slurm.conf`` declares (0 when absent / single-node)."""
    try:
        text = (CONF_DIR / "slurm.conf").read_text(errors="replace")
    except OSError:
        return 0
    return sum(1 for ln in text.splitlines() if ln.startswith("NodeName=node") and " Port=" in ln)


def configure(state: Path, nodes: int = DEFAULT_NODES) -> bool:
    """Write the config files and create the state folders with the right owners (idempotent).

    Returns:
        True when ``slurm.conf`` changed (running daemons must be restarted to see new nodes).
    """
    node, cpus = node_name(), os.cpu_count() or 1
    for sub in ("ctld", "d", "log", "pids", "mysql", "mysqld"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o755)
    for sub in ("ctld", "log"):
        shutil.chown(state / sub, "slurm", "slurm")
    os.chmod(state / "log", 0o777)
    shutil.chown(state / "mysqld", "mysql", "mysql")
    shutil.chown(state / "mysql", "mysql", "mysql")
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    changed = _write_managed(CONF_DIR / "slurm.conf", slurm_conf(state, node, cpus, real_memory_mb(), nodes), 0o644)
    _write_managed(CONF_DIR / "slurmdbd.conf", slurmdbd_conf(state), 0o600, owner="slurm")
    # munge: key and runtime folders
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        _run(["mungekey", "--create"], check=True)
        shutil.chown(key, "munge", "munge")
        os.chmod(key, 0o400)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    return changed


# --------------------------------------------------------------------------------------------------
# daemons
# --------------------------------------------------------------------------------------------------
def _pid_file(state: Path, name: str) -> Path:
    return state / "pids" / f"{name}.pid"


def _alive(state: Path, name: str) -> int | None:
    """PID of daemon ``name`` (``slurmd-<node>`` for a node's slurmd) if this script started it and
    it still runs (its command line is checked, so a reused PID is not mistaken for it)."""
    f = _pid_file(state, name)
    try:
        pid = int(f.read_text().split()[0])
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    stat = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0] if Path(f"/proc/{pid}/stat").exists() else "X"
    daemon, _, node = name.partition("-")
    ok = daemon in cmd and (not node or f"-N {node}" in cmd)
    return pid if ok and stat != "Z" else None


def _spawn(state: Path, name: str, cmd: list[str], user: str | None = None) -> int:
    log = open(state / "log" / f"{name}.out", "ab")
    kw = {}
    if user:
        kw.update(user=user, group=user)
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True, **kw)
    atomic_write_text(f"{p.pid} {' '.join(cmd)}\n", _pid_file(state, name))
    return p.pid


def _sql(state: Path, sql: str) -> subprocess.CompletedProcess:
    return _run(["mariadb", "--no-defaults", "-S", str(state / "mysqld" / "mysqld.sock"), "-u", "root",
                 "-e", sql], timeout=20)


def node_states() -> dict[str, str]:
    """``{node: state}`` of every node slurmctld knows (``sinfo -N``); empty when it does not answer."""
    s = _run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
    if s.returncode != 0:
        return {}
    out = {}
    for ln in s.stdout.splitlines():
        parts = ln.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1].rstrip("*~#")
    return out


def cluster_up(nodes: int | None = None) -> bool:
    """True when ``scontrol ping`` reaches slurmctld and every node of the cluster (the host's node
    and ``node1`` … ``node<nodes>``; ``nodes`` default: those the current ``slurm.conf`` declares)
    is idle / mixed / allocated / completing."""
    p = _run(["scontrol", "ping"], timeout=10)
    if p.returncode != 0 or "UP" not in p.stdout:
        return False
    states = node_states()
    wanted = all_nodes(configured_nodes() if nodes is None else nodes)
    return all(states.get(n) in ("idle", "mixed", "allocated", "completing") for n in wanted)


def _slurmd_names(nodes: int) -> list[str]:
    return [f"slurmd-{n}" for n in all_nodes(nodes)]


def _known_slurmds(state: Path) -> list[str]:
    """Every ``slurmd*`` PID file name this script wrote (also ``slurmd`` of the single-node layout)."""
    pids = state / "pids"
    return sorted(p.stem for p in pids.glob("slurmd-*.pid")) + (["slurmd"] if (pids / "slurmd.pid").exists() else [])


def start(state: Path, timeout: float = 60, nodes: int = DEFAULT_NODES) -> list[str]:
    """Start every daemon that is not running yet, in order, waiting (bounded) for each.

    Returns:
        the names of the daemons started by this call (empty when all already ran).

    Raises:
        ClusterError: a daemon did not come up within ``timeout`` seconds (message names its log).
    """
    started = []
    log = state / "log"
    if not _alive(state, "munged"):
        _spawn(state, "munged", ["/usr/sbin/munged", "--foreground"], user="munge")
        started.append("munged")
        _wait(lambda: subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0,
              timeout, "munged", log / "munged.out")
    if not _alive(state, "mariadbd"):
        datadir = state / "mysql"
        if not (datadir / "mysql").is_dir():
            _run(["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={datadir}",
                  "--auth-root-authentication-method=socket", "--skip-test-db"], timeout=120, check=True)
        _spawn(state, "mariadbd", ["/usr/sbin/mariadbd", "--no-defaults", "--user=mysql", f"--datadir={datadir}",
                                   f"--socket={state}/mysqld/mysqld.sock", f"--port={DB_PORT}",
                                   "--bind-address=127.0.0.1", f"--pid-file={state}/mysqld/mariadbd.pid",
                                   "--innodb-buffer-pool-size=32M", "--performance-schema=OFF"])
        started.append("mariadbd")
        _wait(lambda: _sql(state, "SELECT 1").returncode == 0, timeout, "mariadbd", log / "mariadbd.out")
        for host in ("localhost", "127.0.0.1"):
            p = _sql(state, f"CREATE USER IF NOT EXISTS 'slurm'@'{host}' IDENTIFIED BY '{DB_PASS}'; "
                            f"GRANT ALL ON slurm_acct_db.* TO 'slurm'@'{host}'; FLUSH PRIVILEGES;")
            if p.returncode != 0:
                raise ClusterError(f"mariadb: cannot create the slurm user: {p.stderr.strip()[:200]}")
    if not _alive(state, "slurmdbd"):
        _spawn(state, "slurmdbd", ["/usr/sbin/slurmdbd", "-D"])
        started.append("slurmdbd")
        _wait(lambda: _run(["sacctmgr", "-n", "list", "cluster"], timeout=10).returncode == 0, timeout,
              "slurmdbd", log / "slurmdbd.log")
    if CLUSTER not in _run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]).stdout.split():
        _run(["sacctmgr", "-i", "add", "cluster", CLUSTER], timeout=20, check=True)
    if not _alive(state, "slurmctld"):
        _spawn(state, "slurmctld", ["/usr/sbin/slurmctld", "-D"])
        started.append("slurmctld")
        _wait(lambda: "UP" in _run(["scontrol", "ping"], timeout=10).stdout, timeout, "slurmctld",
              log / "slurmctld.log")
    for node in all_nodes(nodes):
        name = f"slurmd-{node}"
        if not _alive(state, name):
            (state / "d" / node).mkdir(parents=True, exist_ok=True)
            _spawn(state, name, ["/usr/sbin/slurmd", "-D", "-N", node])
            started.append(name)
    _wait(lambda: cluster_up(nodes), timeout, f"nodes {', '.join(all_nodes(nodes))} to become idle",
          log / f"slurmd-{node_name()}.log", interval=0.5)
    for node, st in node_states().items():  # a node left DOWN/DRAIN by an earlier run of another layout
        if node in all_nodes(nodes) and st.startswith(("down", "drain")):
            _run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], timeout=10)
    return started


def _stop_one(state: Path, name: str, timeout: float) -> bool:
    pid = _alive(state, name)
    if pid is None:
        _pid_file(state, name).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    try:
        _wait(lambda: _alive(state, name) is None, timeout, name)
    except ClusterError:
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: _alive(state, name) is None, 10, name)
    _pid_file(state, name).unlink(missing_ok=True)
    return True


def stop(state: Path, timeout: float = 30) -> list[str]:
    """SIGTERM (then SIGKILL after ``timeout`` s) the daemons recorded in this script's PID files.

    Returns the names stopped. Daemons not started by this script are never touched.
    """
    return [name for name in _known_slurmds(state) + list(reversed(DAEMONS)) if _stop_one(state, name, timeout)]


def restart_slurm(state: Path, nodes: int, timeout: float = 60) -> list[str]:
    """Stop this script's slurmd's and slurmctld (the accounting daemons keep running) and start
    them with the current ``slurm.conf``: slurmctld reads its node list only at start. Returns the
    names started."""
    for name in _known_slurmds(state) + ["slurmctld"]:
        _stop_one(state, name, 30)
    return start(state, timeout, nodes)


def status(state: Path) -> dict:
    """``{daemon: pid or None, ..., 'up': bool}`` (one ``slurmd-<node>`` entry per node)."""
    names = DAEMONS + (_known_slurmds(state) or _slurmd_names(configured_nodes()))
    out: dict = {name: _alive(state, name) for name in names}
    out["up"] = cluster_up()
    return out


def ensure(state: Path | None = None, verbose: bool = True, nodes: int = DEFAULT_NODES) -> Path:
    """Install (if needed), configure and start the cluster with ``nodes`` multi-partition nodes;
    returns the state folder. A running cluster of another layout is restarted (slurmctld and the
    slurmd's only, a few seconds); one of the same layout is left alone."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= 64:
        raise ClusterError(f"--nodes {nodes}: must be an integer in [1, 64]")
    state = Path(state or default_state_dir())
    t0 = time.monotonic()
    install(verbose)
    changed = configure(state, nodes)
    stale = [n for n in _known_slurmds(state) if n not in _slurmd_names(nodes)]
    if (changed or stale) and _alive(state, "slurmctld"):
        started = restart_slurm(state, nodes)
        what = f"restarted with {nodes} multi-node node(s): {', '.join(started)}"
    else:
        started = start(state, nodes=nodes)
        what = f"started {', '.join(started)}" if started else "already running"
    if verbose:
        print(f"local slurm cluster up ({what}) in {time.monotonic() - t0:.1f} s; state in {state}", flush=True)
    return state


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm.local_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["ensure", "install", "start", "stop", "status"])
    p.add_argument("--state-dir", default=None, help="PID files, logs, spool, DB (default $CROSSMAE_SLURM_STATE "
                                                     "or /var/tmp/crossmae-slurm)")
    p.add_argument("--nodes", type=int, default=DEFAULT_NODES,
                   help=f"nodes node1 … nodeN of the '{MULTI_PARTITION}' partition (default {DEFAULT_NODES})")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    if args.action == "ensure":
        ensure(state, nodes=args.nodes)
    elif args.action == "install":
        install()
    elif args.action == "start":
        ensure(state, nodes=args.nodes)
    elif args.action == "stop":
        t0 = time.monotonic()
        stopped = stop(state)
        print(f"stopped: {', '.join(stopped) or 'nothing'} in {time.monotonic() - t0:.1f} s")
    else:
        st = status(state)
        for k, v in st.items():
            print(f"{k:18s} {v}")
        return 0 if st["up"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
