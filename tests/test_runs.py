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
