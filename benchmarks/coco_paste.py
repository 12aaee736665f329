"""The "perfect masks" experiment: how much segm AP a mask paste loses on its own.

Every non-crowd ground-truth instance of the bundled COCO val images becomes a detection with score
1, its own box (the annotation ``bbox``) and, as mask prediction, its ground truth resampled into
that box at 28×28. ``--resample soft`` (default, the experiment of issue 10): the full-image bitmask
averaged into the box by ``roi_align(aligned=True)`` (probabilities in [0, 1]); ``target``: the
recipe's binary mask targets (``transfer.vitdet.masks.mask_targets``: polygons rasterised inside
the box). The 28×28 maps are pasted back into the image by each paste and scored by COCOeval segm:
a lossless paste of a lossless map would give AP 100.

Pastes: ``ours`` (``transfer.vitdet.masks.paste_masks``, detectron2's bilinear float-box paste),
``torchvision`` (``paste_masks_in_image``: integer box, 1-px padding, the paste used before) and
``detectron2`` (its own ``detectron2/layers/mask_ops.py``, loaded from ``$DETECTRON2_SRC`` when set).

    python -m benchmarks.coco_paste [--data-root ../shared/data] [--split val] [--resample soft|target]
                                    [--out output/benchmarks]

Prints a table and writes ``coco_paste_<split>_<resample>.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import torch

from crossmae.utils import check_writable, cli_entry


def detectron2_paste():
    """detectron2's ``paste_masks_in_image`` loaded from ``$DETECTRON2_SRC`` (its mask_ops.py needs
    only torch / numpy / PIL), or None when the variable is unset or the file is missing."""
    src = os.environ.get("DETECTRON2_SRC")
    path = Path(src) / "detectron2" / "layers" / "mask_ops.py" if src else None
    if path is None or not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_d2_mask_ops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return lambda probs, boxes, hw: mod.paste_masks_in_image(probs, boxes, hw, threshold=0.5).bool()


def ours_paste(probs, boxes, hw):
    from transfer.vitdet.masks import paste_masks
    return paste_masks(probs, boxes, hw, threshold=0.5)


def torchvision_paste(probs, boxes, hw):
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    return paste_masks_in_image(probs[:, None], boxes, hw)[:, 0] >= 0.5


def perfect_inputs(data_root: Path, split: str = "val", resample: str = "soft", size: int = 28):
    """``(ann_file, items)``; items per image ``(image_id, (H, W), boxes (n, 4) XYXY, maps (n, 28, 28),
    category ids)`` of every non-crowd ground-truth instance (crowd regions stay "ignore" regions
    for COCOeval). ``resample``: "soft" (roi_align average of the bitmask) or "target" (the recipe's
    binary mask targets)."""
    from torchvision.ops import roi_align

    from transfer.vitdet.data import CocoInstances
    from transfer.vitdet.masks import mask_targets

    coco = Path(data_root) / "coco"
    ds = CocoInstances(coco / f"annotations/instances_{split}2017.json", coco / f"{split}2017", train=True,
                       filter_empty=True)
    out = []
    for i in range(len(ds)):
        _, t = ds.load(i)
        if not len(t["labels"]):
            continue
        # the annotation box (XYWH float), not the mask's tight box
        anns = [a for a in ds.anns[i] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        if resample == "soft":
            rois = torch.cat([torch.arange(len(anns), dtype=torch.float32)[:, None], boxes], 1)
            maps = roi_align(t["masks"][:, None].float(), rois, (size, size), 1.0, 0, aligned=True)[:, 0]
        elif resample == "target":
            maps = mask_targets(t, torch.arange(len(anns)), boxes, size)
        else:
            raise ValueError(f"resample must be 'soft' or 'target', not {resample!r}")
        out.append((int(ds.images[i]["id"]), tuple(t["masks"].shape[-2:]), boxes, maps,
                    [int(a["category_id"]) for a in anns]))
    return ds.ann_file, out


def perfect_mask_ap(data_root: Path, paste, split: str = "val", inputs=None) -> dict:
    """COCOeval segm metrics (×100) of the perfect masks pasted by ``paste(probs, boxes, hw)``."""
    from pycocotools import mask as mask_util

    from transfer.vitdet.evaluate import coco_evaluate

    ann_file, items = inputs or perfect_inputs(data_root, split)
    results = []
    for image_id, hw, boxes, maps, cats in items:
        masks = paste(maps, boxes, hw).cpu().numpy().astype(np.uint8)
        for b, m, c in zip(boxes.tolist(), masks, cats):
            rle = mask_util.encode(np.asfortranarray(m[:, :, None]))[0]
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": image_id, "category_id": c, "score": 1.0,
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "segmentation": rle})
    metrics, _, _ = coco_evaluate(ann_file, results, iou_types=("segm",),
                                  img_ids=sorted({it[0] for it in items}))
    return {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("segm/")}


@cli_entry
def main(argv=None) -> dict:
    from crossmae.utils import atomic_write_json, resolve_data_root

    p = argparse.ArgumentParser(prog="python -m benchmarks.coco_paste", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--resample", default="soft", choices=["soft", "target"])
    p.add_argument("--out", default="output/benchmarks")
    args = p.parse_args(argv)
    check_writable(args.out, "--out", folder=True)  # before any work
    root = resolve_data_root(args.data_root)
    inputs = perfect_inputs(root, args.split, args.resample)
    pastes = {"ours": ours_paste, "torchvision": torchvision_paste}
    d2 = detectron2_paste()
    if d2 is not None:
        pastes["detectron2"] = d2
    rows = {}
    for name, fn in pastes.items():
        t0 = time.time()
        rows[name] = perfect_mask_ap(root, fn, args.split, inputs)
        rows[name]["time_s"] = round(time.time() - t0, 2)
    n = sum(len(it[4]) for it in inputs[1])
    print(f"perfect masks ({args.resample}), COCO {args.split} ({len(inputs[1])} images, {n} instances), segm ×100")
    print(f"{'paste':<12}" + "".join(f"{k:>8}" for k in ["AP", "AP50", "AP75", "APs", "APm", "APl"]))
    for name, r in rows.items():
        print(f"{name:<12}" + "".join(f"{r[k]:8.2f}" for k in ["AP", "AP50", "AP75", "APs", "APm", "APl"]))
    if d2 is None:
        print("(detectron2 paste not measured: set DETECTRON2_SRC to a detectron2 source checkout)")
    result = {"split": args.split, "resample": args.resample, "images": len(inputs[1]), "instances": n, "segm": rows}
    path = Path(args.out) / f"coco_paste_{args.split}_{args.resample}.json"
    atomic_write_json(result, path)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
