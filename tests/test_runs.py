"""Shared plumbing: configs and overrides, default paper presets, run folders, atomic strict JSON."""
from __future__ import annotations

import argparse
import json

import pytest

from crossmae.runs import default_preset, prepare_run
from crossmae.utils import REPO_ROOT, UserError, atomic_write_json, load_config


def test_cfg_options_override_and_unknown_dotted_key_is_refused():
    cfg = load_config("smoke", ["train.max_iter=3", "optim.lr=0.5"], REPO_ROOT / "configs" / "coco")
    assert cfg.train.max_iter == 3 and cfg.optim.lr == 0.5
    with pytest.raises(UserError, match=r"unknown key 'train\.nope'"):
        load_config("smoke", ["train.nope=1"], REPO_ROOT / "configs" / "coco")
    with pytest.raises(UserError, match=r"config not found \(presets: .*paper_vit_base.*smoke"):
        load_config("paper_vit_tiny", [], REPO_ROOT / "configs" / "coco")


def test_default_config_is_the_paper_preset_of_the_backbone_arch(tmp_path):
    import torch
    from crossmae.models import create_model
    ck = tmp_path / "b.pth"
    torch.save({"model": create_model("crossmae_vit_base_patch16").state_dict()}, ck)
    args = argparse.Namespace(config=None, backbone=str(ck))
    for task in ("coco", "ade20k", "finetune", "linprobe"):
        assert default_preset(args, REPO_ROOT / "configs" / task) == "paper_vit_base"
    assert default_preset(args, REPO_ROOT / "configs" / "inat", "linprobe_") == "linprobe_paper_vit_base"
    assert default_preset(argparse.Namespace(config="smoke", backbone=str(ck)), "/nonexistent") == "smoke"


def test_default_config_for_a_size_without_paper_preset_says_so(tiny_mae_official):
    args = argparse.Namespace(config=None, backbone=str(tiny_mae_official))
    with pytest.raises(UserError, match="no paper preset for vit_tiny_patch16 .* pass --config"):
        default_preset(args, REPO_ROOT / "configs" / "coco")


def test_finished_run_is_never_overwritten_and_changed_config_never_resumed(tmp_path):
    cfg = load_config("smoke", [], REPO_ROOT / "configs" / "ade20k")
    run = prepare_run(cfg, tmp_path / "run", None, "ade20k")
    assert run.finished is None and not (tmp_path / "run").exists()   # nothing written before start()
    out = run.start().out
    assert run.resume_from is None and (out / "config.py").read_text() == cfg.pretty_text
    run.close()
    import torch
    torch.save({"model": {}, "epoch": 0}, out / "checkpoint-latest.pth")
    other = load_config("smoke", ["seed=123"], REPO_ROOT / "configs" / "ade20k")
    with pytest.raises(UserError, match=r"another config \(differs in: config\.seed\)"):
        prepare_run(other, out, None, "ade20k").start()
    again = prepare_run(cfg, out, None, "ade20k").start()
    assert again.resume_from == out / "checkpoint-latest.pth" and again.load_resume() == {"model": {}, "epoch": 0}
    again.finish({"metrics": {"mIoU": 1.0}})
    again.close()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == {"mIoU": 1.0} and saved["run_hash"] == again.hash
    assert prepare_run(cfg, out, None, "ade20k").finished == saved
    with pytest.raises(UserError, match="finished run with another config"):
        prepare_run(other, out, None, "ade20k")
    assert json.loads((out / "metrics.json").read_text()) == saved


def test_metrics_json_is_strict_json(tmp_path):
    atomic_write_json({"AP": float("nan"), "x": [float("inf"), 1.5]}, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"AP": None, "x": [None, 1.5]} and "NaN" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left behind


def test_layer_id_rule_shared_by_every_task():
    from crossmae.lr_sched import vit_layer_id
    # MAE fine-tuning (timm names), mmseg UperNet ("backbone."), detectron2 ViTDet ("backbone.net.")
    for prefix in ("", "backbone.", "backbone.net."):
        assert vit_layer_id(prefix + "pos_embed", 12, prefix) == 0
        assert vit_layer_id(prefix + "patch_embed.proj.weight", 12, prefix) == 0
        assert vit_layer_id(prefix + "blocks.0.attn.qkv.weight", 12, prefix) == 1
        assert vit_layer_id(prefix + "blocks.11.mlp.fc2.bias", 12, prefix) == 12
    assert vit_layer_id("cls_token", 12) == 0 and vit_layer_id("norm.weight", 12) == 13
    assert vit_layer_id("head.weight", 12) == 13
    assert vit_layer_id("decode_head.conv_seg.weight", 12, "backbone.") == 13
    assert vit_layer_id("roi_heads.box_predictor.cls_score.weight", 12, "backbone.net.") == 13


def test_batch_layout_one_vocabulary():
    """batch_size = per device, total_batch_size = per optimizer step, accum_iter derived: the paper
    effective batches hold on any number of processes; contradictions are one-line errors."""
    from mmengine.config import ConfigDict

    from crossmae.runs import batch_layout
    c = lambda **kw: ConfigDict(dict(batch_size=None, accum_iter=None, total_batch_size=None) | kw)  # noqa: E731
    assert batch_layout(c(batch_size=256, total_batch_size=4096), 8) == (256, 2, 4096)       # MAE pretraining
    assert batch_layout(c(total_batch_size=1024, accum_iter=None), 8) == (128, 1, 1024)      # fine-tuning
    assert batch_layout(c(total_batch_size=1024, accum_iter=4), 8) == (32, 4, 1024)
    assert batch_layout(c(batch_size=1, total_batch_size=64), 2) == (1, 32, 64)             # ViTDet on 2 devices
    assert batch_layout(c(batch_size=16, accum_iter=2), 3) == (16, 2, 96)
    for kw, world, msg in ((dict(batch_size=8, total_batch_size=20), 1, "not a multiple of batch_size 8"),
                           (dict(total_batch_size=16), 3, "not a multiple of 3 processes"),
                           (dict(batch_size=4, total_batch_size=16, accum_iter=2), 1, "accum_iter 2 contradicts"),
                           (dict(), 1, "set batch_size")):
        with pytest.raises(UserError, match=msg):
            batch_layout(c(**kw), world)


def test_run_driver_single_process(tmp_path, monkeypatch):
    """Without a launcher: one process on cuda:0 or cpu, wrap_ddp is the identity, resume loads and
    records the checkpoint, finish writes the layout into metrics.json, close releases everything."""
    import torch

    from crossmae.runs import Run
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    run = Run(tmp_path / "r", "t", {"x": 1}, "x = 1\n", device="cpu")
    layout = run.setup()
    assert (layout.rank, layout.world_size, run.device.type, run.main) == (0, 1, "cpu", True)
    model = torch.nn.Linear(2, 2)
    assert run.wrap_ddp(model) is model
    with run.start():
        log, ckpt, tb = run.open_log(), run.checkpoints(), run.tensorboard()
        assert run.resume(model=model, optimizer=None, required=("model",)) is None
        ckpt.save({"model": model.state_dict(), "epoch": 0}, label="epoch 0")
        log.info("hello")
        tb.add_scalar("x", 1.0, 0)
    assert (tmp_path / "r" / "tensorboard").is_dir() and "hello" in (tmp_path / "r" / "log.txt").read_text()
    assert run.tb is None and run.log is None and run._lock_fd is None
    again = Run(tmp_path / "r", "t", {"x": 1}, "x = 1\n")
    again.setup()
    with again.start():
        other = torch.nn.Linear(2, 2)
        again.checkpoints()
        state = again.resume(model=other, required=("model", "epoch"), label=lambda s: f"epoch {s['epoch']}")
        assert state["epoch"] == 0 and torch.equal(other.weight, model.weight)
        assert "epoch 0" in again.ckpt.last_good
        with pytest.raises(UserError, match="does not match this config"):
            again.resume(model=torch.nn.Linear(3, 2), required=("model",))
        res = again.finish({"metrics": {"top1": 1.0}})
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved == res and (saved["world_size"], saved["num_nodes"], saved["devices_per_node"]) == (1, 1, 1)
    assert (saved["device"], saved["num_gpus"], saved["launcher"]) == ("cpu", 0, "single")
    with pytest.raises(UserError, match="--device 'tpu'|--device tpu"):
        Run(tmp_path / "s", "t", {}, "", device="tpu").setup()
