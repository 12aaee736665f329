"""The COCO presets tied to detectron2's ViTDet config files, every recipe value of B, L and H.

``configs/coco/paper_vit_{base,large,huge}.py`` against ``projects/ViTDet/configs/COCO/
mask_rcnn_vitdet_{b_100ep,l_100ep,h_75ep}.py`` of a detectron2 checkout (``DETECTRON2_SRC``, with
``fvcore iopath omegaconf hydra-core`` installed: ``pip install -e '.[detectron2-parity]'``; skipped
with the reason otherwise), read with detectron2's own ``LazyConfig.load`` (with ``_base_`` files
``configs/common/models/mask_rcnn_{fpn,vitdet}.py``, ``common/optim.py``, ``common/train.py``,
``common/data/coco.py`` and ViTDet's ``common/coco_loader_lsj.py``). A value a config leaves to
a constructor's default is read from that constructor's signature. Each deliberate difference is a
declared exception (commented where declared; a row of the table in ``docs/coco.md``).
"""
from __future__ import annotations

import inspect
import re

import pytest

from _recipe import RecipeCheck, detectron2_src
from crossmae.utils import REPO_ROOT, load_config

pytestmark = pytest.mark.detectron2

FILES = {"paper_vit_base": "mask_rcnn_vitdet_b_100ep.py", "paper_vit_large": "mask_rcnn_vitdet_l_100ep.py",
         "paper_vit_huge": "mask_rcnn_vitdet_h_75ep.py"}

EXCEPTIONS = {
    # detectron2's AMPTrainer autocasts to float16 (with a GradScaler); ours to bfloat16 on CUDA by
    # default (train.amp_dtype=float16 gives detectron2's). Not measured (no GPU here).
    "train.amp dtype": ("bfloat16", "float16"),
    # detectron2 keeps the last 100 checkpoints; ours the newest 2 (+ the final model): disk only.
    "train.checkpointer.max_to_keep": (2, 100),
}
def _get(node, key):
    """``node[key]``, or the default of ``key`` in the signature of ``node``'s LazyCall target."""
    if key in node:
        return node[key]
    target = node["_target_"]
    default = inspect.signature(target).parameters[key].default
    assert default is not inspect.Parameter.empty, (target, key)
    return default


def _name(target) -> str:
    return target if isinstance(target, str) else target.__name__


def compare(chk: RecipeCheck, ours, d2) -> None:
    m, r, h = ours.model, ours.model.rpn, ours.model.roi_heads
    net, sfp = d2.model.backbone.net, d2.model.backbone
    chk.eq("net.img_size", m.img_size, net.img_size)
    chk.eq("net.patch_size", m.patch_size, net.patch_size)
    chk.eq("net.pretrain_img_size", m.pretrain_img_size, _get(net, "pretrain_img_size"))
    chk.eq("net.embed_dim", m.embed_dim, net.embed_dim)
    chk.eq("net.depth", m.depth, net.depth)
    chk.eq("net.num_heads", m.num_heads, net.num_heads)
    chk.eq("net.mlp_ratio", m.mlp_ratio, net.mlp_ratio)
    chk.eq("net.qkv_bias", True, net.qkv_bias)                     # ours: always
    chk.eq("net.norm_layer eps", 1e-6, net.norm_layer.keywords["eps"])  # ours: always
    chk.eq("net.drop_path_rate", m.drop_path_rate, net.drop_path_rate)
    chk.eq("net.window_size", m.window_size, net.window_size)
    chk.eq("net.window_block_indexes", [i for i in range(m.depth) if i not in m.global_blocks],
           list(net.window_block_indexes))
    chk.eq("net.residual_block_indexes", [], list(net.residual_block_indexes))
    chk.eq("net.use_rel_pos", m.use_rel_pos, net.use_rel_pos)
    chk.eq("net.use_abs_pos", True, _get(net, "use_abs_pos"))
    chk.eq("net.rel_pos_zero_init", True, _get(net, "rel_pos_zero_init"))
    chk.eq("sfp.out_channels", m.out_channels, sfp.out_channels)
    chk.eq("sfp.scale_factors", m.scale_factors, sfp.scale_factors)
    chk.eq("sfp.norm", "LN", sfp.norm)
    chk.eq("sfp.square_pad", m.img_size, sfp.square_pad)
    chk.eq("sfp.top_block", "LastLevelMaxPool", _name(sfp.top_block["_target_"]))
    chk.eq("pixel_mean", m.pixel_mean, d2.model.pixel_mean)
    chk.eq("pixel_std", m.pixel_std, d2.model.pixel_std)
    chk.eq("input_format", "RGB", d2.model.input_format)
    pg = d2.model.proposal_generator
    ag = pg.anchor_generator
    chk.eq("rpn.in_features", ["p2", "p3", "p4", "p5", "p6"], pg.in_features)
    chk.eq("rpn.anchor sizes", [[s] for s in r.anchor_sizes], ag.sizes)
    chk.eq("rpn.aspect_ratios", r.aspect_ratios, ag.aspect_ratios)
    chk.eq("rpn.anchor strides", [int(m.patch_size / s) for s in m.scale_factors] + [
        int(2 * m.patch_size / m.scale_factors[-1])], ag.strides)
    chk.eq("rpn.anchor offset", 0.0, ag.offset)
    chk.eq("rpn.head conv depth", r.conv_depth, len(pg.head.conv_dims))
    chk.eq("rpn.matcher thresholds", [r.bg_iou_thresh, r.fg_iou_thresh], pg.anchor_matcher.thresholds)
    chk.eq("rpn.matcher labels", [0, -1, 1], pg.anchor_matcher.labels)
    chk.eq("rpn.matcher low quality", True, pg.anchor_matcher.allow_low_quality_matches)
    chk.eq("rpn.box2box weights", [1.0] * 4, pg.box2box_transform.weights)
    chk.eq("rpn.batch_size_per_image", r.batch_size_per_image, pg.batch_size_per_image)
    chk.eq("rpn.positive_fraction", r.positive_fraction, pg.positive_fraction)
    chk.eq("rpn.pre_nms_topk", r.pre_nms_topk, pg.pre_nms_topk)
    chk.eq("rpn.post_nms_topk", r.post_nms_topk, pg.post_nms_topk)
    chk.eq("rpn.nms_thresh", r.nms_thresh, pg.nms_thresh)
    chk.eq("rpn.smooth_l1_beta", r.smooth_l1_beta, _get(pg, "smooth_l1_beta"))
    rh = d2.model.roi_heads
    chk.eq("roi.num_classes", m.num_classes, rh.num_classes)
    chk.eq("roi.batch_size_per_image", h.batch_size_per_image, rh.batch_size_per_image)
    chk.eq("roi.positive_fraction", h.positive_fraction, rh.positive_fraction)
    chk.eq("roi.matcher thresholds", [h.iou_thresh], rh.proposal_matcher.thresholds)
    chk.eq("roi.matcher low quality", False, rh.proposal_matcher.allow_low_quality_matches)
    chk.eq("roi.box_in_features", ["p2", "p3", "p4", "p5"], rh.box_in_features)
    chk.eq("roi.box_pooler.output_size", h.box_pool_size, rh.box_pooler.output_size)
    chk.eq("roi.box_pooler.sampling_ratio", h.sampling_ratio, rh.box_pooler.sampling_ratio)
    chk.eq("roi.box_pooler.pooler_type", "ROIAlignV2", rh.box_pooler.pooler_type)
    chk.eq("roi.mask_pooler.output_size", h.mask_pool_size, rh.mask_pooler.output_size)
    chk.eq("roi.mask_pooler.sampling_ratio", h.sampling_ratio, rh.mask_pooler.sampling_ratio)
    chk.eq("roi.mask_pooler.pooler_type", "ROIAlignV2", rh.mask_pooler.pooler_type)
    chk.eq("roi.box_head.conv_dims", h.box_conv_dims, rh.box_head.conv_dims)
    chk.eq("roi.box_head.fc_dims", h.box_fc_dims, rh.box_head.fc_dims)
    chk.eq("roi.box_head.conv_norm", "LN", rh.box_head.conv_norm)
    bp = rh.box_predictor
    chk.eq("roi.box_predictor.test_score_thresh", h.score_thresh, bp.test_score_thresh)
    chk.eq("roi.box_predictor.test_nms_thresh", h.nms_thresh, _get(bp, "test_nms_thresh"))
    chk.eq("roi.box_predictor.test_topk_per_image", h.detections_per_img, _get(bp, "test_topk_per_image"))
    chk.eq("roi.box_predictor.smooth_l1_beta", h.smooth_l1_beta, _get(bp, "smooth_l1_beta"))
    chk.eq("roi.box_predictor.weights", h.bbox_reg_weights, bp.box2box_transform.weights)
    chk.eq("roi.box_predictor.cls_agnostic_bbox_reg", False, _get(bp, "cls_agnostic_bbox_reg"))
    chk.eq("roi.mask_head.conv_dims", h.mask_conv_dims, rh.mask_head.conv_dims)
    chk.eq("roi.mask_head.conv_norm", "LN", rh.mask_head.conv_norm)
    # data (LSJ)
    d, tr, te = ours.data, d2.dataloader.train, d2.dataloader.test

    def coco_name(ann):
        split, year = re.search(r"instances_(train|val)(\d{4})\.json$", ann).groups()
        return f"coco_{year}_{split}"
    chk.eq("train dataset", coco_name(d.train_ann), tr.dataset.names)
    chk.eq("test dataset", coco_name(d.val_ann), te.dataset.names)
    chk.eq("train filter_empty", d.filter_empty, _get(tr.dataset, "filter_empty"))
    augs = tr.mapper.augmentations
    chk.eq("LSJ order", ["RandomFlip", "ResizeScale", "FixedSizeCrop"], [_name(a["_target_"]) for a in augs])
    chk.eq("RandomFlip.horizontal", True, augs[0].horizontal)
    chk.eq("RandomFlip.prob", d.flip_prob, _get(augs[0], "prob"))
    chk.eq("ResizeScale.min/max", d.scale_range, [augs[1].min_scale, augs[1].max_scale])
    chk.eq("ResizeScale.target", [d.image_size] * 2, [augs[1].target_height, augs[1].target_width])
    chk.eq("FixedSizeCrop.crop_size", [d.image_size] * 2, augs[2].crop_size)
    chk.eq("FixedSizeCrop.pad", False, augs[2].pad)
    chk.eq("train image_format", "RGB", tr.mapper.image_format)
    chk.eq("recompute_boxes", True, tr.mapper.recompute_boxes)
    chk.eq("use_instance_mask", True, tr.mapper.use_instance_mask)
    chk.eq("total_batch_size", ours.train.total_batch_size, tr.total_batch_size)
    chk.eq("num_workers", d.num_workers, tr.num_workers)
    (ta,) = te.mapper.augmentations
    chk.eq("test resize", "ResizeShortestEdge", _name(ta["_target_"]))
    chk.eq("test short_edge_length", d.test_short_edge, ta.short_edge_length)
    chk.eq("test max_size", d.test_max_size, ta.max_size)
    chk.eq("test batch_size", ours.test.batch_size, 1)  # build_detection_test_loader: one image per GPU
    # optimiser
    o, opt = ours.optim, d2.optimizer
    chk.eq("optimizer", "AdamW", _name(opt["_target_"]))
    chk.eq("lr", o.lr, opt.lr)
    chk.eq("betas", o.betas, opt.betas)
    chk.eq("weight_decay", o.weight_decay, opt.weight_decay)
    chk.eq("weight_decay_norm", o.weight_decay_norm, opt.params.weight_decay_norm)
    chk.eq("weight_decay_bias", o.weight_decay_bias, _get(opt.params, "weight_decay_bias"))
    chk.eq("overrides", dict(o.weight_decay_overrides),
           {k: v["weight_decay"] for k, v in (opt.params.overrides or {}).items()})
    lf = opt.params.lr_factor_func
    chk.eq("layer decay rate", o.layer_decay, lf.keywords["lr_decay_rate"])
    chk.eq("layer decay num_layers", m.depth, lf.keywords["num_layers"])
    # schedule
    t, lm = ours.train, d2.lr_multiplier
    chk.eq("max_iter", t.max_iter, d2.train.max_iter)
    chk.eq("milestones", o.milestones, lm.scheduler.milestones)
    chk.eq("lr values", [o.gamma ** i for i in range(len(o.milestones) + 1)], lm.scheduler["values"])
    chk.eq("num_updates", t.max_iter, lm.scheduler.num_updates)
    chk.eq("warmup_length", o.warmup_length, lm.warmup_length)  # a fraction of max_iter (H: 187.5 it)
    chk.eq("warmup_factor", o.warmup_factor, lm.warmup_factor)
    chk.eq("warmup_method", "linear", _get(lm, "warmup_method"))
    # training loop
    chk.eq("train.amp", t.amp, d2.train.amp.enabled)
    from detectron2.engine import AMPTrainer
    chk.eq("train.amp dtype", t.amp_dtype,
           str(inspect.signature(AMPTrainer).parameters["precision"].default).removeprefix("torch."))
    chk.eq("ddp fp16_compression", t.ddp_fp16_compression, d2.train.ddp.fp16_compression)
    chk.eq("ddp broadcast_buffers", False, d2.train.ddp.broadcast_buffers)
    chk.eq("checkpoint period", t.checkpoint_period, d2.train.checkpointer.period)
    chk.eq("train.checkpointer.max_to_keep", t.keep_checkpoints, d2.train.checkpointer.max_to_keep)
    chk.eq("eval_period", t.eval_period, d2.train.eval_period)
    chk.eq("log_period", t.log_period, d2.train.log_period)
    chk.eq("test amp", ours.test.amp, False)  # detectron2 evaluates without autocast


@pytest.mark.parametrize("preset", sorted(FILES))
def test_coco_preset_is_detectron2_config(preset):
    src = detectron2_src()
    from detectron2.config import LazyConfig
    d2 = LazyConfig.load(str(src / "projects/ViTDet/configs/COCO" / FILES[preset]))
    ours = load_config(preset, None, preset_dir=REPO_ROOT / "configs" / "coco")
    chk = RecipeCheck(EXCEPTIONS)
    compare(chk, ours, d2)
    assert chk.done() >= 100


@pytest.mark.parametrize("preset", sorted(FILES))
def test_coco_lr_every_iteration_equals_detectron2(preset):
    """The lr factor of every iteration equals detectron2's: its ``lr_multiplier`` (instantiated from
    the config file: ``WarmupParamScheduler`` over fvcore's ``MultiStepParamScheduler``) evaluated as
    ``LRMultiplier.get_lr`` does, at ``it / train.max_iter``, for all iterations of the schedule; and a
    real ``LRMultiplier`` stepped as detectron2's ``LRScheduler`` hook steps it (once per iteration
    after the optimiser) gives the lr each of the first 300 iterations runs with."""
    src = detectron2_src()
    import torch
    from detectron2.config import LazyConfig, instantiate
    from detectron2.solver import LRMultiplier
    from transfer.vitdet.optim import lr_factor
    d2 = LazyConfig.load(str(src / "projects/ViTDet/configs/COCO" / FILES[preset]))
    ours = load_config(preset, None, preset_dir=REPO_ROOT / "configs" / "coco")
    o, n = ours.optim.to_dict(), ours.train.max_iter
    assert n == d2.train.max_iter
    sched = instantiate(d2.lr_multiplier)
    theirs = [sched(it / n) for it in range(n)]
    mine = [lr_factor(it, o, n) for it in range(n)]
    bad = [it for it, (a, b) in enumerate(zip(mine, theirs)) if abs(a - b) > 1e-12 * b]
    assert not bad, [(it, mine[it], theirs[it]) for it in bad[:5]]
    warm = sum(1 for it in range(n) if mine[it] < 1.0 and it < o["milestones"][0])
    assert warm == {"paper_vit_huge": 188}.get(preset, 250)  # iterations 0..187 (H), 0..249 (B, L)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=d2.optimizer.lr)
    lrm = LRMultiplier(opt, sched, max_iter=d2.train.max_iter)
    for it in range(300):
        assert opt.param_groups[0]["lr"] == pytest.approx(o["lr"] * lr_factor(it, o, n), rel=1e-12), it
        opt.step()
        lrm.step()


def test_coco_recipe_check_catches_a_change():
    """The comparison is live: one changed value (L's layer decay put to B's) fails."""
    src = detectron2_src()
    from detectron2.config import LazyConfig
    d2 = LazyConfig.load(str(src / "projects/ViTDet/configs/COCO" / FILES["paper_vit_large"]))
    ours = load_config("paper_vit_large", ["optim.layer_decay=0.7"], preset_dir=REPO_ROOT / "configs" / "coco")
    chk = RecipeCheck(EXCEPTIONS)
    compare(chk, ours, d2)
    with pytest.raises(AssertionError, match=r"layer decay rate: ours=0.7 reference=0.8"):
        chk.done()
