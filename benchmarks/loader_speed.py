"""Pretraining input-pipeline throughput: decode + RandomResizedCrop(0.2–1, bicubic) + flip + normalise.

    python -m benchmarks.loader_speed                                   # CPU paths (+ gpu when CUDA)
    python -m benchmarks.loader_speed --paths cpu-pil,cpu-torchvision --workers 0,2 --images 800
    python -m benchmarks.loader_speed --paths cpu-torchvision,gpu --workers 16 --batch-size 256 --images 8192

Paths (``--paths``):

* ``cpu-pil``: the default pretraining pipeline (:func:`crossmae.data.load_rgb`, PIL decode,
  PIL crop/resize, ``ToTensor``, ``Normalize``) in DataLoader workers;
* ``cpu-torchvision``: the same with ``torchvision.io.decode_jpeg`` (libjpeg-turbo; config
  ``decoder='torchvision'``);
* ``cpu-simplejpeg``, ``cpu-cv2``: the same with those decoders, when importable (measured only, not
  an option of the suite);
* ``gpu``: config ``data_pipeline='gpu'``: workers read bytes and draw crops; the main process
  decodes the batch on CUDA and augments there (:class:`crossmae.data.GPUBatchAugment`).

Figures (per path):

* ``per_worker_img_s``: one process, one thread, no DataLoader — what one worker delivers (for
  ``gpu``: the worker's share only, reading bytes + header + crop draw). The paths run interleaved
  (round-robin, 5 rounds, order rotated), medians; ``cpu_img_s`` the same by process CPU time and
  ``vs_pil`` / ``cpu_vs_pil`` the median per-round speed ratio to ``cpu-pil`` (robust on a shared
  machine);
* ``total_img_s[W]``: a DataLoader with W workers (0 = in the main process), batch ``--batch-size``,
  ``--images`` images (the bundled ImageNet images repeated), wall clock from the first to the last
  batch (the first batch is excluded: worker start-up); for ``gpu`` including the device decode +
  augment, synchronised;
* ``gpu_stage_img_s``: the device decode + augment alone on pre-read batches (``gpu`` only).

Also ``--check-pixels``: max / mean absolute difference of each decoder's RGB output against PIL's
over every bundled image (0 = identical pixels). Results: a table on stdout and ``--out`` (JSON,
rewritten atomically after every figure, so an interrupted run keeps what it measured).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from crossmae.data import (EncodedPretrainFolder, GPUBatchAugment, PretrainImageFolder, build_pretrain_transform,
                           load_rgb, load_rgb_turbo)
from crossmae.utils import UserError, atomic_write_json, cli_entry, resolve_data_root
from crossmae.utils import check_writable

DEFAULT_OUT = Path("output/benchmarks/loader_speed.json")
PATHS = ("cpu-pil", "cpu-torchvision", "cpu-simplejpeg", "cpu-cv2", "gpu")


def _simplejpeg_loader(path: str):
    import simplejpeg
    from PIL import Image
    with open(path, "rb") as f:
        data = f.read()
    try:
        return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    except (ValueError, RuntimeError):   # CMYK, not a JPEG, corrupt
        return load_rgb(path)


def _cv2_loader(path: str):
    import cv2
    from PIL import Image
    with open(path, "rb") as f:
        data = np.frombuffer(f.read(), np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        return load_rgb(path)
    return Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


LOADERS = {"cpu-pil": load_rgb, "cpu-torchvision": load_rgb_turbo, "cpu-simplejpeg": _simplejpeg_loader,
           "cpu-cv2": _cv2_loader}
NEEDS = {"cpu-simplejpeg": "simplejpeg", "cpu-cv2": "cv2"}


class Repeat(torch.utils.data.Dataset):
    """``n`` items cycling over ``ds`` (the bundled subset is small)."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, n
        self.collate_fn = getattr(ds, "collate_fn", None)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.ds[i % len(self.ds)]


def build_dataset(path: str, folder: Path, size: int):
    if path == "gpu":
        return EncodedPretrainFolder(folder, size)
    ds = PretrainImageFolder(folder, transform=build_pretrain_transform(size))
    ds.loader = LOADERS[path]
    return ds


def per_worker(datasets: dict, n: int, rounds: int = 5) -> dict:
    """One process, one thread, no DataLoader: ``ds[i]`` for every path, interleaved round-robin
    (order rotated each round) so a shared machine's load hits all paths alike.

    Returns per path ``{"img_s": median over rounds (wall clock), "cpu_img_s": the same with
    process CPU time, "vs_pil": median over rounds of the wall-clock speed ratio to cpu-pil}``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    names = list(datasets)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    chunk = max(1, n // rounds)
    try:
        for ds in datasets.values():     # warm caches / lazy imports
            for i in range(min(4, len(ds))):
                ds[i]
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                ds = datasets[k]
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(r * chunk, (r + 1) * chunk):
                    ds[i % len(ds)]
                wall[k].append(chunk / (time.perf_counter() - t0))
                cpu[k].append(chunk / max(time.process_time() - c0, 1e-9))
    finally:
        torch.set_num_threads(threads)
    res = {}
    for k in names:
        res[k] = {"img_s": statistics.median(wall[k]), "cpu_img_s": statistics.median(cpu[k]),
                  "img_s_rounds": wall[k]}
        if "cpu-pil" in wall:
            res[k]["vs_pil"] = statistics.median([a / b for a, b in zip(wall[k], wall["cpu-pil"])])
            res[k]["cpu_vs_pil"] = statistics.median([a / b for a, b in zip(cpu[k], cpu["cpu-pil"])])
    return res


def total(ds, n: int, workers: int, batch: int, device: torch.device | None) -> float:
    """Images/s through a DataLoader (+ GPU stage), excluding the first batch. With 0 workers the
    main process does the work with one intra-op thread, as a worker would."""
    rep = Repeat(ds, n)
    loader = torch.utils.data.DataLoader(rep, batch_size=batch, num_workers=workers, collate_fn=rep.collate_fn,
                                         shuffle=False, drop_last=True, pin_memory=device is not None,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    aug = GPUBatchAugment(device, ds.input_size) if device is not None else None
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)      # as inside a worker
    try:
        return _drain(loader, aug, device, n, batch)
    finally:
        torch.set_num_threads(threads)


def _drain(loader, aug, device, n: int, batch: int) -> float:
    count, t0 = 0, None
    for b in loader:
        if aug is not None:
            b = aug(b)
            torch.cuda.synchronize(device)
        if t0 is None:
            t0 = time.perf_counter()
            continue
        count += b[0].shape[0] if aug is not None or torch.is_tensor(b[0]) else len(b[0])
    return count / (time.perf_counter() - t0)


def gpu_stage(ds, batch: int, device: torch.device, rounds: int = 5) -> float:
    """Device decode + augment alone, images/s (batches read beforehand)."""
    items = [ds[i % len(ds)] for i in range(batch)]
    b = ds.collate_fn(items)
    aug = GPUBatchAugment(device, ds.input_size)
    aug(b)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        aug(b)
    torch.cuda.synchronize(device)
    return rounds * batch / (time.perf_counter() - t0)


def check_pixels(folder: Path, paths: list[str]) -> dict:
    """Per decoder: max / mean |RGB − PIL's RGB| over the folder's images (uint8 levels)."""
    files = sorted(str(p) for p in folder.glob("*/*") if p.is_file())
    ref = [np.asarray(load_rgb(f)).astype(np.int16) for f in files]
    out = {}
    for path in paths:
        if path in ("cpu-pil", "gpu"):
            continue
        diffs = [np.abs(np.asarray(LOADERS[path](f)).astype(np.int16) - r) for f, r in zip(files, ref)]
        out[path] = {"images": len(files), "max_abs": int(max(d.max() for d in diffs)),
                     "mean_abs": float(np.mean([d.mean() for d in diffs])),
                     "identical_images": int(sum(int(d.max() == 0) for d in diffs))}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader_speed", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="datasets root (default $CROSSMAE_DATA_ROOT or ../shared/data)")
    p.add_argument("--data-subdir", default="imagenet/train")
    p.add_argument("--paths", default=None, help=f"comma list of {', '.join(PATHS)} "
                   "(default: every importable CPU path, plus gpu when CUDA is available)")
    p.add_argument("--workers", default=None, help="comma list of DataLoader worker counts (default 0,<cpu count>)")
    p.add_argument("--images", type=int, default=1024, help="images per total measurement (default 1024)")
    p.add_argument("--per-worker-images", type=int, default=200, help="images per per-worker measurement")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--device", default="cuda", help="device of the gpu path (default cuda)")
    p.add_argument("--check-pixels", action="store_true", help="compare every decoder's pixels with PIL's")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p


def _table(doc: dict) -> str:
    ws = sorted({int(w) for r in doc["paths"].values() for w in r.get("total_img_s", {})})
    hdr = (f"{'path':<18}{'per worker':>11}{'cpu-time':>10}{'x PIL':>7}{'cpu x':>7}"
           + "".join(f"{f'{w} workers':>12}" for w in ws) + f"{'gpu stage':>11}")
    lines = [f"images/s at {doc['input_size']}px, batch {doc['batch_size']} ({doc['environment']['cpu_count']} CPUs)",
             hdr, "-" * len(hdr)]
    for name, r in doc["paths"].items():
        cells = "".join(f"{r.get('total_img_s', {}).get(str(w), float('nan')):>12.1f}" for w in ws)
        lines.append(f"{name:<18}{r.get('per_worker_img_s', float('nan')):>11.1f}"
                     f"{r.get('cpu_img_s', float('nan')):>10.1f}{r.get('vs_pil', float('nan')):>6.2f}x"
                     f"{r.get('cpu_vs_pil', float('nan')):>6.2f}x{cells}"
                     f"{r.get('gpu_stage_img_s', float('nan')):>11.1f}")
    for name, c in doc.get("pixels_vs_pil", {}).items():
        lines.append(f"pixels {name}: max |diff| {c['max_abs']}, mean {c['mean_abs']:.4f}, "
                     f"{c['identical_images']}/{c['images']} identical")
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_writable(args.out, "--out", folder=False)  # before any work
    folder = resolve_data_root(args.data_root) / args.data_subdir
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder does not exist (ImageFolder layout <class>/*.JPEG)")
    cuda = torch.cuda.is_available()
    if args.paths is None:
        paths = [p for p in PATHS if p != "gpu" and (p not in NEEDS or _importable(NEEDS[p]))]
        paths += ["gpu"] if cuda else []
    else:
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for p in paths:
        if p not in PATHS:
            raise UserError(f"--paths {p!r}: expected one of {', '.join(PATHS)}")
        if p in NEEDS and not _importable(NEEDS[p]):
            raise UserError(f"--paths {p}: needs the {NEEDS[p]} package, which is not installed")
        if p == "gpu" and not cuda:
            raise UserError("--paths gpu: CUDA is not available on this machine")
    try:
        workers = [int(w) for w in (args.workers or f"0,{os.cpu_count() or 1}").split(",")]
    except ValueError:
        raise UserError(f"--workers {args.workers!r}: expected a comma list of integers")
    if any(w < 0 for w in workers) or min(args.images, args.batch_size, args.per_worker_images, args.input_size) < 1:
        raise UserError("--workers must be ≥ 0 and --images / --batch-size / --per-worker-images / --input-size ≥ 1")
    if args.images < 2 * args.batch_size:
        raise UserError(f"--images {args.images}: needs at least two batches of --batch-size {args.batch_size}")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a .json file path")
    device = torch.device(args.device) if "gpu" in paths else None

    doc = {"command": "python -m benchmarks.loader_speed " + " ".join(sys.argv[1:] if argv is None else argv),
           "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "folder": str(folder), "input_size": args.input_size, "batch_size": args.batch_size,
           "images": args.images, "augmentation": "RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic) + "
           "horizontal flip + ToTensor + Normalize(ImageNet mean/std)",
           "environment": {"torch": torch.__version__, "python": platform.python_version(),
                           "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                           "device": torch.cuda.get_device_name(device) if device is not None else "cpu"},
           "paths": {}}

    def save():
        doc["environment"]["loadavg_now"] = os.getloadavg()
        atomic_write_json(doc, out)

    if args.check_pixels:
        doc["pixels_vs_pil"] = check_pixels(folder, paths)
        save()
    datasets = {p: build_dataset(p, folder, args.input_size) for p in paths}
    for p, r in per_worker(datasets, args.per_worker_images).items():
        doc["paths"][p] = {"per_worker_img_s": r.pop("img_s"), **r, "total_img_s": {}}
    save()
    for p, ds in datasets.items():
        r = doc["paths"][p]
        if p == "gpu":
            r["gpu_stage_img_s"] = gpu_stage(ds, args.batch_size, device)
            save()
        for w in workers:
            r["total_img_s"][str(w)] = total(ds, args.images, w, args.batch_size, device if p == "gpu" else None)
            save()
    print(_table(doc))
    print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
