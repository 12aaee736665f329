"""Silent successes that must be refusals: checks one command skipped that the others make, a dry run
that checked less than a real one, an export that overwrote a run's result, a suite inside another."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossmae.utils import sha256_file


def _exit2(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert err and err[-1].startswith("error: ") and sum(ln.startswith("error: ") for ln in err) == 1, err
    return err[-1]


# --------------------------------------------------------------------------------------------------
# crossmae.pretrain --backbone goes through the backbone checks of every other command
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["int32", "nan"])
def test_pretrain_backbone_with_integer_or_nonfinite_weights_is_refused(tmp_path, data_root, capsys, bad):
    from crossmae import pretrain
    from crossmae.models import create_model
    torch.manual_seed(0)
    sd = create_model("mae_vit_tiny_patch16", img_size=64).state_dict()
    key = "blocks.0.attn.qkv.weight"
    sd[key] = (sd[key] * 100).to(torch.int32) if bad == "int32" else sd[key].fill_(float("nan"))
    ck = tmp_path / "bad.pth"
    torch.save({"model": sd}, ck)
    out = tmp_path / "out"
    msg = _exit2(pretrain.main, ["--config", "smoke_mae", "--data-root", str(data_root), "--output-dir", str(out),
                                 "--backbone", str(ck), "--cfg-options", "epochs=1"], capsys)
    want = f"{key} has dtype int32; expected floating-point weights" if bad == "int32" else \
        f"non-finite values (nan/inf) in {key}"
    assert msg == f"error: {ck}: {want}"
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# slurm.submit: --arch and --cfg-options are checked, by a dry run as by a real one
# --------------------------------------------------------------------------------------------------
def _submit_argv(tmp_path, ckpt, *extra) -> list[str]:
    return ["--suite", "smoke", "--backbone", f"mae={ckpt}", "--output-dir", str(tmp_path / "suite"),
            "--tasks", "linprobe", "--executor", "local", *extra]


@pytest.mark.parametrize("dry", [True, False])
def test_submit_refuses_an_unknown_arch(tmp_path, capsys, tiny_mae_official, dry):
    from slurm.submit import main
    msg = _exit2(main, _submit_argv(tmp_path, tiny_mae_official, "--arch", "vit_foo", *(["--dry-run"] * dry)), capsys)
    assert msg.startswith("error: --arch vit_foo: unknown architecture (known: ")
    assert not (tmp_path / "suite").exists()


@pytest.mark.parametrize("opts,needle", [
    (["no_such_key=1"], "--cfg-options names unknown key 'no_such_key'"),
    (["epochs=-3"], "--cfg-options epochs=-3: expected an integer >= 1"),
    (["blr='fast'"], "--cfg-options blr='fast': expected a number"),
])
def test_submit_dry_run_checks_cfg_options_like_a_real_run(tmp_path, capsys, tiny_mae_official, opts, needle):
    from slurm.submit import main
    msg = _exit2(main, _submit_argv(tmp_path, tiny_mae_official, "--dry-run", "--cfg-options", *opts), capsys)
    assert needle in msg and "configs/linprobe/smoke.py" in msg
    assert not (tmp_path / "suite").exists()


# --------------------------------------------------------------------------------------------------
# crossmae.backbone export never writes into a run's folder
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["metrics.json", "checkpoint-latest.pth", "encoder.pth", "tensorboard/encoder.pth"])
def test_export_never_writes_into_a_run_folder(tmp_path, capsys, tiny_mae_official, target):
    from crossmae.backbone import main
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"task": "linprobe", "metrics": {"top1": 70.0}}))
    (run / "run.json").write_text(json.dumps({"hash": "x", "identity": {}}))
    (run / "tensorboard").mkdir()
    before = {str(p): sha256_file(p) for p in run.rglob("*") if p.is_file()}
    msg = _exit2(main, ["export", str(tiny_mae_official), str(run / target)], capsys)
    assert f"lies in run folder {run} " in msg
    assert {str(p): sha256_file(p) for p in run.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------------------------------
# a suite inside (or around) another suite's folder
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["inside", "inside_task", "around"])
def test_a_suite_is_never_launched_inside_or_around_another(tmp_path, capsys, tiny_mae_official, where):
    from slurm.submit import main
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "suite.json").write_text(json.dumps({"suite": "smoke"}))
    if where == "inside":
        target = outer / "inner"
    elif where == "inside_task":
        task = outer / "mae" / "linprobe-smoke" / "seed0"
        task.mkdir(parents=True)
        (task / "task.json").write_text(json.dumps({"spec": {}}))
        (outer / "suite.json").unlink()
        target = task / "nested"
    else:
        (outer / "suite.json").rename(outer / "x")
        (outer / "deep" / "inner").mkdir(parents=True)
        (outer / "deep" / "inner" / "suite.json").write_text("{}")
        target = outer
    argv = ["--suite", "smoke", "--backbone", f"mae={tiny_mae_official}", "--output-dir", str(target),
            "--tasks", "linprobe", "--dry-run"]
    msg = _exit2(main, argv, capsys)
    assert "give every suite its own folder" in msg
    assert ("lies inside" in msg) == (where != "around")


def test_the_leaderboard_never_collects_a_nested_suite(tmp_path, capsys):
    from benchmarks.leaderboard import collect
    root = tmp_path / "runs"
    m = {"task": "linprobe", "protocol": "linprobe_mae", "metrics": {"top1": 70.0}, "backbone_sha256": "ab" * 32,
         "seed": 0}
    for d in (root / "mae" / "linprobe-smoke" / "seed0", root / "inner" / "mae" / "linprobe-smoke" / "seed0"):
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(m))
    (root / "suite.json").write_text("{}")
    (root / "inner" / "suite.json").write_text("{}")
    recs = collect(root)
    assert [Path(r["path"]).relative_to(root).parts[0] for r in recs] == ["mae"]
    assert f"{root / 'inner'}: another suite's output folder" in capsys.readouterr().err
