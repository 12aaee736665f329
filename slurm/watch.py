"""``python -m slurm.watch PRETRAIN_DIR --probe knn [--probe linprobe_fast ...] [--every N]``: probe a
pretraining's snapshots while it runs.

The watcher polls ``PRETRAIN_DIR/snapshots.json`` (written by the pretraining after each complete,
atomically written ``checkpoint-<epoch>.pth``; a file not listed there, such as a temporary one
being written, is never probed) and submits each probe of :mod:`benchmarks.suites.probes` for each
listed snapshot whose epoch e has ``(e + 1) % every == 0`` (and the final one), through the same
task runner and executors as the suites (:class:`slurm.tasks.TaskRunner`, :func:`slurm.executor.make_executor`:
Slurm jobs or local processes). A failed probe is submitted again, up to ``--retries`` times
(default 2), then recorded as failed. It ends when the pretraining has finished (``metrics.json``)
or its task failed / was cancelled, and every probe has ended. When a probe's ``metrics.json``
appears, its metrics go to the pretraining's TensorBoard folder as ``probe/<probe>/<metric>`` at
step = the snapshot's epoch. The curves are drawn by :mod:`benchmarks.curves` (``benchmarks.leaderboard``).

Layout (inside the pretraining folder; every file written atomically)::

    watch/                           the watcher's own run folder (crossmae.runs.RunDir): run.lock
                                     (a second watcher is refused), run.json, config.py, metrics.json
                                     (written last, when it ended)
    watch/watch_state.json           every (snapshot, probe): its attempts and state
    watch/<probe>/ep<e>/try<k>/      attempt k of a probe of snapshot e: a task folder (task.json,
                                     task_state.json, metrics.json, ...), shown by slurm.status
    watch/jobs/<job id>/             submitit's job folders

Never twice: an attempt's folder and job name are deterministic, and the attempt is written to
``watch_state.json`` (state ``intent``) BEFORE its job is submitted. A watcher killed at any point
(SIGKILL, preemption) and restarted finds each ``intent`` attempt and adopts its job when one exists
(the attempt folder's ``task.json`` / ``task_state.json``, or on Slurm a job of that name in
``squeue`` / ``sacct``); only an attempt whose job provably does not exist is submitted.
(Locally the window between the process start and its ``task.json`` is not covered when a watcher
is killed inside it.)

Examples::

    python -m slurm.watch runs/pre/crossmae --probe knn --probe linprobe_fast --every 10
    python -m slurm.submit --suite paper --pretrain crossmae=paper_crossmae_vit_base \\
        --watch knn linprobe_fast --every 50 --output-dir runs/paper
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.curves import STATE_NAME, WATCH_DIR
from benchmarks.suites import Resources
from benchmarks.suites.probes import get_probe
from crossmae.checkpoint import read_snapshots
from crossmae.runs import RunDir
from crossmae.utils import UserError, atomic_write_json, cli_entry, resolve_data_root

from .executor import EXECUTORS, ClusterOptions, check_int, make_executor, resolve_executor
from .status import SlurmView, _pid_alive, task_status
from .tasks import METRICS_JSON, STATE_JSON, TASK_JSON, TaskRunner, TaskSpec, read_json

#: attempt states in watch_state.json: intent (recorded, maybe not submitted), submitted, done, failed
ENDED = ("done", "failed")


def pretrain_info(pretrain_dir: Path) -> dict:
    """``{"arch", "model", "epochs", "name"}`` of a pretraining folder, from its ``run.json``
    (identity of task ``pretrain``) or, before the run started, the ``task.json`` that
    ``slurm.submit`` wrote for it.

    Raises:
        UserError: not a folder, or neither file describes a pretraining run.
    """
    if not pretrain_dir.is_dir():
        raise UserError(f"{pretrain_dir}: not a folder (expected a pretraining run folder)")
    rec = read_json(pretrain_dir / "run.json")
    ident = rec.get("identity") if isinstance(rec.get("identity"), dict) else {}
    if ident.get("task") == "pretrain" and isinstance(ident.get("config"), dict):
        from crossmae.models import parse_model_name
        model = str(ident["config"].get("model", ""))
        try:
            _, arch = parse_model_name(model)
        except ValueError:
            raise UserError(f"{pretrain_dir / 'run.json'}: unknown model {model!r}") from None
        epochs = ident["config"].get("epochs")
        return {"arch": arch, "model": model, "epochs": epochs if isinstance(epochs, int) else None,
                "name": pretrain_dir.name}
    spec = read_json(pretrain_dir / TASK_JSON).get("spec")
    if isinstance(spec, dict) and spec.get("kind") == "pretrain":
        return {"arch": spec.get("arch") or "", "model": None, "epochs": None,
                "name": spec.get("backbone_name") or pretrain_dir.name}
    raise UserError(f"{pretrain_dir}: not a pretraining run (no run.json of a pretraining, no task.json of "
                    f"one submitted by slurm.submit)")


def _job_by_name(name: str, since: float) -> str | None:
    """The id of a Slurm job called ``name`` (live controller, then accounting since ``since``)."""
    cmds = [["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"],
            ["sacct", "-n", "-X", "-P", "--name", name, "-S",
             time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60)), "-o", "JobID"]]
    for cmd in cmds:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        ids = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
        if p.returncode == 0 and ids:
            return ids[0]
    return None


class Watcher:
    """Probe the snapshots of one pretraining folder (see the module doc).

    Args:
        pretrain_dir: the pretraining run folder. probes: probe names (:mod:`benchmarks.suites.probes`).
        every: probe the snapshots of epochs e with ``(e + 1) % every == 0`` and the final one.
        retries: extra attempts after a failure. poll: seconds between polls.
        kind: resolved executor (``slurm`` / ``local`` / ``debug``). opts: scheduler options;
            ``opts.array_parallelism`` caps the probes running at once off Slurm.
        config: ``configs/linprobe`` preset or file (None: by architecture). cfg_options,
            data_root, seed, resources: passed to every probe task.
    """

    def __init__(self, pretrain_dir: Path, probes: list[str], every: int, retries: int, poll: float, kind: str,
                 opts: ClusterOptions, config: str | None, cfg_options: list[str], data_root: str | None,
                 seed: int, resources: dict, say=print):
        self.pre = pretrain_dir.resolve()
        self.dir = self.pre / WATCH_DIR
        self.state_path = self.dir / STATE_NAME
        self.info = pretrain_info(self.pre)
        self.probes = {p: get_probe(p) for p in probes}
        self.every, self.retries, self.poll, self.kind, self.opts = every, retries, poll, kind, opts
        self.config, self.cfg_options, self.data_root, self.seed = config, list(cfg_options), data_root, seed
        self.resources = {}
        for name, td in self.probes.items():
            arch = self.info["arch"]
            self.resources[name] = td.resources_for(arch).replace("--probe-resources", **resources).to_dict()
            if config is None:
                td.config_for(arch)  # UserError when no preset for the architecture
        self.tag = hashlib.sha256(str(self.pre).encode()).hexdigest()[:8]
        self.say = say or (lambda *_: None)
        self.jobs: dict[str, object] = {}  # attempt dir -> submitit job (this process's submissions)
        self.state: dict = {"entries": {}}

    def load(self) -> None:
        """Read ``watch_state.json`` (call once the watcher holds the folder's lock)."""
        self.state = read_json(self.state_path) if self.state_path.is_file() else {}
        if not isinstance(self.state.get("entries"), dict):
            self.state["entries"] = {}
        self.state.update(pretrain_dir=str(self.pre), probes=list(self.probes), every=self.every,
                          retries=self.retries)

    # --- state -------------------------------------------------------------------------------
    def save(self) -> None:
        self.state["updated_at"] = time.time()
        atomic_write_json(self.state, self.state_path)

    def wanted(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch + 1 == self.info.get("epochs")

    def pretraining_ended(self) -> str | None:
        """``"finished"``, ``"failed: ..."`` when its dispatched task ended without metrics, else None."""
        if (self.pre / METRICS_JSON).is_file():
            return "finished"
        if (self.pre / TASK_JSON).is_file():
            st = task_status(self.pre)
            if st.state in ("failed", "cancelled"):
                return f"{st.state}: {st.error or ''}".rstrip(": ")
        return None

    # --- one poll --------------------------------------------------------------------------------
    def step(self) -> bool:
        """Poll once: add new snapshots, follow attempts, retry, submit. True when everything ended."""
        ended = self.pretraining_ended()  # read BEFORE the snapshot list: no snapshot listed after it is missed
        info = pretrain_info(self.pre)
        if info.get("epochs") is not None:
            self.info.update(epochs=info["epochs"], model=info["model"])
        for snap in read_snapshots(self.pre):
            if not self.wanted(snap["step"]):
                continue
            for probe in self.probes:
                key = f"{probe}/ep{snap['step']}"
                if key not in self.state["entries"]:
                    self.state["entries"][key] = {"probe": probe, "epoch": snap["step"],
                                                  "snapshot": str(self.pre / snap["file"]), "state": "pending",
                                                  "attempts": [], "tensorboard": False}
                    self.say(f"new snapshot {snap['file']}: probe {probe}")
        self.save()
        self._follow()
        self._submit_pending()
        open_ = [e for e in self.state["entries"].values() if e["state"] not in ENDED]
        if ended is not None and not open_:
            self.state["pretraining"] = ended
            self.save()
            return True
        return False

    def _follow(self) -> None:
        entries = self.state["entries"]
        live = [a for e in entries.values() if e["state"] not in ENDED for a in e["attempts"][-1:]]
        ids = [a.get("job_id") for a in live if a.get("job_id") and a.get("executor") == "slurm"]
        view = SlurmView.query(ids) if ids else None
        for e in entries.values():
            if e["state"] in ENDED or not e["attempts"]:
                continue
            a = e["attempts"][-1]
            if a["state"] in ENDED:  # already judged (e.g. a refused submission): a new attempt follows
                continue
            if a["state"] == "intent":
                self._resolve_intent(e, a)
                if a["state"] == "intent":
                    continue
            state, error = self._attempt_state(a, view)
            if state == "running":
                e["state"] = "running"
                continue
            a.update(state=state, error=error, ended_at=time.time())
            if state == "done":
                e["state"] = "done"
                self.say(f"done {e['probe']} ep{e['epoch']} ({Path(a['dir']).name})")
                self._tensorboard(e, a)
            elif len(e["attempts"]) <= self.retries:
                e["state"] = "pending"  # submitted again by _submit_pending
                self.say(f"failed {e['probe']} ep{e['epoch']} attempt {len(e['attempts'])}: {error}; retrying")
            else:
                e["state"] = "failed"
                e["error"] = error
                self.say(f"failed {e['probe']} ep{e['epoch']} after {len(e['attempts'])} attempt(s): {error}")
            self.save()

    def _attempt_state(self, a: dict, view) -> tuple[str, str | None]:
        d = Path(a["dir"])
        if (d / METRICS_JSON).is_file():
            return "done", None
        job = self.jobs.get(a["dir"])
        if job is not None and self.kind != "slurm":
            if not job.done():
                return "running", None
            st = task_status(d)
            if st.state == "done":
                return "done", None
            err = st.error or read_json(d / STATE_JSON).get("error")
            return "failed", err or "process ended without metrics.json"
        st = task_status(d, view)
        if st.state == "done":
            return "done", None
        if st.state in ("failed", "cancelled"):
            return "failed", st.error or st.state
        pid = a.get("job_id")  # a local job's id is its process id (a string in the state file)
        pid = int(pid) if isinstance(pid, str) and pid.isdigit() else None
        if a.get("executor") != "slurm" and not (d / STATE_JSON).is_file() and not _pid_alive(pid):
            return "failed", f"process {a.get('job_id')} ended before the task started"
        return "running", None

    def _resolve_intent(self, e: dict, a: dict) -> None:
        """An attempt recorded but maybe not submitted (the watcher was killed): adopt its job if any."""
        d = Path(a["dir"])
        task, st = read_json(d / TASK_JSON), read_json(d / STATE_JSON)
        job_id = task.get("job_id") or st.get("job_id")
        if not job_id and a.get("executor") == "slurm":
            job_id = _job_by_name(a["job_name"], a["at"])
            if job_id and not task:
                atomic_write_json({"spec": a["spec"], "executor": "slurm", "job_id": job_id,
                                   "submitted_at": a["at"], "adopted": True}, d / TASK_JSON)
        if job_id or task or st:
            a.update(state="submitted", job_id=str(job_id) if job_id else None)
            self.say(f"adopted {e['probe']} ep{e['epoch']} {d.name}: job {job_id}")
            self.save()

    def _submit_pending(self) -> None:
        running = sum(e["state"] == "running" for e in self.state["entries"].values())
        for key, e in sorted(self.state["entries"].items(), key=lambda kv: (kv[1]["epoch"], kv[1]["probe"])):
            intent = e["attempts"] and e["attempts"][-1]["state"] == "intent"
            if e["state"] != "pending" and not intent:
                continue
            if self.kind != "slurm" and running >= self.opts.array_parallelism and not intent:
                break
            self._submit(e, reuse=bool(intent))
            running += 1

    def _spec(self, e: dict, k: int) -> TaskSpec:
        td = self.probes[e["probe"]]
        arch = self.info["arch"]
        d = self.dir / e["probe"] / f"ep{e['epoch']}" / f"try{k}"
        return TaskSpec(id=f"{e['probe']}/ep{e['epoch']}/try{k}", suite="watch", task=td.name, protocol=td.protocol,
                        module=td.module, config=self.config or td.config_for(arch), kind="probe",
                        backbone_name=f"{self.info['name']}@ep{e['epoch']}", backbone=e["snapshot"], seed=self.seed,
                        output_dir=str(d), data_root=self.data_root, resources=self.resources[e["probe"]], arch=arch,
                        cfg_options=list(self.cfg_options), args=list(td.args))

    def _submit(self, e: dict, reuse: bool) -> None:
        from .submit import _record
        if reuse:
            a = e["attempts"][-1]
            spec = TaskSpec.from_dict(a["spec"])
        else:
            k = len(e["attempts"])
            spec = self._spec(e, k)
            a = {"try": k, "dir": spec.output_dir, "spec": spec.to_dict(), "executor": self.kind, "state": "intent",
                 "job_name": f"{self.opts.job_name}-watch-{self.tag}-{e['probe']}-ep{e['epoch']}-try{k}",
                 "at": time.time()}
            e["attempts"].append(a)
            e["state"] = "running"
            self.save()  # the intent is on disk before the job exists
        opts = ClusterOptions(**{**self.opts.__dict__, "job_name": a["job_name"]})
        ex = make_executor(self.kind, self.dir / "jobs", Resources(**spec.resources), opts, "")
        ex.update_parameters(name=a["job_name"])
        try:
            job = ex.submit(TaskRunner(), spec.to_dict())
        except Exception as exc:  # the scheduler refused: recorded as a failed attempt (retried)
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            a.update(state="failed", error=f"submission refused: {lines[-1]}")
            e["state"] = "pending" if len(e["attempts"]) <= self.retries else "failed"
            e["error"] = a["error"] if e["state"] == "failed" else None
            self.save()
            self.say(f"{e['probe']} ep{e['epoch']} try{a['try']}: {a['error']}")
            return
        _record(spec, self.kind, job, self.dir / "jobs")
        self.jobs[spec.output_dir] = job
        a.update(state="submitted", job_id=str(job.job_id))
        e["state"] = "running"
        self.save()
        self.say(f"submitted {e['probe']} ep{e['epoch']} try{a['try']}: job {job.job_id}")

    def _tensorboard(self, e: dict, a: dict) -> None:
        """The probe's metrics as ``probe/<probe>/<metric>`` at step = epoch in ``<pretrain>/tensorboard``."""
        if e.get("tensorboard"):
            return
        try:
            metrics = read_json(Path(a["dir"]) / METRICS_JSON).get("metrics") or {}
        except UserError:
            metrics = {}
        vals = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if vals:
            from torch.utils.tensorboard import SummaryWriter
            w = SummaryWriter(log_dir=str(self.pre / "tensorboard"), filename_suffix=".watch")
            for k, v in vals.items():
                w.add_scalar(f"probe/{e['probe']}/{k}", v, int(e["epoch"]))
            w.close()
        e["tensorboard"] = True
        self.save()

    def run(self) -> dict:
        """Poll until everything ended; returns the summary (also the watcher's ``metrics.json``)."""
        while not self.step():
            time.sleep(self.poll)
        es = list(self.state["entries"].values())
        return {"done": sum(e["state"] == "done" for e in es), "failed": sum(e["state"] == "failed" for e in es),
                "attempts": sum(len(e["attempts"]) for e in es)}


def watch_spec(pre: TaskSpec, probes: list[str], every: int, poll: float = 5.0) -> TaskSpec:
    """The task (kind ``watch``, module ``slurm.watch``, no dependency) that watches the pretraining
    task ``pre``: one CPU, 2 GB, the pretraining's time limit (a time-out requeues it; it resumes).
    ``--executor auto`` in its arguments is replaced by :func:`slurm.submit.dispatch` with the
    suite's executor.

    Raises:
        UserError: an unknown probe, ``every`` < 1.
    """
    names = probe_names(probes)
    check_int("--every", every, 1)
    res = Resources(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1, mem_gb=2,
                    timeout_min=int(pre.resources.get("timeout_min", 60)), gpu_type="cpu")
    return TaskSpec(id=f"{pre.id}/{WATCH_DIR}", suite=pre.suite, task="watch", protocol="watch", module="slurm.watch",
                    config="auto", kind="watch", backbone_name=pre.backbone_name, backbone=None, seed=0,
                    output_dir=str(Path(pre.output_dir) / WATCH_DIR), data_root=pre.data_root,
                    resources=res.to_dict(), arch=pre.arch,
                    args=[pre.output_dir, "--probe", ",".join(names), "--every", str(every), "--poll", str(poll),
                          "--executor", "auto"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm.watch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pretrain_dir", help="the pretraining run folder (running, queued or finished)")
    p.add_argument("--probe", action="append", required=True,
                   help="knn | linprobe_fast | linprobe_blocks | linprobe (repeatable, or comma-separated)")
    p.add_argument("--every", type=int, default=1, help="probe every N-th epoch's snapshot (and the final one)")
    p.add_argument("--retries", type=int, default=2, help="extra attempts of a failed probe (default 2)")
    p.add_argument("--poll", type=float, default=15.0, help="seconds between looks at the folder (default 15)")
    p.add_argument("--executor", default="auto", choices=EXECUTORS, help="where the probes run (auto: slurm if up)")
    p.add_argument("--config", default=None,
                   help="configs/linprobe preset or file (default or 'auto': by the snapshot's architecture)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every probe")
    p.add_argument("--data-root", default=None, help="datasets root (default $CROSSMAE_DATA_ROOT or ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="the probes' seed")
    p.add_argument("--probe-resources", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override the probes' resources (gpus_per_node, cpus_per_task, mem_gb, timeout_min, ...)")
    p.add_argument("--array-parallelism", type=int, default=1, help="probes at a time off Slurm (default 1)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--job-name", default="crossmae")
    p.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)  # set by slurm.submit: PRETRAIN_DIR/watch
    return p


def probe_names(values: list[str]) -> list[str]:
    """``["knn,linprobe_fast", "knn"]`` → ``["knn", "linprobe_fast"]`` (each checked).

    Raises:
        UserError: an unknown probe name.
    """
    out = []
    for v in values:
        for name in (x.strip() for x in v.split(",")):
            if name:
                get_probe(name)
                if name not in out:
                    out.append(name)
    if not out:
        raise UserError("--probe: give at least one probe")
    return out


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    """Watch a pretraining folder until it and every probe ended. Returns ``{"done", "failed",
    "attempts"}`` (also written as ``watch/metrics.json``).

    Raises:
        UserError (exit 2, nothing written): not a pretraining folder, an unknown probe, ``--every`` <
        1, ``--retries`` < 0, ``--poll`` <= 0, a bad resource, another watcher holding the folder.
    """
    from .submit import parse_kv
    args = build_parser().parse_args(argv)
    probes = probe_names(args.probe)
    check_int("--every", args.every, 1)
    check_int("--retries", args.retries, 0)
    if not args.poll > 0:
        raise UserError(f"--poll {args.poll}: must be > 0 seconds")
    if args.config == "auto":
        args.config = None
    pre = Path(args.pretrain_dir).resolve()
    pretrain_info(pre)
    if args.output_dir and Path(args.output_dir).resolve() != pre / WATCH_DIR:
        raise UserError(f"--output-dir {args.output_dir}: the watcher's folder is {pre / WATCH_DIR}")
    opts = ClusterOptions(partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                          array_parallelism=args.array_parallelism, job_name=args.job_name)
    data_root = str(resolve_data_root(args.data_root).resolve())
    kind = resolve_executor(args.executor)
    w = Watcher(pre, probes, args.every, args.retries, args.poll, kind, opts, args.config, args.cfg_options,
                data_root, args.seed, parse_kv(args.probe_resources, "--probe-resources"),
                say=lambda m: print(f"[watch {time.strftime('%H:%M:%S')}] {m}", flush=True))
    ident = {"pretrain_dir": str(pre), "probes": probes, "every": args.every, "retries": args.retries,
             "config": args.config, "cfg_options": list(args.cfg_options), "data_root": data_root, "seed": args.seed}
    run = RunDir(pre / WATCH_DIR, "watch", ident, json.dumps(ident, indent=1) + "\n",
                 remedy=f"a pretraining has one watcher folder: move {pre / WATCH_DIR} away to watch "
                        f"with these options")
    if run.finished is not None:
        return run.finished["metrics"]
    run.start()
    try:
        w.load()
        summary = w.run()
        run.finish({"task": "watch", "protocol": "watch", "metrics": summary, "pretraining": w.state.get("pretraining"),
                    "state": str(w.state_path)})
    finally:
        run.close()
    print(f"watch ended: {summary['done']} probe(s) done, {summary['failed']} failed "
          f"({summary['attempts']} attempts); state {w.state_path}")
    return summary


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res.get("failed") else 0)
