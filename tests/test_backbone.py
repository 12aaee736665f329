"""Backbone API: every known format in, a ViT out, with a strict report; every bad file refused."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from crossmae import BackboneLoadError, export_encoder, load_backbone, load_encoder_state_dict, load_into
from crossmae.models import create_model


def _encoder_keys(depth=4):
    blocks = [f"blocks.{i}.{m}.{p}" for i in range(depth) for m in
              ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")]
    return {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", *blocks}


def test_official_mae_checkpoint_with_namespace_args(tiny_mae_official):
    model, rep = load_backbone(tiny_mae_official, img_size=64, num_classes=10)
    assert rep.format == "mae_pretrain" and rep.arch == "vit_tiny_patch16" and rep.has_final_norm
    assert set(rep.loaded) == _encoder_keys() | {"norm.weight", "norm.bias"}
    assert rep.missing == ["head.bias", "head.weight"] and rep.unexpected == []
    assert "decoder_embed.weight" in rep.ignored and "mask_token" in rep.ignored
    assert rep.meta["method"] == "mae" and rep.meta["mask_ratio"] == 0.75 and rep.meta["kept_mask_ratio"] == 0.75
    sd = model.state_dict()
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(tiny_mae_official, weights_only=True)["model"]
    assert torch.equal(sd["blocks.3.mlp.fc2.weight"], raw["blocks.3.mlp.fc2.weight"])
    assert torch.equal(sd["norm.weight"], raw["norm.weight"])


def test_official_crossmae_checkpoint_has_no_final_norm(tiny_crossmae_official):
    model, rep = load_backbone(tiny_crossmae_official, img_size=64)
    assert rep.format == "crossmae_pretrain" and not rep.has_final_norm
    assert set(rep.loaded) == _encoder_keys() and rep.missing == []
    assert isinstance(model.norm, torch.nn.Identity)  # never a randomly initialised norm
    assert {"wfm.linear.weight", "dec_norms.0.weight"} <= set(rep.ignored)
    assert rep.meta["method"] == "crossmae" and rep.meta["kept_mask_ratio"] == 0.25
    # avg pooling: a new fc_norm, reported missing (MAE fine-tuning protocol)
    _, rep2 = load_backbone(tiny_crossmae_official, img_size=64, global_pool="avg", num_classes=3)
    assert rep2.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def test_mae_finetuned_and_timm_formats(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=7, global_pool="avg", img_size=64)
    ft = tmp_path / "finetuned.pth"
    torch.save({"model": vit.state_dict(), "epoch": 99, "args": argparse.Namespace(model="vit_small_patch16")}, ft)
    model, rep = load_backbone(ft, img_size=64, global_pool="avg", num_classes=7)
    assert rep.format == "mae_finetune" and rep.missing == [] and "head.weight" in rep.loaded
    x = torch.randn(1, 3, 64, 64)
    vit.eval(), model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), vit(x), atol=1e-5)
    # a bare timm state dict (with final norm, token pooling), new head size → head not loaded
    bare = tmp_path / "timm.pth"
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=1000, img_size=64).state_dict(), bare)
    _, rep = load_backbone(bare, img_size=64, num_classes=5)
    assert rep.format == "timm" and rep.missing == ["head.bias", "head.weight"] and "head.weight" in rep.ignored


def test_pos_embed_resized_bicubically_and_reported(tiny_mae_official):
    sd, rep = load_encoder_state_dict(tiny_mae_official, img_size=128)
    assert rep.pos_embed_resized == ((4, 4), (8, 8))
    with torch.serialization.safe_globals([argparse.Namespace]):
        pe = torch.load(tiny_mae_official, weights_only=True)["model"]["pos_embed"]
    grid = pe[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, -1)
    assert sd["pos_embed"].shape == (1, 65, 64)
    assert torch.allclose(sd["pos_embed"][:, 1:], ref) and torch.equal(sd["pos_embed"][:, :1], pe[:, :1])
    sd2, _ = load_encoder_state_dict(tiny_mae_official, img_size=64, keep_cls_token=False)
    assert "cls_token" not in sd2 and sd2["pos_embed"].shape == (1, 16, 64)


@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "crossmae_vit_base_patch16"])
def test_export_loads_in_timm_without_missing_encoder_keys(tmp_path, name):
    torch.manual_seed(0)
    m = create_model(name)
    src = tmp_path / "pretrain.pth"
    torch.save({"model": m.state_dict(), "epoch": 0, "args": argparse.Namespace(model=name)}, src)
    out = tmp_path / "encoder.pth"
    rep = export_encoder(src, out)
    extra = {} if rep.has_final_norm else {"final_norm": False}
    vit = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(out)), **extra)
    sd, enc = vit.state_dict(), m.encoder_state_dict()
    assert set(sd) == set(enc)
    assert all(torch.equal(sd[k], enc[k]) for k in enc)
    # and the export itself is a recognised format
    _, rep2 = load_encoder_state_dict(out)
    assert rep2.format == "project_encoder" and rep2.meta["method"] == ("mae" if name.startswith("mae") else "crossmae")


def test_load_into_refuses_silent_partial_loads(tiny_mae_official):
    sd, rep = load_encoder_state_dict(tiny_mae_official)
    target = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                               embed_dim=64, depth=4, num_heads=4, img_size=64)
    sd = {k: v + 1.0 for k, v in sd.items()}  # no tensor equals the target's init (norms are 1 / 0 in both)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    assert not any(torch.equal(before[k], sd[k]) for k in sd)  # so any copy would show

    def unchanged():
        return all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    # a wrong prefix (mmseg's classic silent failure) loads nothing → refused
    with pytest.raises(BackboneLoadError, match="would stay randomly initialised"):
        load_into(target, sd, rep, key_map=lambda k: "backbone." + k)
    assert unchanged()
    # a partial match (block 3 under a wrong name): the 60 tensors that do fit must not be copied either
    with pytest.raises(BackboneLoadError, match="12 VisionTransformer weights would stay randomly initialised"):
        load_into(target, sd, rep, key_map=lambda k: k.replace("blocks.3.", "layers.3."))
    assert unchanged()
    # one tensor of the wrong shape: refused, nothing copied
    bad = dict(sd, **{"blocks.0.mlp.fc1.bias": torch.zeros(7)})
    with pytest.raises(BackboneLoadError, match=r"shape mismatch .*blocks.0.mlp.fc1.bias \(7,\) vs \(256,\)"):
        load_into(target, bad, rep)
    assert unchanged()
    rep = load_into(target, sd, rep)
    assert all(torch.equal(target.state_dict()[k], sd[k]) for k in sd)
    assert rep.missing == [] and len(rep.loaded) == len(sd)


def _expect_error(path, match, **kw):
    with pytest.raises(BackboneLoadError) as ei:
        load_encoder_state_dict(path, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg
    assert match in msg, msg


def test_bad_checkpoints_get_one_line_errors(tmp_path, tiny_mae_official):
    _expect_error(tmp_path / "absent.pth", "not found")
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(tiny_mae_official.read_bytes()[:5000])
    _expect_error(trunc, "truncated or corrupt")
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, resnet)
    _expect_error(resnet, "not a ViT checkpoint")
    _expect_error(tiny_mae_official, "patch size 16 does not match vit_huge_patch14", arch="vit_huge_patch14")
    _expect_error(tiny_mae_official, "width 64 does not match vit_base_patch16", arch="vit_base_patch16")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ck = torch.load(tiny_mae_official, weights_only=True)
    short = {k: v for k, v in ck["model"].items() if not k.startswith("blocks.3.")}
    p = tmp_path / "short.pth"
    torch.save({"model": short}, p)
    _expect_error(p, "missing encoder blocks: the checkpoint has 3 blocks", arch="vit_tiny_patch16")
    hole = dict(ck["model"])
    del hole["blocks.1.attn.qkv.weight"]
    p = tmp_path / "hole.pth"
    torch.save({"model": hole}, p)
    _expect_error(p, "missing encoder tensors [blocks.1.attn.qkv.weight]")
    nan = dict(ck["model"])
    nan["blocks.2.mlp.fc1.weight"] = nan["blocks.2.mlp.fc1.weight"].clone().fill_(float("nan"))
    p = tmp_path / "nan.pth"
    torch.save({"model": nan}, p)
    _expect_error(p, "non-finite values (nan/inf) in blocks.2.mlp.fc1.weight")
    _expect_error(tiny_mae_official, "not divisible by the patch size", img_size=100)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARK', '/tmp/crossmae_evil_mark')}",))


def test_code_running_pickle_is_refused_not_executed(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    p = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, p)
    _expect_error(p, "refused to unpickle")
    assert not mark.exists()


def test_cli_inspect_and_bad_input_exit_code(tmp_path, tiny_crossmae_official):
    ok = subprocess.run([sys.executable, "-m", "crossmae.backbone", "inspect", str(tiny_crossmae_official)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "format crossmae_pretrain" in ok.stdout and "final norm no" in ok.stdout
    bad = tmp_path / "empty.pth"
    bad.write_bytes(b"")
    out = subprocess.run([sys.executable, "-m", "crossmae.backbone", "export", str(bad), str(tmp_path / "o.pth")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == f"error: {bad}: checkpoint file is empty"
    assert not (tmp_path / "o.pth").exists()


def test_patch_embed_resampled_for_another_patch_size_and_reported(tiny_mae_official):
    # ViTDet-H runs the MAE ViT-H/14 checkpoint at patch 16: the kernel is resampled, never skipped
    from timm.layers import resample_patch_embed
    sd, rep = load_encoder_state_dict(tiny_mae_official, img_size=64, patch_size=8)
    assert rep.patch_embed_resized == (16, 8) and rep.pos_embed_resized == ((4, 4), (8, 8))
    with torch.serialization.safe_globals([argparse.Namespace]):
        w = torch.load(tiny_mae_official, weights_only=True)["model"]["patch_embed.proj.weight"]
    assert sd["patch_embed.proj.weight"].shape == (64, 3, 8, 8)
    assert torch.allclose(sd["patch_embed.proj.weight"], resample_patch_embed(w, [8, 8]))
    assert "resampled from 16px to 8px" in rep.summary()
