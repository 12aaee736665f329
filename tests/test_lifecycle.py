"""The run lifecycle shared by every command (crossmae.runs.RunDir; docs/CONTRACTS.md "Run lifecycle"):
exclusive lock, finished runs are final, nothing written before validation, provenance, per-sample
predictions that re-score to the reported metrics, healthy checkpoints, stale temp files removed.

Every command runs for real on the shared data with the suite's tiny models (one finished run per
command, built once for the module)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossmae import pretrain
from crossmae.checkpoint import WEIGHT_LIMIT, CheckpointManager, TrainingDivergedError, nonfinite_tensors
from crossmae.runs import RunDir
from crossmae.utils import REPO_ROOT, safe_torch_load, sha256_file
from transfer import ade20k, coco, finetune, linprobe, places
from transfer.seg.testing import FAST_OPTIONS as ADE_FAST, tiny_checkpoint

COCO_OPTS = ["model.img_size=128", "data.image_size=128", "data.test_short_edge=128", "data.test_max_size=128",
             "train.checkpoint_period=1", "train.eval_period=0", "train.log_period=1",
             "model.roi_heads.score_thresh=0.0", "model.roi_heads.detections_per_img=20", "train.max_iter=1"]
PRE_OPTS = ["epochs=1", "data_subset=16", "batch_size=4", "total_batch_size=8", "num_workers=0",
            "tensorboard=False", "verify_images=False"]


class Cmd:
    """One command with the tiny arguments of this module: ``argv(out, *cfg_options, extra=[...])``."""

    def __init__(self, name, main, head, opts):
        self.name, self.main, self.head, self.opts = name, main, head, opts

    def argv(self, out, *cfg, extra=()):
        return [*self.head, "--output-dir", str(out), "--cfg-options", *self.opts, *cfg, *extra]


@pytest.fixture(scope="module")
def cmds(data_root, tiny_mae_official, tiny_crossmae_ckpt, tmp_path_factory):
    dr = str(data_root)
    cache = tmp_path_factory.mktemp("featcache")
    ade_ckpt = tiny_checkpoint(tmp_path_factory.mktemp("ade") / "mae_tiny.pth", "mae")
    ft = ["--backbone", str(tiny_crossmae_ckpt), "--config", "smoke", "--data-root", dr]
    return {
        "pretrain": Cmd("pretrain", pretrain.main, ["--config", "smoke_crossmae", "--data-root", dr], PRE_OPTS),
        "coco": Cmd("coco", coco.main, ["--config", "smoke", "--backbone", str(tiny_mae_official), "--data-root", dr],
                    COCO_OPTS),
        "ade20k": Cmd("ade20k", ade20k.main, ["--backbone", str(ade_ckpt), "--config", "smoke", "--data-root",
                                              str(data_root)],
                      [*ADE_FAST, "schedule.max_iters=2", "schedule.warmup_iters=1", "train.checkpoint_period=1"]),
        "finetune": Cmd("finetune", finetune.main, ft, ["epochs=1", "deterministic=True"]),
        "linprobe": Cmd("linprobe", linprobe.main, ft, [f"fast.cache_dir={cache}", "protocol=knn"]),
        "places": Cmd("places", places.main, [*ft, "--protocol", "linprobe"],
                      [f"fast.cache_dir={cache}", "protocol=knn"]),
    }


@pytest.fixture(scope="module")
def finished(cmds, tmp_path_factory):
    """One finished run per command: ``{name: (out, returned metrics)}``."""
    root = tmp_path_factory.mktemp("finished")
    res = {}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, c in cmds.items():
            out = root / name
            res[name] = (out, c.main(c.argv(out)))
    finally:
        torch.set_num_threads(n)
    return res


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` → (bytes sha256, mtime_ns)."""
    return {str(p.relative_to(folder)): (sha256_file(p), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(capsys, main, argv, *needles) -> str:
    """``main(argv)`` must exit 2 with ONE ``error:`` line (the last stderr line) holding every needle."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------------------------------
# 1. exclusive lock
# --------------------------------------------------------------------------------------------------
HOLDER = """
import sys, time
from crossmae.runs import RunDir
run = RunDir(sys.argv[1], "holder", {}, "x = 1\\n").start()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_process_on_a_locked_folder_exits_2_naming_the_holder(cmds, tmp_path, capsys):
    out = tmp_path / "busy"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        for c in cmds.values():   # every command, in this (second) process
            fails(capsys, c.main, c.argv(out), f"{out}: output dir is in use by another run",
                  f"pid {holder.pid} on host {socket.gethostname()}", "started 20")
        assert snapshot(out) == before
        # and a real command in a third process
        r = subprocess.run([sys.executable, "-m", "crossmae.pretrain", *cmds["pretrain"].argv(out)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
            f"error: {out}: output dir is in use by another run (pid {holder.pid} ")
        assert snapshot(out) == before
    finally:
        holder.kill()   # SIGKILL: no clean-up code runs, the kernel drops the lock
        holder.wait()
    run = RunDir(out, "holder", {}, "x = 1\n").start()
    assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
    run.close()


# --------------------------------------------------------------------------------------------------
# 2. a finished run is final
# --------------------------------------------------------------------------------------------------
OTHER_VALUE = {"pretrain": ["epochs=6", "lr=1e30"], "coco": ["optim.lr=0.5"], "ade20k": ["optimizer.lr=0.5"],
               "finetune": ["blr=0.5"], "linprobe": ["total_batch_size=8"], "places": ["total_batch_size=8"]}


def test_finished_run_is_final_for_every_command(cmds, finished, capsys):
    for name, c in cmds.items():
        out, metrics = finished[name]
        saved = json.loads((out / "metrics.json").read_text())
        before = snapshot(out)
        capsys.readouterr()
        assert c.main(c.argv(out)) == saved                 # same config: the result, nothing written
        assert f"the result is in {out / 'metrics.json'}" in capsys.readouterr().err
        assert snapshot(out) == before, name
        fails(capsys, c.main, c.argv(out, extra=["--seed", "7"]), "finished run with another config",
              "seed", "never overwritten")
        fails(capsys, c.main, c.argv(out, *OTHER_VALUE[name]), "finished run with another config",
              OTHER_VALUE[name][-1].split("=")[0])
        assert snapshot(out) == before, name
    out, _ = finished["pretrain"]          # another preset
    before = snapshot(out)
    argv = cmds["pretrain"].argv(out)
    argv[argv.index("smoke_crossmae")] = "smoke_mae"
    fails(capsys, pretrain.main, argv, "finished run with another config", "config_name")
    assert snapshot(out) == before
    out, _ = finished["coco"]
    before = snapshot(out)
    fails(capsys, coco.main, ["--eval-only", "--weights", str(out / "model_final.pth"), "--config", "smoke",
                              "--data-root", cmds["coco"].head[-1], "--output-dir", str(out),
                              "--cfg-options", *COCO_OPTS], "finished run with another config", "eval_only")
    assert snapshot(out) == before


def test_changed_config_never_resumes_and_config_py_is_kept(cmds, tmp_path, capsys):
    """An unfinished run (checkpoint, no metrics.json) refuses another config before writing anything."""
    c = cmds["ade20k"]
    out = tmp_path / "part"
    assert c.main(c.argv(out, extra=["--stop-after", "1"])) == {"stopped_at": 1}
    before = snapshot(out)
    fails(capsys, c.main, c.argv(out, "optimizer.lr=0.5"), "checkpoint-latest.pth: the run being resumed used "
          "another config (differs in: config.optimizer.lr)")
    assert snapshot(out) == before


# --------------------------------------------------------------------------------------------------
# 3./4. nothing written before validation; unusable output folders; bad resume checkpoints
# --------------------------------------------------------------------------------------------------
def _read_only(folder: str) -> bool:
    import tempfile
    try:
        with tempfile.TemporaryFile(dir=folder):
            return False
    except OSError:
        return True


def test_output_dir_that_is_a_file_or_not_writable(cmds, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    ro = Path("/sys/kernel/crossmae_out")   # read-only even for root
    for c in cmds.values():
        fails(capsys, c.main, c.argv(f), f"{f}: --output-dir exists and is not a folder")
        fails(capsys, c.main, c.argv(f / "sub"), f"{f / 'sub'}: --output-dir lies under {f}, which is not a folder")
        if _read_only("/sys/kernel"):
            fails(capsys, c.main, c.argv(ro), f"{ro}: --output-dir is not writable")
    assert f.read_text() == "keep me" and not ro.exists()


def test_resume_checkpoint_without_model_is_refused_before_writing(cmds, tmp_path, capsys):
    bad = tmp_path / "no_model.pth"
    torch.save({"optimizer": {}, "epoch": 0, "iter": 1}, bad)
    for name in ("pretrain", "coco", "ade20k", "finetune"):
        out = tmp_path / name
        fails(capsys, cmds[name].main, cmds[name].argv(out, extra=["--resume", str(bad)]),
              f"{bad}: not a training checkpoint (no 'model' entry)")
        assert not (out / "config.py").exists() and not (out / "metrics.json").exists()


def test_bad_input_leaves_no_folder(cmds, tmp_path, capsys, tiny_mae_official):
    missing = tmp_path / "missing.pth"
    for name in ("coco", "ade20k", "finetune", "linprobe"):
        argv = cmds[name].argv(tmp_path / name)
        argv[argv.index("--backbone") + 1] = str(missing)
        fails(capsys, cmds[name].main, argv, "missing.pth")
        assert not (tmp_path / name).exists(), name
    # checkpoints that exist but do not fit are read before anything is written, too
    out = tmp_path / "pre"
    fails(capsys, pretrain.main, cmds["pretrain"].argv(out, extra=["--backbone", str(tiny_mae_official)]),
          "does not fit the model")
    out2 = tmp_path / "ev"
    fails(capsys, coco.main, ["--eval-only", "--weights", str(tiny_mae_official), "--config", "smoke",
                              "--data-root", cmds["coco"].head[-1], "--output-dir", str(out2),
                              "--cfg-options", *COCO_OPTS], "weights do not match")
    assert not out.exists() and not out2.exists()


# --------------------------------------------------------------------------------------------------
# 5. provenance
# --------------------------------------------------------------------------------------------------
def test_provenance_in_every_metrics_json(finished, data_root, tiny_mae_official, tiny_crossmae_ckpt):
    for name, (out, _) in finished.items():
        m = json.loads((out / "metrics.json").read_text())
        assert m["data_root"] == str(data_root.resolve()), name
        for path, sha in m["data_files"].items():
            assert Path(path).is_absolute() and sha256_file(path) == sha, (name, path)
        assert isinstance(m["num_train_images"], int) and isinstance(m["num_eval_images"], int)
        assert m["num_train_images"] > 0 and m["config_hash"] and m["code_version"] and m["run_hash"]
        if name != "pretrain":
            assert m["num_eval_images"] > 0 and (out / m["predictions"]).is_file(), name
            assert not Path(m["predictions"]).is_absolute()
            assert m["backbone_sha256"] == m["backbone_report"]["sha256"]
    files = {n: set(json.loads((finished[n][0] / "metrics.json").read_text())["data_files"]) for n in finished}
    assert files["coco"] == {str((data_root / "coco/annotations/instances_train2017.json").resolve()),
                             str((data_root / "coco/annotations/instances_val2017.json").resolve())} or \
        len(files["coco"]) == 2
    assert {Path(p).name for p in files["finetune"]} == {"train2019.json", "val2019.json"}
    assert {Path(p).name for p in files["places"]} >= {"categories_places365.txt"}
    assert len(files["places"]) == 3
    m = json.loads((finished["coco"][0] / "metrics.json").read_text())
    assert m["backbone_sha256"] == sha256_file(tiny_mae_official) and len(m["eval_image_ids"]) == m["num_eval_images"]
    m = json.loads((finished["finetune"][0] / "metrics.json").read_text())
    assert m["backbone_sha256"] == sha256_file(tiny_crossmae_ckpt) and m["num_train_images"] == 120


def test_forgotten_data_root_is_visible(cmds, tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("CROSSMAE_DATA_ROOT", str(data_root))
    c = cmds["linprobe"]
    argv = c.argv(tmp_path / "knn")
    i = argv.index("--data-root")
    del argv[i:i + 2]
    m = c.main(argv)
    assert m["data_root"] == str(data_root.resolve())


# --------------------------------------------------------------------------------------------------
# 8. per-sample predictions re-score to the reported metrics
# --------------------------------------------------------------------------------------------------
def test_classification_predictions_rescore(finished, data_root):
    for name in ("finetune", "linprobe", "places"):
        out, _ = finished[name]
        m = json.loads((out / "metrics.json").read_text())
        p = json.loads((out / m["predictions"]).read_text())
        assert p["format"] == "classification/v1"
        n = len(p["labels"])
        assert n == m["num_eval_images"] == len(p["images"]) == len(p["top5"]) == len(p["scores"])
        assert all((data_root / im).is_file() for im in p["images"])
        top1 = 100.0 * sum(t[0] == y for t, y in zip(p["top5"], p["labels"])) / n
        top5 = 100.0 * sum(y in t for t, y in zip(p["top5"], p["labels"])) / n
        assert top1 == pytest.approx(m["metrics"]["top1"]) and top5 == pytest.approx(m["metrics"]["top5"]), name
        assert all(s == sorted(s, reverse=True) and 0 <= s[-1] and sum(s) <= 1 + 1e-6 for s in p["scores"])


def test_ade20k_predictions_rescore(finished):
    out, _ = finished["ade20k"]
    m = json.loads((out / "metrics.json").read_text())
    p = json.loads((out / m["predictions"]).read_text())
    assert p["format"] == "segmentation/v1" and p["num_classes"] == 80 and len(p["images"]) == 2
    inter = torch.tensor(p["intersect"]).sum(0).double()
    union = torch.tensor(p["union"]).sum(0).double()
    label = torch.tensor(p["label"]).sum(0).double()
    iou = inter / union
    assert float(iou[~iou.isnan()].mean() * 100) == pytest.approx(m["metrics"]["mIoU"])
    assert float(inter.sum() / label.sum() * 100) == pytest.approx(m["metrics"]["aAcc"])


def test_coco_predictions_rescore(finished):
    from transfer.vitdet.evaluate import coco_evaluate
    out, _ = finished["coco"]
    m = json.loads((out / "metrics.json").read_text())
    ann = [f for f in m["data_files"] if f.endswith("val2017.json")][0]
    res = json.loads((out / m["predictions"]).read_text())
    metrics, _, _ = coco_evaluate(ann, res, img_ids=m["eval_image_ids"])
    assert metrics["APbox"] == pytest.approx(m["metrics"]["APbox"], abs=1e-9)


# --------------------------------------------------------------------------------------------------
# 6. checkpoint health and divergence
# --------------------------------------------------------------------------------------------------
def test_checkpoint_manager_refuses_unhealthy_states(tmp_path):
    ck = CheckpointManager(tmp_path)
    w = torch.ones(3)
    ck.save({"model": {"w": w}, "optimizer": {"state": {0: {"exp_avg_sq": torch.ones(3)}}}, "epoch": 0},
            step=0, label="epoch 0")
    good = sha256_file(ck.latest_path)
    for model, opt in (({"w": torch.tensor([1.0, float("nan")])}, {}),
                       ({"w": torch.tensor([1e36])}, {}),                        # finite but overflowing
                       ({"w": w}, {"state": {0: {"exp_avg_sq": torch.tensor([float("inf")])}}})):
        with pytest.raises(TrainingDivergedError, match=rf"last good checkpoint kept: {ck.latest_path} \(epoch 0\)"):
            ck.save({"model": model, "optimizer": opt, "epoch": 1}, step=1, periodic=True, label="epoch 1")
    assert sha256_file(ck.latest_path) == good and not (tmp_path / "checkpoint-1.pth").exists()
    assert nonfinite_tensors({"a": torch.tensor([WEIGHT_LIMIT * 2])}, limit=WEIGHT_LIMIT) == ["a"]


def test_other_ranks_check_every_state_and_name_the_main_process_checkpoint(tmp_path):
    """DDP: every rank calls save(write=is_main); a non-main rank writes nothing, refuses an unhealthy
    state like the main rank, and its divergence error names the checkpoint the main rank wrote."""
    main_ck, other_ck = CheckpointManager(tmp_path / "main"), CheckpointManager(tmp_path / "other")
    state = {"model": {"w": torch.ones(3)}, "optimizer": {}, "epoch": 0}
    main_ck.save(state, step=0, label="epoch 0")
    assert other_ck.save(state, step=0, label="epoch 0", write=False) == other_ck.latest_path
    assert list((tmp_path / "other").iterdir()) == []
    with pytest.raises(TrainingDivergedError, match=rf"last good checkpoint kept: {other_ck.latest_path} \(epoch 0"):
        other_ck.save({"model": {"w": torch.tensor([float("nan")])}, "optimizer": {}, "epoch": 1},
                      step=1, label="epoch 1", write=False)
    assert list((tmp_path / "other").iterdir()) == []


DIVERGE = {"pretrain": ["lr=1e36", "warmup_epochs=0", "epochs=2", "data_subset=8"],
           "coco": ["optim.lr=1e36", "train.max_iter=3", "optim.warmup_length=0"],
           "ade20k": ["optimizer.lr=1e36", "schedule.warmup_iters=0", "schedule.max_iters=3"],
           "finetune": ["lr=1e36", "warmup_epochs=0", "epochs=3"]}


def test_divergence_ends_every_task_with_one_line_and_only_healthy_checkpoints(cmds, tmp_path, capsys):
    for name, opts in DIVERGE.items():
        out = tmp_path / name
        err = fails(capsys, cmds[name].main, cmds[name].argv(out, *opts), "training stopped, last good checkpoint kept: ")
        assert not (out / "metrics.json").exists()
        named = err.split("last good checkpoint kept: ", 1)[1]
        ckpts = sorted(out.glob("checkpoint-*.pth"))
        if ckpts:
            assert named.startswith(str(out / "checkpoint-latest.pth")), err
        else:
            assert named.startswith(f"none written yet in {out}"), err
        for p in ckpts:
            s = safe_torch_load(p)
            assert not nonfinite_tensors(s["model"], limit=WEIGHT_LIMIT) and not nonfinite_tensors(s["optimizer"]), p
    # the MAE linear probe of linprobe / inat / places
    c = cmds["linprobe"]
    out = tmp_path / "lp"
    fails(capsys, c.main, c.argv(out, "protocol=mae", "lr=1e36", "warmup_epochs=0", "epochs=2"),
          "loss is", "training stopped, last good checkpoint kept: ")
    assert not (out / "metrics.json").exists()


def test_fast_probe_never_selects_a_diverged_head(cmds, tmp_path):
    c = cmds["linprobe"]
    res = c.main(c.argv(tmp_path / "fast", "protocol=fast", "fast.blrs=[0.1,1e36]", "epochs=2"))
    grid = res["grid"]
    assert {g["blr"] for g in grid if g["diverged"]} == {1e36}
    assert all(g["holdout_top1"] is None for g in grid if g["diverged"])
    assert res["choice"]["blr"] == 0.1
    s = safe_torch_load(tmp_path / "fast" / "checkpoint-latest.pth")
    assert not nonfinite_tensors(s["model"], limit=WEIGHT_LIMIT) and len(s["diverged"]) == len(grid) // 2


# --------------------------------------------------------------------------------------------------
# 7. stale temporary files
# --------------------------------------------------------------------------------------------------
def test_stale_temp_files_are_removed_when_a_run_starts(cmds, tmp_path):
    for name in ("pretrain", "linprobe"):
        out = tmp_path / name
        (out / "inference").mkdir(parents=True)
        stale = [out / ".metrics.json.k3j_x1.tmp", out / ".checkpoint-latest.pth.abc.tmp",
                 out / "inference" / ".coco_instances_results.json.zz.tmp", out / ".a.png.tmp.png"]
        for p in stale:
            p.write_bytes(b"half-written")
        keep = out / "notes.tmp"
        keep.write_text("mine")
        cmds[name].main(cmds[name].argv(out))
        assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
        assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]
