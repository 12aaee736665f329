"""The suite's own JSON files, read back through one reader with a schema per kind: what is not the
expected shape is refused with one line (commands) or a one-line warning and skipped (scanners), never
a traceback. Config files without the command's required keys are refused the same way."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from crossmae.runs import RunDir
from crossmae.utils import REPO_ROOT, UserError, load_config

DEEP = "[" * 100_000 + "]" * 100_000


def _metrics(**kw) -> dict:
    m = {"task": "linprobe", "protocol": "linprobe_mae", "metrics": {"top1": 70.0}, "backbone": "b.pth",
         "backbone_sha256": "ab" * 32, "seed": 1, "wall_time_s": 1.0, "num_gpus": 0}  # seed 1: not a duplicate
    m.update(kw)
    return m


# leaderboard: bad metrics.json files are warned about and skipped, the good one stays
BAD_METRICS = {
    "deep": '{"task": "linprobe", "metrics": ' + DEEP + "}",
    "deep_object": '{"a":' * 100_000 + "1" + "}" * 100_000,
    "wall_time_string": json.dumps(_metrics(wall_time_s="abc")),
    "num_gpus_string": json.dumps(_metrics(num_gpus="abc")),
    "metrics_values_strings": json.dumps(_metrics(wall_time_s=[1.0])),
    "seed_string": json.dumps(_metrics(seed="zero")),
    "backbone_report_list": json.dumps(_metrics(backbone_report=["x"])),
}


@pytest.mark.parametrize("case", list(BAD_METRICS))
def test_leaderboard_skips_a_metrics_file_of_the_wrong_shape(tmp_path, capsys, case):
    from benchmarks.leaderboard import build
    good = tmp_path / "runs" / "b" / "linprobe-smoke" / "seed0"
    bad = tmp_path / "runs" / "b" / "linprobe-smoke" / "seed1"
    good.mkdir(parents=True), bad.mkdir(parents=True)
    (good / "metrics.json").write_text(json.dumps(_metrics(seed=0)))
    (bad / "metrics.json").write_text(BAD_METRICS[case])
    paths = build(tmp_path / "runs", tmp_path / "runs" / "leaderboard.csv")
    err = capsys.readouterr().err
    assert f"{bad / 'metrics.json'}: " in err and "skipped" in err
    assert Path(paths["csv"]).read_text().count("\n") == 2  # header + the good row


@pytest.mark.parametrize("case", ["deep", "deep_object", "wall_time_string"])
def test_a_run_folder_with_a_malformed_metrics_file_is_one_line(tmp_path, case):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text(BAD_METRICS[case])
    with pytest.raises(UserError, match=r"metrics\.json: output dir holds an unreadable metrics\.json"):
        RunDir(out, "unit", {"config": {}}, "", main_process=True)


# slurm.status / slurm.cancel: a task whose files are not of the suite's shape is warned about and skipped
BAD_TASK = {
    "task_deep": ("task.json", DEEP),
    "task_list": ("task.json", json.dumps([{"spec": {}}])),
    "task_spec_string": ("task.json", json.dumps({"spec": "abc", "executor": "local"})),
    "state_attempts_string": ("task_state.json", json.dumps({"state": "running", "attempts": "abc"})),
    "state_deep": ("task_state.json", DEEP),
    "state_list": ("task_state.json", "[1, 2, 3]"),
    "state_pid_string": ("task_state.json", json.dumps({"state": "running", "pid": "abc"})),
    "state_job_id_list": ("task_state.json", json.dumps({"state": "running", "job_id": [1]})),
}


def _task(d: Path, tid: str) -> None:
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"spec": {"id": tid}, "executor": "local"}))
    (d / "task_state.json").write_text(json.dumps({"state": "failed", "error": "boom", "attempts": 1,
                                                   "host": socket.gethostname()}))


@pytest.mark.parametrize("case", list(BAD_TASK))
def test_status_and_cancel_skip_a_task_whose_files_are_malformed(tmp_path, capsys, case):
    from slurm.cancel import main as cancel_main
    from slurm.status import main as status_main
    _task(tmp_path / "ok", "ok")
    _task(tmp_path / "bad", "bad")
    name, text = BAD_TASK[case]
    (tmp_path / "bad" / name).write_text(text)
    rows = status_main([str(tmp_path)])
    err = capsys.readouterr().err
    assert [r.id for r in rows] == ["ok"]
    assert f"warning: {tmp_path / 'bad' / name}: " in err and "task skipped" in err
    assert cancel_main([str(tmp_path), "--timeout", "1"]) == {}


def test_resolve_of_a_pretraining_folder_with_a_malformed_metrics_file_is_one_line(tmp_path):
    from slurm.tasks import resolve_backbone
    (tmp_path / "metrics.json").write_text(json.dumps({"task": "pretrain", "metrics": {}, "checkpoint": ["x"]}))
    with pytest.raises(UserError, match=r"'checkpoint' is a list"):
        resolve_backbone(f"pretrain:{tmp_path}")


def test_a_malformed_run_record_is_not_trusted(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"hash": "x", "identity": ' + DEEP + "}")
    run = RunDir(out, "unit", {"config": {}}, "", main_process=True)
    assert run._read_record() is None


# --------------------------------------------------------------------------------------------------
# configs without the command's required keys
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command,text,missing", [
    ("pretrain", "", "config lacks"),
    ("pretrain", "# nothing but a comment\nx = 1\n", "config lacks"),
    ("ade20k", f"_base_ = ['{REPO_ROOT}/configs/finetune/smoke.py']\n", "config lacks"),   # another command's
    ("coco", f"_base_ = ['{REPO_ROOT}/configs/ade20k/smoke.py']\n", "config lacks optim"),
    ("finetune", f"_base_ = ['{REPO_ROOT}/configs/linprobe/smoke.py']\n", "config lacks"),
])
def test_config_without_the_command_s_keys_is_one_line(tmp_path, command, text, missing):
    cfg = tmp_path / "my.py"
    cfg.write_text(text)
    with pytest.raises(UserError, match=missing) as exc:
        load_config(cfg, None, REPO_ROOT / "configs" / command)
    assert str(exc.value).startswith(f"{cfg}: ") and "\n" not in str(exc.value)


def test_pretrain_with_an_empty_config_is_one_line_and_writes_nothing(tmp_path, capsys):
    from crossmae.pretrain import main
    cfg = tmp_path / "empty.py"
    cfg.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {cfg}: config lacks ") and not (tmp_path / "out").exists()
