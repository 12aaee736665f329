"""Expand a suite into tasks × backbones × seeds and run them on Slurm, locally, or in-process.

::

    python -m slurm.submit --suite paper --backbone mae=mae_b.pth --backbone cmae=cmae_b.pth \\
        --seeds 0 1 2 --output-dir runs/paper --partition gpu --account proj --constraint a100
    python -m slurm.submit --suite smoke --pretrain mae=smoke_mae --pretrain crossmae=smoke_crossmae \\
        --output-dir runs/smoke --executor local
    python -m slurm.submit --suite paper --pretrain crossmae=paper_crossmae_vit_base --watch knn linprobe_fast \\
        --every 50 --output-dir runs/paper      # + a watcher job probing the snapshots (slurm.watch)

Layout of ``--output-dir``::

    pretrain/<name>/                     a pretraining run (``--pretrain NAME=CONFIG``)
    pretrain/<name>/watch/               its watcher (``--watch PROBES``: a task of kind ``watch``
                                         running ``slurm.watch``, no dependency; its probes inside)
    <backbone>/<task>-<config>/seed<k>/  a transfer task: metrics.json, checkpoints, log.txt,
                                         task.json (spec + job), task_state.json (state, error)
    jobs/<job id>/                       submitit's job folder (pickles, stdout/stderr logs)
    leaderboard.{csv,md,png}, leaderboard_paired.csv

On Slurm: one job per pretraining (multi-node DDP, requeued on preemption / time-out), one array job
per task type (``map_array``) with ``--dependency=afterok:<pretraining jobs>`` when its backbones
come from this submission, and a final leaderboard job (``afterany`` on every array). Locally the
same graph runs in order (at most ``--array-parallelism`` tasks at a time) with a progress display.
A task whose metrics exist is skipped (``--force`` moves its folder aside to ``<dir>.old-<time>``
and reruns it); a task already queued or running is not submitted twice; a task folder whose
``task.json`` records other inputs (data root, backbone, config, overrides, ...) is refused with
exit status 2 unless ``--force`` (folder moved aside, rerun from scratch).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.suites import Resources, Suite, TaskDef, get_suite
from crossmae.utils import REPO_ROOT, UserError, atomic_write_json, cli_entry, resolve_data_root
from crossmae.utils import check_writable

from .executor import EXECUTORS, ClusterOptions, check_int, make_executor, resolve_executor
from .tasks import METRICS_JSON, PRETRAIN_PREFIX, STATE_JSON, SUITE_JSON, TASK_JSON, nested_suite, TaskRunner, TaskSpec, read_json, run_leaderboard, write_state

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# --------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------
def parse_named(values: list[str] | None, option: str, default_name=None) -> dict[str, str]:
    """``["a=x", "y"]`` → ``{"a": "x", default_name("y"): "y"}``.

    Raises:
        UserError: a bad or repeated name.
    """
    out: dict[str, str] = {}
    for v in values or []:
        if "=" in v:
            name, val = v.split("=", 1)
        elif default_name is not None:
            name, val = default_name(v), v
        else:
            raise UserError(f"{option} {v}: expected NAME=VALUE")
        if not NAME_RE.match(name):
            raise UserError(f"{option} {v}: name {name!r} must match {NAME_RE.pattern}")
        if name in out or name == "pretrain" and option == "--backbone":
            raise UserError(f"{option} {v}: name {name!r} used twice (or reserved)")
        if not val:
            raise UserError(f"{option} {v}: empty value")
        out[name] = val
    return out


def parse_kv(values: list[str] | None, option: str) -> dict[str, str]:
    out = {}
    for v in values or []:
        if "=" not in v:
            raise UserError(f"{option} {v}: expected key=value")
        k, val = v.split("=", 1)
        out[k.strip()] = val.strip()
    return out


def _check_config(td: TaskDef, config: str, option: str, cfg_options: list[str] | None = None,
                  _seen: set | None = None) -> None:
    """The preset exists (``configs/<dir>/<preset>.py``) or the path exists, when the module has a
    configs folder, and it loads with ``cfg_options`` applied exactly as the task will load it
    (:func:`crossmae.utils.load_config`: known keys, types, ranges, the command's required keys), so
    ``--dry-run`` and a real submission refuse the same things before any job starts.
    Raises UserError otherwise."""
    if "/" in config or config.endswith(".py"):
        if not Path(config).is_file():
            raise UserError(f"{option} {config}: config file not found")
    d = REPO_ROOT / "configs" / td.config_dir
    if not ("/" in config or config.endswith(".py")) and d.is_dir() and not (d / f"{config}.py").is_file():
        known = ", ".join(sorted(p.stem for p in d.glob("*.py") if not p.stem.startswith("_")))
        raise UserError(f"{option} {config}: no preset configs/{td.config_dir}/{config}.py (presets: {known})")
    key = (td.config_dir, config, tuple(cfg_options or ()))
    if d.is_dir() and (_seen is None or key not in _seen):
        from crossmae.utils import load_config
        load_config(config, list(cfg_options or []), d)
        if _seen is not None:
            _seen.add(key)


def checkpoint_arch(path: str | Path) -> str | None:
    """The encoder architecture recorded in a pretraining checkpoint's ``args.model`` (or None)."""
    from benchmarks.leaderboard import pretrain_meta
    try:
        return pretrain_meta(path).get("arch") or None
    except UserError:
        return None


#: the resource fields a recipe (config file) may set: its process layout
RECIPE_LAYOUT_FIELDS = ("nodes", "gpus_per_node", "tasks_per_node")


def config_path(td: TaskDef, config: str) -> Path:
    """The file of ``config``: a path, or the preset ``configs/<task dir>/<config>.py``."""
    if "/" in config or config.endswith(".py"):
        return Path(config)
    return REPO_ROOT / "configs" / td.config_dir / f"{config}.py"


def recipe_resources(td: TaskDef, config: str) -> dict:
    """The process layout a task's recipe asks for: its config's top-level ``resources`` dict
    (only :data:`RECIPE_LAYOUT_FIELDS`; e.g. the COCO paper presets record ViTDet's 64 GPUs as
    ``resources = dict(nodes=8, gpus_per_node=8, tasks_per_node=8)``); ``{}`` when it has none.
    ``_base_`` files are followed (the ViT-L / ViT-H presets inherit the ViT-B layout).

    Raises:
        UserError: ``resources`` is not a dict or names another field.
    """
    path = config_path(td, config)
    if not path.is_file():
        return {}
    st = path.stat()
    rec = _config_resources(str(path.resolve()), st.st_mtime_ns, st.st_size)
    if rec is None:
        return {}
    if not isinstance(rec, dict) or set(rec) - set(RECIPE_LAYOUT_FIELDS):
        raise UserError(f"{path}: resources must be a dict of {', '.join(RECIPE_LAYOUT_FIELDS)}, got {dict(rec) if isinstance(rec, dict) else rec!r}")
    return dict(rec)


@functools.lru_cache(maxsize=256)
def _config_resources(path: str, mtime_ns: int, size: int):
    """The ``resources`` entry of a config file (cached per path, modification time and size)."""
    from mmengine.config import Config
    try:
        rec = Config.fromfile(path).get("resources")
    except Exception as exc:
        raise UserError(f"{path}: cannot be parsed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return rec.to_dict() if hasattr(rec, "to_dict") else rec


def split_task_resources(resources: dict | None, suite: Suite) -> tuple[dict, dict[str, dict]]:
    """``--resources`` entries split into those for every task (``nodes=2``) and those for one
    suite entry (``coco:nodes=8`` → ``{"coco": {"nodes": "8"}}``).

    Raises:
        UserError: ``TASK:key=value`` names a task the suite does not have.
    """
    common: dict = {}
    per_task: dict[str, dict] = {}
    for k, v in (resources or {}).items():
        if ":" in k:
            task, key = k.split(":", 1)
            if task not in {t.name for t in suite.tasks}:
                raise UserError(f"--resources {k}={v}: suite {suite.name!r} has no task {task!r} "
                                f"(tasks: {', '.join(t.name for t in suite.tasks)})")
            per_task.setdefault(task, {})[key] = v
        else:
            common[k] = v
    return common, per_task


def task_resources(td: TaskDef, arch: str, config: str, common: dict, own: dict | None,
                   option: str = "--resources") -> Resources:
    """The resources of one task, each source overriding the one before: the suite entry's
    resources for ``arch``, the recipe's layout (:func:`recipe_resources`), ``--resources
    key=value`` (every task), ``--resources TASK:key=value`` (this suite entry)."""
    res = td.resources_for(arch)
    rec = recipe_resources(td, config)
    if rec:
        res = res.replace(f"{config_path(td, config)}: resources", **rec)
    res = res.replace(option, **common)
    if own:
        try:
            res = res.replace(option, **own)
        except UserError as exc:  # name the suite entry: "--resources coco:nodes=0: must be >= 1"
            raise UserError(str(exc).replace(f"{option} ", f"{option} {td.name}:", 1)) from None
    return res


def plan(suite: Suite, out: Path, *, backbones: dict[str, str] | None = None, pretrains: dict[str, str] | None = None,
         seeds: list[int] = (0,), data_root: str | None = None, tasks: list[str] | None = None,
         arch: str | None = None, cfg_options: list[str] | None = None, pretrain_cfg_options: list[str] | None = None,
         resources: dict | None = None, pretrain_resources: dict | None = None,
         watch: list[str] | None = None, every: int = 1) -> list[TaskSpec]:
    """The task list: pretraining specs first, then suite tasks × backbones × seeds.

    Args:
        backbones: name → existing checkpoint. pretrains: name → pretraining config (preset or path);
            their transfer tasks use ``pretrain:<dir>`` and depend on the pretraining.
        arch: the backbones' architecture (selects per-arch presets / resources); default: read from
            each checkpoint's ``args.model``, else the suite's default.
        watch, every: probes (:mod:`benchmarks.suites.probes`) a watcher task (``slurm.watch``, kind
            ``watch``) runs on every ``every``-th snapshot of each pretraining, while it runs.

    Raises:
        UserError: no backbone at all, a missing checkpoint, a name used twice, a bad preset, bad seeds.
    """
    backbones, pretrains = dict(backbones or {}), dict(pretrains or {})
    if arch is not None:
        from crossmae.models import ARCHS
        if arch not in ARCHS:
            raise UserError(f"--arch {arch}: unknown architecture (known: {', '.join(sorted(ARCHS))})")
    seen: set = set()
    if not backbones and not pretrains:
        raise UserError("--backbone/--pretrain: give at least one backbone (NAME=CKPT) or pretraining config")
    if set(backbones) & set(pretrains):
        raise UserError(f"--pretrain: name {sorted(set(backbones) & set(pretrains))[0]!r} also used by --backbone")
    if not seeds or len(set(seeds)) != len(list(seeds)):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: give distinct seeds")
    for seed in seeds:
        check_int("--seeds", seed, 0, 2**32 - 1)
    out = out.resolve()
    specs: list[TaskSpec] = []
    chosen = suite.select(tasks)
    sources: dict[str, tuple[str, str, list[str]]] = {}  # name -> (backbone, arch, depends_on)
    for name, ckpt in backbones.items():
        from crossmae.zoo import is_uri, validate_spec, zoo_entry
        if is_uri(ckpt):  # checked without downloading; the tasks download it once into the cache
            validate_spec(ckpt)
            sources[name] = (ckpt, arch or (zoo_entry(ckpt) or {}).get("arch") or suite.default_arch, [])
            continue
        p = Path(ckpt).expanduser()
        if not p.exists():
            raise UserError(f"--backbone {name}={ckpt}: checkpoint not found")
        a = arch or (checkpoint_arch(p) if p.is_file() else None) or suite.default_arch
        sources[name] = (str(p.resolve()), a, [])
    if pretrains and suite.pretrain is None:
        raise UserError(f"--pretrain: suite {suite.name!r} defines no pretraining")
    for name, config in pretrains.items():
        td = suite.pretrain
        a = arch or suite.default_arch
        _check_config(td, config, "--pretrain", pretrain_cfg_options, seen)
        res = task_resources(td, a, config, pretrain_resources or {}, None, option="--pretrain-resources")
        d = out / "pretrain" / name
        specs.append(TaskSpec(id=f"pretrain/{name}", suite=suite.name, task="pretrain", protocol=td.protocol,
                              module=td.module, config=config, kind="pretrain", backbone_name=name, backbone=None,
                              seed=int(seeds[0]), output_dir=str(d), data_root=data_root, resources=res.to_dict(),
                              arch=a, cfg_options=list(pretrain_cfg_options or []), args=list(td.args)))
        sources[name] = (PRETRAIN_PREFIX + str(d), a, [f"pretrain/{name}"])
    if watch:
        from .watch import watch_spec
        if not pretrains:
            raise UserError("--watch: needs --pretrain (it probes the snapshots of those pretrainings)")
        for name in pretrains:
            pre = next(s for s in specs if s.id == f"pretrain/{name}")
            specs.append(watch_spec(pre, watch, every))
    common, per_task = split_task_resources(resources, suite)
    for td in chosen:
        for name, (bb, a, deps) in sources.items():
            config = td.config_for(a)
            _check_config(td, config, f"--suite {suite.name} (task {td.name})", cfg_options, seen)
            res = task_resources(td, a, config, common, per_task.get(td.name))
            for seed in seeds:
                tid = f"{name}/{td.name}-{config}/seed{int(seed)}"
                specs.append(TaskSpec(id=tid, suite=suite.name, task=td.name, protocol=td.protocol,
                                      module=td.module, config=config, kind="transfer", backbone_name=name,
                                      backbone=bb, seed=int(seed), output_dir=str(out / tid), data_root=data_root,
                                      resources=res.to_dict(), arch=a, cfg_options=list(cfg_options or []),
                                      args=list(td.args), depends_on=list(deps)))
    return specs


# --------------------------------------------------------------------------------------------------
# submission
# --------------------------------------------------------------------------------------------------
@dataclass
class Submission:
    """What :func:`dispatch` did. ``jobs``: task id → submitit job; ``skipped``: task id → reason;
    ``results``: task id → ``"done"`` / ``"failed: <error>"`` (local / debug, or Slurm with wait);
    ``stage_times``: kind (pretrain / transfer / leaderboard) → seconds from its first start to its
    last end; ``task_times``: task id → seconds from submission to end (process start-up included)."""

    executor: str
    out: Path
    specs: list[TaskSpec]
    jobs: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    leaderboard_job: object = None
    stage_times: dict = field(default_factory=dict)
    task_times: dict = field(default_factory=dict)


def _record(spec: TaskSpec, kind: str, job, folder: Path) -> None:
    atomic_write_json({"spec": spec.to_dict(), "executor": kind, "job_id": str(job.job_id),
                       "job_folder": str(folder), "submitted_at": time.time(),
                       "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)},
                      spec.dir / TASK_JSON)


#: the spec fields that are a task's inputs (``resources`` may change between submissions; these not)
INPUT_FIELDS = ("suite", "task", "protocol", "module", "config", "kind", "backbone", "seed", "data_root", "arch",
                "cfg_options", "args")


def input_difference(spec: TaskSpec, recorded: dict) -> str | None:
    """The first input of ``spec`` that differs from a ``task.json``'s recorded spec, as
    ``"data_root /a (task.json) != /b (now)"``; None when every input (:data:`INPUT_FIELDS`) matches."""
    def show(v) -> str:
        return (" ".join(map(str, v)) if isinstance(v, list) else "" if v is None else str(v)) or "(none)"

    now = spec.to_dict()
    for k in INPUT_FIELDS:
        if k in recorded and recorded[k] != now[k]:
            return f"{k} {show(recorded[k])} (task.json) != {show(now[k])} (now)"
    return None


def _triage(specs: list[TaskSpec], force: bool) -> tuple[list[TaskSpec], dict]:
    """Drop tasks already done (unless ``force``: folder moved aside) or queued / running.

    Every task is checked before anything is written: a folder whose ``task.json`` records other
    inputs (:func:`input_difference`: data root, backbone, seed, suite, config, overrides, ...) is
    another run's, so it is refused unless ``force``, which moves it aside and starts afresh.

    Raises:
        UserError: ``<dir>/task.json: <field> <old> (task.json) != <new> (now) ...`` without
            ``force``; with ``force`` when that other run is still queued / running.
    """
    from .status import SlurmView, task_status
    jobs = [read_json(s.dir / STATE_JSON).get("job_id") or t.get("job_id") for s in specs
            if (t := read_json(s.dir / TASK_JSON)).get("executor") == "slurm"]
    view = SlurmView.query([j for j in jobs if j])  # one sacct and one squeue call for every task
    checked = []
    for s in specs:
        st = task_status(s.dir, view)
        diff = input_difference(s, read_json(s.dir / TASK_JSON).get("spec") or {})
        if diff and not force:
            raise UserError(f"{s.dir / TASK_JSON}: {diff}: this folder holds another run "
                            "(use another --output-dir, or --force to move it aside and rerun)")
        if diff and st.active and st.state in ("pending", "running"):
            raise UserError(f"{s.dir / TASK_JSON}: {diff}, and that run is still {st.state} as job {st.job_id} "
                            "(cancel it first: python -m slurm.cancel)")
        checked.append((s, st, diff))
    todo, skipped = [], {}
    for s, st, diff in checked:
        if st.state == "done" and not force:
            skipped[s.id] = "done (metrics.json exists; --force reruns)"
        elif st.state in ("pending", "running") and st.job_id and st.active:
            skipped[s.id] = f"already {st.state} as job {st.job_id}"
        else:
            if force and s.dir.exists() and ((s.dir / METRICS_JSON).exists() or diff):
                stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
                s.dir.rename(s.dir.with_name(f"{s.dir.name}.old-{stamp}"))
            elif st.state in ("cancelled", "failed") and (s.dir / STATE_JSON).exists():
                write_state(s.dir, state="pending", error=None)  # submitted again: resumes
            todo.append(s)
    return todo, skipped


def _group_key(s: TaskSpec) -> tuple:
    return (s.task, json.dumps(s.resources, sort_keys=True))


def dispatch(specs: list[TaskSpec], out: Path, executor: str = "auto", opts: ClusterOptions | None = None,
             force: bool = False, wait: bool | None = None, leaderboard: bool = True,
             progress=print) -> Submission:
    """Submit ``specs`` (from :func:`plan`) and, off Slurm, run the graph to the end.

    Args:
        executor: ``auto`` / ``slurm`` / ``local`` / ``debug``.
        wait: on Slurm, block until every job ends (default False); local / debug always wait.
        leaderboard: build ``leaderboard.csv`` at the end (a final Slurm job on Slurm).
        progress: a callable receiving one-line progress messages (``None`` for silence).

    Raises:
        UserError: Slurm asked for but unreachable, the scheduler refused a submission, or a task
            folder's ``task.json`` records other inputs (see :func:`_triage`).
    """
    opts = opts or ClusterOptions()
    kind = resolve_executor(executor)
    out = Path(out).resolve()
    for s in specs:  # a watcher submits its probes where the suite runs
        if s.kind == "watch" and "--executor" in s.args:
            s.args[s.args.index("--executor") + 1] = kind
    why = nested_suite(out)
    if why:
        raise UserError(f"{out}: --output-dir {why}; give every suite its own folder")
    todo, skipped = _triage(specs, force)  # may refuse (UserError) before anything is written
    from crossmae.safeio import real_dir
    real_dir(out, "--output-dir", create=True)
    real_dir(out / "jobs", "job folder", create=True)  # submitit writes the job logs there: never through a link
    if not os.path.lexists(out / SUITE_JSON):
        atomic_write_json({"suite": specs[0].suite if specs else None, "created_at": time.time()}, out / SUITE_JSON)
    folder = out / "jobs"
    say = progress or (lambda *_: None)
    sub = Submission(executor=kind, out=out, specs=specs, skipped=skipped)
    for tid, why in skipped.items():
        say(f"skip {tid}: {why}")
    if kind == "slurm":
        _dispatch_slurm(sub, todo, folder, opts, leaderboard, say)
        _tidy(folder)
        if wait:
            _wait_slurm(sub, say)
    else:
        _run_graph(sub, todo, kind, folder, opts, say)
        _tidy(folder)
        if leaderboard:
            t0 = time.time()
            csv = run_leaderboard(str(out))
            sub.stage_times["leaderboard"] = time.time() - t0
            say(f"leaderboard: {csv}")
    return sub


def _tidy(folder: Path) -> None:
    """Remove the empty literal ``%j`` folder submitit's executor creates next to the job folders."""
    try:
        (folder / "%j").rmdir()
    except OSError:
        pass


def _submit_error(exc: Exception, what: str) -> UserError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    return UserError(f"{what}: the scheduler refused the job: {first}")


def _dispatch_slurm(sub: Submission, todo: list[TaskSpec], folder: Path, opts: ClusterOptions, leaderboard: bool,
                    say) -> None:
    runner = TaskRunner()
    job_of: dict[str, str] = {}
    for s in [s for s in todo if s.kind == "pretrain"]:
        ex = make_executor("slurm", folder, Resources(**s.resources), opts, f"pretrain-{s.backbone_name}")
        try:
            job = ex.submit(runner, s.to_dict())
        except Exception as exc:  # submitit raises on sbatch errors
            raise _submit_error(exc, f"--pretrain {s.backbone_name}")
        sub.jobs[s.id], job_of[s.id] = job, str(job.job_id)
        _record(s, "slurm", job, folder)
        say(f"submitted {s.id}: job {job.job_id} ({s.resources['nodes']} node(s))")
    from .status import task_status
    for s in sub.specs:  # a pretraining queued / running from an earlier submission: depend on it too
        if s.kind == "pretrain" and s.id not in job_of:
            st = task_status(s.dir)
            if st.active and st.job_id:
                job_of[s.id] = st.job_id
    groups: dict[tuple, list[TaskSpec]] = {}
    for s in [s for s in todo if s.kind != "pretrain"]:
        groups.setdefault(_group_key(s), []).append(s)
    array_ids = []
    for (task, _), group in groups.items():
        deps = sorted({job_of[d] for s in group for d in s.depends_on if d in job_of})
        missing = [d for s in group for d in s.depends_on if d not in job_of
                   and not (sub.out / d / METRICS_JSON).is_file()]
        dep = f"afterok:{':'.join(deps)}" if deps else None
        if missing and not deps:
            say(f"warning: {task}: pretraining {missing[0]} is neither done nor submitted now; "
                "its tasks will fail unless it finishes first")
        ex = make_executor("slurm", folder, Resources(**group[0].resources), opts, task, dependency=dep)
        try:
            jobs = ex.map_array(runner, [s.to_dict() for s in group])
        except Exception as exc:
            raise _submit_error(exc, f"--suite {group[0].suite} (task {task})")
        for s, job in zip(group, jobs):
            sub.jobs[s.id] = job
            _record(s, "slurm", job, folder)
        array_ids.append(str(jobs[0].job_id).split("_")[0])
        say(f"submitted {task}: array job {array_ids[-1]} with {len(group)} task(s)"
            + (f", after {dep}" if dep else ""))
    if leaderboard and (array_ids or job_of):
        ids = array_ids or list(job_of.values())
        ex = make_executor("slurm", folder, Resources(cpus_per_task=1, mem_gb=2, timeout_min=30), opts,
                           "leaderboard", dependency="afterany:" + ":".join(ids))
        sub.leaderboard_job = ex.submit(run_leaderboard, str(sub.out))
        say(f"submitted leaderboard: job {sub.leaderboard_job.job_id} (after every array)")


def _wait_slurm(sub: Submission, say) -> None:
    jobs = dict(sub.jobs)
    while jobs:
        for tid, job in list(jobs.items()):
            if job.done(force_check=True):
                sub.results[tid] = _outcome(job, next((s for s in sub.specs if s.id == tid), None))
                say(f"{tid}: {sub.results[tid]}")
                del jobs[tid]
        time.sleep(2)
    if sub.leaderboard_job is not None:
        while not sub.leaderboard_job.done(force_check=True):
            time.sleep(2)
        say(f"leaderboard: {_outcome(sub.leaderboard_job)} ({sub.out / 'leaderboard.csv'})")


def _outcome(job, spec: TaskSpec | None = None) -> str:
    """``done`` or ``failed: <first line of the task's error>`` (from its task_state.json when the
    task recorded one, else the scheduler's message)."""
    try:
        job.result()
        return "done"
    except Exception as exc:
        err = read_json(spec.dir / STATE_JSON).get("error") if spec is not None else None
        if not err:
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            err = lines[-1] if lines else type(exc).__name__
        return "failed: " + err


def _fmt_time(s: float) -> str:
    return f"{int(s // 60):3d}:{int(s % 60):02d}"


def _run_graph(sub: Submission, todo: list[TaskSpec], kind: str, folder: Path, opts: ClusterOptions, say) -> None:
    """Run the tasks locally in dependency order, at most ``opts.array_parallelism`` at a time."""
    t0 = time.time()
    pending = list(todo)
    running: dict[str, tuple] = {}
    total = len(pending)
    counts = {"done": 0, "failed": 0}
    done_ids = {tid for tid, why in sub.skipped.items() if why.startswith("done")}
    failed_ids: set[str] = set()
    stage_start: dict[str, float] = {}
    last_beat = time.time()
    runner = TaskRunner()

    def line(msg: str) -> None:
        say(f"[{_fmt_time(time.time() - t0)}] {counts['done'] + counts['failed']}/{total} finished "
            f"({counts['failed']} failed), {len(running)} running | {msg}")

    def finish(tid: str, job, started: float) -> None:
        spec = next(s for s in todo if s.id == tid)
        res = _outcome(job, spec)
        sub.results[tid] = res
        (done_ids if res == "done" else failed_ids).add(tid)
        counts["done" if res == "done" else "failed"] += 1
        stage_times = sub.stage_times.setdefault(spec.kind, 0.0)
        sub.stage_times[spec.kind] = max(stage_times, time.time() - stage_start[spec.kind])
        sub.task_times[tid] = time.time() - started
        line(f"{res} {tid} in {time.time() - started:.1f} s")

    while pending or running:
        for s in list(pending):
            busy = sum(1 for tid in running if not tid.endswith("/watch"))  # watchers (mostly asleep) not counted
            if s.kind != "watch" and busy >= max(1, opts.array_parallelism):
                continue
            bad = [d for d in s.depends_on if d in failed_ids]
            if bad:
                pending.remove(s)
                s.dir.mkdir(parents=True, exist_ok=True)
                write_state(s.dir, state="failed", error=f"dependency {bad[0]} failed", ended_at=time.time())
                sub.results[s.id] = f"failed: dependency {bad[0]} failed"
                failed_ids.add(s.id)
                counts["failed"] += 1
                line(f"skipped {s.id}: dependency {bad[0]} failed")
                continue
            if any(d not in done_ids and not (sub.out / d / METRICS_JSON).is_file() for d in s.depends_on):
                continue
            pending.remove(s)
            if read_json(s.dir / STATE_JSON).get("state") == "cancelled":  # by slurm.cancel meanwhile
                sub.results[s.id] = "failed: cancelled"
                failed_ids.add(s.id)
                counts["failed"] += 1
                line(f"cancelled {s.id}")
                continue
            stage_start.setdefault(s.kind, time.time())
            ex = make_executor(kind, folder, Resources(**s.resources), opts, s.task)
            job = ex.submit(runner, s.to_dict())
            sub.jobs[s.id] = job
            _record(s, kind, job, folder)
            line(f"started {s.id}")
            if kind == "debug":
                finish(s.id, job, time.time())
            else:
                running[s.id] = (job, time.time())
        for tid, (job, started) in list(running.items()):
            if job.done():
                del running[tid]
                finish(tid, job, started)
        if running and time.time() - last_beat > 30:
            last_beat = time.time()
            line("running: " + ", ".join(f"{tid} ({time.time() - st:.0f} s)" for tid, (_, st) in running.items()))
        if running:
            time.sleep(0.5)
        elif pending and not any(all(d in done_ids or d in failed_ids or (sub.out / d / METRICS_JSON).is_file()
                                     for d in s.depends_on) for s in pending):
            for s in pending:  # dependencies that are neither here nor done: cannot run
                sub.results[s.id] = f"failed: dependency {s.depends_on[0]} not available"
                write_state(s.dir, state="failed", error=sub.results[s.id][8:], ended_at=time.time())
                counts["failed"] += 1
            pending.clear()


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, help="smoke | paper | selftest")
    p.add_argument("--backbone", action="append", metavar="NAME=CKPT", help="a pretrained checkpoint (repeatable)")
    p.add_argument("--pretrain", action="append", metavar="[NAME=]CONFIG",
                   help="pretrain first with this config (preset of configs/pretrain or a path; repeatable)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--output-dir", required=True, help="results, job logs and the leaderboard go here")
    p.add_argument("--data-root", default=None, help="datasets root (default $CROSSMAE_DATA_ROOT or ../shared/data)")
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks of the suite")
    p.add_argument("--arch", default=None, help="backbone architecture (default: from the checkpoint's args)")
    p.add_argument("--cfg-options", nargs="+", default=None, help="key=value overrides for every transfer task")
    p.add_argument("--pretrain-cfg-options", nargs="+", default=None, help="key=value overrides for pretraining")
    p.add_argument("--resources", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override the suite's transfer resources (nodes, gpus_per_node, tasks_per_node, "
                        "cpus_per_task, mem_gb, timeout_min); TASK:key=value for one suite entry "
                        "(e.g. coco:nodes=8); precedence: suite < the recipe's own layout < key=value < TASK:key=value")
    p.add_argument("--pretrain-resources", nargs="+", default=None, metavar="KEY=VALUE")
    p.add_argument("--executor", default="auto", choices=EXECUTORS,
                   help="slurm | local | debug; auto = slurm when `scontrol ping` answers, else local")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None, help="Slurm --constraint, e.g. a100")
    p.add_argument("--array-parallelism", type=int, default=None,
                   help="max concurrent tasks per array (default: 256 on Slurm, 2 locally)")
    p.add_argument("--job-name", default="crossmae")
    p.add_argument("--max-num-timeout", type=int, default=3, help="time-outs allowed before giving up a task")
    p.add_argument("--exclusive", action="store_true", help="request whole nodes")
    p.add_argument("--force", action="store_true",
                   help="rerun tasks whose metrics exist, or whose task.json records other inputs (old folder kept)")
    p.add_argument("--wait", action="store_true", help="on Slurm, wait for every job and print outcomes")
    p.add_argument("--no-leaderboard", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the task list and resources, submit nothing")
    p.add_argument("--watch", nargs="+", default=None, metavar="PROBE",
                   help="probe each --pretrain snapshot while it runs (knn, linprobe_fast, ...; slurm.watch)")
    p.add_argument("--every", type=int, default=1, help="with --watch: probe every N-th epoch's snapshot")
    return p


def specs_from_args(args, suite: Suite) -> list[TaskSpec]:
    """:func:`plan` from parsed command-line arguments."""
    needs_data = suite.name != "selftest"
    data_root = str(resolve_data_root(args.data_root).resolve()) if needs_data else args.data_root
    return plan(suite, Path(args.output_dir), backbones=parse_named(args.backbone, "--backbone"),
                pretrains=parse_named(args.pretrain, "--pretrain", default_name=lambda v: Path(v).stem),
                seeds=args.seeds, data_root=data_root, tasks=args.tasks, arch=args.arch,
                cfg_options=args.cfg_options, pretrain_cfg_options=args.pretrain_cfg_options,
                resources=parse_kv(args.resources, "--resources"),
                pretrain_resources=parse_kv(args.pretrain_resources, "--pretrain-resources"),
                watch=args.watch, every=args.every)


def options_from_args(args, kind: str) -> ClusterOptions:
    """Scheduler options from parsed arguments.

    Raises:
        UserError: ``--array-parallelism`` < 1 or ``--max-num-timeout`` < 0 (see :class:`ClusterOptions`).
    """
    par = args.array_parallelism if args.array_parallelism is not None else (256 if kind == "slurm" else 2)
    return ClusterOptions(partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                          array_parallelism=par, job_name=args.job_name, max_num_timeout=args.max_num_timeout,
                          exclusive=args.exclusive)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    """Plan, then submit (or print with ``--dry-run``). Returns ``{"executor", "jobs": {id: job id},
    "skipped", "results"}``."""
    args = build_parser().parse_args(argv)
    check_writable(args.output_dir, "--output-dir", folder=True)  # before any work
    why = nested_suite(args.output_dir)
    if why:  # checked by --dry-run too
        raise UserError(f"{args.output_dir}: --output-dir {why}; give every suite its own folder")
    options_from_args(args, "local")  # numeric options checked before anything else (nothing written)
    suite = get_suite(args.suite)
    specs = specs_from_args(args, suite)
    if args.dry_run:
        for s in specs:
            r = s.resources
            print(f"{s.id:48s} {s.module:20s} --config {s.config:14s} nodes={r['nodes']} gpus/node={r['gpus_per_node']} "
                  f"tasks/node={r['tasks_per_node']} cpus/task={r['cpus_per_task']} mem={r['mem_gb']}GB "
                  f"time={r['timeout_min']}min" + (f" after {','.join(s.depends_on)}" if s.depends_on else ""))
        return {"executor": None, "jobs": {}, "skipped": {}, "results": {}, "specs": [s.to_dict() for s in specs]}
    kind = resolve_executor(args.executor)
    sub = dispatch(specs, Path(args.output_dir), kind, options_from_args(args, kind), force=args.force,
                   wait=args.wait, leaderboard=not args.no_leaderboard)
    if kind == "slurm" and not args.wait:
        print(f"follow with: python -m slurm.status {sub.out}")
    failed = [t for t, r in sub.results.items() if r != "done"]
    if failed:
        print(f"{len(failed)} task(s) failed; see python -m slurm.status {sub.out}", file=sys.stderr)
    return {"executor": kind, "jobs": {t: str(j.job_id) for t, j in sub.jobs.items()}, "skipped": sub.skipped,
            "results": sub.results}


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any(r != "done" for r in res.get("results", {}).values()) else 0)
