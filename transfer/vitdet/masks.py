"""Mask geometry of ViTDet Mask R-CNN: pasting 28×28 predictions into the image, polygon transforms
and polygon mask targets, all with detectron2's geometry.

Protocol sources (detectron2, read as the reference; the code here is our own):

- ``detectron2/layers/mask_ops.py: paste_masks_in_image`` — each M×M probability map is bilinearly
  sampled (``grid_sample``, ``align_corners=False``, zero padding) at the centres of the image
  pixels inside its *float* box, then thresholded at 0.5 (``>=``).
- ``detectron2/structures/masks.py: PolygonMasks.crop_and_resize`` / ``rasterize_polygons_within_box``
  — mask targets are the GT polygons shifted to the proposal's top-left corner, scaled by
  ``M / max(side, 0.1)`` and rasterised at M×M by pycocotools.
- ``fvcore/transforms/transform.py: HFlipTransform / ResizeTransform / CropTransform.apply_polygons``
  — polygons flip as ``x -> W - x``, scale by ``new/old`` per axis and are intersected with the crop
  window by shapely (``buffer(0)`` first: invalid polygons are dropped, holes and degenerate parts
  are discarded), then shifted by the crop offset.

Polygon instances travel through the data pipeline and to the device as three tensors (so that a
target dict stays a dict of tensors): ``poly_xy`` (V, 2) float64 vertex coordinates, ``poly_len``
(P,) int64 vertex count of each polygon, ``poly_inst`` (P,) int64 index of the instance each
polygon belongs to. Instances without polygons (RLE) use the bitmask in ``masks``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.ops import roi_align

#: Bytes of float intermediate one paste chunk may use (the detectron2 GPU limit is 1 GiB).
PASTE_CHUNK_BYTES = 256 * 1024 ** 2


def _hat_weights(lo: torch.Tensor, hi: torch.Tensor, n_out: int, m: int) -> torch.Tensor:
    """1-D bilinear sampling weights (K, n_out, m): output pixel p (centre p + 0.5) of the box
    [lo, hi) reads the M-cell map at ``u = (p + 0.5 - lo) / (hi - lo) * m - 0.5`` with weight
    ``max(0, 1 - |u - i|)`` for cell i (zero outside the map = grid_sample's zero padding)."""
    p = torch.arange(n_out, device=lo.device, dtype=torch.float32) + 0.5
    u = (p[None, :] - lo[:, None]) / (hi - lo)[:, None] * m - 0.5          # (K, n_out)
    i = torch.arange(m, device=lo.device, dtype=torch.float32)
    return (1 - (u[:, :, None] - i).abs()).clamp_(min=0)


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int], threshold: float = 0.5,
                chunk_bytes: int = PASTE_CHUNK_BYTES) -> torch.Tensor:
    """Paste M×M mask probabilities into the image, as detectron2's ``paste_masks_in_image``.

    Bilinear sampling is separable, so the pasted map of box k is ``Wy_k @ P_k @ Wx_kᵀ`` with the 1-D
    hat weights of :func:`_hat_weights`; this equals ``grid_sample(P_k, grid of pixel centres in the
    float box, align_corners=False)`` up to float rounding (~1e-7) and never builds a sampling grid.
    Masks are processed in chunks whose float intermediate (k, H, W) stays under ``chunk_bytes``
    (100 detections at 1024² → 2 chunks of ≤ 256 MiB; the output is a bool tensor of N·H·W bytes).

    Args:
        probs: (N, M, M) or (N, 1, M, M) probabilities in [0, 1].
        boxes: (N, 4) XYXY float boxes in output-image pixels.
        image_hw: (H, W) of the output image.
        threshold: binarisation threshold (``>=``); a negative value returns the float maps.
    Returns:
        (N, H, W) bool masks (float32 maps when ``threshold < 0``).
    Raises:
        ValueError: non-square masks or mismatched lengths.
    """
    if probs.dim() == 4:
        probs = probs[:, 0]
    n, m = probs.shape[0], probs.shape[-1]
    if probs.shape[-2] != m or boxes.shape[0] != n:
        raise ValueError(f"paste_masks: masks {tuple(probs.shape)} and boxes {tuple(boxes.shape)} do not match")
    h, w = int(image_hw[0]), int(image_hw[1])
    dtype = torch.bool if threshold >= 0 else torch.float32
    out = torch.zeros((n, h, w), dtype=dtype, device=probs.device)
    if n == 0:
        return out
    # CPU: one box at a time over its own pixel window (fewest operations); GPU: memory-bounded
    # chunks over the window that holds all their boxes. Outside [floor(x0) - 1, ceil(x1) + 1) the
    # sampled value is < 0.5 (detectron2's ``skip_empty`` window), so thresholded masks are unchanged.
    per = 1 if probs.device.type == "cpu" else max(1, int(chunk_bytes // max(1, h * w * 4)))
    probs, boxes = probs.float(), boxes.float()
    for s in range(0, n, per):
        b, p = boxes[s:s + per], probs[s:s + per]
        x0 = max(int(math.floor(b[:, 0].min().item())) - 1, 0)
        y0 = max(int(math.floor(b[:, 1].min().item())) - 1, 0)
        x1 = min(int(math.ceil(b[:, 2].max().item())) + 1, w)
        y1 = min(int(math.ceil(b[:, 3].max().item())) + 1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        wy = _hat_weights(b[:, 1] - y0, b[:, 3] - y0, y1 - y0, m)               # (k, h', M)
        wx = _hat_weights(b[:, 0] - x0, b[:, 2] - x0, x1 - x0, m)               # (k, w', M)
        img = torch.bmm(torch.bmm(wy, p), wx.transpose(1, 2))                  # (k, h', w')
        out[s:s + per, y0:y1, x0:x1] = img >= threshold if threshold >= 0 else img
    return out


# --------------------------------------------------------------------------------------------------
# polygons
# --------------------------------------------------------------------------------------------------
def pack_polygons(polys: list[list[np.ndarray]]) -> dict[str, torch.Tensor]:
    """Per-instance polygon lists (each polygon a (n, 2) array) -> ``poly_xy`` / ``poly_len`` /
    ``poly_inst`` tensors (see the module docstring). An instance with no polygon has no rows."""
    xy, lens, inst = [], [], []
    for i, ps in enumerate(polys):
        for p in ps:
            p = np.asarray(p, dtype=np.float64).reshape(-1, 2)
            xy.append(p)
            lens.append(len(p))
            inst.append(i)
    return {"poly_xy": torch.from_numpy(np.concatenate(xy, 0) if xy else np.zeros((0, 2))),
            "poly_len": torch.tensor(lens, dtype=torch.int64), "poly_inst": torch.tensor(inst, dtype=torch.int64)}


def unpack_polygons(target: dict, num_instances: int) -> list[list[np.ndarray]]:
    """Inverse of :func:`pack_polygons`: ``num_instances`` lists of (n, 2) float64 arrays (CPU)."""
    out: list[list[np.ndarray]] = [[] for _ in range(num_instances)]
    if "poly_xy" not in target:
        return out
    xy = target["poly_xy"].detach().cpu().numpy()
    lens = target["poly_len"].tolist()
    inst = target["poly_inst"].tolist()
    start = 0
    for n, i in zip(lens, inst):
        out[i].append(xy[start:start + n])
        start += n
    return out


def crop_polygons(polys: list[np.ndarray], x0: float, y0: float, w: float, h: float) -> list[np.ndarray]:
    """Intersect polygons with the window [x0, x0+w] × [y0, y0+h] and shift them to its origin, as
    fvcore's ``CropTransform.apply_polygons`` (shapely; ``buffer(0)`` repairs or drops invalid input,
    a polygon cut in several pieces gives several polygons, lines / points are dropped)."""
    import shapely.geometry as geometry

    window = geometry.box(x0, y0, x0 + w, y0 + h).buffer(0.0)
    out = []
    for p in polys:
        poly = geometry.Polygon(p).buffer(0.0)
        if not poly.is_valid:
            continue
        cut = poly.intersection(window)
        if cut.is_empty:
            continue
        parts = cut.geoms if hasattr(cut, "geoms") else [cut]
        for part in parts:
            if isinstance(part, geometry.Polygon) and part.is_valid:
                xy = np.asarray(part.exterior.coords)[:-1]  # shapely repeats the first vertex
                out.append(xy - np.array([x0, y0]))
    return out


def polygon_boxes(polys: list[list[np.ndarray]]) -> torch.Tensor:
    """XYXY boxes (G, 4) float32 = min / max over each instance's polygon vertices (detectron2
    ``PolygonMasks.get_bounding_boxes``); an instance without polygons gets a zero box."""
    boxes = torch.zeros((len(polys), 4), dtype=torch.float32)
    for i, ps in enumerate(polys):
        if ps:
            xy = np.concatenate(ps, 0)
            boxes[i] = torch.from_numpy(np.concatenate([xy.min(0), xy.max(0)])).float()
    return boxes


def rasterize_polygons(polys: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """Union of polygons (pixel coordinates) rasterised at (h, w) by pycocotools -> uint8 (h, w)."""
    from pycocotools import mask as mask_util

    flat = [np.asarray(p, dtype=np.float64).reshape(-1) for p in polys if len(p) >= 3]
    if not flat:
        return np.zeros((h, w), dtype=np.uint8)
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(flat, h, w))).astype(np.uint8)


def polygon_mask_targets(polys: list[list[np.ndarray]], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """M×M mask targets of ``boxes`` (K, 4) from their matched instances' polygons ``polys`` (K
    lists), as detectron2 ``PolygonMasks.crop_and_resize``: shift by the box corner, scale by
    ``M / max(side, 0.1)``, rasterise. Returns (K, M, M) float32 in {0, 1} on ``boxes``' device."""
    b = boxes.detach().cpu().float().numpy()  # sides in float32, as detectron2 computes them
    out = np.zeros((len(polys), size, size), dtype=np.float32)
    for k, ps in enumerate(polys):
        x0, y0 = b[k, 0], b[k, 1]
        sx, sy = size / max(b[k, 2] - x0, 0.1), size / max(b[k, 3] - y0, 0.1)
        out[k] = rasterize_polygons([(p - np.array([x0, y0], dtype=np.float64)) * np.array([sx, sy], dtype=np.float64)
                                     for p in ps], size, size)
    return torch.from_numpy(out).to(boxes.device)


def bitmask_targets(masks: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """M×M targets cropped from full-image bitmasks (K, H, W) by ``roi_align(aligned=True)`` ≥ 0.5
    (detectron2 ``BitMasks.crop_and_resize``). Returns (K, M, M) float32 in {0, 1}."""
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size), dtype=torch.float32)
    rois = torch.cat([torch.arange(boxes.shape[0], device=boxes.device, dtype=torch.float32)[:, None],
                      boxes.float()], 1)
    crop = roi_align(masks[:, None].float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (crop[:, 0] >= 0.5).float()


def mask_targets(target: dict, gt_idx: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Mask targets (K, M, M) of RoIs ``boxes`` (K, 4) matched to ground-truth instances ``gt_idx``
    (K,) of one image's ``target``: polygon instances by :func:`polygon_mask_targets`, the others
    (RLE) by :func:`bitmask_targets` of ``target["masks"]``."""
    out = torch.zeros((boxes.shape[0], size, size), dtype=torch.float32, device=boxes.device)
    if boxes.shape[0] == 0:
        return out
    g = len(target["labels"])
    polys = unpack_polygons(target, g)
    gi = gt_idx.tolist()
    use_poly = torch.tensor([len(polys[i]) > 0 for i in gi], dtype=torch.bool, device=boxes.device)
    if use_poly.any():
        idx = torch.where(use_poly)[0]
        out[idx] = polygon_mask_targets([polys[gi[k]] for k in idx.tolist()], boxes[idx], size)
    if (~use_poly).any():
        idx = torch.where(~use_poly)[0]
        out[idx] = bitmask_targets(target["masks"][gt_idx[idx]], boxes[idx], size)
    return out
