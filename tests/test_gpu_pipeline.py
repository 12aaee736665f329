"""The pretraining input pipelines (crossmae.data): the GPU path's crop logic run on CPU-decoded images
against the PIL path, the torchvision (libjpeg-turbo) decoder against PIL, and their error messages.

The GPU path's device steps (``decode_jpeg(device='cuda')``) are covered by tests/test_cuda.py; here
the same code runs with device='cpu'.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from crossmae import pretrain
from crossmae.data import (IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, EncodedPretrainFolder, GPUBatchAugment,
                           augment_decoded, build_pretrain_dataset, build_pretrain_transform, load_rgb,
                           load_rgb_turbo, pretrain_batches, sample_crop_flip)

STD255 = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


@pytest.fixture(scope="module")
def image_paths(data_root):
    paths = sorted((data_root / "imagenet" / "train").glob("*/*.JPEG"))
    assert len(paths) >= 40
    return paths


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory, image_paths):
    """An ImageFolder with one CMYK JPEG, one greyscale JPEG, one PNG and two ordinary JPEGs."""
    root = tmp_path_factory.mktemp("odd")
    (root / "c").mkdir()
    src = Image.open(image_paths[0]).convert("RGB")
    src.convert("CMYK").save(root / "c" / "a_cmyk.JPEG", quality=92)
    src.convert("L").save(root / "c" / "b_grey.JPEG", quality=92)
    src.save(root / "c" / "c_png.png")
    for k, p in enumerate(image_paths[1:3]):
        shutil.copy(p, root / "c" / f"d{k}.JPEG")
    return root


def _to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def test_crop_parameters_are_those_of_the_cpu_transform(image_paths):
    """For a fixed seed, sample_crop_flip draws exactly the crop and flip the CPU transform applies:
    replaying the CPU pipeline by hand with those parameters gives the CPU output bit for bit."""
    tf = build_pretrain_transform(64)
    flips = 0
    for k, path in enumerate(image_paths[:25]):
        img = load_rgb(str(path))
        torch.manual_seed(1000 + k)
        cpu = tf(img)
        torch.manual_seed(1000 + k)
        i, j, h, w, flip = sample_crop_flip(img.size[1], img.size[0])
        torch.manual_seed(1000 + k)
        assert (i, j, h, w) == transforms.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3])
        flips += flip
        ref = TF.resized_crop(img, i, j, h, w, [64, 64], transforms.InterpolationMode.BICUBIC)
        if flip:
            ref = TF.hflip(ref)
        ref = TF.normalize(TF.to_tensor(ref), IMAGENET_MEAN, IMAGENET_STD)
        assert torch.equal(cpu, ref)
        assert 0.2 * img.size[0] * img.size[1] * 0.7 <= h * w <= img.size[0] * img.size[1]
    assert 0 < flips < 25        # both branches of the flip were exercised


def test_tensor_augment_matches_pil_path_within_resize_tolerance(image_paths):
    """augment_decoded (the GPU path's crop / resize / flip / normalise) on CPU-decoded images equals
    the PIL path within the two resize implementations' difference (PIL rounds to 8 bits between its
    two 1-D passes; torch does not)."""
    tf = build_pretrain_transform(64)
    diffs = []
    for k, path in enumerate(image_paths[:40]):
        img = load_rgb(str(path))
        torch.manual_seed(k)
        cpu = tf(img)
        torch.manual_seed(k)
        crop = sample_crop_flip(img.size[1], img.size[0])
        out = augment_decoded([_to_uint8_chw(img)], [crop], 64)[0]
        assert out.shape == cpu.shape == (3, 64, 64) and out.dtype == torch.float32
        diffs.append(((out - cpu) * STD255).abs())     # in 8-bit levels
    d = torch.stack(diffs)
    assert d.mean() < 0.3, d.mean()
    assert (d > 2.5).float().mean() < 0.005
    assert d.max() <= 10
    # the tolerance is tight enough to catch a wrong flip or a crop shifted by a few pixels
    img = load_rgb(str(image_paths[0]))
    torch.manual_seed(0)
    cpu = tf(img)
    torch.manual_seed(0)
    i, j, h, w, flip = sample_crop_flip(img.size[1], img.size[0])
    for crop in [(i, j, h, w, not flip), (i + 3, j + 3, h - 3, w - 3, flip)]:
        wrong = augment_decoded([_to_uint8_chw(img)], [crop], 64)[0]
        assert ((wrong - cpu) * STD255).abs().mean() > 1.0


def test_encoded_pipeline_on_cpu_matches_cpu_pipeline(odd_folder):
    """The whole GPU pipeline (encoded dataset → collate → batched decode → augment) run with
    device='cpu' gives, for the same seed, the CPU pipeline's batch within resize tolerance — also
    for CMYK, greyscale and PNG files."""
    cpu_ds = build_pretrain_dataset(odd_folder, 48)
    enc_ds = EncodedPretrainFolder(odd_folder, 48)
    assert [s for s, _ in cpu_ds.samples] == [s for s, _ in enc_ds.samples]
    kinds = {}
    torch.manual_seed(5)
    cpu = torch.stack([cpu_ds[k][0] for k in range(len(cpu_ds))])
    torch.manual_seed(5)
    items = [enc_ds[k] for k in range(len(enc_ds))]
    for (s, _), (path, _) in zip(items, enc_ds.samples):
        kinds[path.rsplit("/", 1)[-1]] = "jpeg" if "jpeg" in s else "rgb"
    assert kinds == {"a_cmyk.JPEG": "rgb", "b_grey.JPEG": "jpeg", "c_png.png": "rgb", "d0.JPEG": "jpeg",
                     "d1.JPEG": "jpeg"}
    imgs, labels = GPUBatchAugment("cpu", 48)(enc_ds.collate_fn(items))
    assert imgs.shape == cpu.shape == (5, 3, 48, 48) and labels.tolist() == [0] * 5
    d = ((imgs - cpu) * STD255).abs()
    assert d.mean() < 0.3 and d.max() <= 10


def test_pretrain_batches_passes_cpu_loader_through(odd_folder):
    ds = build_pretrain_dataset(odd_folder, 32)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    wrapped = pretrain_batches(loader, "cpu")
    assert wrapped.augment is None and len(wrapped) == len(loader) == 3
    torch.manual_seed(0)
    a = [x for x, _ in wrapped]
    torch.manual_seed(0)
    b = [x for x, _ in loader]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_torchvision_decoder_gives_pil_pixels(image_paths, odd_folder):
    """load_rgb_turbo decodes the bundled images (greyscale ones included) and a CMYK JPEG to the same
    RGB pixels as PIL's load_rgb; a PNG goes through PIL."""
    paths = [str(p) for p in image_paths] + [str(p) for p in sorted((odd_folder / "c").iterdir())]
    greys = 0
    for p in paths:
        a, b = load_rgb(p), load_rgb_turbo(p)
        assert b.mode == "RGB" and a.size == b.size
        assert np.array_equal(np.asarray(a), np.asarray(b)), p
        greys += Image.open(p).mode == "L"
    assert greys >= 3


def _corrupt(tmp_path, image_paths):
    root = tmp_path / "bad"
    (root / "c").mkdir(parents=True)
    data = image_paths[0].read_bytes()
    (root / "c" / "trunc.JPEG").write_bytes(data[: len(data) // 3])
    (root / "c" / "garbage.JPEG").write_bytes(b"not an image at all")
    return root


def test_corrupt_images_give_one_line_error_on_every_path(tmp_path, image_paths):
    root = _corrupt(tmp_path, image_paths)
    for name in ("trunc.JPEG", "garbage.JPEG"):
        path = str(root / "c" / name)
        with pytest.raises(CorruptImageError) as pil_err:
            load_rgb(path)
        with pytest.raises(CorruptImageError) as turbo_err:
            load_rgb_turbo(path)
        assert str(turbo_err.value) == str(pil_err.value)
        assert "\n" not in str(pil_err.value) and path in str(pil_err.value)
    ds = EncodedPretrainFolder(root, 32)
    names = [p.rsplit("/", 1)[-1] for p, _ in ds.samples]
    with pytest.raises(CorruptImageError, match="garbage.JPEG: cannot decode image"):
        ds[names.index("garbage.JPEG")]
    item = ds[names.index("trunc.JPEG")]          # the header is fine: fails at decode time
    with pytest.raises(CorruptImageError, match="trunc.JPEG: cannot decode image") as err:
        GPUBatchAugment("cpu", 32)(ds.collate_fn([item]))
    assert "\n" not in str(err.value)


def _pretrain_argv(data_root, out, *opts):
    return ["--config", "smoke_mae", "--data-root", str(data_root), "--output-dir", str(out), "--device", "cpu",
            "--cfg-options", "epochs=1", "data_subset=8", "batch_size=4", "total_batch_size=4", "num_workers=0",
            "tensorboard=False", "verify_images=False", *opts]


@pytest.mark.parametrize("opt,msg", [
    ("data_pipeline=gpu", "config data_pipeline: 'gpu' decodes on CUDA, but the device is cpu"),
    ("data_pipeline=disk", "config data_pipeline: 'disk' is not one of"),
    ("decoder=simd", "config decoder: 'simd' is not one of"),
])
def test_pretrain_rejects_bad_pipeline_options(data_root, tmp_path, capsys, opt, msg):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        pretrain.main(_pretrain_argv(data_root, out, opt))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not out.exists()


def test_pretrain_with_torchvision_decoder_equals_pil(data_root, tmp_path):
    """Same pixels, same RNG use: one epoch with decoder=torchvision gives PIL's loss exactly."""
    a = pretrain.main(_pretrain_argv(data_root, tmp_path / "pil"))
    b = pretrain.main(_pretrain_argv(data_root, tmp_path / "tv", "decoder=torchvision"))
    assert a["metrics"]["loss"] == b["metrics"]["loss"]


def test_gpu_pipeline_through_dataloader_workers_matches_cpu_pipeline(data_root):
    """With 2 DataLoader workers and the same loader generator seed, the encoded pipeline (decoded and
    augmented by pretrain_batches, here on the CPU) yields the CPU pipeline's batches within resize
    tolerance: the workers draw the same crops in both pipelines."""
    from crossmae.utils import seed_worker
    folder = data_root / "imagenet" / "train"

    def batches(ds):
        loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2, worker_init_fn=seed_worker,
                                             generator=torch.Generator().manual_seed(11), shuffle=True,
                                             collate_fn=getattr(ds, "collate_fn", None))
        return [(x.clone(), y.clone()) for x, y in pretrain_batches(loader, "cpu")]

    cpu = batches(build_pretrain_dataset(folder, 32, subset=24))
    enc = batches(EncodedPretrainFolder(folder, 32, subset=24))
    assert len(cpu) == len(enc) == 4
    for (xc, yc), (xe, ye) in zip(cpu, enc):
        assert torch.equal(yc, ye)
        d = ((xe - xc) * STD255).abs()
        assert d.mean() < 0.3 and d.max() <= 10
