"""Parity with mmsegmentation (the oracle), when it is importable.

Same weights in mmseg's ``EncoderDecoder`` (MAE backbone with relative position bias and layer scale,
``Feature2Pyramid``, ``UPerHead``, ``FCNHead``) and in ours must give the same logits (whole and
sliding-window inference, auxiliary head) and the same loss; our mIoU / mAcc / aAcc must equal
mmseg's ``IoUMetric`` on the same predictions. mmseg needs an mmcv build with compiled ops (see
``docs/ade20k.md``); without it every test here is skipped with the reason.
"""
from __future__ import annotations

import re

import pytest
import torch

try:  # mmseg imports mmcv (compiled ops) and checks its version at import time
    import mmseg  # noqa: F401
    from mmseg.models.losses import CrossEntropyLoss
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    from mmengine.config import ConfigDict
    register_all_modules()
except Exception as exc:  # noqa: BLE001 - any import failure means: no oracle here
    pytest.skip(f"mmsegmentation not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"parity with mmseg not checked (setup: docs/ade20k.md, 'mmsegmentation as the oracle')",
                allow_module_level=True)

from transfer.seg.metrics import ConfusionMatrix  # noqa: E402
from transfer.seg.model import UperNet, seg_cross_entropy  # noqa: E402



K = 7
TINY = dict(num_classes=K, img_size=64, embed_dim=64, depth=4, num_heads=4, out_indices=(0, 1, 2, 3),
            channels=32, aux_channels=16, rel_pos_bias=True, layer_scale_init=1.0)


def _mmseg_model():
    bn = dict(type="BN", requires_grad=True)
    cfg = dict(
        type="EncoderDecoder",
        backbone=dict(type="MAE", img_size=(64, 64), patch_size=16, embed_dims=64, num_layers=4, num_heads=4,
                      mlp_ratio=4, out_indices=[0, 1, 2, 3], drop_path_rate=0.0, init_values=1.0,
                      norm_cfg=dict(type="LN", eps=1e-6), final_norm=False),
        neck=dict(type="Feature2Pyramid", embed_dim=64, rescales=[4, 2, 1, 0.5], norm_cfg=bn),
        decode_head=dict(type="UPerHead", in_channels=[64] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                         channels=32, dropout_ratio=0.1, num_classes=K, norm_cfg=bn, align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=64, in_index=2, channels=16, num_convs=1,
                            concat_input=False, dropout_ratio=0.1, num_classes=K, norm_cfg=bn, align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
        train_cfg=dict(),
        test_cfg=ConfigDict(mode="slide", crop_size=(64, 64), stride=(32, 32)))
    return MODELS.build(cfg)


_BACKBONE_RENAMES = [
    (r"backbone\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
    (r"backbone\.blocks\.(\d+)\.norm1\.", r"backbone.layers.\1.ln1."),
    (r"backbone\.blocks\.(\d+)\.norm2\.", r"backbone.layers.\1.ln2."),
    (r"backbone\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone.layers.\1.ffn.layers.0.0."),
    (r"backbone\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone.layers.\1.ffn.layers.1."),
    (r"backbone\.blocks\.(\d+)\.ls1\.gamma", r"backbone.layers.\1.gamma_1"),
    (r"backbone\.blocks\.(\d+)\.ls2\.gamma", r"backbone.layers.\1.gamma_2"),
    (r"backbone\.blocks\.(\d+)\.attn\.", r"backbone.layers.\1.attn."),
]


def to_mmseg(name: str) -> str:
    """Our parameter name → mmseg's (neck and heads share names; the backbone is renamed)."""
    for pat, rep in _BACKBONE_RENAMES:
        new, n = re.subn(pat, rep, name)
        if n:
            return new
    return name


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours = UperNet(**TINY)
    with torch.no_grad():  # make every parameter / BN statistic matter
        for n, p in ours.named_parameters():
            if "relative_position_bias_table" in n or n.endswith("gamma"):
                p.normal_(0, 0.5) if "relative" in n else p.uniform_(0.5, 1.5)
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    theirs = _mmseg_model()
    sd = {to_mmseg(k): v for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("relative_position_index") for k in missing), missing
    return ours.eval(), theirs.eval()


def test_same_logits_whole_and_aux(pair):
    ours, theirs = pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f_ours = ours.backbone(x)
        f_theirs = theirs.backbone(x)
        for a, b in zip(f_ours, f_theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        pyr = theirs.neck(f_theirs)
        for a, b in zip(ours.neck(f_ours), pyr):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        out, aux = ours(x)
        torch.testing.assert_close(out, theirs.decode_head(pyr), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(aux, theirs.auxiliary_head(pyr), rtol=1e-4, atol=1e-4)


def test_same_logits_sliding_window(pair):
    ours, theirs = pair
    x = torch.randn(1, 3, 64, 112)  # two overlapping 64-px windows
    meta = [dict(img_shape=(64, 112), ori_shape=(64, 112), pad_shape=(64, 112))]
    with torch.no_grad():
        torch.testing.assert_close(ours.inference(x, "slide", (64, 64), (32, 32)),
                                   theirs.slide_inference(x, meta), rtol=1e-4, atol=1e-4)


def test_same_loss():
    torch.manual_seed(1)
    logits = torch.randn(2, K, 16, 16)
    label = torch.randint(0, K, (2, 64, 64))
    label[:, :10] = 255
    up = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    ref = CrossEntropyLoss(loss_weight=1.0)(up, label, ignore_index=255)
    torch.testing.assert_close(seg_cross_entropy(logits, label), ref, rtol=1e-5, atol=1e-6)


def test_same_miou_as_iou_metric():
    torch.manual_seed(2)
    k = 150
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=[f"c{i}" for i in range(k)])
    cm = ConfusionMatrix(k)
    samples = []
    for h, w in [(40, 50), (31, 64), (64, 64)]:
        label = torch.randint(0, 30, (h, w))          # most of the 150 classes absent
        label[torch.rand(h, w) < 0.1] = 255
        pred = torch.where(torch.rand(h, w) < 0.6, label.clamp(max=k - 1), torch.randint(0, 40, (h, w)))
        samples.append(dict(pred_sem_seg=dict(data=pred[None]), gt_sem_seg=dict(data=label[None])))
        cm.update(pred, label)
    metric.process({}, samples)
    ref = metric.compute_metrics(metric.results)
    ours = cm.compute()
    for key in ("mIoU", "mAcc", "aAcc"):
        # mmseg rounds to 2 decimals (in float32)
        assert round(ours[key], 2) == pytest.approx(float(ref[key]), abs=1e-4), (key, ours[key], ref[key])


def test_same_layer_decay_groups(pair):
    from mmseg.engine.optimizers import LayerDecayOptimizerConstructor
    from transfer.seg.optim import param_groups_layer_decay
    ours, theirs = pair
    ctor = LayerDecayOptimizerConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)),
        dict(num_layers=4, layer_decay_rate=0.65))
    ref_groups: list = []
    ctor.add_params(ref_groups, theirs)
    ref = {n: (g["lr_scale"], g["weight_decay"]) for g in ref_groups for n in g["param_names"]}
    mine = {to_mmseg(n): (g["lr_scale"], g["weight_decay"])
            for g in param_groups_layer_decay(ours, 1e-4, 0.05, 0.65, 4) for n in g["param_names"]}
    assert mine.keys() == ref.keys()
    for n in ref:
        assert mine[n] == pytest.approx(ref[n]), n


def test_same_test_pipeline_on_real_images(data_root):
    """mmseg LoadAnnotations(reduce_zero_label) + mmcv Resize(keep_ratio) vs ours, on real ADE20K pairs."""
    from mmcv.transforms import LoadImageFromFile, Resize
    from mmseg.datasets.transforms import LoadAnnotations
    from transfer.seg.data import load_pair, resize_pair, scan_split
    from transfer.seg.testing import ADE_SUBDIR, require_dir
    for s in scan_split(require_dir(data_root / ADE_SUBDIR), "validation"):
        r = LoadImageFromFile()(dict(img_path=str(s.image)))
        r = LoadAnnotations(reduce_zero_label=True)(dict(r, seg_map_path=str(s.annotation), reduce_zero_label=True,
                                                          seg_fields=[]))
        img, label = load_pair(s, 150)
        assert (r["img"] == img).all() and (r["gt_seg_map"] == label).all()
        for scale in [(2048, 512), (1536, 384), (3000, 750)]:
            rr = Resize(scale=scale, keep_ratio=True)(dict(r))
            mine_img, mine_lab = resize_pair(img, label, scale)
            assert rr["img"].shape == mine_img.shape and (rr["img"] == mine_img).all()
            assert (rr["gt_seg_map"] == mine_lab).all()
