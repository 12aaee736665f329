"""ADEChallengeData2016-layout semantic segmentation data (mmsegmentation 1.2.2 ADE20K pipeline).

Layout (``mmseg/datasets/ade.py``, ``configs/_base_/datasets/ade20k.py``)::

    <root>/images/{training,validation}/<stem>.jpg
    <root>/annotations/{training,validation}/<stem>.png     uint8, 0 = other (ignored), 1..K = classes
    <root>/objectInfo<K>.txt                                 optional class names (last column)

Pipelines (protocol elements and their mmseg source):

* ``LoadImageFromFile`` (BGR uint8; mmcv decodes with cv2, here strictly with :func:`read_bgr`) and
  ``LoadAnnotations(reduce_zero_label=True)`` (``mmseg/datasets/transforms/loading.py``): label 0 → 255,
  others −1 (:func:`reduce_zero_label`);
* train: ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)`` (mmcv),
  ``RandomCrop(512, cat_max_ratio=0.75)``, ``RandomFlip(0.5)``, ``PhotoMetricDistortion``
  (``mmseg/datasets/transforms/transforms.py``), then ``SegDataPreProcessor`` (BGR→RGB,
  normalise mean (123.675, 116.28, 103.53) std (58.395, 57.12, 57.375), pad bottom/right to the crop
  with 0 for the image and 255 for the label);
* test: ``Resize(scale=(2048, 512), keep_ratio=True)`` of the image only; the label stays at the
  original size (predictions are resized back to it).

Each training sample draws its augmentation from its own ``numpy.random.Generator`` seeded by
(run seed, global sample position), so a resumed run sees exactly the samples and augmentations
of an uninterrupted one (mmseg draws from the global NumPy RNG instead; same distributions).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from crossmae.data import load_rgb
from crossmae.index import StringTable, check_offsets, dir_source, load_or_build, pack_paths
from crossmae.utils import UserError

IGNORE_INDEX = 255
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
IMG_EXTS = (".jpg", ".jpeg", ".png")


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg ``LoadAnnotations(reduce_zero_label=True)``: 0 → 255, v → v−1, (255 stays 255).

    ``label``: ``(H, W)`` uint8. Returns a new uint8 array.
    """
    out = label.astype(np.int16)
    out[out == 0] = 256
    out = out - 1
    out[out == 254] = IGNORE_INDEX  # 255 − 1: labels that were already "ignore" stay ignored
    out[out == 255] = IGNORE_INDEX
    return out.astype(np.uint8)


def read_class_names(root: Path, num_classes: int) -> list[str]:
    """Class names from ``objectInfo<K>.txt`` (tab separated, name in the last column, first line a
    header), or ``class_<i>`` when there is no such file.

    Raises:
        UserError: the file lists a number of classes different from ``num_classes``.
    """
    files = sorted(root.glob("objectInfo*.txt"))
    if not files:
        return [f"class_{i}" for i in range(num_classes)]
    f = files[0]
    lines = [ln for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    names = [ln.split("\t")[-1].strip() for ln in lines[1:]]
    if len(names) != num_classes:
        raise UserError(f"{f}: lists {len(names)} classes but the config says num_classes={num_classes}")
    return names


@dataclass
class Sample:
    image: Path
    annotation: Path
    size: tuple[int, int]  # (H, W)


def scan_split(root: Path, split: str, check_sizes: bool = True) -> "SampleTable":
    """Pair ``images/<split>/*`` with ``annotations/<split>/*.png`` by file stem, sorted by stem, with
    each pair's size ``(H, W)`` read from the file headers (``(0, 0)`` without ``check_sizes``).

    The pairs are kept in the cached dataset index (:mod:`crossmae.index`; rebuilt when either
    folder's listing changes) and returned as a :class:`SampleTable` of :class:`Sample`.

    Raises:
        UserError: a folder is missing or empty, an image has no annotation or vice versa, or an
            image and its annotation differ in size (read from the file headers).
    """
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise UserError(f"{d}: folder not found (expected the ADEChallengeData2016 layout)")

    def build():
        sources = [dir_source(img_dir), dir_source(ann_dir)]
        samples = _scan_split(root, split, check_sizes)
        img_blob, img_off, img_tails = pack_paths(str(img_dir) + "/", [str(x.image) for x in samples])
        ann_blob, ann_off, ann_tails = pack_paths(str(ann_dir) + "/", [str(x.annotation) for x in samples])
        arrays = {"img_blob": img_blob, "img_off": img_off, "ann_blob": ann_blob, "ann_off": ann_off,
                  "size": np.array([x.size for x in samples], dtype=np.int64).reshape(len(samples), 2)}
        return arrays, {"img_tails": img_tails, "ann_tails": ann_tails}, sources

    idx = load_or_build("ade20k", root, img_dir, {"given": str(root), "split": split, "check_sizes": bool(check_sizes)},
                        build, _validate_ade_index)
    return SampleTable(idx, str(img_dir) + "/", str(ann_dir) + "/")


class SampleTable(Sequence):
    """The pairs of an ADE20K split as a read-only sequence of :class:`Sample` (built per access from
    the memory-mapped index: image / annotation path blobs and sizes int64 (N, 2))."""

    def __init__(self, index, img_prefix: str, ann_prefix: str):
        self.index = index
        self.images = StringTable.of(index, "img_blob", "img_off", img_prefix if index.meta["img_tails"] else "")
        self.annotations = StringTable.of(index, "ann_blob", "ann_off", ann_prefix if index.meta["ann_tails"] else "")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        h, w = (int(v) for v in self.index["size"][i])
        return Sample(Path(self.images[i]), Path(self.annotations[i]), (h, w))

    def __add__(self, other) -> list:
        return list(self) + list(other)


def _validate_ade_index(idx) -> None:
    check_offsets("img_off", idx["img_off"], len(idx["img_blob"]))
    check_offsets("ann_off", idx["ann_off"], len(idx["ann_blob"]))
    if not len(idx["img_off"]) == len(idx["ann_off"]) == len(idx["size"]) + 1 or idx["size"].ndim != 2:
        raise ValueError("image / annotation / size arrays differ in length")


def _scan_split(root: Path, split: str, check_sizes: bool = True) -> list[Sample]:
    """Pair ``images/<split>/*`` with ``annotations/<split>/*.png`` by file stem (the build step of
    :func:`scan_split`'s cached index).

    Raises:
        UserError: a folder is missing or empty, an image has no annotation or vice versa, or an
            image and its annotation differ in size (read from the file headers).
    """
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise UserError(f"{d}: folder not found (expected the ADEChallengeData2016 layout)")
    imgs = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMG_EXTS}
    anns = {p.stem: p for p in sorted(ann_dir.iterdir()) if p.suffix.lower() == ".png"}
    if not imgs:
        raise UserError(f"{img_dir}: no images")
    only_img = sorted(set(imgs) - set(anns))
    only_ann = sorted(set(anns) - set(imgs))
    if only_img or only_ann:
        first = imgs[only_img[0]] if only_img else anns[only_ann[0]]
        raise UserError(f"{first}: has no matching {'annotation' if only_img else 'image'} "
                        f"({len(imgs)} images vs {len(anns)} annotations in {split})")
    out = []
    for stem in sorted(imgs):
        size = (0, 0)
        if check_sizes:
            try:
                with Image.open(imgs[stem]) as im:
                    iw, ih = im.size
            except OSError as exc:
                raise UserError(f"{imgs[stem]}: cannot decode image ({exc})") from None
            try:
                with Image.open(anns[stem]) as an:
                    aw, ah = an.size
            except OSError as exc:
                raise UserError(f"{anns[stem]}: cannot read annotation ({exc})") from None
            if (iw, ih) != (aw, ah):
                raise UserError(f"{anns[stem]}: annotation size {aw}x{ah} differs from image size {iw}x{ih}")
            size = (ih, iw)
        out.append(Sample(imgs[stem], anns[stem], size))
    return out


def read_bgr(path: str | Path) -> np.ndarray:
    """Decode an image strictly with the suite's decoder (:func:`crossmae.data.load_rgb`: PIL, a
    truncated or corrupt file is an error, never a grey-filled image as ``cv2.imread`` gives) and
    return it as mmcv's ``LoadImageFromFile`` does: BGR uint8 ``(H, W, 3)``, C-contiguous. On the
    bundled ADE20K-layout images the pixels equal ``cv2.imread(path, cv2.IMREAD_COLOR)``'s.

    Raises:
        UserError: the file cannot be read or fully decoded (names the file).
    """
    return np.ascontiguousarray(np.asarray(load_rgb(str(path)))[:, :, ::-1])


def load_pair(s: Sample, num_classes: int, do_reduce_zero_label: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read one pair: BGR uint8 image ``(H, W, 3)`` and label ``(H, W)`` uint8 (reduced).

    Raises:
        UserError: unreadable file, size mismatch, a non-single-channel annotation, or a label
            value ≥ ``num_classes`` that is not the ignore value 255.
    """
    img = read_bgr(s.image)
    try:
        with Image.open(s.annotation) as an:
            label = np.array(an)
    except OSError as exc:
        raise UserError(f"{s.annotation}: cannot read annotation ({exc})")
    if label.ndim != 2:
        raise UserError(f"{s.annotation}: annotation must be a single-channel class-index PNG, got shape "
                        f"{label.shape}")
    if label.shape != img.shape[:2]:
        raise UserError(f"{s.annotation}: annotation size {label.shape[1]}x{label.shape[0]} differs from "
                        f"image size {img.shape[1]}x{img.shape[0]}")
    label = label.astype(np.uint8) if label.dtype != np.uint8 else label
    if do_reduce_zero_label:
        label = reduce_zero_label(label)
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        v = int(label[bad].max()) + (1 if do_reduce_zero_label else 0)
        raise UserError(f"{s.annotation}: label value {v} is outside the {num_classes} classes "
                        f"(valid: {'1..' + str(num_classes) if do_reduce_zero_label else '0..' + str(num_classes - 1)}"
                        f", 0 = ignored{'' if do_reduce_zero_label else ', 255 = ignored'})")
    return img, label


# --------------------------------------------------------------------------------------------------
# transforms (numpy, BGR uint8 images as in mmcv)
# --------------------------------------------------------------------------------------------------
def rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` with ``keep_ratio``: factor = min(long/max(h,w), short/min(h,w)) of the
    target ``scale`` (e.g. (2048, 512)); size rounded with ``int(x·f + 0.5)``. Returns ``(H', W')``."""
    long_e, short_e = max(scale), min(scale)
    f = min(long_e / max(h, w), short_e / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_pair(img: np.ndarray, label: np.ndarray | None, scale: Sequence[int]):
    """Keep-ratio resize to ``scale``: bilinear image, nearest label (mmcv ``imrescale``)."""
    nh, nw = rescale_size(img.shape[0], img.shape[1], scale)
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
    return img, label


def random_crop(img, label, crop: tuple[int, int], cat_max_ratio: float, rng: np.random.Generator):
    """mmseg ``RandomCrop``: up to 10 draws until no class (ignore excluded) covers ≥ ``cat_max_ratio``
    of the crop and more than one class is present; crops are clipped to the image."""
    def bbox():
        mh, mw = max(img.shape[0] - crop[0], 0), max(img.shape[1] - crop[1], 0)
        y, x = int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
        return y, y + crop[0], x, x + crop[1]

    y1, y2, x1, x2 = bbox()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            labels, cnt = np.unique(label[y1:y2, x1:x2], return_counts=True)
            cnt = cnt[labels != IGNORE_INDEX]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
                break
            y1, y2, x1, x2 = bbox()
    return img[y1:y2, x1:x2], label[y1:y2, x1:x2]


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18):
    """mmseg ``PhotoMetricDistortion`` on a BGR uint8 image: each step with probability 0.5 —
    brightness ±32, contrast ×[0.5, 1.5] (before or after the colour steps, 50/50), saturation
    ×[0.5, 1.5] and hue ±18 (OpenCV HSV, hue mod 180); values clipped to [0, 255] after each step."""
    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(*saturation_range))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + int(rng.integers(-hue_delta, hue_delta))) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if mode == 0 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(*contrast_range))
    return img


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """BGR uint8 ``(H, W, 3)`` → normalised RGB float ``(3, H, W)`` (``SegDataPreProcessor``)."""
    rgb = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1])).permute(2, 0, 1).float()
    mean = torch.tensor(MEAN_RGB).view(3, 1, 1)
    std = torch.tensor(STD_RGB).view(3, 1, 1)
    return (rgb - mean) / std


def pad_to(x: torch.Tensor, size: tuple[int, int], value: float) -> torch.Tensor:
    """Pad the last two dims bottom/right to ``size`` with ``value`` (mmseg ``stack_batch``)."""
    ph, pw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if ph <= 0 and pw <= 0:
        return x
    return torch.nn.functional.pad(x, (0, max(pw, 0), 0, max(ph, 0)), value=value)


class SegTrainDataset(torch.utils.data.Dataset):
    """Training samples indexed by GLOBAL sample position ``p`` (0, 1, 2, … over the whole run).

    Position ``p`` maps to image ``perm_e[p mod N]`` with ``e = p // N`` and ``perm_e`` a permutation
    seeded by (seed, e) (an infinite shuffled sampler, like mmengine's ``InfiniteSampler``); its
    augmentation RNG is seeded by (seed, p). Returns ``(img (3, c, c) float, label (c, c) int64)``
    with the crop ``c`` padded (image 0, label 255).
    """

    def __init__(self, root: Path, split: str, num_classes: int, seed: int, crop_size=(512, 512),
                 scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True, reduce_zero_label: bool = True):
        self.samples = scan_split(Path(root), split)
        self.num_classes = num_classes
        self.seed = int(seed)
        self.crop_size = tuple(crop_size)
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.reduce_zero_label = reduce_zero_label
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:  # positions are unbounded; report the image count
        return len(self.samples)

    def index_of(self, position: int) -> int:
        n = len(self.samples)
        e = position // n
        perm = self._perms.get(e)
        if perm is None:
            perm = self._perms[e] = np.random.default_rng([self.seed, e, 0x5E6]).permutation(n)
        return int(perm[position % n])

    def __getitem__(self, position: int):
        s = self.samples[self.index_of(position)]
        img, label = load_pair(s, self.num_classes, self.reduce_zero_label)
        rng = np.random.default_rng([self.seed, int(position), 0xA06])
        ratio = rng.random() * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
        img, label = resize_pair(img, label, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        img, label = random_crop(img, label, self.crop_size, self.cat_max_ratio, rng)
        if rng.random() < self.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(np.ascontiguousarray(img), rng)
        x = pad_to(to_tensor(img), self.crop_size, 0.0)
        y = pad_to(torch.from_numpy(np.ascontiguousarray(label)).long(), self.crop_size, IGNORE_INDEX)
        return x, y


class SegTestDataset(torch.utils.data.Dataset):
    """Validation samples: image resized keep-ratio to ``scale`` (2048, 512); label at original size.

    Returns ``(img (3, H', W') float, label (H, W) int64, index)``; batch size 1 (sizes differ).
    """

    def __init__(self, root: Path, split: str, num_classes: int, scale=(2048, 512),
                 reduce_zero_label: bool = True):
        self.samples = scan_split(Path(root), split)
        self.num_classes = num_classes
        self.scale = tuple(scale)
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img, label = load_pair(self.samples[i], self.num_classes, self.reduce_zero_label)
        img, _ = resize_pair(img, None, self.scale)
        return to_tensor(img), torch.from_numpy(label).long(), i


class PositionBatchSampler(torch.utils.data.Sampler):
    """Yields, for iterations ``start_iter .. max_iters-1``, this rank's list of global sample
    positions ``[t·B·W + r·B + j for j < B]`` (B per-rank batch, W world size, r rank)."""

    def __init__(self, batch_size: int, start_iter: int, max_iters: int, rank: int = 0, world: int = 1):
        self.b, self.start, self.stop, self.rank, self.world = batch_size, start_iter, max_iters, rank, world

    def __iter__(self):
        for t in range(self.start, self.stop):
            base = t * self.b * self.world + self.rank * self.b
            yield list(range(base, base + self.b))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class ``(K, 3)`` uint8 (PASCAL-VOC bit-interleaving scheme)."""
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for i in range(num_classes):
        c, r, g, b = i + 1, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def overlay(image_bgr: np.ndarray, pred: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``: the image blended with the class colours of ``pred`` ``(H, W)``."""
    rgb = image_bgr[:, :, ::-1].astype(np.float32)
    col = palette(num_classes)[np.clip(pred, 0, num_classes - 1)].astype(np.float32)
    return (rgb * (1 - alpha) + col * alpha).clip(0, 255).astype(np.uint8)
