"""ViTDet Mask R-CNN assembled from torchvision detection components, configured like detectron2.

Protocol sources (detectron2): ``configs/common/models/mask_rcnn_fpn.py`` (RPN, RoI heads, poolers,
box coders, matchers, samplers), ``configs/common/models/mask_rcnn_vitdet.py`` (LN heads, 2-conv RPN,
4conv1fc box head), ``modeling/proposal_generator/rpn.py`` (RPN losses),
``modeling/roi_heads/fast_rcnn.py`` (box losses, inference), ``modeling/roi_heads/mask_head.py`` (mask
head and loss), ``modeling/poolers.py`` (ROIAlignV2 level assignment), ``modeling/anchor_generator.py``
and ``modeling/postprocessing.py``. Every place where torchvision behaves differently and we did
not override it is listed in ``docs/coco.md``.

Label convention (torchvision): 0 = background, 1..K = contiguous classes (the dataset maps them to
and from COCO's non-contiguous ids).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import roi_align

from crossmae.utils import maybe_compile

from .backbone import ConvLN, SimpleFeaturePyramid, ViTDetViT, _c2_msra_fill
from .masks import paste_masks


class ExactAnchorGenerator(AnchorGenerator):
    """torchvision ``AnchorGenerator`` without rounding the cell anchors to integers, as detectron2's
    ``DefaultAnchorGenerator`` (offset 0.0; anchor of size s and ratio a = h/w has w = s/sqrt(a),
    h = s*sqrt(a), centred on (0, 0))."""

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


class FloatRPNHead(RPNHead):
    """torchvision ``RPNHead`` whose outputs are cast to fp32: under bf16/fp16 autocast torchvision
    would decode the proposals in the deltas' dtype (anchors up to 1024 px lose whole pixels in
    bf16); detectron2 likewise decodes in fp32 (``Box2BoxTransform.apply_deltas``)."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class ViTDetRPN(RegionProposalNetwork):
    """torchvision RPN with detectron2's losses (``rpn.py: RPN.losses``).

    Both losses are sums over the sampled anchors divided by ``batch_size_per_image * num_images``
    (256·N), the box loss is smooth-L1 with ``smooth_l1_beta`` (0.0 in detectron2, i.e. plain L1;
    torchvision hard-codes 1/9 and divides by the number of sampled anchors).
    """

    def __init__(self, *args, smooth_l1_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(sampled_pos, dim=0))[0]
        neg = torch.where(torch.cat(sampled_neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        normalizer = float(self.fg_bg_sampler.batch_size_per_image * len(sampled_pos))
        box_loss = _smooth_l1(pred_bbox_deltas[pos], regression_targets[pos], self.smooth_l1_beta) / normalizer
        obj_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled], reduction="sum")
        return obj_loss / normalizer, box_loss


    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        """detectron2 ``find_top_rpn_proposals``: per level the ``pre_nms_top_n`` highest objectness
        *logits*, clip to the image, drop boxes with a side <= 0 (``Boxes.nonempty``), NMS per level
        ranked by the logits, keep the ``post_nms_top_n`` best per image.

        torchvision ranks NMS and the final top-k by ``sigmoid(logit)``, which saturates to exactly
        1.0 in fp32 above a logit of ~16.6 and then breaks ties by index; it also drops sides
        < 1e-3 px. Non-finite boxes or logits raise ``FloatingPointError`` in training and are
        dropped at test time (detectron2).

        Args:
            proposals: (N, A, 4) decoded boxes; objectness: (N*A, 1) or (N, A) logits;
            num_anchors_per_level: anchors of each level (their sum is A).
        Returns:
            (boxes, logits): per image (k, 4) boxes and (k,) logits, sorted by decreasing logit.
        """
        from torchvision.ops import boxes as box_ops

        n = proposals.shape[0]
        objectness = objectness.detach().reshape(n, -1)
        levels = torch.cat([torch.full((k,), i, dtype=torch.int64, device=proposals.device)
                            for i, k in enumerate(num_anchors_per_level)])
        top_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch = torch.arange(n, device=proposals.device)[:, None]
        objectness, levels, proposals = objectness[batch, top_idx], levels[top_idx], proposals[batch, top_idx]
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, hw in zip(proposals, objectness, levels, image_shapes):
            valid = torch.isfinite(boxes).all(1) & torch.isfinite(scores)
            if not valid.all():
                if self.training:
                    raise FloatingPointError("RPN boxes or logits contain Inf/NaN: training has diverged")
                boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
            boxes = box_ops.clip_boxes_to_image(boxes, hw)
            keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores


def _smooth_l1(x: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed smooth-L1 (beta < 1e-5 → L1), detectron2 ``fvcore.nn.smooth_l1_loss`` semantics."""
    if beta < 1e-5:
        return (x - y).abs().sum()
    return F.smooth_l1_loss(x, y, beta=beta, reduction="sum")


class ROIAlignV2Pooler(nn.Module):
    """Multi-level RoIAlign with half-pixel alignment (detectron2 ``ROIPooler(pooler_type="ROIAlignV2")``).

    Level of a box: ``floor(4 + log2(sqrt(area) / 224 + 1e-8))`` clamped to [min_level, max_level]
    (detectron2 ``assign_boxes_to_levels``; torchvision's ``LevelMapper`` adds its epsilon outside
    the log). ``roi_align(aligned=True, sampling_ratio=0)``.

    Args:
        featmap_names: pyramid levels used, e.g. ("p2", "p3", "p4", "p5").
        strides: their strides (4, 8, 16, 32).
    Call: ``(features: dict[name, (N, C, h, w)], boxes: list[(K_i, 4)] XYXY input pixels, image_shapes)
    -> (sum K_i, C, output_size, output_size)``.
    """

    def __init__(self, featmap_names: Sequence[str], strides: Sequence[int], output_size: int,
                 sampling_ratio: int = 0, canonical_box_size: int = 224, canonical_level: int = 4):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(math.log2(strides[0]))
        self.max_level = int(math.log2(strides[-1]))
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def forward(self, features: dict, boxes: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        feats = [features[n] for n in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], 0)
        n_rois, c = rois.shape[0], feats[0].shape[1]
        # fp32 throughout: under bf16 autocast the box coordinates (up to 1024) would lose whole pixels
        out = feats[0].new_zeros((n_rois, c, self.output_size, self.output_size), dtype=torch.float32)
        if n_rois == 0:
            return out
        rois = rois.float()
        area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        lvl = torch.floor(self.canonical_level + torch.log2(torch.sqrt(area) / self.canonical_box_size + 1e-8))
        lvl = (lvl.clamp(self.min_level, self.max_level) - self.min_level).long()
        for i, (f, s) in enumerate(zip(feats, self.scales)):
            idx = torch.where(lvl == i)[0]
            if idx.numel():
                out[idx] = roi_align(f.float(), rois[idx], self.output_size, spatial_scale=s,
                                     sampling_ratio=self.sampling_ratio, aligned=True)
        return out


class FastRCNNConvFCHead(nn.Sequential):
    """detectron2 ``FastRCNNConvFCHead``: ``conv_dims`` 3×3 convs (no bias, LN, ReLU; c2_msra_fill),
    flatten, ``fc_dims`` fcs (ReLU; c2_xavier_fill). (K, C, 7, 7) -> (K, fc_dims[-1])."""

    def __init__(self, in_channels: int, pool: int, conv_dims: Sequence[int], fc_dims: Sequence[int]):
        layers: list[nn.Module] = []
        c = in_channels
        for d in conv_dims:
            layers += [ConvLN(c, d, 3, msra_init=True), nn.ReLU()]
            c = d
        layers.append(nn.Flatten())
        n = c * pool * pool
        for d in fc_dims:
            fc = nn.Linear(n, d)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
            layers += [fc, nn.ReLU()]
            n = d
        super().__init__(*layers)
        self.out_features = n


class FastRCNNPredictor(nn.Module):
    """Class scores (K+1 incl. background; normal std 0.01) and class-specific box deltas
    (normal std 0.001), detectron2 ``FastRCNNOutputLayers`` init. (K, F) -> ((K, C+1), (K, 4(C+1))).

    The background column of the deltas is never trained nor used (torchvision layout)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, (num_classes + 1) * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x):
        # fp32 outputs: box decoding happens in the deltas' dtype in torchvision (see FloatRPNHead)
        return self.cls_score(x).float(), self.bbox_pred(x).float()


class MaskRCNNConvUpsampleHead(nn.Module):
    """detectron2 ``MaskRCNNConvUpsampleHead`` (conv_dims [256]*4 + deconv 256, LN): 4 × (3×3 conv,
    LN, ReLU), ConvTranspose 2×2/2 + ReLU, 1×1 predictor with one logit map per class (no
    background). c2_msra_fill init, predictor normal std 0.001.
    (K, C, 14, 14) -> (K, num_classes, 28, 28)."""

    def __init__(self, in_channels: int, conv_dims: Sequence[int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for d in conv_dims[:-1]:
            layers += [ConvLN(c, d, 3, msra_init=True), nn.ReLU()]
            c = d
        self.convs = nn.Sequential(*layers)
        self.deconv = nn.ConvTranspose2d(c, conv_dims[-1], 2, 2)
        _c2_msra_fill(self.deconv)
        self.predictor = nn.Conv2d(conv_dims[-1], num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x):
        return self.predictor(F.relu(self.deconv(self.convs(x))))


class ViTDetRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` (proposal + GT appending, IoU matching, balanced sampling, box coder
    (10, 10, 5, 5), inference with score threshold / per-class NMS / top-k) with detectron2's losses:

    - ``loss_cls``: cross entropy, mean over the sampled RoIs;
    - ``loss_box_reg``: smooth-L1 with ``smooth_l1_beta`` (0 → L1) summed over foreground RoIs of the
      GT class, divided by the number of sampled RoIs (``fast_rcnn.py``);
    - ``loss_mask``: per-pixel BCE of the GT-class logit map, mean, with 28×28 targets rasterised
      from the GT polygons inside each RoI (detectron2 ``PolygonMasks.crop_and_resize``); instances
      without polygons (RLE) use an aligned crop of their bitmask (``BitMasks.crop_and_resize``).

    ``forward(features, proposals, image_shapes, targets)`` returns ``(detections, losses)``;
    detections: boxes (n, 4), scores (n,), labels (n,) 1..K, mask_probs (n, 1, 28, 28).
    """

    def __init__(self, *args, smooth_l1_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(x)
        losses: dict[str, torch.Tensor] = {}
        result: list[dict[str, torch.Tensor]] = []
        if self.training:
            labels_cat = torch.cat(labels, 0)
            reg_targets = torch.cat(regression_targets, 0)
            losses["loss_cls"] = F.cross_entropy(class_logits, labels_cat)
            pos = torch.where(labels_cat > 0)[0]
            deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, labels_cat[pos]]
            losses["loss_box_reg"] = (_smooth_l1(deltas, reg_targets[pos], self.smooth_l1_beta)
                                      / max(labels_cat.numel(), 1))
            pos_boxes, pos_labels, pos_gt = [], [], []
            for p, m, lab in zip(proposals, matched_idxs, labels):
                keep = torch.where(lab > 0)[0]
                pos_boxes.append(p[keep])
                pos_labels.append(lab[keep])
                pos_gt.append(m[keep])
            mask_logits = self.mask_head(self.mask_roi_pool(features, pos_boxes, image_shapes))
            losses["loss_mask"] = self.mask_loss(mask_logits, pos_boxes, pos_labels, pos_gt, targets)
            return result, losses
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        mask_logits = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        lab = torch.cat(labels, 0)
        probs = mask_logits[torch.arange(lab.numel(), device=lab.device), lab - 1][:, None].sigmoid()
        for b, s, l, m in zip(boxes, scores, labels, probs.split([len(b) for b in boxes])):
            result.append({"boxes": b, "scores": s, "labels": l, "mask_probs": m})
        return result, losses

    @staticmethod
    def mask_loss(mask_logits, boxes, labels, gt_idx, targets) -> torch.Tensor:
        """BCE of the GT-class logits against 28×28 targets of the foreground RoIs; 0·sum when there
        is no foreground RoI (detectron2 ``mask_rcnn_loss``). Targets come from
        :func:`transfer.vitdet.masks.mask_targets`: the instance's polygons rasterised inside the RoI
        (``PolygonMasks.crop_and_resize``, detectron2's default ``mask_format="polygon"``), or for
        instances without polygons (RLE) an aligned crop of the bitmask ≥ 0.5 (``BitMasks``)."""
        from .masks import mask_targets

        if mask_logits.shape[0] == 0:
            return mask_logits.sum() * 0
        m = mask_logits.shape[-1]
        targets = torch.cat([mask_targets(t, g, b, m) for b, g, t in zip(boxes, gt_idx, targets)], 0)
        targets = targets.to(mask_logits.dtype)
        lab = torch.cat(labels, 0)
        logits = mask_logits[torch.arange(lab.numel(), device=lab.device), lab - 1]
        return F.binary_cross_entropy_with_logits(logits, targets)


class ViTDetMaskRCNN(nn.Module):
    """ViTDet Mask R-CNN (detectron2 ``GeneralizedRCNN`` with a ``SimpleFeaturePyramid`` backbone).

    Input: a list of images, each (3, H, W) float RGB in 0..255 with H, W <= ``square_pad``; in
    training a list of targets ``{"boxes": (G, 4) XYXY input pixels, "labels": (G,) int64 1..K,
    "masks": (G, H, W) uint8}`` and optionally the packed polygons ``poly_xy`` / ``poly_len`` /
    ``poly_inst`` (``transfer.vitdet.masks``; polygon instances get polygon mask targets). Images are normalised with ``pixel_mean`` / ``pixel_std`` and
    zero-padded at the bottom/right to ``square_pad``² (detectron2 ``ImageList.from_tensors`` with
    ``square_size``).

    Returns: training → dict of the five losses (``loss_rpn_cls``, ``loss_rpn_loc``, ``loss_cls``,
    ``loss_box_reg``, ``loss_mask``); eval → per image ``{"boxes", "scores", "labels", "masks"}``
    rescaled to ``orig_sizes`` (boxes clipped; masks (n, H0, W0) bool, pasted and thresholded at 0.5
    as detectron2 ``detector_postprocess``).

    Raises:
        ValueError: an image larger than ``square_pad``.
    """

    def __init__(self, backbone: SimpleFeaturePyramid, rpn: ViTDetRPN, roi_heads: ViTDetRoIHeads,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float]):
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    def preprocess(self, images: list[torch.Tensor]) -> ImageList:
        s = self.backbone.square_pad
        batch = images[0].new_zeros((len(images), 3, s, s))
        sizes = []
        for i, im in enumerate(images):
            h, w = im.shape[-2:]
            if h > s or w > s:
                raise ValueError(f"image of size {h}x{w} exceeds square_pad={s}")
            batch[i, :, :h, :w] = (im - self.pixel_mean) / self.pixel_std
            sizes.append((int(h), int(w)))
        return ImageList(batch, sizes)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None,
                orig_sizes: list[tuple[int, int]] | None = None):
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        il = self.preprocess(images)
        features = self.backbone(il.tensors)
        proposals, rpn_losses = self.rpn(il, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, il.image_sizes, targets)
        if self.training:
            # detectron2 loss names
            return {"loss_rpn_cls": rpn_losses["loss_objectness"], "loss_rpn_loc": rpn_losses["loss_rpn_box_reg"],
                    **roi_losses}
        orig_sizes = orig_sizes or il.image_sizes
        return [self.postprocess(d, in_hw, out_hw) for d, in_hw, out_hw in
                zip(detections, il.image_sizes, orig_sizes)]

    @staticmethod
    def postprocess(det: dict, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict:
        """Rescale boxes from the network input size to ``out_hw``, clip, drop boxes left empty, paste
        masks (:func:`transfer.vitdet.masks.paste_masks`, detectron2's bilinear float-box paste,
        threshold 0.5), as detectron2 ``detector_postprocess``."""
        boxes = det["boxes"].float().clone()
        sy, sx = out_hw[0] / in_hw[0], out_hw[1] / in_hw[1]
        boxes[:, 0::2] = (boxes[:, 0::2] * sx).clamp(0, out_hw[1])
        boxes[:, 1::2] = (boxes[:, 1::2] * sy).clamp(0, out_hw[0])
        # detectron2 detector_postprocess: boxes empty after clipping are dropped
        keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        boxes = boxes[keep]
        masks = paste_masks(det["mask_probs"][keep].float(), boxes, out_hw, threshold=0.5)
        return {"boxes": boxes, "scores": det["scores"][keep].float(), "labels": det["labels"][keep], "masks": masks}


def build_vit(m: dict) -> ViTDetViT:
    """The ViTDet ViT from the ``model`` config section (see ``configs/coco/paper_vit_base.py``)."""
    return ViTDetViT(img_size=m["img_size"], patch_size=m["patch_size"], embed_dim=m["embed_dim"],
                     depth=m["depth"], num_heads=m["num_heads"], mlp_ratio=m.get("mlp_ratio", 4.0),
                     qkv_bias=True, drop_path_rate=m["drop_path_rate"], window_size=m["window_size"],
                     global_blocks=m["global_blocks"], use_rel_pos=m.get("use_rel_pos", True),
                     pretrain_img_size=m["pretrain_img_size"])


def build_model(m: dict) -> ViTDetMaskRCNN:
    """Build the detector from the ``model`` config section (all detectron2 values in the presets)."""
    net = maybe_compile(build_vit(m), m.get("compile", False), "config model.compile")  # in place: keys unchanged
    backbone = SimpleFeaturePyramid(net, out_channels=m["out_channels"], scale_factors=m["scale_factors"],
                                    square_pad=m["img_size"])
    r = m["rpn"]
    levels = backbone.level_names  # p2..p6
    anchor_gen = ExactAnchorGenerator(sizes=tuple((s,) for s in r["anchor_sizes"]),
                                      aspect_ratios=(tuple(r["aspect_ratios"]),) * len(r["anchor_sizes"]))
    if len(r["anchor_sizes"]) != len(levels):
        raise ValueError(f"rpn.anchor_sizes needs one size per level {levels}")
    rpn = ViTDetRPN(anchor_gen, FloatRPNHead(m["out_channels"], len(r["aspect_ratios"]), conv_depth=r["conv_depth"]),
                    fg_iou_thresh=r["fg_iou_thresh"], bg_iou_thresh=r["bg_iou_thresh"],
                    batch_size_per_image=r["batch_size_per_image"], positive_fraction=r["positive_fraction"],
                    pre_nms_top_n=dict(training=r["pre_nms_topk"][0], testing=r["pre_nms_topk"][1]),
                    post_nms_top_n=dict(training=r["post_nms_topk"][0], testing=r["post_nms_topk"][1]),
                    nms_thresh=r["nms_thresh"], smooth_l1_beta=r["smooth_l1_beta"])
    h = m["roi_heads"]
    roi_levels, roi_strides = levels[:4], backbone.strides[:4]
    box_pool = ROIAlignV2Pooler(roi_levels, roi_strides, h["box_pool_size"], h["sampling_ratio"])
    mask_pool = ROIAlignV2Pooler(roi_levels, roi_strides, h["mask_pool_size"], h["sampling_ratio"])
    box_head = FastRCNNConvFCHead(m["out_channels"], h["box_pool_size"], h["box_conv_dims"], h["box_fc_dims"])
    roi_heads = ViTDetRoIHeads(
        box_pool, box_head, FastRCNNPredictor(box_head.out_features, m["num_classes"]),
        fg_iou_thresh=h["iou_thresh"], bg_iou_thresh=h["iou_thresh"],
        batch_size_per_image=h["batch_size_per_image"], positive_fraction=h["positive_fraction"],
        bbox_reg_weights=tuple(h["bbox_reg_weights"]), score_thresh=h["score_thresh"],
        nms_thresh=h["nms_thresh"], detections_per_img=h["detections_per_img"],
        mask_roi_pool=mask_pool,
        mask_head=MaskRCNNConvUpsampleHead(m["out_channels"], h["mask_conv_dims"], m["num_classes"]),
        mask_predictor=nn.Identity(), smooth_l1_beta=h["smooth_l1_beta"])
    return ViTDetMaskRCNN(backbone, rpn, roi_heads, m["pixel_mean"], m["pixel_std"])
