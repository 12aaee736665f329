"""Pretraining data: an ImageNet-style ``ImageFolder`` with up-front validation and clear errors.

Recipe (MAE ``main_pretrain.py`` / CrossMAE ``main_pretrain.py``, "simple augmentation"):
``RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=bicubic)`` → ``RandomHorizontalFlip()``
→ ``ToTensor()`` → ``Normalize(ImageNet mean, std)``. Images are read with PIL and converted to RGB
(ImageNet holds some greyscale and CMYK JPEGs). Labels are ignored by pretraining.

Errors (all :class:`crossmae.utils.UserError`, one line, naming the path):
- the folder is missing, holds no class sub-folders, or no image files (:func:`build_pretrain_dataset`);
- an image cannot be decoded — found up front with ``verify=True``, or met mid-run
  (:class:`CorruptImageError`, raised from ``__getitem__``; :func:`clean_loader_error` turns the
  multi-line text a DataLoader worker wraps around it back into the one-line message).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from .utils import UserError

#: ImageNet channel statistics (RGB, 0..1 scale), as in MAE / timm ``IMAGENET_DEFAULT_MEAN/STD``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CorruptImageError(UserError):
    """An image file of the dataset cannot be opened or decoded. The message names the file."""


def build_pretrain_transform(input_size: int) -> transforms.Compose:
    """The MAE/CrossMAE pretraining augmentation: PIL image → float tensor (3, input_size, input_size),
    normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`. Randomness comes from torch's
    global RNG (per DataLoader worker when workers are used)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def load_rgb(path: str, exif_transpose: bool = False) -> Image.Image:
    """Open and fully decode ``path`` as an RGB PIL image (greyscale / CMYK / palette converted).

    ``exif_transpose``: apply the EXIF orientation tag (``PIL.ImageOps.exif_transpose``), as
    detectron2's ``read_image`` does for COCO; off by default (torchvision's ImageFolder loader,
    used by MAE, does not).

    Raises:
        CorruptImageError: the file cannot be read or decoded (truncated, not an image, …).
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return img.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(f"{path}: cannot decode image ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None


class PretrainImageFolder(datasets.ImageFolder):
    """``torchvision.datasets.ImageFolder`` whose loader raises :class:`CorruptImageError` naming the file.

    Items are ``(image (3, S, S) float32, class index)``; ``subset`` keeps ``n`` images spread evenly
    over the sorted file list (every ``len/n``-th), for smoke runs.
    """

    def __init__(self, root: str | os.PathLike, transform=None, subset: int | None = None):
        super().__init__(str(root), transform=transform, loader=load_rgb)
        if subset is not None and 0 < subset < len(self.samples):
            step = len(self.samples) / subset
            self.samples = [self.samples[int(i * step)] for i in range(subset)]
            self.imgs = self.samples
            self.targets = [t for _, t in self.samples]


def build_pretrain_dataset(folder: str | os.PathLike, input_size: int, subset: int | None = None,
                           verify: bool = False) -> PretrainImageFolder:
    """Validate ``folder`` (``<root>/imagenet/train`` layout: ``<wnid>/*.JPEG``) and build the dataset.

    Args:
        folder: the ImageFolder root (class sub-folders inside).
        input_size: crop size in pixels.
        subset: use only this many images (evenly spaced), or all when None.
        verify: decode every selected image now, so a corrupt file fails before training starts
            (costs one full decode per image; off in the paper configs, on in the smoke configs).

    Raises:
        UserError: missing folder, no class folders, no images; CorruptImageError with ``verify``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: pretraining data folder does not exist "
                        f"(expected <data-root>/imagenet/train/<class>/*.JPEG; set --data-root)")
    classes = [d for d in folder.iterdir() if d.is_dir()]
    if not classes:
        raise UserError(f"{folder}: no class sub-folders (expected ImageFolder layout <class>/*.JPEG)")
    try:
        ds = PretrainImageFolder(folder, transform=build_pretrain_transform(input_size), subset=subset)
    except FileNotFoundError as exc:  # torchvision: a class folder without images, or none at all
        raise UserError(f"{folder}: no usable images ({str(exc).splitlines()[0]}; "
                        f"extensions {', '.join(IMG_EXTENSIONS)})") from None
    if len(ds) == 0:
        raise UserError(f"{folder}: no images found")
    if verify:
        for path, _ in ds.samples:
            load_rgb(path)
    return ds


def clean_loader_error(exc: BaseException) -> CorruptImageError:
    """A :class:`CorruptImageError` re-raised by a DataLoader worker carries the worker's traceback in
    its message; return a new error holding only the original one-line message."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    prefix = f"{CorruptImageError.__module__}.{CorruptImageError.__name__}: "
    for ln in reversed(lines):
        if ln.startswith(prefix):
            return CorruptImageError(ln[len(prefix):])
    return CorruptImageError(lines[-1] if lines else "corrupt image")


def loader_generator(seed: int) -> torch.Generator:
    """A CPU generator for the DataLoader's worker seeds, so they do not depend on the global RNG."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g
