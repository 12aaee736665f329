"""Dispatch without a cluster: the in-process ``debug`` and submitit ``local`` executors running the
protocol task ``slurm.selftest`` (checkpoints every step, resumes, writes metrics.json)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.suites import get_suite
from slurm import selftest
from slurm.cancel import main as cancel_main
from slurm.executor import ClusterOptions
from slurm.status import collect, main as status_main
from slurm.submit import dispatch, plan

SUITE = get_suite("selftest")


@pytest.fixture
def no_pdb(monkeypatch):
    """submitit's debug executor opens pdb on a failing task; tests have no terminal."""
    import pdb
    monkeypatch.setattr(pdb, "post_mortem", lambda *a, **k: None)


def _plan(out, **kw):
    kw.setdefault("pretrains", {"mae": "mae", "crossmae": "crossmae"})
    kw.setdefault("cfg_options", ["steps=6"])
    kw.setdefault("pretrain_cfg_options", ["steps=3"])
    return plan(SUITE, out, **kw)


def test_debug_graph_runs_pretrain_then_transfer_then_leaderboard(tmp_path):
    out = tmp_path / "run"
    sub = dispatch(_plan(out, seeds=[0, 1]), out, "debug", progress=None)
    assert sub.executor == "debug"
    assert set(sub.results.values()) == {"done"} and len(sub.results) == 2 + 2 * 2
    for tid in sub.results:
        assert (out / tid / "metrics.json").is_file()
        assert json.loads((out / tid / "task.json").read_text())["spec"]["id"] == tid
    st = json.loads((out / "crossmae/selftest-default/seed1/task_state.json").read_text())
    assert st["state"] == "done" and st["backbone_meta"]["method"] == "crossmae"
    assert st["backbone_meta"]["prediction_ratio"] == 0.25
    assert {r.state for r in collect(out)} == {"done"}
    lines = (out / "leaderboard.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2  # 2 backbones x 2 metrics (mse, w_err)
    paired = (out / "leaderboard_paired.csv").read_text().splitlines()
    assert len(paired) == 1 + 2 and ",mae,crossmae,2,0 1," in paired[1]
    assert (out / "leaderboard.png").stat().st_size > 1000


def test_done_tasks_are_skipped_and_force_keeps_the_old_folder(tmp_path):
    out = tmp_path / "run"
    specs = _plan(out, pretrains=None, backbones={"b": __file__})
    dispatch(specs, out, "debug", leaderboard=False, progress=None)
    first = (out / "b/selftest-default/seed0/metrics.json").read_text()
    again = dispatch(_plan(out, pretrains=None, backbones={"b": __file__}), out, "debug", leaderboard=False,
                     progress=None)
    assert not again.jobs and list(again.skipped.values())[0].startswith("done")
    forced = dispatch(_plan(out, pretrains=None, backbones={"b": __file__}), out, "debug", force=True,
                      leaderboard=False, progress=None)
    assert list(forced.results.values()) == ["done"]
    old = list((out / "b").glob("selftest-default/seed0.old-*"))
    assert len(old) == 1 and (old[0] / "metrics.json").read_text() == first
    # same seed, same data: the rerun reproduces the metrics
    assert json.loads((out / "b/selftest-default/seed0/metrics.json").read_text())["metrics"] == \
        json.loads(first)["metrics"]


def test_failed_pretraining_fails_its_transfers_without_metrics(tmp_path, no_pdb, capsys):
    out = tmp_path / "run"
    specs = _plan(out, pretrains={"mae": "mae"}, pretrain_cfg_options=["steps=3", "fail_at_step=1"])
    sub = dispatch(specs, out, "debug", leaderboard=False, progress=None)
    assert sub.results["pretrain/mae"].startswith("failed")
    assert sub.results["mae/selftest-default/seed0"] == "failed: dependency pretrain/mae failed"
    rows = {r.id: r for r in collect(out)}
    assert rows["pretrain/mae"].state == "failed"
    assert rows["pretrain/mae"].error == "RuntimeError: selftest: injected failure at step 1"
    assert rows["mae/selftest-default/seed0"].state == "failed"
    assert not list(out.rglob("metrics.json"))
    capsys.readouterr()
    status_main([str(out)])
    table = capsys.readouterr().out
    assert "RuntimeError: selftest: injected failure at step 1" in table and "2 failed" in table


def test_failed_task_resubmitted_resumes_to_the_uninterrupted_metrics(tmp_path, no_pdb):
    ref = tmp_path / "ref"
    dispatch(plan(SUITE, ref, backbones={"b": __file__}, cfg_options=["steps=12"]), ref, "debug",
             leaderboard=False, progress=None)
    out = tmp_path / "run"
    sub = dispatch(plan(SUITE, out, backbones={"b": __file__}, cfg_options=["steps=12", "fail_at_step=7"]),
                   out, "debug", leaderboard=False, progress=None)
    d = out / "b/selftest-default/seed0"
    assert list(sub.results.values())[0].startswith("failed") and not (d / "metrics.json").exists()
    # the same inputs again (a changed config would be another run): the fault was transient
    sub = dispatch(plan(SUITE, out, backbones={"b": __file__}, cfg_options=["steps=12", "fail_at_step=7"]), out,
                   "debug", leaderboard=False, progress=None)
    assert list(sub.results.values()) == ["done"]
    assert "start_step=7" in (d / "log.txt").read_text()  # resumed, not restarted
    got = json.loads((d / "metrics.json").read_text())["metrics"]
    assert got == json.loads((ref / "b/selftest-default/seed0/metrics.json").read_text())["metrics"]
    assert json.loads((d / "task_state.json").read_text())["attempts"] == 2


def test_cancel_marks_unstarted_tasks_and_never_touches_finished_ones(tmp_path, capsys):
    out = tmp_path / "run"
    dispatch(plan(SUITE, out, backbones={"b": __file__}, cfg_options=["steps=2"]), out, "debug", leaderboard=False,
             progress=None)
    waiting = out / "c/selftest-default/seed0"
    waiting.mkdir(parents=True)
    (waiting / "task_state.json").write_text(json.dumps({"state": "requeued"}))
    (waiting / "task.json").write_text(json.dumps({"spec": {"id": "c/selftest-default/seed0"}, "executor": "local"}))
    assert cancel_main([str(out)]) == {"c/selftest-default/seed0": "cancelled"}
    assert capsys.readouterr().out == "cancelled 1 task(s)\n  c/selftest-default/seed0\n"
    rows = {r.id: r.state for r in collect(out)}
    assert rows == {"b/selftest-default/seed0": "done", "c/selftest-default/seed0": "cancelled"}


def test_selftest_rejects_unknown_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        selftest.main(["--output-dir", str(tmp_path), "--cfg-options", "nope=1"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --cfg-options nope: unknown key (known: batch, dim, " \
                                              "fail_at_step, lr, step_seconds, steps)"


def test_local_executor_processes_failure_log_and_cancel(tmp_path):
    """Two submitit local processes at once: one fails (error + log kept, no metrics), one is
    cancelled while running by ``slurm.cancel`` (SIGINT to its controller)."""
    import threading
    import time
    out = tmp_path / "run"
    specs = plan(SUITE, out, backbones={"long": __file__, "bad": __file__}, cfg_options=["steps=400", "step_seconds=0.25"])
    long, bad = specs
    bad.cfg_options = ["steps=3", "fail_at_step=2"]
    box = {}
    th = threading.Thread(target=lambda: box.update(sub=dispatch(specs, out, "local", ClusterOptions(array_parallelism=2),
                                                                  leaderboard=False, progress=None)))
    th.start()
    end = time.monotonic() + 120
    while time.monotonic() < end and not ((long.dir / "checkpoint-latest.pth").exists()
                                          and {r.id: r.state for r in collect(out)}.get(bad.id) == "failed"):
        time.sleep(0.2)
    rows = {r.id: r for r in collect(out)}
    assert rows[long.id].state == "running"
    assert rows[bad.id].state == "failed" and rows[bad.id].error == "RuntimeError: selftest: injected failure at step 2"
    assert Path(rows[bad.id].log).is_file() and "injected failure" in Path(rows[bad.id].log).read_text()
    assert Path(rows[bad.id].log).is_relative_to(out / "jobs")  # job folder under the output directory
    assert cancel_main([str(out)]) == {long.id: "cancelled"}
    th.join(120)
    assert not th.is_alive()
    assert box["sub"].results[bad.id].startswith("failed: RuntimeError")
    assert box["sub"].results[long.id].startswith("failed")
    assert {r.id: r.state for r in collect(out)} == {long.id: "cancelled", bad.id: "failed"}
    assert not list(out.rglob("metrics.json"))


def test_a_cancelled_task_submitted_again_runs(tmp_path):
    out = tmp_path / "run"
    specs = plan(SUITE, out, backbones={"b": __file__}, cfg_options=["steps=4"])
    specs[0].dir.mkdir(parents=True)
    (specs[0].dir / "task_state.json").write_text(json.dumps({"state": "cancelled"}))
    # a cancelled task is resubmitted by a new dispatch (its state is reset, it runs)
    sub = dispatch(specs, out, "debug", leaderboard=False, progress=None)
    assert sub.results == {specs[0].id: "done"} and (specs[0].dir / "metrics.json").is_file()


def _tree(root: Path) -> dict:
    """Every file under ``root`` with its bytes and mtime (to prove nothing changed)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("first,again,field", [
    ([], ["--data-root", "OTHER"], "data_root"),
    ([], ["--cfg-options", "steps=3", "lr=0.1"], "cfg_options"),
    ([], ["--arch", "vit_large_patch16"], "arch"),
    ([], ["--backbone-file", "OTHER"], "backbone"),
    (["--cfg-options", "steps=3", "fail_at_step=1"], ["--data-root", "OTHER"], "data_root"),  # unfinished
])
def test_resubmit_with_other_inputs_is_refused_unless_force(tmp_path, capsys, no_pdb, first, again, field):
    """A folder whose task.json records other inputs is another run: exit 2 naming task.json and the
    difference, nothing changed; --force moves it aside and reruns with the new inputs."""
    from slurm.submit import main as submit_main
    out, d1 = tmp_path / "run", tmp_path / "data1"
    other = tmp_path / "other.pth"
    other.write_bytes(b"another checkpoint")

    def argv(extra):
        bb, extra = (str(other), []) if extra == ["--backbone-file", "OTHER"] else (__file__, list(extra))
        extra = [str(tmp_path / "data2") if a == "OTHER" else a for a in extra]
        return ["--suite", "selftest", "--backbone", f"b={bb}", "--output-dir", str(out), "--executor", "debug",
                "--no-leaderboard", "--data-root", str(d1), "--cfg-options", "steps=3", *extra]  # later wins

    submit_main(argv(first))
    d = out / "b/selftest-default/seed0"
    assert (d / "task.json").is_file() and (d / "metrics.json").is_file() == (not first)
    before = _tree(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        submit_main(argv(again))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {d / 'task.json'}: {field} ") and "\n" not in err
    assert "--force" in err
    assert _tree(out) == before  # nothing written, moved or touched
    res = submit_main(argv(again) + ["--force"])
    assert res["results"] == {"b/selftest-default/seed0": "done"}
    old = list(d.parent.glob("seed0.old-*"))
    assert len(old) == 1 and _tree(old[0]) == {k[len("b/selftest-default/seed0/"):]: v for k, v in before.items()
                                               if k.startswith("b/selftest-default/seed0/")}
    spec = json.loads((d / "task.json").read_text())["spec"]
    now = {"data_root": str(tmp_path / "data2"), "cfg_options": ["steps=3", "lr=0.1"], "arch": "vit_large_patch16",
           "backbone": str(other)}[field]
    assert spec[field] == now
    assert (d / "log.txt").read_text().count("start_step=") == 1  # started afresh, not resumed from the other run
    assert "start_step=0" in (d / "log.txt").read_text()


def test_resubmit_with_the_same_inputs_and_new_resources_skips(tmp_path):
    out = tmp_path / "run"
    dispatch(plan(SUITE, out, backbones={"b": __file__}, cfg_options=["steps=2"], data_root="/d"), out, "debug",
             leaderboard=False, progress=None)
    again = dispatch(plan(SUITE, out, backbones={"b": __file__}, cfg_options=["steps=2"], data_root="/d",
                          resources={"mem_gb": "3"}), out, "debug", leaderboard=False, progress=None)
    assert not again.jobs and list(again.skipped.values())[0].startswith("done")


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_cancel_refuses_a_nonsense_timeout_and_changes_nothing(tmp_path, capsys, value):
    out = tmp_path / "run"
    waiting = out / "c/selftest-default/seed0"
    waiting.mkdir(parents=True)
    (waiting / "task_state.json").write_text(json.dumps({"state": "requeued"}))
    (waiting / "task.json").write_text(json.dumps({"spec": {"id": "c/selftest-default/seed0"}, "executor": "local"}))
    before = _tree(out)
    with pytest.raises(SystemExit) as e:
        cancel_main([str(out), "--timeout", value])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: --timeout {float(value)}: must be a positive number of seconds"
    assert _tree(out) == before


@pytest.mark.parametrize("extra,msg", [
    (["--cfg-options", "steps=abc"], "--cfg-options steps=abc: expected int"),
    (["--cfg-options", "steps=0"], "--cfg-options steps=0: must be >= 1"),
    (["--cfg-options", "batch=-4"], "--cfg-options batch=-4: must be >= 1"),
    (["--cfg-options", "step_seconds=-1"], "--cfg-options step_seconds=-1: must be >= 0.0"),
    (["--cfg-options", "lr=nan"], "--cfg-options lr=nan: must be >= 0.0"),
    (["--seed", "-1"], "--seed -1: must be an integer in [0, 4294967295]"),
])
def test_selftest_refuses_nonsense_numbers_and_writes_nothing(tmp_path, capsys, extra, msg):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        selftest.main(["--output-dir", str(out), *extra])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {msg}"
    assert not out.exists()
