"""Pretraining data: an ImageNet-style ``ImageFolder`` with up-front validation and clear errors.

Recipe (MAE ``main_pretrain.py`` / CrossMAE ``main_pretrain.py``, "simple augmentation"):
``RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=bicubic)`` → ``RandomHorizontalFlip()``
→ ``ToTensor()`` → ``Normalize(ImageNet mean, std)``. Images are read with PIL and converted to RGB
(ImageNet holds some greyscale and CMYK JPEGs). Labels are ignored by pretraining.

Two pipelines produce the same augmentation distribution (config ``data_pipeline``):

- ``"cpu"`` (default): DataLoader workers decode (``decoder``: ``"pil"`` or ``"torchvision"``, the
  latter libjpeg-turbo through ``torchvision.io.decode_jpeg``, same pixels, see docs/benchmarks.md)
  and augment with PIL as above.
- ``"gpu"``: workers only read the encoded JPEG bytes and draw the crop / flip parameters (the same
  ``RandomResizedCrop.get_params`` + flip draw, in the same RNG order, as the CPU transform);
  :class:`GPUBatchAugment` decodes a whole batch on the GPU (``torchvision.io.decode_jpeg(device=
  'cuda')``) and crops, resizes (bicubic, antialiased: PIL's kernel), flips and normalises there.
  Non-JPEG files and JPEGs the GPU decoder refuses are decoded on the CPU with :func:`load_rgb`.
  ``"auto"`` is ``"gpu"`` on a CUDA device, else ``"cpu"``.

Errors (all :class:`crossmae.utils.UserError`, one line, naming the path):
- the folder is missing, holds no class sub-folders, or no image files (:func:`build_pretrain_dataset`);
- an image cannot be decoded — found up front with ``verify=True``, or met mid-run
  (:class:`CorruptImageError`, raised from ``__getitem__``; :func:`clean_loader_error` turns the
  multi-line text a DataLoader worker wraps around it back into the one-line message).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from .utils import UserError

#: ImageNet channel statistics (RGB, 0..1 scale), as in MAE / timm ``IMAGENET_DEFAULT_MEAN/STD``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: RandomResizedCrop arguments of the pretraining recipe (area fraction, aspect ratio).
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: ``data_pipeline`` values and CPU-path ``decoder`` values (see the module docstring).
PIPELINES = ("cpu", "gpu", "auto")
DECODERS = ("pil", "torchvision")
_JPEG_SOI = b"\xff\xd8"


class CorruptImageError(UserError):
    """An image file of the dataset cannot be opened or decoded. The message names the file."""


def build_pretrain_transform(input_size: int) -> transforms.Compose:
    """The MAE/CrossMAE pretraining augmentation: PIL image → float tensor (3, input_size, input_size),
    normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`. Randomness comes from torch's
    global RNG (per DataLoader worker when workers are used)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=CROP_SCALE, ratio=CROP_RATIO,
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


def load_rgb_turbo(path: str) -> Image.Image:
    """:func:`load_rgb` with JPEG files decoded by ``torchvision.io.decode_jpeg`` (libjpeg-turbo,
    ``ImageReadMode.RGB``: greyscale replicated, CMYK converted): the same pixels as PIL on the
    bundled ImageNet images (docs/benchmarks.md) with less per-image overhead. Files that are not
    JPEG, or that it refuses (truncated, corrupt), go through :func:`load_rgb`, so a corrupt image
    gives the same one-line :class:`CorruptImageError` naming the file.

    Returns:
        RGB PIL image (H, W).
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return load_rgb(path)   # raises the one-line error
    if data[:2] == _JPEG_SOI:
        try:
            chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            return load_rgb(path)
        return Image.fromarray(chw.permute(1, 2, 0).contiguous().numpy())
    return load_rgb(path)


_LOADERS = {"pil": load_rgb, "torchvision": load_rgb_turbo}


class _IndexedImageFolder(datasets.ImageFolder):
    """A torchvision ``ImageFolder`` whose sample list comes from the cached dataset index
    (:func:`crossmae.index.imagefolder_index`, torchvision's order and extension rule exactly):
    ``samples`` is a :class:`crossmae.index.PathLabels` over memory-mapped arrays, ``targets`` an
    int32 array; nothing per image is a Python object, so DataLoader workers copy nothing.
    ``subset`` keeps ``n`` images spread evenly over the sorted file list (every ``len/n``-th).

    Raises:
        FileNotFoundError: no class folder, or a class folder without images (torchvision's errors).
    """

    def __init__(self, root: str | os.PathLike, loader, transform=None, subset: int | None = None):
        from .index import PathLabels, imagefolder_index

        datasets.VisionDataset.__init__(self, str(root), transform=transform)
        idx, classes = imagefolder_index(str(root), None, IMG_EXTENSIONS, recursive=True, errors=_tv_error)
        self.loader, self.extensions = loader, IMG_EXTENSIONS
        self.classes, self.class_to_idx = classes, {c: i for i, c in enumerate(classes)}
        self.samples = PathLabels(idx, os.path.join(os.path.expanduser(str(root)), ""))
        if subset is not None and 0 < subset < len(self.samples):
            step = len(self.samples) / subset
            self.samples = self.samples.select([int(i * step) for i in range(subset)])
        self.imgs = self.samples
        self.targets = self.samples.labels
        self.index_fingerprint = idx.fingerprint


def _tv_error(kind: str, detail: str) -> FileNotFoundError:
    if kind == "no_classes":
        return FileNotFoundError(f"Couldn't find any class folder in {detail}.")
    return FileNotFoundError(f"Found no valid file for the classes {detail}. "
                             f"Supported extensions are: {', '.join(IMG_EXTENSIONS)}")


class PretrainImageFolder(_IndexedImageFolder):
    """``torchvision.datasets.ImageFolder`` whose loader raises :class:`CorruptImageError` naming the file.

    Items are ``(image (3, S, S) float32, class index)``; ``subset`` keeps ``n`` images spread evenly
    over the sorted file list (every ``len/n``-th), for smoke runs. The sample list is the cached
    dataset index (:class:`_IndexedImageFolder`).
    """

    def __init__(self, root: str | os.PathLike, transform=None, subset: int | None = None, decoder: str = "pil"):
        super().__init__(root, _LOADERS[decoder], transform=transform, subset=subset)


def build_pretrain_dataset(folder: str | os.PathLike, input_size: int, subset: int | None = None,
                           verify: bool = False, pipeline: str = "cpu", decoder: str = "pil",
                           device: torch.device | str | None = None) -> PretrainImageFolder:
    """Validate ``folder`` (``<root>/imagenet/train`` layout: ``<wnid>/*.JPEG``) and build the dataset.

    Args:
        folder: the ImageFolder root (class sub-folders inside).
        input_size: crop size in pixels.
        subset: use only this many images (evenly spaced), or all when None.
        verify: decode every selected image now, so a corrupt file fails before training starts
            (costs one full decode per image; off in the paper configs, on in the smoke configs).
        pipeline: ``"cpu"``, ``"gpu"`` or ``"auto"`` (module docstring). With ``"gpu"`` the items
            are encoded (:class:`EncodedPretrainFolder`); wrap the DataLoader with
            :func:`pretrain_batches`.
        decoder: the CPU path's JPEG decoder, one of :data:`DECODERS`.
        device: the training device (``"gpu"`` needs CUDA; ``"auto"`` picks by it).

    Raises:
        UserError: missing folder, no class folders, no images, a bad ``pipeline`` / ``decoder``,
            ``"gpu"`` without a CUDA device; CorruptImageError with ``verify``.
    """
    pipeline = resolve_pipeline(pipeline, device)
    if decoder not in DECODERS:
        raise UserError(f"config decoder: {decoder!r} is not one of {DECODERS}")
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: pretraining data folder does not exist "
                        f"(expected <data-root>/imagenet/train/<class>/*.JPEG; set --data-root)")
    classes = [d for d in folder.iterdir() if d.is_dir()]
    if not classes:
        raise UserError(f"{folder}: no class sub-folders (expected ImageFolder layout <class>/*.JPEG)")
    try:
        if pipeline == "gpu":
            ds = EncodedPretrainFolder(folder, input_size, subset=subset)
        else:
            ds = PretrainImageFolder(folder, transform=build_pretrain_transform(input_size), subset=subset,
                                     decoder=decoder)
    except FileNotFoundError as exc:  # torchvision: a class folder without images, or none at all
        raise UserError(f"{folder}: no usable images ({str(exc).splitlines()[0]}; "
                        f"extensions {', '.join(IMG_EXTENSIONS)})") from None
    if len(ds) == 0:
        raise UserError(f"{folder}: no images found")
    if verify:
        for path, _ in ds.samples:
            _LOADERS[decoder](path)
    return ds


def resolve_pipeline(pipeline: str, device: torch.device | str | None) -> str:
    """``"auto"`` → ``"gpu"`` on a CUDA device else ``"cpu"``; checks the value.

    Raises:
        UserError: not one of :data:`PIPELINES`, or ``"gpu"`` without a CUDA device.
    """
    if pipeline not in PIPELINES:
        raise UserError(f"config data_pipeline: {pipeline!r} is not one of {PIPELINES}")
    cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    if pipeline == "auto":
        return "gpu" if cuda else "cpu"
    if pipeline == "gpu" and not cuda:
        raise UserError(f"config data_pipeline: 'gpu' decodes on CUDA, but the device is {device or 'cpu'}; "
                        f"use 'cpu' or 'auto'")
    return pipeline


# --------------------------------------------------------------------------------------------------
# GPU pipeline: encoded bytes + crop parameters from the workers, decode + augment on the device
# --------------------------------------------------------------------------------------------------
def sample_crop_flip(height: int, width: int) -> tuple[int, int, int, int, bool]:
    """Draw ``(i, j, h, w, flip)`` exactly as the CPU transform does for an image of this size:
    ``RandomResizedCrop.get_params(scale=CROP_SCALE, ratio=CROP_RATIO)`` then the flip's
    ``torch.rand(1) < 0.5``, from torch's global RNG in the same order, so a given seed gives the
    same crop and flip on both pipelines."""
    proxy = torch.empty(1, 1, 1).expand(1, height, width)    # only its shape is read
    i, j, h, w = transforms.RandomResizedCrop.get_params(proxy, list(CROP_SCALE), list(CROP_RATIO))
    flip = bool(torch.rand(1) < 0.5)
    return i, j, h, w, flip


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CorruptImageError(f"{path}: cannot read image ({type(exc).__name__}: {exc.strerror or exc})") from None


def encoded_collate(batch: list) -> tuple[list[dict], torch.Tensor]:
    """DataLoader ``collate_fn`` of :class:`EncodedPretrainFolder`: ``(list of samples, labels (B,))``."""
    return [s for s, _ in batch], torch.tensor([t for _, t in batch], dtype=torch.long)


class EncodedPretrainFolder(_IndexedImageFolder):
    """The GPU pipeline's dataset: items are ``(sample, class index)`` where ``sample`` is a dict

    - ``"path"``: the file;
    - ``"jpeg"``: the encoded bytes, uint8 (L,) — or ``"rgb"``: uint8 (3, H, W) already decoded on
      the CPU by :func:`load_rgb`, for non-JPEG files and JPEGs that are neither RGB nor greyscale
      (CMYK, YCCK: decoded by PIL, whose conversion the CPU path uses);
    - ``"crop"``: ``(i, j, h, w, flip)`` from :func:`sample_crop_flip` (header-only read of the size).

    Batch with :func:`encoded_collate`; augment with :class:`GPUBatchAugment`. The sample list is
    the cached dataset index (:class:`_IndexedImageFolder`).

    Raises (from ``__getitem__``):
        CorruptImageError: the file cannot be read or is not an image (one line naming it).
    """

    def __init__(self, root: str | os.PathLike, input_size: int, subset: int | None = None):
        super().__init__(root, _read_bytes, subset=subset)
        self.input_size = input_size

    collate_fn = staticmethod(encoded_collate)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        data = _read_bytes(path)
        try:
            with Image.open(io.BytesIO(data)) as head:   # parses the header only
                fmt, mode, (width, height) = head.format, head.mode, head.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            fmt = mode = None   # not an image: load_rgb below raises the one-line CorruptImageError
        sample: dict[str, Any] = {"path": path}
        if fmt == "JPEG" and mode in ("RGB", "L"):
            sample["jpeg"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            sample["rgb"] = torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1)
            height, width = sample["rgb"].shape[1:]
        sample["crop"] = sample_crop_flip(height, width)
        return sample, target


def augment_decoded(images: list[torch.Tensor], crops: list[tuple], input_size: int) -> torch.Tensor:
    """Crop, resize, flip and normalise decoded images — the tensor twin of the CPU transform.

    ``images[k]`` is uint8 (3, H_k, W_k) on any device; ``crops[k] = (i, j, h, w, flip)``. Each crop
    ``[i:i+h, j:j+w]`` is resized to ``input_size``² with antialiased bicubic interpolation
    (``F.interpolate(mode='bicubic', antialias=True)``: PIL's a = −0.5 kernel with the support widened
    when shrinking, as ``Image.resize(BICUBIC)``), rounded to 0..255 as PIL's 8-bit output, flipped
    when asked, scaled to 0..1 and normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.

    Returns:
        float32 (B, 3, input_size, input_size) on the images' device. Differs from the PIL path by
        the resize arithmetic only (PIL rounds to 8 bits between its two 1-D passes): within about
        one 8-bit level on average (tests/test_gpu_pipeline.py).
    """
    import torch.nn.functional as F

    if not images:
        raise ValueError("augment_decoded: empty batch")
    dev = images[0].device
    out = torch.empty(len(images), 3, input_size, input_size, device=dev, dtype=torch.float32)
    for k, (img, (i, j, h, w, flip)) in enumerate(zip(images, crops)):
        region = img[:, i:i + h, j:j + w].unsqueeze(0).float()
        r = F.interpolate(region, size=(input_size, input_size), mode="bicubic", antialias=True,
                          align_corners=False)[0]
        out[k] = r.flip(-1) if flip else r
    out.round_().clamp_(0, 255)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1) * 255.0
    return out.sub_(mean).div_(std)


class GPUBatchAugment:
    """Decode a batch of :class:`EncodedPretrainFolder` samples on ``device`` and augment it.

    JPEGs are decoded in one ``torchvision.io.decode_jpeg(list, mode=RGB, device=device)`` call; if
    the batched call fails, each image is retried alone on the device and, failing that, decoded on
    the CPU with :func:`load_rgb` (so a corrupt file raises its one-line :class:`CorruptImageError`).

    Call: ``(samples, labels) -> (images float32 (B, 3, S, S) on device, labels (B,) on device)``.
    """

    def __init__(self, device: torch.device | str, input_size: int):
        self.device = torch.device(device)
        self.input_size = input_size

    def decode(self, samples: list[dict]) -> list[torch.Tensor]:
        """uint8 (3, H, W) tensors on the device, in the order of ``samples``."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(samples)
        jpeg_idx = [k for k, s in enumerate(samples) if "jpeg" in s]
        if jpeg_idx:
            datas = [samples[k]["jpeg"] for k in jpeg_idx]
            try:
                decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                decoded = [self._decode_one(samples[k]) for k in jpeg_idx]
            for k, img in zip(jpeg_idx, decoded):
                out[k] = img
        for k, s in enumerate(samples):
            if "rgb" in s:
                out[k] = s["rgb"].to(self.device, non_blocking=True)
        return out  # type: ignore[return-value]

    def _decode_one(self, sample: dict) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg
        try:
            return decode_jpeg(sample["jpeg"], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            rgb = np.asarray(load_rgb(sample["path"])).copy()   # corrupt: one-line error naming the file
            return torch.from_numpy(rgb).permute(2, 0, 1).to(self.device)

    def __call__(self, batch: tuple[list[dict], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        samples, labels = batch
        images = self.decode(samples)
        x = augment_decoded(images, [s["crop"] for s in samples], self.input_size)
        return x, labels.to(self.device, non_blocking=True)


class pretrain_batches:
    """Iterable over a pretraining DataLoader that yields ``(images, labels)`` ready for the model:
    the loader itself for the CPU pipeline, each batch through :class:`GPUBatchAugment` for the GPU
    pipeline (``loader.dataset`` an :class:`EncodedPretrainFolder`). ``len()`` is the loader's."""

    def __init__(self, loader, device: torch.device | str):
        self.loader = loader
        ds = loader.dataset
        self.augment = GPUBatchAugment(device, ds.input_size) if isinstance(ds, EncodedPretrainFolder) else None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        if self.augment is None:
            yield from self.loader
            return
        for batch in self.loader:
            yield self.augment(batch)


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
