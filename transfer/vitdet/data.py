"""COCO 2017 instance data for ViTDet: json loading, LSJ augmentation, batching, deterministic sampling.

Protocol sources (detectron2): ``data/datasets/coco.py: load_coco_json`` (category mapping,
polygon/RLE handling, invalid polygons), ``data/build.py: get_detection_dataset_dicts``
(``filter_empty``: drop training images without non-crowd instances), ``data/dataset_mapper.py``
(crowd instances are not training targets; ``recompute_boxes``: boxes from the transformed polygons;
``filter_empty_instances``), ``data/detection_utils.py`` (``read_image``: EXIF orientation applied;
``transform_instance_annotations``), ``data/transforms/augmentation_impl.py`` (``RandomFlip``,
``ResizeScale``, ``FixedSizeCrop``, ``ResizeShortestEdge``), ``data/samplers/distributed_sampler.py:
TrainingSampler`` and ViTDet's ``configs/common/coco_loader_lsj.py``.

Images are decoded with PIL to RGB uint8 with their EXIF orientation applied (as detectron2) and
resized by PIL bilinear (detectron2's ``ResizeTransform``). Polygons are transformed exactly
(``transfer/vitdet/masks.py``), boxes come from the transformed polygons, and the polygons travel
with the targets for polygon mask targets; RLE (crowd) masks are bitmasks transformed with the image.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from PIL import Image

from crossmae.data import load_rgb

from crossmae.index import StringTable, check_offsets, file_source, load_or_build, pack_strings
from crossmae.utils import UserError

from .masks import crop_polygons, pack_polygons, polygon_boxes, rasterize_polygons, unpack_polygons


class CocoInstances(Dataset):
    """A COCO-format instance segmentation split (official json layout, original image folder).

    Args:
        ann_file: ``instances_*.json``.
        image_dir: folder of the images named by ``file_name``.
        train: training split semantics (crowd instances dropped from the targets, images without
            non-crowd instances dropped when ``filter_empty``, LSJ augmentation).
        transform: a callable ``(image uint8 (3,H,W), target) -> (image, target)``; None = identity.
        filter_empty: drop images with no non-crowd instance (detectron2 default for training).

    Attributes:
        cat_ids: sorted COCO category ids; ``label = cat_ids.index(id) + 1`` (1..K, 0 = background)
            and ``cat_ids[label - 1]`` maps back (``label_to_cat_id``).
        images: the kept image records (json dicts).

    Items: ``{"image": (3, H, W) float32 0..255 RGB, "target": {"boxes": (G, 4) XYXY float32,
    "labels": (G,) int64, "masks": (G, H, W) uint8, "poly_xy" / "poly_len" / "poly_inst": the
    polygons of the polygon instances packed as tensors (``transfer.vitdet.masks.pack_polygons``)},
    "image_id": int, "orig_size": (H0, W0),
    "error": None | str}``. A decode failure is reported in ``error`` (raised as ``UserError`` by the
    caller in the main process), never as a worker traceback.

    Raises:
        UserError: missing / unreadable / malformed annotation file, missing image folder or files,
            no images (after filtering), an annotation of an unknown image or category.
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, train: bool, transform=None,
                 filter_empty: bool = True):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.train = train
        self.transform = transform
        if not self.ann_file.is_file():
            raise UserError(f"{self.ann_file}: annotation file not found")
        self.index = idx = load_or_build(
            "coco", self.ann_file.parent, self.ann_file,
            {"ann_file": str(self.ann_file), "image_dir": str(self.image_dir), "train": bool(train),
             "filter_empty": bool(filter_empty)},
            lambda: _build_coco_index(self.ann_file, self.image_dir, train, filter_empty), _validate_coco_index)
        self.index_fingerprint = idx.fingerprint
        self.cat_ids = [int(c) for c in idx.meta["cat_ids"]]
        self.cat_names = {int(c): n for c, n in idx.meta["cat_names"]}
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.num_dropped_annotations = int(idx.meta["num_dropped_annotations"])
        self.images = CocoImages(idx)
        self.anns = CocoAnnotations(idx)

    @staticmethod
    def _valid(a: dict) -> bool:
        """detectron2 ``load_coco_json``: keep polygons with >= 3 points (even length >= 6); an
        annotation whose polygons are all invalid is dropped; RLE is kept as is."""
        seg = a.get("segmentation")
        if isinstance(seg, list):
            polys = [p for p in seg if len(p) % 2 == 0 and len(p) >= 6]
            if not polys:
                return False
            a["segmentation"] = polys
        return seg is not None and "bbox" in a

    def label_to_cat_id(self, label: int) -> int:
        """Contiguous label 1..K -> COCO category id."""
        return self.cat_ids[int(label) - 1]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[torch.Tensor, dict]:
        """Decode image ``index`` and its instances (crowd instances dropped when ``train``).

        Raises:
            UserError: corrupt image, or its size differs from the json's ``height``/``width``
                (detectron2 ``SizeMismatchError``).
        """
        from pycocotools import mask as mask_util

        info = self.images[index]
        path = self.image_dir / info["file_name"]
        arr = np.asarray(load_rgb(str(path), exif_transpose=True)).copy()  # detectron2 read_image
        h, w = arr.shape[:2]
        if (h, w) != (int(info["height"]), int(info["width"])):
            raise UserError(f"{path}: image is {w}x{h} but {self.ann_file.name} says {info['width']}x{info['height']}")
        anns = [a for a in self.anns[index] if not (self.train and a.get("iscrowd", 0))]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.zeros((len(anns), h, w), dtype=np.uint8)
        for i, a in enumerate(anns):
            seg = a["segmentation"]
            if isinstance(seg, list):
                rle = mask_util.merge(mask_util.frPyObjects([p.tolist() for p in seg], h, w))
            elif isinstance(seg.get("counts"), list):
                rle = mask_util.frPyObjects(seg, h, w)
            else:
                rle = seg
            masks[i] = mask_util.decode(rle)
        target = {"boxes": boxes, "labels": torch.tensor([self.cat_to_label[int(a["category_id"])] for a in anns],
                                                         dtype=torch.int64),
                  "masks": torch.from_numpy(masks),
                  # polygon instances also carry their polygons (image pixels), RLE ones do not
                  **pack_polygons([[p.reshape(-1, 2) for p in a["segmentation"]]
                                   if isinstance(a["segmentation"], list) else [] for a in anns])}
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), target

    def __getitem__(self, index):
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        info = self.images[index]
        out = {"image_id": int(info["id"]), "orig_size": (int(info["height"]), int(info["width"])), "error": None}
        try:
            image, target = self.load(index)
        except UserError as exc:
            out["error"] = str(exc)
            return out
        if self.transform is not None:
            if seed is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image, target = self.transform(image, target)
            else:
                image, target = self.transform(image, target)
        out["image"] = image.float()
        out["target"] = target
        return out


class CocoImages(Sequence):
    """``images[i]``: the kept image record ``{"id", "file_name", "height", "width"}`` (a fresh dict
    built from the memory-mapped index, in the loader's order: ascending image id)."""

    def __init__(self, index):
        self.idx = index
        self.names = StringTable.of(index, "file_blob", "file_off")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        return {"id": int(self.idx["img_id"][i]), "file_name": self.names[i],
                "height": int(self.idx["img_hw"][i, 0]), "width": int(self.idx["img_hw"][i, 1])}


class CocoAnnotations(Sequence):
    """``anns[i]``: the kept annotations of image ``i`` as fresh dicts ``{"id", "image_id",
    "category_id", "iscrowd", "bbox" [x, y, w, h], "area" (when the json has one), "segmentation"}``; ``segmentation`` is a list of
    float64 (2K,) arrays (views of the mapped coordinates: detectron2's valid polygons, K >= 3) or an
    RLE dict ``{"size": [h, w], "counts": str | list}``."""

    def __init__(self, index):
        self.idx = index
        self.rle_str = StringTable.of(index, "rle_blob", "rle_off")

    def __len__(self) -> int:
        return len(self.idx["ann_off"]) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        x = self.idx
        out = []
        image_id = int(x["img_id"][i])
        for k in range(int(x["ann_off"][i]), int(x["ann_off"][i + 1])):
            r = int(x["ann_rle"][k])
            if r < 0:
                p0, p1 = int(x["ann_poly_off"][k]), int(x["ann_poly_off"][k + 1])
                co, xy = x["poly_off"], x["poly_xy"]
                seg = [xy[int(co[j]):int(co[j + 1])] for j in range(p0, p1)]
            else:
                size = [int(v) for v in x["rle_size"][r]]
                c0, c1 = int(x["rle_cnt_off"][r]), int(x["rle_cnt_off"][r + 1])
                counts = x["rle_cnt"][c0:c1].tolist() if x["rle_is_list"][r] else self.rle_str[r]
                seg = {"size": size, "counts": counts}
            a = {"id": int(x["ann_id"][k]), "image_id": image_id, "category_id": int(x["ann_cat"][k]),
                 "iscrowd": int(x["ann_crowd"][k]), "bbox": x["ann_bbox"][k].tolist(), "segmentation": seg}
            area = float(x["ann_area"][k])
            if area == area:
                a["area"] = area
            out.append(a)
        return out


def _build_coco_index(ann_file: Path, image_dir: Path, train: bool, filter_empty: bool):
    """Read, validate and filter an instances json into flat arrays (see :class:`CocoInstances`):
    images (``img_id`` int64, ``img_hw`` int32 (N, 2), file names), per-image annotation ranges
    (``ann_off``), annotations (``ann_id``, ``ann_cat`` int64, ``ann_crowd`` int8 (1 = crowd, the
    truth value of ``iscrowd``), ``ann_bbox`` float64 (A, 4)), polygons (``ann_poly_off`` → ``poly_off``
    → ``poly_xy`` float64 coordinates, exactly the json numbers) and RLE masks (``ann_rle`` → size,
    counts string or list).

    Raises:
        UserError: the json is unreadable / malformed (:func:`validate_coco_json`), an annotation of an
            unknown image or category, a segmentation that is neither polygons nor an RLE dict, no
            usable image, the image folder or an image file is missing.
    """
    sources = [file_source(ann_file)]
    data = _read_json(ann_file)
    validate_coco_json(ann_file, data)
    cat_ids = sorted(int(c["id"]) for c in data["categories"])
    cat_names = [[int(c["id"]), c.get("name", str(c["id"]))] for c in data["categories"]]
    cat_set = set(cat_ids)
    img_by_id = {int(im["id"]): im for im in data["images"]}
    anns: dict[int, list] = {i: [] for i in img_by_id}
    for a in data["annotations"]:
        iid = int(a.get("image_id", -1))
        if iid not in anns:
            raise UserError(f"{ann_file}: annotation {a.get('id')} refers to unknown image_id {iid}")
        if int(a.get("category_id", -1)) not in cat_set:
            raise UserError(f"{ann_file}: annotation {a.get('id')} has unknown category_id {a.get('category_id')}")
        anns[iid].append(a)
    dropped = 0
    records = []
    for iid in sorted(img_by_id):
        kept = [a for a in anns[iid] if CocoInstances._valid(a)]
        dropped += len(anns[iid]) - len(kept)
        if train and filter_empty and not any(a.get("iscrowd", 0) == 0 for a in kept):
            continue
        records.append((img_by_id[iid], kept))
    del anns, img_by_id
    if not records:
        raise UserError(f"{ann_file}: no usable images"
                        + (" (no image has a non-crowd annotation)" if train and filter_empty else ""))
    if not image_dir.is_dir():
        raise UserError(f"{image_dir}: image folder not found")
    isfile, base = os.path.isfile, str(image_dir)
    missing = [im["file_name"] for im, _ in records if not isfile(os.path.join(base, im["file_name"]))]
    if missing:
        raise UserError(f"{image_dir / missing[0]}: image file not found "
                        f"({len(missing)} of {len(records)} images missing)")
    n = len(records)
    file_blob, file_off = pack_strings(im["file_name"] for im, _ in records)
    img_id = np.fromiter((int(im["id"]) for im, _ in records), dtype=np.int64, count=n)
    img_hw = np.array([[int(im["height"]), int(im["width"])] for im, _ in records], dtype=np.int32).reshape(n, 2)
    ann_off = np.zeros(n + 1, dtype=np.int64)
    ann_off[1:] = np.cumsum([len(k) for _, k in records])
    flat = [a for _, kept in records for a in kept]
    del records
    m = len(flat)
    ann_id = np.array([int(a["id"]) if _is_int(a["id"]) else -1 for a in flat], dtype=np.int64)
    ann_cat = np.array([int(a["category_id"]) for a in flat], dtype=np.int64)
    ann_crowd = np.array([1 if a.get("iscrowd", 0) else 0 for a in flat], dtype=np.int8)
    ann_bbox = np.array([a["bbox"] for a in flat], dtype=np.float64).reshape(m, 4)
    ann_area = np.array([a["area"] if _is_num(a.get("area")) else np.nan for a in flat], dtype=np.float64)
    ann_rle = np.full(m, -1, dtype=np.int64)
    poly_count, poly_len, coords = [], [], []
    rle_size, rle_strs, rle_is_list, rle_cnt_len, rle_cnt = [], [], [], [], []
    for k, a in enumerate(flat):
        seg = a["segmentation"]
        if isinstance(seg, list):
            poly_count.append(len(seg))
            for p in seg:
                poly_len.append(len(p))
                coords.extend(p)
            continue
        poly_count.append(0)
        size = seg.get("size") if isinstance(seg, dict) else None
        counts = seg.get("counts") if isinstance(seg, dict) else None
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)) or \
                not isinstance(counts, (str, list)) or \
                isinstance(counts, list) and not all(_is_int(v) and v >= 0 for v in counts):
            raise UserError(f"{ann_file}: annotation {a.get('id')}: segmentation is neither polygons nor an RLE "
                            f"{{'size': [h, w], 'counts': ...}}")
        ann_rle[k] = len(rle_size)
        rle_size.append(size)
        rle_is_list.append(isinstance(counts, list))
        rle_strs.append("" if isinstance(counts, list) else counts)
        rle_cnt_len.append(len(counts) if isinstance(counts, list) else 0)
        if isinstance(counts, list):
            rle_cnt.extend(counts)
    del flat
    try:
        poly_xy = np.array(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{ann_file}: a polygon holds a value that is not a number") from None
    del coords

    def offsets(lengths):
        out = np.zeros(len(lengths) + 1, dtype=np.int64)
        out[1:] = np.cumsum(np.asarray(lengths, dtype=np.int64))
        return out

    rle_blob, rle_off = pack_strings(rle_strs)
    arrays = {"img_id": img_id, "img_hw": img_hw, "file_blob": file_blob, "file_off": file_off,
              "ann_off": ann_off, "ann_id": ann_id, "ann_cat": ann_cat, "ann_crowd": ann_crowd,
              "ann_bbox": ann_bbox, "ann_area": ann_area, "ann_rle": ann_rle, "ann_poly_off": offsets(poly_count),
              "poly_off": offsets(poly_len), "poly_xy": poly_xy,
              "rle_size": np.asarray(rle_size, dtype=np.int64).reshape(-1, 2),
              "rle_is_list": np.asarray(rle_is_list, dtype=np.int8), "rle_blob": rle_blob, "rle_off": rle_off,
              "rle_cnt_off": offsets(rle_cnt_len), "rle_cnt": np.asarray(rle_cnt, dtype=np.int64)}
    meta = {"cat_ids": cat_ids, "cat_names": cat_names, "num_dropped_annotations": dropped}
    return arrays, meta, sources


def _validate_coco_index(idx) -> None:
    """Structural invariants of a COCO index (every offset array inside what it indexes)."""
    n, m = len(idx["img_id"]), len(idx["ann_id"])
    r = len(idx["rle_size"])
    check_offsets("file_off", idx["file_off"], len(idx["file_blob"]))
    check_offsets("ann_off", idx["ann_off"], m)
    check_offsets("ann_poly_off", idx["ann_poly_off"], len(idx["poly_off"]) - 1)
    check_offsets("poly_off", idx["poly_off"], len(idx["poly_xy"]))
    check_offsets("rle_off", idx["rle_off"], len(idx["rle_blob"]))
    check_offsets("rle_cnt_off", idx["rle_cnt_off"], len(idx["rle_cnt"]))
    if idx["img_hw"].shape != (n, 2) or len(idx["file_off"]) != n + 1 or idx["ann_bbox"].shape != (m, 4):
        raise ValueError("image / annotation arrays differ in length")
    for name in ("ann_cat", "ann_crowd", "ann_rle", "ann_area"):
        if idx[name].shape != (m,):
            raise ValueError(f"{name}: wrong length")
    if len(idx["ann_poly_off"]) != m + 1 or len(idx["rle_off"]) != r + 1 or len(idx["rle_cnt_off"]) != r + 1 \
            or idx["rle_is_list"].shape != (r,):
        raise ValueError("offset arrays differ in length")
    if m and (int(idx["ann_rle"].max()) >= r or int(idx["ann_rle"].min()) < -1):
        raise ValueError("ann_rle outside the RLE table")
    if not set(np.unique(idx["ann_cat"]).tolist()) <= set(int(c) for c in idx.meta["cat_ids"]):
        raise ValueError("ann_cat outside the categories")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    """A finite JSON number (bool excluded; an int too large for float64 is not)."""
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, int) and not isinstance(v, bool) and -_FLOAT_MAX <= v <= _FLOAT_MAX


_FLOAT_MAX = float(np.finfo(np.float64).max)


def validate_coco_json(path: Path, data: dict) -> None:
    """Check the fields of a COCO instances json that loading, training and COCOeval rely on.

    ``images``, ``annotations`` and ``categories`` must be lists; every image needs an integer ``id``
    (unique), a string ``file_name`` and positive integer ``height`` / ``width``; every category an
    integer ``id``; every annotation an ``id``, integer ``image_id`` / ``category_id`` and a ``bbox``
    of four finite numbers ``[x, y, width, height]`` with width, height >= 0 (the COCO format,
    cocodataset.org/#format-data; pycocotools and detectron2 ``load_coco_json`` assume it).

    Raises:
        UserError: one line naming the json file and the offending entry (list index and id).
    """
    for key in ("images", "annotations", "categories"):
        if key not in data or not isinstance(data[key], list):
            raise UserError(f"{path}: not a COCO instances file (no '{key}' list)")
    seen: set = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise UserError(f"{path}: images[{i}] is not an object")
        where = f"{path}: images[{i}] (id {im.get('id')})"
        if not _is_int(im.get("id")):
            raise UserError(f"{where}: needs an integer 'id'")
        if im["id"] in seen:
            raise UserError(f"{where}: duplicate image id")
        seen.add(im["id"])
        if not isinstance(im.get("file_name"), str):
            raise UserError(f"{where}: needs a string 'file_name'")
        for k in ("height", "width"):
            if not _is_int(im.get(k)) or im[k] <= 0:
                raise UserError(f"{where}: needs a positive integer '{k}', got {im.get(k)!r}")
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise UserError(f"{path}: categories[{i}]: needs an integer 'id'")
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise UserError(f"{path}: annotations[{i}] is not an object")
        where = f"{path}: annotations[{i}] (id {a.get('id')})"
        if "id" not in a:
            raise UserError(f"{path}: annotations[{i}]: needs an 'id'")
        for k in ("image_id", "category_id"):
            if not _is_int(a.get(k)):
                raise UserError(f"{where}: needs an integer '{k}', got {a.get(k)!r}")
        box = a.get("bbox")
        if box is None:
            raise UserError(f"{where}: needs a 'bbox' [x, y, width, height]")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_num(v) for v in box):
            raise UserError(f"{where}: bbox {box!r} is not four numbers [x, y, width, height]")
        if box[2] < 0 or box[3] < 0:
            raise UserError(f"{where}: bbox {box!r} has a negative width or height")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc.__class__.__name__}: {str(exc).splitlines()[0]})")
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a COCO instances file (top level is not an object)")
    return data


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------
def _pil_resize(arr: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    """PIL resize of a uint8 (H, W[, C]) array to ``hw`` (detectron2 ``ResizeTransform.apply_image``:
    PIL bilinear for images, PIL nearest for segmentation bitmasks)."""
    return np.asarray(Image.fromarray(arr).resize((hw[1], hw[0]), resample))


class LSJ(torch.nn.Module):
    """Large-scale jitter of ViTDet (``coco_loader_lsj.py``) with detectron2's geometry:
    RandomFlip (horizontal, p=0.5) -> ResizeScale(scale U(0.1, 2.0) of 1024², keep aspect) ->
    FixedSizeCrop(1024, pad=False) -> boxes recomputed from the transformed polygons
    (``recompute_boxes``) -> drop empty instances (``filter_empty_instances``).

    - ResizeScale: ``s = U(lo, hi)``, ``scale = min(S*s/H, S*s/W)``, output ``round(H*scale)`` ×
      ``round(W*scale)``; the image is resized by PIL bilinear (as detectron2, pixel-exact).
    - FixedSizeCrop: offset ``round(U(0, 1) * max(size - S, 0))`` per axis; the crop window is always
      S × S (smaller images are not padded), and polygons are intersected with it.
    - Polygons are transformed exactly (fvcore ``HFlipTransform`` ``x -> W - x``,
      ``ResizeTransform`` ``x * W'/W``, ``CropTransform`` shapely intersection, see
      :func:`transfer.vitdet.masks.crop_polygons`); a polygon instance's box is the min / max of its
      transformed vertices and its ``masks`` plane is the polygons rasterised at the output size.
      RLE instances (no polygons) have their bitmask flipped, PIL-nearest resized and cropped, and
      their box is the tight box of that mask (``BitMasks.get_bounding_boxes``).
    - An instance is dropped when its box side is <= 1e-5 or it has no polygon left (polygon
      instances) / no mask pixel (RLE instances).

    Random draws, in this order from torch's RNG: flip ``rand() < flip_prob``, ``s``, crop ``U``;
    :meth:`draw` returns them and :meth:`apply` applies given draws (for parity tests).
    Call: ``(image uint8 (3,H,W), target) -> (image uint8 (3,H',W'), target)``; target keys
    ``boxes`` (G, 4), ``labels`` (G,), ``masks`` (G, H', W') uint8 and the packed polygons.
    """

    def __init__(self, size: int = 1024, scale_range=(0.1, 2.0), flip_prob: float = 0.5):
        super().__init__()
        self.size = size
        self.scale_range = tuple(scale_range)
        self.flip_prob = flip_prob

    def draw(self) -> tuple[bool, float, float]:
        """``(flip, s, u)`` from torch's global RNG."""
        flip = torch.rand(1).item() < self.flip_prob
        lo, hi = self.scale_range
        s = lo + torch.rand(1).item() * (hi - lo)
        u = torch.rand(1, dtype=torch.float64).item()
        return flip, s, u

    def forward(self, image, target):
        return self.apply(image, target, *self.draw())

    def apply(self, image: torch.Tensor, target: dict, flip: bool, s: float, u: float):
        """Apply the LSJ with the given draws (flip, scale factor ``s``, crop uniform ``u``)."""
        h, w = image.shape[-2:]
        g = target["labels"].shape[0]
        img = image.permute(1, 2, 0).numpy()
        polys = unpack_polygons(target, g)
        is_poly = [len(p) > 0 for p in polys]
        bits = [target["masks"][i].numpy() if not is_poly[i] else None for i in range(g)]
        # flip
        if flip:
            img = img[:, ::-1]
            polys = [[np.stack([w - p[:, 0], p[:, 1]], 1) for p in ps] for ps in polys]
            bits = [None if b is None else b[:, ::-1] for b in bits]
        # resize
        scale = min(self.size * s / h, self.size * s / w)
        nh, nw = int(np.round(h * scale)), int(np.round(w * scale))
        img = _pil_resize(np.ascontiguousarray(img), (nh, nw), Image.BILINEAR)
        polys = [[p * np.array([nw * 1.0 / w, nh * 1.0 / h]) for p in ps] for ps in polys]
        bits = [None if b is None else _pil_resize(np.ascontiguousarray(b), (nh, nw), Image.NEAREST) for b in bits]
        # crop (window always size × size, detectron2 FixedSizeCrop(pad=False))
        off = np.round(np.maximum(np.array([nh, nw]) - self.size, 0) * u).astype(int)
        y0, x0 = int(off[0]), int(off[1])
        img = img[y0:y0 + self.size, x0:x0 + self.size]
        ch, cw = img.shape[:2]
        polys = [crop_polygons(ps, x0, y0, self.size, self.size) if is_poly[i] else [] for i, ps in enumerate(polys)]
        bits = [None if b is None else b[y0:y0 + self.size, x0:x0 + self.size] for b in bits]
        # boxes and masks from the exact geometry, then filter_empty_instances
        boxes = polygon_boxes(polys)
        masks = np.zeros((g, ch, cw), dtype=np.uint8)
        nonempty = torch.zeros(g, dtype=torch.bool)
        for i in range(g):
            if is_poly[i]:
                masks[i] = rasterize_polygons(polys[i], ch, cw)
                nonempty[i] = len(polys[i]) > 0
            else:
                masks[i] = bits[i]
                nonempty[i] = bool(bits[i].any())
        if g and not all(is_poly):
            rle = torch.tensor([not p for p in is_poly])
            boxes[rle] = boxes_from_masks(torch.from_numpy(masks[rle.numpy()]))
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5) & nonempty
        kept = keep.nonzero()[:, 0].tolist()
        out = {"boxes": boxes[keep], "labels": target["labels"][keep], "masks": torch.from_numpy(masks[keep.numpy()]),
               **pack_polygons([polys[i] for i in kept])}
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(), out


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes of binary masks (G, H, W) -> (G, 4) float, x2/y2 exclusive (detectron2
    ``BitMasks.get_bounding_boxes``); an empty mask gives a zero box."""
    g = masks.shape[0]
    boxes = torch.zeros((g, 4), dtype=torch.float32)
    if g == 0:
        return boxes
    m = masks.bool()
    rows, cols = m.any(2), m.any(1)
    for i in range(g):
        ys, xs = torch.where(rows[i])[0], torch.where(cols[i])[0]
        if ys.numel() and xs.numel():
            boxes[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


class ResizeShortestEdge(torch.nn.Module):
    """detectron2 ``ResizeShortestEdge(short, max_size)`` at test time: ``scale = short/min(H,W)``,
    reduced so that ``max(H,W)*scale <= max_size``; output ``int(H*scale + 0.5)`` × ``int(W*scale + 0.5)``,
    PIL bilinear (detectron2 ``ResizeTransform``). Only the image is resized (predictions are mapped
    back to the original size by the detector)."""

    def __init__(self, short: int = 1024, max_size: int = 1024):
        super().__init__()
        self.short, self.max_size = short, max_size

    def forward(self, image, target):
        h, w = image.shape[-2:]
        scale = self.short / min(h, w)
        if max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        img = _pil_resize(image.permute(1, 2, 0).contiguous().numpy(), (nh, nw), Image.BILINEAR)
        return torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous(), target


def collate(batch: list[dict]) -> list[dict]:
    """Identity collate (variable-size images and instance counts)."""
    return batch


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------
class TrainingStream(Sampler):
    """Infinite, resumable shuffled stream (detectron2 ``TrainingSampler`` semantics: a fresh
    permutation per pass seeded by ``seed``; rank r of w takes every w-th sample).

    Each item is ``(index, sample_seed)``: the augmentation of global sample k is seeded by
    ``seed * 1_000_003 + k``, so a run resumed at iteration i sees exactly the images and
    augmentations of an uninterrupted run, whatever the number of workers.

    Args:
        n: dataset size; start: the first global sample (iteration × global batch).
    """

    def __init__(self, n: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        k = self.start + self.rank
        perm, perm_epoch = None, -1
        while True:
            epoch, j = divmod(k, self.n)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
            yield perm[j], self.seed * 1_000_003 + k
            k += self.world


def split_dataset_paths(data_root: Path, d: dict, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of ``split`` ("train" / "val") under ``data_root/<dataset>``."""
    base = Path(data_root) / d["dataset"]
    if not base.is_dir():
        raise UserError(f"{base}: COCO folder not found under the data root")
    return base / d[f"{split}_ann"], base / d[f"{split}_images"]


def build_dataset(data_root: Path, d: dict, split: str) -> CocoInstances:
    """Training (LSJ) or evaluation (shortest-edge resize) dataset from the ``data`` config section."""
    ann, img = split_dataset_paths(data_root, d, split)
    if split == "train":
        return CocoInstances(ann, img, train=True, filter_empty=d["filter_empty"],
                             transform=LSJ(d["image_size"], d["scale_range"], d["flip_prob"]))
    return CocoInstances(ann, img, train=False, filter_empty=False,
                         transform=ResizeShortestEdge(d["test_short_edge"], d["test_max_size"]))
