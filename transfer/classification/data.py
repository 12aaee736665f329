"""Classification datasets in their original on-disk layouts, and the reference transforms.

Layouts (each read as released, never converted):

* ImageFolder (ImageNet): ``<root>/<split>/<class>/<image>``; classes are the sorted folder names of
  ``train/`` (torchvision ``ImageFolder`` order), ``val/`` must use a subset of them.
* iNaturalist 2019: ``<root>/train2019.json`` / ``val2019.json`` (COCO-style ``images``,
  ``annotations``, ``categories`` with the taxonomy), ``file_name`` relative to ``<root>``. Category ids
  need not be contiguous: class index = rank of the id in the sorted list of category ids.
* Places365-Standard: ``<root>/categories_places365.txt`` (``/a/airfield 0``), train list
  ``places365_train_standard.txt`` (``/a/airfield/00000001.jpg 0``, images under ``data_256/``), val list
  ``places365_val.txt`` (``Places365_val_00000001.jpg 165``, images under ``val_256/``). Class index =
  the official id (0..364).

Every malformed input raises :class:`crossmae.utils.UserError` with one line naming the file and the
line (text lists) or the JSON entry (``annotations[12]``) and the problem.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from crossmae.data import load_rgb
from crossmae.index import (PathLabels, file_source, imagefolder_index, load_or_build, pack_paths, path_label_arrays,
                            validate_path_labels)
from crossmae.utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DATASET_TYPES = ("imagefolder", "inat2019", "places365")


@dataclass
class ClassificationData:
    """A parsed split: ``samples`` — a sequence of ``(image path, class index)`` (the loaders give a
    :class:`crossmae.index.PathLabels` over the cached, memory-mapped index; a plain list works
    too), ``classes`` (names, index order), ``source`` (the file or folder the split was read from,
    for messages and cache keys), ``index_fingerprint`` (the dataset index's, or ``None``)."""
    samples: Sequence[tuple[str, int]]
    classes: list[str]
    source: str
    extra: dict = field(default_factory=dict)
    index_fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """SHA-256 over (path, label) pairs and the class list: changes when the split changes."""
        import hashlib
        h = hashlib.sha256()
        for name in self.classes:
            h.update(name.encode() + b"\0")
        for p, y in self.samples:
            h.update(f"{p}\t{y}\n".encode())
        return h.hexdigest()


class ImageDataset(Dataset):
    """``(image, label)`` pairs from a :class:`ClassificationData`; images decoded with PIL as RGB.

    Returns ``(transform(img), int)``; the tensor is (3, H, W) float after the usual ToTensor/Normalize.

    Raises:
        UserError: an image vanished or cannot be decoded (names the file).
    """

    def __init__(self, data: ClassificationData, transform: Callable | None = None):
        self.data = data
        self.samples = data.samples
        self.classes = data.classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        if not os.path.isfile(path):
            raise UserError(f"{path}: image listed in {self.data.source} is missing")
        img = load_rgb(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, label


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    return path


# --------------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------------
def load_imagefolder(root: str | os.PathLike, split: str, classes: Sequence[str] | None = None) -> ClassificationData:
    """Read ``<root>/<split>/<class>/*`` (torchvision ``ImageFolder`` semantics, sorted class names).

    Args:
        root: dataset folder holding ``train/`` and ``val/``.
        split: sub-folder name (``train`` / ``val``).
        classes: the class list to use (the train split's); ``None`` reads it from this split.

    Raises:
        UserError: the split folder is missing or has no class folders, a class folder of ``val`` is
            not a train class, or a class folder holds no image.
    """
    d = Path(root) / split
    if not d.is_dir():
        raise UserError(f"{d}: ImageFolder split folder not found")

    def error(kind: str, detail: str) -> UserError:
        if kind == "no_classes":
            return UserError(f"{detail}: no class folders")
        if kind == "unknown_class":
            return UserError(f"{detail}: class folder not among the {len(classes)} train classes")
        return UserError(f"{detail}: class folder holds no image")

    idx, names = imagefolder_index(d, classes, IMG_EXTENSIONS, recursive=False, errors=error)
    return ClassificationData(PathLabels(idx, str(d) + "/"), names, str(d), index_fingerprint=idx.fingerprint)


# --------------------------------------------------------------------------------------------------
# iNaturalist 2019
# --------------------------------------------------------------------------------------------------
INAT_FILES = {"train": "train2019.json", "val": "val2019.json"}


def _read_json(path: Path) -> dict:
    _require_file(path, "annotation file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})")


def inat_categories(root: str | os.PathLike, split: str = "train") -> tuple[list[int], list[dict]]:
    """The sorted category ids of an iNat 2019 json and the category entries in that order.

    Class index ``k`` ↔ ``ids[k]`` (ids may be non-contiguous). Raises UserError on a bad file.
    """
    path = Path(root) / INAT_FILES[split]
    d = _read_json(path)
    return _inat_cats(d, path)


def _inat_cats(d: dict, path: Path) -> tuple[list[int], list[dict]]:
    for key in ("images", "annotations", "categories"):
        if key not in d or not isinstance(d[key], list):
            raise UserError(f"{path}: missing list '{key}'")
    cats = {}
    for i, c in enumerate(d["categories"]):
        if not isinstance(c, dict) or "id" not in c:
            raise UserError(f"{path}: categories[{i}]: entry without 'id'")
        if c["id"] in cats:
            raise UserError(f"{path}: categories[{i}]: duplicate category id {c['id']}")
        cats[c["id"]] = c
    ids = sorted(cats)
    return ids, [cats[i] for i in ids]


def check_same_categories(path: str | os.PathLike, ids: Sequence, names: Sequence[str],
                          train_categories: Sequence[tuple]) -> None:
    """Refuse a val json whose categories are not the train json's, matched by id AND name (class
    index k must mean the same species in both splits; equal counts are not enough).

    Args:
        path: the val json. ids, names: its sorted category ids and their names.
        train_categories: ``(id, name)`` pairs of the train split, in class-index order.

    Raises:
        UserError: one line naming the json and the first differing category.
    """
    train = [(i, str(n)) for i, n in train_categories]
    val = [(i, str(n)) for i, n in zip(ids, names)]
    for k in range(max(len(train), len(val))):
        t = train[k] if k < len(train) else None
        v = val[k] if k < len(val) else None
        if t != v:
            show = lambda c: "none" if c is None else f"id {c[0]!r} {c[1]!r}"
            raise UserError(f"{path}: categories differ from the train split's at class {k}: val has {show(v)}, "
                            f"train has {show(t)}")


def load_inat2019(root: str | os.PathLike, split: str, check_files: bool = True,
                  train_categories: Sequence[tuple] | None = None) -> ClassificationData:
    """Read iNaturalist 2019 ``train2019.json`` / ``val2019.json`` (official layout).

    Class index = position of ``category_id`` in the sorted category ids of the same file (the
    official 2019 ids are 0..1009, contiguous, so this is the identity there). ``extra`` holds
    ``category_ids`` (index → id) and ``taxonomy`` (the category dicts).

    Raises:
        UserError: file missing / invalid JSON, an entry without required keys, an annotation whose
            ``category_id`` is not in ``categories`` or whose ``image_id`` is unknown, an image with no
            or several annotations, or an image file that does not exist (names ``images[i]``); with
            ``train_categories`` (the train split's ``(id, name)`` pairs), categories that differ from
            them (:func:`check_same_categories`).
    """
    root = Path(root)
    if split not in INAT_FILES:
        raise UserError(f"iNat split {split!r}: expected one of {sorted(INAT_FILES)}")
    path = _require_file(root / INAT_FILES[split], "annotation file")
    prefix = str(root) + "/"

    def build():
        sources = [file_source(path)]
        d = _read_json(path)
        ids, cats = _inat_cats(d, path)
        cat_index = {cid: k for k, cid in enumerate(ids)}
        images = {}
        for i, im in enumerate(d["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise UserError(f"{path}: images[{i}]: entry needs 'id' and 'file_name'")
            images[im["id"]] = (i, im["file_name"])
        labels: dict = {}
        for i, a in enumerate(d["annotations"]):
            if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
                raise UserError(f"{path}: annotations[{i}]: entry needs 'image_id' and 'category_id'")
            if a["category_id"] not in cat_index:
                raise UserError(f"{path}: annotations[{i}]: category_id {a['category_id']} is not in "
                                f"'categories' ({len(ids)} categories)")
            if a["image_id"] not in images:
                raise UserError(f"{path}: annotations[{i}]: image_id {a['image_id']} is not in 'images'")
            if a["image_id"] in labels:
                raise UserError(f"{path}: annotations[{i}]: image_id {a['image_id']} has a second annotation")
            labels[a["image_id"]] = cat_index[a["category_id"]]
        del d
        samples = []
        for image_id, (i, rel) in images.items():
            if image_id not in labels:
                raise UserError(f"{path}: images[{i}]: image id {image_id} has no annotation")
            p = str(root / rel)
            if check_files and not os.path.isfile(p):
                raise UserError(f"{path}: images[{i}]: image file {p} does not exist")
            samples.append((p, labels[image_id]))
        names = [str(c.get("name", c["id"])) for c in cats]
        arrays, meta = path_label_arrays(prefix, samples, {"classes": names, "num_classes": len(names),
                                                           "category_ids": ids, "taxonomy": cats})
        return arrays, meta, sources

    idx = load_or_build("inat2019", root, path, {"given": str(root), "split": split, "check_files": bool(check_files)},
                        build, validate_path_labels)
    ids, cats, names = idx.meta["category_ids"], idx.meta["taxonomy"], idx.meta["classes"]
    if train_categories is not None:
        check_same_categories(path, ids, [c.get("name", c["id"]) for c in cats], train_categories)
    return ClassificationData(PathLabels(idx, prefix), list(names), str(path), {"category_ids": ids, "taxonomy": cats},
                              index_fingerprint=idx.fingerprint)


# --------------------------------------------------------------------------------------------------
# Places365-Standard
# --------------------------------------------------------------------------------------------------
PLACES_FILES = {"train": ("places365_train_standard.txt", "data_256"), "val": ("places365_val.txt", "val_256")}
PLACES_CATEGORIES = "categories_places365.txt"


def _read_pairs(path: Path, what: str):
    """Yield ``(line number, first field, int second field)`` of a ``"<text> <int>"`` list file,
    skipping blank lines. Raises UserError naming the file and line of a malformed line."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"{path}: line {n}: expected '{what}', got {line.strip()!r}")
            yield n, parts[0], int(parts[1])


def places_categories(root: str | os.PathLike) -> list[str]:
    """Category names by official id from ``categories_places365.txt`` (``/a/airfield 0``).

    Raises:
        UserError: missing file, a malformed line, or ids that are not exactly 0..N-1 (names the line).
    """
    path = _require_file(Path(root) / PLACES_CATEGORIES, "Places365 category file")
    names: dict[int, str] = {}
    for n, name, cid in _read_pairs(path, "<name> <id>"):
        if cid in names:
            raise UserError(f"{path}: line {n}: duplicate category id {cid}")
        names[cid] = name
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{path}: category ids are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def load_places365(root: str | os.PathLike, split: str, check_files: bool = True) -> ClassificationData:
    """Read a Places365-Standard split from its official list file.

    Train lines ``/a/airfield/00000001.jpg 0`` → ``<root>/data_256/a/airfield/00000001.jpg``; val lines
    ``Places365_val_00000001.jpg 165`` → ``<root>/val_256/…``. The label is the official id, which is
    also the class index. For train, the image's folder must be the label's category (a check that
    the list and the category file agree).

    Raises:
        UserError: a missing list / category file, a malformed line, a label outside the category list,
            a train path whose folder disagrees with its label, or a listed image that does not exist
            (each names the list file and line).
    """
    root = Path(root)
    if split not in PLACES_FILES:
        raise UserError(f"Places365 split {split!r}: expected one of {sorted(PLACES_FILES)}")
    cat_path = _require_file(root / PLACES_CATEGORIES, "Places365 category file")
    list_name, img_dir = PLACES_FILES[split]
    path = _require_file(root / list_name, "Places365 list file")
    prefix = str(root / img_dir) + "/"

    def build():
        sources = [file_source(cat_path), file_source(path)]
        names = places_categories(root)
        folders = [n + "/" for n in names]
        isfile, k = os.path.isfile, len(names)
        paths, labels = [], []
        for n, rel, label in _read_pairs(path, "<image path> <label>"):
            if not 0 <= label < k:
                raise UserError(f"{path}: line {n}: label {label} is outside the {k} categories "
                                f"of {root / PLACES_CATEGORIES}")
            if split == "train" and not rel.startswith(folders[label]):
                raise UserError(f"{path}: line {n}: image {rel} is not in the folder of its label "
                                f"{label} ({names[label]})")
            r = rel.lstrip("/")
            p = prefix + r if _clean_rel(r) else str(root / img_dir / r)
            if check_files and not isfile(p):
                raise UserError(f"{path}: line {n}: image {p} does not exist")
            paths.append(p)
            labels.append(label)
        if not paths:
            raise UserError(f"{path}: list file is empty")
        blob, off, tails = pack_paths(prefix, paths)
        del paths
        arrays = {"path_blob": blob, "path_off": off, "labels": np.asarray(labels, dtype=np.int32)}
        return arrays, {"classes": names, "num_classes": k, "tails": tails}, sources

    idx = load_or_build("places365", root, path, {"given": str(root), "split": split, "check_files": bool(check_files)},
                        build, validate_path_labels)
    return ClassificationData(PathLabels(idx, prefix), list(idx.meta["classes"]), str(path),
                              index_fingerprint=idx.fingerprint)


def _clean_rel(r: str) -> bool:
    """``prefix + r`` is already ``str(Path(prefix) / r)`` (no empty, ``.`` or trailing component)."""
    return bool(r) and "//" not in r and not r.endswith("/") and "/./" not in r and not r.startswith("./") \
        and not r.endswith("/.") and r != "."


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------
def load_split(dataset_type: str, root: str | os.PathLike, split: str, *, num_classes: int | None = None,
               train_classes: Sequence[str] | None = None, check_files: bool = True,
               train_categories: Sequence[tuple] | None = None) -> ClassificationData:
    """Load ``split`` of a dataset of ``dataset_type`` (one of :data:`DATASET_TYPES`).

    Args:
        num_classes: the head's class count from the config (``None`` = take the dataset's).
        train_classes: for ImageFolder val, the train split's class list.
        train_categories: for iNat val, the train split's ``(category id, name)`` pairs.

    Raises:
        UserError: any problem of the layout, or ``num_classes`` disagreeing with the dataset's class
            list (names the category file / folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    if dataset_type == "imagefolder":
        data = load_imagefolder(root, split, train_classes)
        cat_src = str(root / "train")
    elif dataset_type == "inat2019":
        data = load_inat2019(root, split, check_files, train_categories)
        cat_src = data.source + " 'categories'"
    elif dataset_type == "places365":
        data = load_places365(root, split, check_files)
        cat_src = str(root / PLACES_CATEGORIES)
    else:
        raise UserError(f"data.type {dataset_type!r}: expected one of {DATASET_TYPES}")
    if num_classes is not None and num_classes != data.num_classes:
        raise UserError(f"{cat_src}: defines {data.num_classes} classes but the config's head has "
                        f"num_classes={num_classes}")
    return data


def load_train_val(data_cfg: dict, data_root: str | os.PathLike) -> tuple[ClassificationData, ClassificationData]:
    """Both splits of the dataset described by the config's ``data`` dict
    (``type``, ``root`` relative to the data root, ``num_classes``, ``train_split``, ``val_split``)."""
    root = Path(data_root) / data_cfg["root"]
    kw = dict(num_classes=data_cfg.get("num_classes"), check_files=data_cfg.get("check_files", True))
    train = load_split(data_cfg["type"], root, data_cfg.get("train_split", "train"), **kw)
    train_cats = list(zip(train.extra["category_ids"], train.classes)) if "category_ids" in train.extra else None
    val = load_split(data_cfg["type"], root, data_cfg.get("val_split", "val"), train_classes=train.classes,
                     train_categories=train_cats, **kw)
    if val.num_classes != train.num_classes:
        raise UserError(f"{val.source}: {val.num_classes} classes, train split has {train.num_classes}")
    return train, val


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------
def eval_transform(input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """MAE ``build_transform(is_train=False)``: Resize(size/crop_pct, bicubic) + CenterCrop(size),
    crop_pct = 224/256 for input ≤ 224 else 1.0. Output (3, size, size) float, normalised."""
    from torchvision import transforms as T
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    size = int(input_size / crop_pct)
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(input_size),
                      T.ToTensor(), T.Normalize(mean, std)])


def finetune_train_transform(cfg: dict):
    """MAE ``build_transform(is_train=True)`` via ``timm.data.create_transform``: RandomResizedCrop
    (bicubic), flip, RandAugment (``auto_augment``), optional colour jitter, normalise, RandomErasing
    (``reprob``, ``remode``, ``recount``). Output (3, size, size)."""
    from timm.data import create_transform
    return _posterize_compat(create_transform(input_size=cfg["input_size"], is_training=True, color_jitter=cfg.get("color_jitter"),
                            auto_augment=cfg.get("auto_augment"), interpolation="bicubic",
                            re_prob=cfg.get("reprob", 0.0), re_mode=cfg.get("remode", "pixel"),
                            re_count=cfg.get("recount", 1), mean=IMAGENET_MEAN, std=IMAGENET_STD))


def _posterize(img, bits_to_keep, **__):
    """timm ``posterize`` with the pre-Pillow-13 meaning of ``bits_to_keep = 0`` (all bits cleared:
    a black image). Pillow 13 refuses 0 bits, which timm's ``PosterizeIncreasing`` at magnitude ≥ 7.5
    produces (m9 with mstd 0.5 does); MAE's timm 0.3.2 + old Pillow gave black. Local to our transform."""
    if bits_to_keep >= 8:
        return img
    mask = ~(2 ** (8 - max(int(bits_to_keep), 0)) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _posterize_compat(transform):
    """Swap timm's posterize op for :func:`_posterize` inside the RandAugment of ``transform``."""
    from timm.data import auto_augment as aa
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is aa.posterize:
                op.aug_fn = _posterize
    return transform


class ClampedRandomResizedCrop(torch.nn.Module):
    """RandomResizedCrop with ONE draw whose width and height are clamped to the image: the crop of
    MAE's linear probe (facebookresearch/mae ``util/crop.py``, after BYOL's TF/TPU crop).

    torchvision's ``RandomResizedCrop`` retries up to 10 draws until the box fits and then falls back
    to a centre crop; this one draws once: area fraction ``s ~ U(scale)``, log aspect ratio
    ``~ U(log ratio)``, ``w = round(sqrt(s·H·W·r))``, ``h = round(sqrt(s·H·W/r))``, then
    ``w = min(w, W)``, ``h = min(h, H)``, top ``~ randint(0, H-h)``, left ``~ randint(0, W-w)``. The
    random numbers are drawn from torch's global generator in torchvision's order, so a seeded crop
    equals the official one on every image shape (``tests/test_cls_parity.py``).

    Input: a PIL image or a (…, H, W) tensor; output: the crop resized to ``size`` (bicubic by
    default, antialiased as torchvision's ``resized_crop``).
    """

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=None):
        from torchvision.transforms import InterpolationMode
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = InterpolationMode.BICUBIC if interpolation is None else interpolation

    @staticmethod
    def get_params(img, scale, ratio) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of one crop of ``img`` (module docstring); consumes two
        uniform draws and two ``randint`` draws of torch's global generator."""
        import math
        from torchvision.transforms import functional as F
        width, height = F.get_image_size(img)
        s = torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_lo, log_hi = torch.log(torch.tensor(ratio))
        r = torch.exp(torch.empty(1).uniform_(log_lo, log_hi)).item()
        area = s * (height * width)
        w = min(int(round(math.sqrt(area * r))), width)
        h = min(int(round(math.sqrt(area / r))), height)
        top = int(torch.randint(0, height - h + 1, size=(1,)).item())
        left = int(torch.randint(0, width - w + 1, size=(1,)).item())
        return top, left, h, w

    def forward(self, img):
        from torchvision.transforms import functional as F
        top, left, h, w = self.get_params(img, self.scale, self.ratio)
        return F.resized_crop(img, top, left, h, w, list(self.size), self.interpolation, antialias=True)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation.value})")


def linprobe_train_transform(input_size: int):
    """MAE ``main_linprobe.py`` probe augmentation: :class:`ClampedRandomResizedCrop` (MAE
    ``util/crop.py``: one draw, clamped; scale 0.08–1, bicubic) + RandomHorizontalFlip, then
    ToTensor + ImageNet Normalize. Output (3, size, size) float."""
    from torchvision import transforms as T
    return T.Compose([ClampedRandomResizedCrop(input_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def describe_transform(t) -> str:
    """A stable text description of a torchvision transform (used in cache keys)."""
    return " ".join(repr(t).split())


class ShardSampler(torch.utils.data.Sampler):
    """Deterministic evaluation shard: indices ``rank::world`` (no padding, so every sample is
    counted once when counts are summed over ranks)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)
