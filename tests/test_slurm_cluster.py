"""The dispatch on a REAL single-node Slurm (``python -m slurm.local_cluster ensure``), through submitit.

Marked ``slurm``: when the cluster is not up, the fixture runs ``local_cluster.ensure()`` (install
where missing, configure, start; idempotent, bounded waits) and skips with the reason only when that
fails (no root / apt-get / packages). Every wait below is a bounded poll
of the scheduler, never an assertion about durations.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.suites import get_suite
from slurm import local_cluster, selftest
from slurm.cancel import FINISHED, cancel, main as cancel_main
from slurm.executor import ClusterOptions
from slurm.status import collect, main as status_main
from slurm.submit import dispatch, plan
from _slurm import out, wait_until as _wait  # noqa: F401  (fixture)

pytestmark = pytest.mark.slurm
SUITE = get_suite("selftest")


@pytest.fixture(scope="module")
def cluster():
    if not local_cluster.cluster_up():
        try:  # installs (apt-get) only where missing; CI runs `python -m slurm.local_cluster ensure` first
            local_cluster.ensure(verbose=False)
        except (local_cluster.ClusterError, OSError, LookupError) as exc:
            pytest.skip(f"no local Slurm: {exc}")
    return True






def _done(job, timeout=120.0):
    _wait(lambda: job.done(force_check=True), timeout, f"job {job.job_id}")
    return job


def _reference_metrics(tmp_path: Path, cfg: list[str], seed: int = 0) -> dict:
    """The same task run uninterrupted, in-process."""
    return selftest.main(["--output-dir", str(tmp_path / f"ref-{seed}"), "--backbone", __file__, "--seed", str(seed),
                          "--cfg-options", *cfg])["metrics"]


def _steps_done(d: Path) -> int:
    import torch
    try:
        return int(torch.load(d / "checkpoint-latest.pth", weights_only=False)["epoch"])
    except Exception:
        return 0


def test_array_job_with_a_failing_task_and_status(out, tmp_path):
    specs = plan(SUITE, out, backbones={"a": __file__, "b": __file__}, seeds=[0, 1], cfg_options=["steps=4"])
    bad = specs[3]
    bad.cfg_options = ["steps=4", "fail_at_step=2"]
    sub = dispatch(specs, out, "slurm", ClusterOptions(partition="debug", job_name="t-array", array_parallelism=2),
                   progress=None)
    ids = [str(sub.jobs[s.id].job_id) for s in specs]
    assert len({i.split("_")[0] for i in ids}) == 1 and all("_" in i for i in ids)  # ONE array job
    for s in specs:
        _done(sub.jobs[s.id])
    rows = {r.id: r for r in collect(out)}
    assert [rows[s.id].state for s in specs] == ["done", "done", "done", "failed"]
    assert rows[bad.id].error == "RuntimeError: selftest: injected failure at step 2"
    assert Path(rows[bad.id].log).is_file() and "injected failure" in Path(rows[bad.id].log).read_text()
    assert not (bad.dir / "metrics.json").exists()
    # the leaderboard job runs after the array (afterany) and sees the three finished tasks
    _done(sub.leaderboard_job)
    assert sub.leaderboard_job.result() == str(out / "leaderboard.csv")
    lines = (out / "leaderboard.csv").read_text().splitlines()
    assert [ln.split(",")[0] for ln in lines[1:]] == ["a", "a", "b", "b"]
    assert ",mse,2,0 1," in lines[1] and ",mse,1,0," in lines[3]  # backbone b: only seed 0 finished
    p = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ids[0].split("_")[0], "-o", "JobName,Partition"],
                       capture_output=True, text=True)
    assert "t-array-selftest|debug" in p.stdout


def test_interrupted_task_requeues_and_resumes_to_the_same_metrics(out, tmp_path):
    cfg = ["steps=16", "step_seconds=0.4"]
    specs = plan(SUITE, out, backbones={"a": __file__}, cfg_options=cfg)
    sub = dispatch(specs, out, "slurm", ClusterOptions(), leaderboard=False, progress=None)
    job, d = sub.jobs[specs[0].id], specs[0].dir
    _wait(lambda: _steps_done(d) >= 3, 90, "3 checkpointed steps")
    job._interrupt()  # SIGUSR2 as on preemption: checkpoint() → requeue → resume
    _done(job, 180)
    assert job.result()["metrics"] == _reference_metrics(tmp_path, cfg)
    starts = [int(ln.split("start_step=")[1].split()[0]) for ln in (d / "log.txt").read_text().splitlines()]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 3
    assert json.loads((d / "task_state.json").read_text())["attempts"] == 2


def test_real_preemption_by_a_higher_priority_partition(out, tmp_path):
    cpus = os.cpu_count() or 1
    cfg = ["steps=24", "step_seconds=0.4"]
    specs = plan(SUITE, out, backbones={"low": __file__}, cfg_options=cfg, resources={"cpus_per_task": str(cpus)})
    sub = dispatch(specs, out, "slurm", ClusterOptions(partition="debug"), leaderboard=False, progress=None)
    low, d = sub.jobs[specs[0].id], specs[0].dir
    _wait(lambda: _steps_done(d) >= 3, 90, "3 checkpointed steps")
    hi_specs = plan(SUITE, out, backbones={"high": __file__}, cfg_options=["steps=2"],
                    resources={"cpus_per_task": str(cpus)})
    hi = dispatch(hi_specs, out, "slurm", ClusterOptions(partition="high"), leaderboard=False, progress=None)
    _done(hi.jobs[hi_specs[0].id], 120)
    _done(low, 180)
    assert low.result()["metrics"] == _reference_metrics(tmp_path, cfg)
    starts = [int(ln.split("start_step=")[1].split()[0]) for ln in (d / "log.txt").read_text().splitlines()]
    assert len(starts) == 2 and starts[1] >= 3  # preempted once, resumed from its checkpoint


def test_cancel_stops_a_running_task_and_status_shows_it(out, tmp_path):
    specs = plan(SUITE, out, backbones={"a": __file__}, cfg_options=["steps=200", "step_seconds=0.5"])
    sub = dispatch(specs, out, "slurm", ClusterOptions(), leaderboard=False, progress=None)
    d = specs[0].dir
    _wait(lambda: _steps_done(d) >= 1, 90, "the task to run")
    row = collect(out)[0]
    assert (row.state, row.job_id) == ("running", str(sub.jobs[specs[0].id].job_id))
    assert row.scheduler_state in ("RUNNING", "PENDING")  # sacct may lag the start by a second
    assert cancel(out) == {specs[0].id: "cancelled"}
    _wait(lambda: subprocess.run(["sacct", "-n", "-X", "-j", str(sub.jobs[specs[0].id].job_id), "-o", "State"],
                                 capture_output=True, text=True).stdout.strip().startswith("CANCELLED"),
          60, "sacct to show CANCELLED")
    assert [r.state for r in collect(out)] == ["cancelled"]
    assert not (d / "metrics.json").exists()


def test_two_process_job_initialises_ddp_from_submitit(out, tmp_path):
    specs = plan(SUITE, out, backbones={"a": __file__}, cfg_options=["steps=3"],
                 resources={"tasks_per_node": "2", "cpus_per_task": "1"})
    sub = dispatch(specs, out, "slurm", ClusterOptions(), leaderboard=False, progress=None)
    job = _done(sub.jobs[specs[0].id])
    res = job.results()  # one result per process
    assert len(res) == 2 and all(r["world_size"] == 2 for r in res)
    m = json.loads((specs[0].dir / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["metrics"] == res[0]["metrics"]


def test_smoke_suite_arrays_with_the_real_task_modules(out, tmp_path, data_root, tiny_mae_official,
                                                       tiny_crossmae_official):
    """Two real smoke tasks (the fastest; the main job runs all of them) × MAE / CrossMAE checkpoints:
    one array job per task type, then the leaderboard job, through the real task modules."""
    specs = plan(get_suite("smoke"), out, backbones={"mae": str(tiny_mae_official), "crossmae": str(tiny_crossmae_official)},
                 tasks=["places", "finetune"], data_root=str(data_root))
    sub = dispatch(specs, out, "slurm", ClusterOptions(array_parallelism=2), progress=None)
    arrays = {str(j.job_id).split("_")[0] for j in sub.jobs.values()}
    assert len(arrays) == 2  # one array per task type
    for s in specs:
        _done(sub.jobs[s.id], 300)
    bad = {r.id: r.error for r in collect(out) if r.state != "done"}
    assert not bad
    _done(sub.leaderboard_job, 120)
    rows = list(__import__("csv").DictReader((out / "leaderboard.csv").open()))
    assert {(r["backbone"], r["task"], r["method"]) for r in rows if r["metric"] == "top1"} == {
        ("mae", "places", "mae"), ("crossmae", "places", "crossmae"),
        ("mae", "finetune", "mae"), ("crossmae", "finetune", "crossmae")}
    paired = (out / "leaderboard_paired.csv").read_text().splitlines()
    assert any(ln.startswith("vit_tiny_patch16,places,") for ln in paired)


def test_a_refused_submission_is_a_one_line_error_and_records_nothing(out, tmp_path, capsys):
    from slurm.submit import main as submit_main
    with pytest.raises(SystemExit) as e:
        submit_main(["--suite", "selftest", "--backbone", f"a={__file__}", "--output-dir", str(out),
                     "--executor", "slurm", "--partition", "no-such-partition"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # sbatch's own stderr may precede it
    assert e.value.code == 2
    assert err.startswith("error: --suite selftest (task selftest): the scheduler refused the job")
    assert "partition" in err.lower()
    assert not list(out.rglob("task.json"))


def test_pretraining_jobs_then_transfer_arrays_after_them(out, tmp_path):
    specs = plan(SUITE, out, pretrains={"mae": "mae", "crossmae": "crossmae"}, cfg_options=["steps=3"],
                 pretrain_cfg_options=["steps=4", "step_seconds=0.2"])
    sub = dispatch(specs, out, "slurm", ClusterOptions(), progress=None)
    pre = [str(sub.jobs[f"pretrain/{n}"].job_id) for n in ("mae", "crossmae")]
    arr = sub.jobs["mae/selftest-default/seed0"]
    master = str(arr.job_id).split("_")[0]
    script = (out / "jobs" / master / f"{master}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{':'.join(sorted(pre))}" in script
    for s in specs:
        _done(sub.jobs[s.id], 180)
    for s in specs:
        assert (s.dir / "metrics.json").is_file(), s.id
    first_transfer = min(json.loads((s.dir / "task_state.json").read_text())["started_at"]
                         for s in specs if s.kind == "transfer")
    assert first_transfer >= max((out / "pretrain" / n / "metrics.json").stat().st_mtime for n in ("mae", "crossmae"))
    _done(sub.leaderboard_job, 120)
    rows = list(__import__("csv").DictReader((out / "leaderboard.csv").open()))
    assert {(r["backbone"], r["method"], r["prediction_ratio"]) for r in rows} == {
        ("mae", "mae", "0.75"), ("crossmae", "crossmae", "0.25")}


def test_a_pending_array_element_cancelled_outside_is_cancelled_and_a_resubmit_runs_it(out, capsys):
    """``scancel <array>_3`` while element 3 waits: Slurm drops it from the array without any
    accounting record; status must say cancelled (not pending forever) and a re-submit runs it."""
    specs = plan(SUITE, out, backbones={"a": __file__}, seeds=[0, 1, 2, 3], cfg_options=["steps=3"])
    opts = ClusterOptions(array_parallelism=1, job_name="t-scancel")
    sub = dispatch(specs, out, "slurm", opts, leaderboard=False, progress=None)
    third = specs[3]
    jid = str(sub.jobs[third.id].job_id)
    assert jid.endswith("_3")
    subprocess.run(["scancel", jid], check=True, capture_output=True, timeout=30)
    _wait(lambda: {r.id: r.state for r in collect(out)}[third.id] == "cancelled", 30, f"{jid} to read as cancelled")
    assert all(r.state != "cancelled" for r in collect(out) if r.id != third.id)
    capsys.readouterr()
    status_main([str(out), "--state", "cancelled"])
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:3] == [third.id, "cancelled", jid] and table[-1] == "total: 1 cancelled"
    again = dispatch(plan(SUITE, out, backbones={"a": __file__}, seeds=[0, 1, 2, 3], cfg_options=["steps=3"]), out,
                     "slurm", opts, leaderboard=False, progress=None)
    assert list(again.jobs) == [third.id] and len(again.skipped) == 3  # the others: queued, running or done
    assert str(again.jobs[third.id].job_id) != jid
    _done(again.jobs[third.id])
    for s in specs[:3]:
        _done(sub.jobs[s.id])
    assert {r.id: r.state for r in collect(out)} == {s.id: "done" for s in specs}
    assert all((s.dir / "metrics.json").is_file() for s in specs)  # no seed missing from the leaderboard


def test_cancel_of_a_task_that_finishes_in_the_kill_grace_period_reports_it_done(out, tmp_path, capsys):
    """scancel sends SIGTERM, which submitit ignores; the task has ~2 s left, less than KillWait
    (5 s), so it finishes before the SIGKILL: cancel must say so and keep the result as done."""
    cfg = ["steps=6", "step_seconds=1.5"]
    specs = plan(SUITE, out, backbones={"a": __file__}, cfg_options=cfg)
    sub = dispatch(specs, out, "slurm", ClusterOptions(), leaderboard=False, progress=None)
    d = specs[0].dir
    _wait(lambda: _steps_done(d) >= 5, 90, "5 checkpointed steps")
    capsys.readouterr()
    assert cancel_main([str(out)]) == {specs[0].id: FINISHED}
    assert capsys.readouterr().out.splitlines() == [
        "cancelled 0 task(s)", "1 task(s) finished before the cancel took effect (kept as done)", f"  {specs[0].id}"]
    assert json.loads((d / "metrics.json").read_text())["metrics"] == _reference_metrics(tmp_path, cfg)
    assert json.loads((d / "task_state.json").read_text())["state"] == "done"
    assert [r.state for r in collect(out)] == ["done"]
    _done(sub.jobs[specs[0].id])
