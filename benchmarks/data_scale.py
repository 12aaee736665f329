"""Dataset indexes at full size: cold build, warm load, memory held, DataLoader workers' private memory.

    python -m benchmarks.data_scale                           # full size (about 3.5 M links, ~20 min)
    python -m benchmarks.data_scale --scale 0.01 --workers 2  # a quick run
    python -m benchmarks.data_scale --datasets places365 --keep --scratch /big/disk/tmp

Builds trees with the real datasets' file counts and list / json layouts in a scratch folder
(removed at the end unless ``--keep``), every image a symlink (short relative target) to a copy of
one of the bundled JPEGs in that folder:

* ``imagenet``: ImageNet-1k ``train/`` 1,281,167 images and ``val/`` 50,000 in 1000 class folders;
* ``places365``: Places365-Standard, 1,803,460 train + 36,500 val list lines, 365 categories;
* ``inat2019``: iNaturalist 2019 ``train2019.json`` 265,213 + ``val2019.json`` 3,030 images, 1,010
  categories;
* ``coco``: ``instances_train2017.json`` with 118,287 images and 860,001 instances (polygons of 30
  vertices on average, 1 % crowd RLE), about the size of the real file.

``--scale s`` multiplies every count (classes / categories stay). Per loader (each in a fresh
process, index cache in the scratch folder), the loaders every task uses:

* ``pretrain``: ``crossmae.data.build_pretrain_dataset`` on ``imagenet/train``;
* ``imagefolder`` / ``places365`` / ``inat2019``: ``transfer.classification.data.load_train_val``
  (both splits);
* ``coco``: ``transfer.vitdet.data.CocoInstances`` (train2017, training semantics);

figures: ``cold_s`` (empty cache: parse, file-existence check, write), ``warm_s`` (cache present),
``held_mb`` (the process's private memory — ``Private_Dirty`` of ``/proc/self/smaps_rollup``, what
copy-on-write cannot share — above the imports, after the warm load; ``rss_mb`` the same for RSS,
which also counts the mapped cache pages read so far), and ``worker_gain_mb``: the largest
``Private_Dirty`` growth of any of ``--workers`` DataLoader workers over one pass reading everything
the dataset's ``__getitem__`` reads of the index (path and label; COCO: the image record and every
annotation with every polygon coordinate), images not decoded. Results: a table on stdout and
``--out`` (JSON, rewritten atomically after every loader).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from crossmae.utils import UserError, atomic_write_json, check_writable, cli_entry, resolve_data_root

DEFAULT_OUT = Path("output/benchmarks/data_scale.json")
FULL = {"imagenet": (1_281_167, 50_000, 1000), "places365": (1_803_460, 36_500, 365),
        "inat2019": (265_213, 3_030, 1010), "coco": (118_287, 860_001, 80)}
LOADERS = {"imagenet": ("pretrain", "imagefolder"), "places365": ("places365",), "inat2019": ("inat2019",),
           "coco": ("coco",)}


# --------------------------------------------------------------------------------------------------
# trees
# --------------------------------------------------------------------------------------------------
def _jpegs(data_root: Path, sub: str, scratch: Path) -> list[str]:
    """Copies of the bundled JPEGs of ``sub`` in ``scratch/src-<sub>``: the trees' links point there
    with short relative targets (kept inside the inode, as a link to a nearby file is; a long absolute
    target costs a block read per link on a cold page cache, which would dominate the figures)."""
    files = sorted(p for p in (data_root / sub).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise UserError(f"{data_root / sub}: no bundled JPEGs to link to")
    dest = scratch / ("src-" + sub.replace("/", "-"))
    dest.mkdir(exist_ok=True)
    out = []
    for k, f in enumerate(files):
        q = dest / f"{k}{f.suffix}"
        if not q.exists():
            shutil.copyfile(f, q)
        out.append(str(q))
    return out


class _Linker:
    """``link(k, path)``: a symlink at ``path`` to source image ``k % len(src)`` by a relative target."""

    def __init__(self, src: list[str]):
        self.src, self.base, self.rel = src, os.path.dirname(src[0]), {}

    def __call__(self, k: int, path: Path | str) -> None:
        d = os.path.dirname(path)
        rel = self.rel.get(d)
        if rel is None:
            rel = self.rel[d] = os.path.relpath(self.base, d)
        os.symlink(f"{rel}/{os.path.basename(self.src[k % len(self.src)])}", path)


def _counts(total: int, k: int) -> list[int]:
    return [total // k + (1 if c < total % k else 0) for c in range(k)]


def make_imagenet(dest: Path, src: list[str], n_train: int, n_val: int, k: int) -> None:
    j, link = 0, _Linker(src)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, m in enumerate(_counts(n, k)):
            d = dest / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(m):
                link(j, d / f"n{c:08d}_{i}.JPEG")
                j += 1


def make_places(dest: Path, src: list[str], n_train: int, n_val: int, k: int) -> None:
    dest.mkdir(parents=True)
    link = _Linker(src)
    names = [f"/{chr(97 + c % 26)}/category_{c:03d}" for c in range(k)]
    (dest / "categories_places365.txt").write_text("".join(f"{n} {c}\n" for c, n in enumerate(names)))
    j, lines = 0, []
    for c, m in enumerate(_counts(n_train, k)):
        d = dest / "data_256" / names[c].lstrip("/")
        d.mkdir(parents=True)
        for i in range(m):
            link(j, d / f"{i + 1:08d}.jpg")
            lines.append(f"{names[c]}/{i + 1:08d}.jpg {c}\n")
            j += 1
    (dest / "places365_train_standard.txt").write_text("".join(lines))
    (dest / "val_256").mkdir()
    lines = []
    for i in range(n_val):
        link(j, dest / "val_256" / f"Places365_val_{i + 1:08d}.jpg")
        lines.append(f"Places365_val_{i + 1:08d}.jpg {i % k}\n")
        j += 1
    (dest / "places365_val.txt").write_text("".join(lines))


def make_inat(dest: Path, src: list[str], n_train: int, n_val: int, k: int) -> None:
    cats = [{"id": c, "name": f"Species {c}", "kingdom": "Plantae", "phylum": "Tracheophyta", "class": "C",
             "order": "O", "family": "F", "genus": f"G{c // 4}"} for c in range(k)]
    j, image_id, link = 0, 0, _Linker(src)
    for split, n in (("train", n_train), ("val", n_val)):
        images, anns = [], []
        for c, m in enumerate(_counts(n, k)):
            d = dest / "train_val2019" / "Plantae" / str(c)
            d.mkdir(parents=True, exist_ok=True)
            for i in range(m):
                rel = f"train_val2019/Plantae/{c}/{split}_{image_id:08x}.jpg"
                link(j, dest / rel)
                images.append({"license": 1, "file_name": rel, "width": 800, "height": 600, "id": image_id})
                anns.append({"image_id": image_id, "id": image_id, "category_id": c})
                j, image_id = j + 1, image_id + 1
        with open(dest / f"{split}2019.json", "w") as f:
            json.dump({"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}, f)


def make_coco(dest: Path, src: list[str], n_img: int, n_inst: int, k: int) -> None:
    from PIL import Image
    sizes = []
    for s in src:
        with Image.open(s) as im:
            sizes.append(im.size)
    img_dir = dest / "train2017"
    img_dir.mkdir(parents=True)
    link = _Linker(src)
    (dest / "annotations").mkdir()
    rng = np.random.default_rng(0)
    # a pool of pre-formatted polygons (formatting 50 M numbers would dominate), reused cyclically
    pool = []
    for _ in range(4096):
        v = int(rng.integers(8, 53))
        ang = np.sort(rng.uniform(0, 2 * np.pi, v))
        r = rng.uniform(5, 60)
        cx, cy = rng.uniform(80, 300, 2)
        xy = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1).ravel()
        pool.append(("[" + ",".join(f"{x:.2f}" for x in xy) + "]", float(xy[0::2].min()), float(xy[1::2].min()),
                     float(np.ptp(xy[0::2])), float(np.ptp(xy[1::2]))))
    per = _counts(n_inst, n_img)
    with open(dest / "annotations" / "instances_train2017.json", "w") as f:
        f.write('{"info": {}, "licenses": [], "categories": [')
        f.write(",".join(json.dumps({"id": c + 1 + c // 10, "name": f"cat{c}", "supercategory": "s"}) for c in range(k)))
        f.write('], "images": [')
        for i in range(n_img):
            w, h = sizes[i % len(src)]
            name = f"{i + 1:012d}.jpg"
            link(i, img_dir / name)
            f.write(("," if i else "") + json.dumps({"license": 1, "file_name": name, "height": h, "width": w,
                                                      "id": i + 1}))
        f.write('], "annotations": [')
        a = 0
        for i, m in enumerate(per):
            for _ in range(m):
                poly, x, y, bw, bh = pool[a % len(pool)]
                cat = (a % k) + 1 + (a % k) // 10
                if a % 100 == 99:
                    seg = '{"counts": [100, 20, 300, 40, 500], "size": [%d, %d]}' % (sizes[i % len(src)][1],
                                                                                    sizes[i % len(src)][0])
                    crowd = 1
                else:
                    seg = "[" + poly + "]"
                    crowd = 0
                f.write(("," if a else "") + '{"segmentation": %s, "area": %.2f, "iscrowd": %d, "image_id": %d, '
                        '"bbox": [%.2f, %.2f, %.2f, %.2f], "category_id": %d, "id": %d}'
                        % (seg, bw * bh * 0.7, crowd, i + 1, x, y, bw, bh, cat, a + 1))
                a += 1
        f.write("]}")


# --------------------------------------------------------------------------------------------------
# one measurement (child process)
# --------------------------------------------------------------------------------------------------
def _smaps() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":", 1)
        out[k] = int(v.split()[0])
    return out


def _load(loader: str, root: Path):
    """``(dataset, read(i))`` of one loader: ``read`` touches everything ``__getitem__`` reads of the
    index for item ``i`` (images themselves are not decoded)."""
    if loader == "pretrain":
        from crossmae.data import build_pretrain_dataset
        ds = build_pretrain_dataset(root / "imagenet" / "train", 224)
        return ds, lambda i: len(ds.samples[i][0]) + ds.samples[i][1]
    if loader == "coco":
        from transfer.vitdet.data import CocoInstances
        ds = CocoInstances(root / "coco" / "annotations" / "instances_train2017.json", root / "coco" / "train2017",
                           train=True)

        def read(i):
            info, n = ds.images[i], 0
            for a in ds.anns[i]:
                seg = a["segmentation"]
                n += sum(len(p.tolist()) for p in seg) if isinstance(seg, list) else len(seg["counts"])
                n += len(a["bbox"])
            return n + len(info["file_name"])
        return ds, read
    from transfer.classification.data import load_train_val
    cfg = {"imagefolder": dict(type="imagefolder", root="imagenet", num_classes=1000),
           "places365": dict(type="places365", root="places365", num_classes=365),
           "inat2019": dict(type="inat2019", root="inat2019", num_classes=1010)}[loader]
    train, val = load_train_val(cfg, root)
    s = train.samples
    return (train, val), lambda i: len(s[i][0]) + s[i][1]


def _length(ds) -> int:
    return len(ds[0].samples) if isinstance(ds, tuple) else len(ds)


def child(loader: str, root: Path, workers: int) -> dict:
    import gc
    import torch  # noqa: F401  (imports counted in the baseline)
    import crossmae.data  # noqa: F401
    import transfer.classification.data  # noqa: F401
    import transfer.vitdet.data  # noqa: F401
    gc.collect()
    m0 = _smaps()
    t0 = time.perf_counter()
    ds, read = _load(loader, root)
    secs = time.perf_counter() - t0
    gc.collect()
    m1 = _smaps()
    out = {"seconds": secs, "items": _length(ds),
           "held_mb": (m1["Private_Dirty"] - m0["Private_Dirty"]) / 1024, "rss_mb": (m1["Rss"] - m0["Rss"]) / 1024}
    if workers:
        out["worker_gain_mb"] = _worker_pass(_length(ds), read, workers)
    return out


class _Pass:
    def __init__(self, n, read):
        self.n, self.read = n, read

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.read(i)


_BASE: dict = {}


def _init(worker_id):
    _BASE["kb"] = _smaps()["Private_Dirty"]


def _collate(batch):
    import torch.utils.data as tud
    return tud.get_worker_info().id, sum(batch), _smaps()["Private_Dirty"] - _BASE["kb"]


def _worker_pass(n: int, read, workers: int) -> float:
    from torch.utils.data import DataLoader
    last: dict[int, int] = {}
    for wid, _, gain in DataLoader(_Pass(n, read), batch_size=4096, num_workers=workers, collate_fn=_collate,
                                   worker_init_fn=_init):
        last[wid] = gain
    return max(last.values()) / 1024


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def _run_child(loader: str, root: Path, cache: Path, workers: int) -> dict:
    env = dict(os.environ, CROSSMAE_INDEX_CACHE=str(cache), PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("CROSSMAE_DATA_ROOT", None)
    r = subprocess.run([sys.executable, "-m", "benchmarks.data_scale", "--child", loader, "--child-root", str(root),
                        "--workers", str(workers)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"measuring {loader} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _table(doc: dict) -> str:
    rows = [f"{'loader':<12} {'items':>10} {'cold s':>8} {'warm s':>8} {'held MB':>8} {'RSS MB':>8} {'worker +MB':>10}"]
    for name, r in doc["loaders"].items():
        if "warm_s" not in r:
            continue
        rows.append(f"{name:<12} {r['items']:>10} {r['cold_s']:>8.1f} {r['warm_s']:>8.2f} {r['held_mb']:>8.1f} "
                    f"{r['rss_mb']:>8.1f} {r['worker_gain_mb']:>10.1f}")
    return "\n".join(rows)


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_scale", description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply every count (default 1 = full size)")
    p.add_argument("--datasets", default=",".join(FULL), help=f"comma list of {', '.join(FULL)}")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the memory pass (0 = skip)")
    p.add_argument("--data-root", default=None, help="the bundled data (JPEGs to link to)")
    p.add_argument("--scratch", default=None, help="folder for the trees and the index cache (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (trees and cache)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.child_root), args.workers)))
        return None
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for d in names:
        if d not in FULL:
            raise UserError(f"--datasets {d!r}: expected one of {', '.join(FULL)}")
    if not 0 < args.scale <= 1 or args.workers < 0:
        raise UserError("--scale must be in (0, 1] and --workers >= 0")
    out = check_writable(args.out, "--out", folder=False)
    data_root = resolve_data_root(args.data_root)
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="crossmae-data-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    doc = {"command": "python -m benchmarks.data_scale " + " ".join(sys.argv[1:] if argv is None else argv),
           "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "scale": args.scale,
           "workers": args.workers,
           "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                           "loadavg_start": os.getloadavg()},
           "trees": {}, "loaders": {}}

    def save():
        doc["environment"]["loadavg_now"] = os.getloadavg()
        atomic_write_json(doc, out)

    try:
        for d in names:
            a, b, k = FULL[d]
            floor = k if d == "imagenet" else 1     # ImageFolder: every class folder holds an image
            a, b = max(int(round(a * args.scale)), floor), max(int(round(b * args.scale)), floor)
            tree, cache = scratch / "data", scratch / "cache"
            t0 = time.perf_counter()
            maker = {"imagenet": make_imagenet, "places365": make_places, "inat2019": make_inat, "coco": make_coco}[d]
            src = _jpegs(data_root, "coco/train2017" if d == "coco" else "imagenet/train", scratch)
            print(f"{d}: making the tree ({a} + {b}) ...", file=sys.stderr, flush=True)
            maker(tree / d, src, a, b, k)
            doc["trees"][d] = {"counts": [a, b, k], "make_s": round(time.perf_counter() - t0, 1)}
            save()
            for loader in LOADERS[d]:
                shutil.rmtree(cache, ignore_errors=True)
                cold = _run_child(loader, tree, cache, 0)
                warm = _run_child(loader, tree, cache, args.workers)
                doc["loaders"][loader] = {"items": warm["items"], "cold_s": cold["seconds"], "warm_s": warm["seconds"],
                                          "cold_held_mb": cold["held_mb"], "held_mb": warm["held_mb"],
                                          "rss_mb": warm["rss_mb"], "worker_gain_mb": warm.get("worker_gain_mb", 0.0),
                                          "cache_mb": sum(f.stat().st_size for f in cache.glob("*.idx")) / 2 ** 20}
                print(f"{loader}: {doc['loaders'][loader]}", file=sys.stderr, flush=True)
                save()
            if not args.keep:
                shutil.rmtree(tree / d)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(_table(doc))
    print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
