"""UperNet model, backbone loading, inference modes and the optimiser recipe (tiny ViT)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossmae.utils import UserError, load_config
from transfer.ade20k import PRESET_DIR, build_model, build_optimizer, load_backbone_weights
from transfer.seg.model import UperNet
from transfer.seg.optim import layer_id_for_vit, lr_factor, param_groups_layer_decay
from transfer.seg.testing import tiny_checkpoint



TINY = dict(num_classes=5, img_size=64, embed_dim=64, depth=4, num_heads=4, out_indices=(0, 1, 2, 3),
            channels=32, aux_channels=16)


def _cfg(*opts):
    return load_config("smoke", list(opts), PRESET_DIR)


def test_shapes_and_loss():
    torch.manual_seed(0)
    m = UperNet(**TINY)
    x = torch.randn(2, 3, 64, 64)
    out, aux = m(x)
    assert out.shape == (2, 5, 16, 16) and aux.shape == (2, 5, 4, 4)  # levels 0 (1/4) and 2 (1/16)
    y = torch.randint(0, 5, (2, 64, 64))
    y[:, :32] = 255
    losses = m.loss(x, y)
    assert set(losses) == {"loss_ce", "aux.loss_ce", "loss"}
    assert torch.allclose(losses["loss"], losses["loss_ce"] + losses["aux.loss_ce"])
    # mmseg averages over ALL pixels (avg_non_ignore=False), ignored ones included
    m.eval()  # (dropout differs between calls in train mode; compare in eval)
    out, _ = m(x)
    full = torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(out, size=(64, 64), mode="bilinear", align_corners=False), y,
        ignore_index=255, reduction="sum") / y.numel()
    assert torch.allclose(m.loss(x, y)["loss_ce"], full)


def test_slide_equals_whole_when_window_covers_image():
    torch.manual_seed(0)
    m = UperNet(**TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    whole = m.inference(x, "whole")
    assert torch.equal(m.inference(x, "slide", (64, 64), (32, 32)), whole)
    small = torch.randn(1, 3, 48, 64)  # window larger than the image: clipped, one pass
    assert torch.equal(m.inference(small, "slide", (64, 64), (32, 32)), m.inference(small, "whole"))


def test_slide_averages_overlapping_windows():
    torch.manual_seed(0)
    m = UperNet(**TINY).eval()
    x = torch.randn(1, 3, 64, 96)
    s = m.inference(x, "slide", (64, 64), (32, 32))  # windows at x = 0 and 32
    a = m.encode_decode(x[..., 0:64])
    b = m.encode_decode(x[..., 32:96])
    assert torch.allclose(s[..., :32], a[..., :32])
    assert torch.allclose(s[..., 32:64], (a[..., 32:] + b[..., :32]) / 2, atol=1e-6)
    assert torch.allclose(s[..., 64:], b[..., 32:])


def test_rel_pos_and_layer_scale_are_identity_at_init():
    torch.manual_seed(0)
    plain = UperNet(**TINY).eval()
    mmseg_like = UperNet(**TINY, rel_pos_bias=True, layer_scale_init=1.0).eval()
    missing, unexpected = mmseg_like.load_state_dict(plain.state_dict(), strict=False)
    assert all("relative_position_bias_table" in k or ".ls" in k for k in missing) and not unexpected
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(plain(x)[0], mmseg_like(x)[0], atol=1e-5)
    # a non-zero table changes the output (it is used)
    with torch.no_grad():
        mmseg_like.backbone.blocks[0].attn.relative_position_bias_table.normal_()
    assert not torch.allclose(plain(x)[0], mmseg_like(x)[0], atol=1e-3)


@pytest.mark.parametrize("kind", ["mae", "crossmae"])
@pytest.mark.parametrize("rel_pos", [False, True])
def test_backbone_load(tmp_path, kind, rel_pos):
    ck = tiny_checkpoint(tmp_path / f"{kind}.pth", kind)
    opts = [f"model.rel_pos_bias={rel_pos}", f"model.layer_scale_init={1.0 if rel_pos else None}"]
    cfg = _cfg(*opts)
    m = build_model(cfg)
    rep = load_backbone_weights(m, str(ck), cfg)
    assert rep.pos_embed_resized == ((14, 14), (4, 4))
    assert all(k.startswith(("blocks.", "cls_token", "pos_embed", "patch_embed")) for k in rep.loaded)
    assert len([k for k in rep.loaded if k.startswith("blocks.")]) == 4 * 12
    if rel_pos:
        assert len(rep.missing) == 4 * 3
    else:
        assert rep.missing == []
    sd = torch.load(ck)["model"]
    assert torch.equal(m.backbone.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])
    assert ("norm.weight" in rep.ignored) == (kind == "mae")


def test_backbone_load_wrong_size_fails(tmp_path):
    ck = tiny_checkpoint(tmp_path / "mae.pth", "mae")
    cfg = _cfg("model.embed_dim=128")
    with pytest.raises(UserError, match="mae.pth"):
        load_backbone_weights(build_model(cfg), str(ck), cfg)
    with pytest.raises(UserError, match="nope.pth: --backbone checkpoint not found"):
        load_backbone_weights(build_model(_cfg()), str(tmp_path / "nope.pth"), _cfg())


def test_layer_decay_groups_follow_mmseg():
    assert layer_id_for_vit("backbone.pos_embed", 12) == 0
    assert layer_id_for_vit("backbone.patch_embed.proj.weight", 12) == 0
    assert layer_id_for_vit("backbone.blocks.11.mlp.fc1.weight", 12) == 12
    assert layer_id_for_vit("decode_head.conv_seg.weight", 12) == 13
    m = UperNet(**TINY, rel_pos_bias=True, layer_scale_init=1.0)
    groups = param_groups_layer_decay(m, 1e-4, 0.05, 0.65, 4)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["backbone.pos_embed"]["lr_scale"] == pytest.approx(0.65 ** 5)
    assert by_name["backbone.pos_embed"]["weight_decay"] == 0.05   # mmseg quirk: pos_embed decayed
    assert by_name["backbone.cls_token"]["weight_decay"] == 0.05
    assert by_name["backbone.blocks.0.ls1.gamma"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.2.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65 ** 2)
    assert by_name["decode_head.conv_seg.weight"]["lr_scale"] == 1.0
    assert by_name["decode_head.conv_seg.bias"]["weight_decay"] == 0.0
    assert by_name["neck.upsample_4x.1.weight"]["weight_decay"] == 0.0  # BN weight, 1-D
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    opt = build_optimizer(m, _cfg())
    assert opt.defaults["betas"] == (0.9, 0.999)


def test_paper_schedule_values():
    cfg = load_config("paper_vit_base", None, PRESET_DIR)
    s = cfg.schedule
    f = lambda it: lr_factor(it, s.warmup_iters, s.warmup_start_factor, s.max_iters, s.power)  # noqa: E731
    assert f(0) == pytest.approx(1e-6)
    assert f(750) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert f(1500) == pytest.approx(1.0)
    assert f(1500 + 158500 // 2) == pytest.approx(0.5)
    assert f(160000) == 0.0
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.layer_decay) == (1e-4, 0.05, 0.65)
    assert cfg.model.out_indices == (3, 5, 7, 11) and cfg.model.channels == 768
    assert cfg.test.stride == (341, 341) and cfg.train.total_batch_size == 16


def test_paper_model_builds_at_512():
    cfg = load_config("paper_vit_base", None, PRESET_DIR)
    with torch.device("meta"):  # shapes only, no memory / init time
        m = build_model(cfg)
    n = sum(p.numel() for p in m.backbone.parameters())
    assert m.backbone.pos_embed.shape == (1, 1 + 32 * 32, 768)
    assert 85e6 < n < 90e6  # ViT-B (85.8M) + relative position tables + layer scale


def test_multiscale_flip_prediction():
    from transfer.ade20k import predict
    torch.manual_seed(0)
    cfg = _cfg("model.rel_pos_bias=False", "model.layer_scale_init=None",
               "test.aug_ratios=(0.5,1.0)", "test.flip=True")
    m = build_model(cfg).eval()
    imgs = [torch.randn(3, 40, 56), torch.randn(3, 64, 90)]  # the image at two test scales
    pred = predict(m, imgs, (50, 70), cfg)
    assert pred.shape == (50, 70) and pred.dtype == torch.int64
    assert 0 <= int(pred.min()) and int(pred.max()) < cfg.model.num_classes

    # by hand (mmseg SegTTAModel): mean over scales and flips of softmax(resize(logits)), where the
    # flipped pass is predicted on flip(x) and flipped back before averaging
    def probs(x, undo=True):
        logits = m.inference(x[None], "slide", (64, 64), (32, 32))
        flipped = m.inference(x.flip(-1)[None], "slide", (64, 64), (32, 32))
        flipped = flipped.flip(-1) if undo else flipped
        return sum(F.interpolate(z, size=(50, 70), mode="bilinear", align_corners=False).softmax(1)
                   for z in (logits, flipped))

    with torch.no_grad():
        ref = sum(probs(x) for x in imgs)[0].argmax(0)
        not_undone = sum(probs(x, undo=False) for x in imgs)[0].argmax(0)
    assert (ref != not_undone).float().mean() > 0.05  # the inputs are asymmetric enough to tell
    assert torch.equal(pred, ref)
    # single scale without flip = argmax of the resized slide logits
    cfg1 = _cfg("model.rel_pos_bias=False", "model.layer_scale_init=None")
    logits = m.inference(imgs[1][None], "slide", (64, 64), (32, 32))
    ref = torch.nn.functional.interpolate(logits, size=(50, 70), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(predict(m, imgs[1:], (50, 70), cfg1), ref)
