"""ViTDet backbone layout, pretrained loading through the backbone API, optimiser groups, schedule,
and a few real training iterations reducing the loss."""
from __future__ import annotations

import pytest
import torch

from crossmae import BackboneLoadError
from crossmae.utils import REPO_ROOT, load_config
from transfer.vitdet.backbone import load_pretrained_backbone, resize_abs_pos
from transfer.vitdet.model import build_model, build_vit
from transfer.vitdet.optim import lr_factor, param_groups

PRESETS = REPO_ROOT / "configs" / "coco"



def _cfg(name="smoke", opts=None):
    return load_config(name, opts, preset_dir=PRESETS)


@pytest.mark.parametrize("preset,depth,dim,globals_,dp", [
    ("paper_vit_base", 12, 768, [2, 5, 8, 11], 0.1),
    ("paper_vit_large", 24, 1024, [5, 11, 17, 23], 0.4),
    ("paper_vit_huge", 32, 1280, [7, 15, 23, 31], 0.5),
])
def test_paper_backbone_layout(preset, depth, dim, globals_, dp):
    m = _cfg(preset).model.to_dict()
    with torch.device("meta"):
        net = build_vit(m)
    assert len(net.blocks) == depth and net.global_blocks == tuple(globals_)
    assert net.window_block_indexes == [i for i in range(depth) if i not in globals_]
    head_dim = dim // (16 if depth > 12 else 12)
    for i, b in enumerate(net.blocks):
        side = 64 if i in globals_ else 14       # 1024/16 global grid, 14 window
        assert b.window_size == (0 if i in globals_ else 14)
        assert tuple(b.attn.rel_pos_h.shape) == (2 * side - 1, head_dim)
        assert tuple(b.attn.rel_pos_w.shape) == (2 * side - 1, head_dim)
    dps = [getattr(b.drop_path, "drop_prob", 0.0) for b in net.blocks]
    assert dps[0] == 0.0 and dps[-1] == pytest.approx(dp)
    names = {k for k, _ in net.named_parameters()}
    assert "cls_token" not in names and not any(k.startswith("norm.") for k in names)
    assert tuple(net.pos_embed.shape) == (1, 1 + 14 * 14, dim)   # 224 grid + cls row, resized per forward
    assert m["img_size"] == 1024 and m["window_size"] == 14 and m["out_channels"] == 256


def test_rel_pos_zero_init_and_pyramid_shapes():
    model = build_model(_cfg().model.to_dict())
    for b in model.backbone.net.blocks:
        assert torch.count_nonzero(b.attn.rel_pos_h) == 0 and torch.count_nonzero(b.attn.rel_pos_w) == 0
    feats = model.backbone(torch.zeros(1, 3, 256, 256))
    assert {k: tuple(v.shape[-2:]) for k, v in feats.items()} == \
        {"p2": (64, 64), "p3": (32, 32), "p4": (16, 16), "p5": (8, 8), "p6": (4, 4)}
    assert all(v.shape[1] == 64 for v in feats.values())


def _rel_pos_keys(net):
    return sorted(k for k in net.state_dict() if ".rel_pos_" in k)


@pytest.mark.parametrize("fixture,has_norm", [("tiny_mae_official", True), ("tiny_crossmae_official", False)])
def test_load_mae_and_crossmae_report(request, fixture, has_norm):
    path = request.getfixturevalue(fixture)
    net = build_model(_cfg().model.to_dict()).backbone.net
    report = load_pretrained_backbone(net, str(path), 224, "vit_tiny_patch16")
    target = net.state_dict()
    assert report.missing == _rel_pos_keys(net)                 # exactly the zero-init rel-pos tables
    assert sorted(report.loaded) == sorted(k for k in target if ".rel_pos_" not in k)
    assert report.unexpected == []
    assert "cls_token" in report.ignored
    assert ("norm.weight" in report.ignored) == has_norm and report.has_final_norm == has_norm
    assert any(k.startswith("decoder") for k in report.ignored)
    assert report.pos_embed_resized == ((4, 4), (14, 14))       # 64-px checkpoint -> 224 grid
    sd = torch.load(path, weights_only=False)["model"]
    assert torch.equal(net.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    assert torch.equal(net.patch_embed.proj.weight, sd["patch_embed.proj.weight"])


def test_load_448px_checkpoint_resizes_pos_embed(tmp_path):
    from crossmae.models import create_model
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch16", img_size=448)
    with torch.no_grad():
        mae.pos_embed.normal_()    # a distinctive table (the sin-cos one is fixed anyway)
    p = tmp_path / "mae448.pth"
    torch.save({"model": mae.state_dict()}, p)
    net = build_model(_cfg().model.to_dict()).backbone.net
    report = load_pretrained_backbone(net, str(p), 224, "vit_tiny_patch16")
    assert report.pos_embed_resized == ((28, 28), (14, 14)) and "pos_embed" in report.loaded
    expected = resize_abs_pos(mae.pos_embed.detach(), (14, 14))
    got = net.pos_embed.detach()[:, 1:].reshape(1, 14, 14, -1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_load_wrong_size_fails_loudly(tmp_path):
    from crossmae.models import create_model
    p = tmp_path / "mae_small.pth"
    torch.save({"model": create_model("mae_vit_tiny_patch16", depth=2).state_dict()}, p)
    net = build_model(_cfg().model.to_dict()).backbone.net
    before = net.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(BackboneLoadError):
        load_pretrained_backbone(net, str(p), 224, "vit_tiny_patch16")
    assert torch.equal(before, net.blocks[0].attn.qkv.weight)


def test_param_groups_follow_detectron2():
    cfg = _cfg()
    model = build_model(cfg.model.to_dict())
    o = cfg.optim.to_dict()
    depth = cfg.model.depth
    by_name = {}
    for g in param_groups(model, o, depth):
        for n in g["names"]:
            by_name[n] = (g["lr_scale"], g["weight_decay"])
    d = o["layer_decay"]
    assert by_name["backbone.net.pos_embed"] == (pytest.approx(d ** (depth + 1)), 0.0)
    assert by_name["backbone.net.patch_embed.proj.weight"][0] == pytest.approx(d ** (depth + 1))
    assert by_name["backbone.net.blocks.0.attn.qkv.weight"] == (pytest.approx(d ** depth), 0.1)
    assert by_name["backbone.net.blocks.3.norm1.weight"] == (pytest.approx(d), 0.0)   # nn.LayerNorm: wd 0
    assert by_name["backbone.net.blocks.3.attn.qkv.bias"] == (pytest.approx(d), 0.1)  # biases keep wd
    assert by_name["backbone.net.blocks.2.attn.rel_pos_h"][1] == 0.1                  # as detectron2
    assert by_name["backbone.simfp_2.1.weight"] == (1.0, 0.1)      # channel LN is not a torch norm
    assert by_name["roi_heads.box_predictor.cls_score.weight"] == (1.0, 0.1)
    assert len(by_name) == sum(1 for _ in model.parameters())


def test_lr_schedule_matches_reference_milestones():
    o = _cfg("paper_vit_base").optim.to_dict()
    assert o["warmup_length"] == 250 / 184375
    assert lr_factor(0, o, 184375) == pytest.approx(0.001)
    assert lr_factor(125, o, 184375) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(249, o, 184375) == pytest.approx(0.001 + 0.999 * 249 / 250)
    assert lr_factor(250, o, 184375) == 1.0
    assert lr_factor(163888, o, 184375) == 1.0
    assert lr_factor(163889, o, 184375) == pytest.approx(0.1)
    assert lr_factor(177546, o, 184375) == pytest.approx(0.01)
    assert lr_factor(184374, o, 184375) == pytest.approx(0.01)


def test_huge_warmup_is_a_fraction_of_its_shorter_schedule():
    """ViT-H keeps B's warmup fraction 250/184375 over 138,281 iterations (detectron2's H file):
    the warmup lasts 250 * 138281 / 184375 = 187.4997 iterations, the factor at iteration ``it`` is
    0.001 + 0.999 * it / 187.4997 up to it = 187 and the step schedule from it = 188 on."""
    cfg = _cfg("paper_vit_huge")
    o, n = cfg.optim.to_dict(), cfg.train.max_iter
    assert n == 138281 and o["milestones"] == [122916, 133159]
    w = 250 * 138281 / 184375
    assert w == pytest.approx(187.4997, abs=1e-4)
    for it in (0, 1, 100, 125, 187):
        assert lr_factor(it, o, n) == pytest.approx(0.001 + 0.999 * it / w, rel=1e-12), it
    assert lr_factor(187, o, n) == pytest.approx(0.997338, abs=1e-6)  # still warming up (B: 0.748252)
    for it in (188, 189, 250, 122915):
        assert lr_factor(it, o, n) == 1.0, it
    assert lr_factor(122916, o, n) == pytest.approx(0.1)
    assert lr_factor(133159, o, n) == pytest.approx(0.01)
    assert lr_factor(n - 1, o, n) == pytest.approx(0.01)
    # an explicit fraction: 0.1 of 1000 iterations, milestone at 500; 0 = no warmup
    o = {"warmup_length": 0.1, "warmup_factor": 0.5, "milestones": [500], "gamma": 0.1}
    assert [lr_factor(it, o, 1000) for it in (0, 50, 99, 100, 499, 500)] == pytest.approx(
        [0.5, 0.75, 0.5 + 0.5 * 99 / 100, 1.0, 1.0, 0.1])
    assert lr_factor(0, {**o, "warmup_length": 0.0}, 1000) == 1.0


def test_warmup_length_is_validated(tmp_path):
    """A warmup given in iterations (the old integer key) or outside [0, 1] is bad input."""
    from crossmae.utils import UserError
    for opt, match in (("optim.warmup_length=250", r"warmup_length.*\[0, 1\]"),
                       ("optim.warmup_length=-0.1", r"warmup_length"),
                       ("optim.warmup_iters=250", r"warmup_iters")):
        with pytest.raises(UserError, match=match):
            load_config("paper_vit_base", [opt], preset_dir=REPO_ROOT / "configs" / "coco")


def test_training_iterations_reduce_loss(data_root, tiny_mae_official):
    """8 AdamW steps on two real training images (fixed test-time resize, no augmentation)."""
    from transfer.vitdet.data import CocoInstances, ResizeShortestEdge
    torch.manual_seed(0)
    cfg = _cfg("smoke", ["model.img_size=128", "model.drop_path_rate=0.0"])
    model = build_model(cfg.model.to_dict())
    load_pretrained_backbone(model.backbone.net, str(tiny_mae_official), 224, "vit_tiny_patch16")
    coco = data_root / "coco"
    ds = CocoInstances(coco / "annotations/instances_train2017.json", coco / "train2017", train=True,
                       transform=ResizeShortestEdge(128, 128))
    images, targets = [], []
    for i in range(2):
        img, t = ds.transform(*ds.load(i))
        h0, w0 = ds.images[i]["height"], ds.images[i]["width"]
        sy, sx = img.shape[-2] / h0, img.shape[-1] / w0
        t["boxes"] = t["boxes"] * torch.tensor([sx, sy, sx, sy])
        t["masks"] = torch.nn.functional.interpolate(t["masks"][None].float(), size=img.shape[-2:])[0].to(torch.uint8)
        t["poly_xy"] = t["poly_xy"] * torch.tensor([sx, sy], dtype=torch.float64)
        images.append(img.float())
        targets.append(t)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    model.train()
    totals = []
    for _ in range(8):
        losses = model(images, targets)
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert all(torch.isfinite(torch.tensor(totals)))
    assert sum(totals[-2:]) / 2 < 0.8 * sum(totals[:2]) / 2, totals


def test_bf16_autocast_keeps_boxes_in_fp32():
    """Under bf16 autocast (CUDA AMP in the recipe; CPU autocast here) proposals and detections are
    decoded in fp32 and the losses are finite."""
    torch.manual_seed(0)
    cfg = _cfg("smoke", ["model.img_size=128", "model.roi_heads.score_thresh=0.0"])
    model = build_model(cfg.model.to_dict())
    img = torch.rand(3, 96, 128) * 255
    masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
    masks[0, 20:70, 30:100] = 1
    target = {"boxes": torch.tensor([[30.0, 20.0, 100.0, 70.0]]), "labels": torch.tensor([3]), "masks": masks}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        losses = model([img], [target])
        model.eval()
        with torch.no_grad():
            il = model.preprocess([img])
            props, _ = model.rpn(il, model.backbone(il.tensors))
            det = model([img], orig_sizes=[(192, 256)])[0]
    assert all(torch.isfinite(v) for v in losses.values())
    assert props[0].dtype == torch.float32 and det["boxes"].dtype == torch.float32
    assert det["masks"].shape[-2:] == (192, 256) and det["boxes"].shape[0] > 0
