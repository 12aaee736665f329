"""The dataset index layer (crossmae.index): cached once, rebuilt when its source changes, refused
when foreign / truncated / a symlink, shared by concurrent processes, never written into the data,
copy-free in DataLoader workers, and giving exactly the samples of the original loaders."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from crossmae import index as I
from crossmae.utils import UserError
from transfer.classification.data import load_imagefolder, load_inat2019, load_places365

REPO = Path(__file__).resolve().parent.parent


def _places_tree(root: Path, n: int) -> Path:
    """A Places365-layout folder with a train list of ``n`` lines over 2 categories (no images:
    loaded with ``check_files=False``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "categories_places365.txt").write_text("/a/airfield 0\n/b/beach 1\n")
    lines = [f"/{'a/airfield' if i % 3 else 'b/beach'}/{i:08d}.jpg {0 if i % 3 else 1}" for i in range(n)]
    (root / "places365_train_standard.txt").write_text("\n".join(lines) + "\n")
    return root


def _builds(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "building the index" in r.getMessage()]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(I.CACHE_ENV, str(folder))
    return folder


def test_rebuilt_when_source_changes(tmp_path, cache, caplog):
    caplog.set_level(logging.WARNING, "crossmae.index")
    root = _places_tree(tmp_path / "places", 30)
    a = load_places365(root, "train", check_files=False)
    assert len(_builds(caplog)) == 1 and len(a.samples) == 30
    b = load_places365(root, "train", check_files=False)
    assert len(_builds(caplog)) == 1, "a current cache must not be rebuilt"
    assert b.index_fingerprint == a.index_fingerprint and list(b.samples) == list(a.samples)
    lst = root / "places365_train_standard.txt"
    lst.write_text(lst.read_text() + "/b/beach/99999999.jpg 1\n")
    c = load_places365(root, "train", check_files=False)
    msgs = _builds(caplog)
    assert len(msgs) == 2 and f"{lst} changed" in msgs[1]
    assert len(c.samples) == 31 and c.samples[30] == (str(root / "data_256/b/beach/99999999.jpg"), 1)
    assert c.index_fingerprint != a.index_fingerprint
    # the fingerprint is of the content: the same data rebuilt elsewhere gives the same one
    other = tmp_path / "other-cache"
    os.environ[I.CACHE_ENV] = str(other)
    assert load_places365(root, "train", check_files=False).index_fingerprint == c.index_fingerprint


def _patch(raw: bytes, name: str, item: int, value: np.generic) -> bytes:
    """``raw`` (a cache file) with element ``item`` of array ``name`` set to ``value``."""
    hlen = int.from_bytes(raw[16:24], "little")
    spec = json.loads(raw[24:24 + hlen])["arrays"][name]
    start = (24 + hlen + I.ALIGN - 1) // I.ALIGN * I.ALIGN + spec["offset"] + item * value.nbytes
    return raw[:start] + value.tobytes() + raw[start + value.nbytes:]


def test_foreign_truncated_and_symlinked_cache_files_are_rebuilt(tmp_path, cache, caplog):
    caplog.set_level(logging.WARNING, "crossmae.index")
    root = _places_tree(tmp_path / "places", 50)
    ref = load_places365(root, "train", check_files=False)
    want = list(ref.samples)
    (path,) = cache.glob("places365-*.idx")
    data = path.read_bytes()
    other = load_places365(_places_tree(tmp_path / "p2", 7), "train", check_files=False)
    other_path = next(p for p in cache.glob("places365-*.idx") if p != path)
    cases = {
        "truncated": lambda: path.write_bytes(data[:-100]),
        "bad magic": lambda: path.write_bytes(b"garbage" * 100),
        "foreign": lambda: path.write_bytes(other_path.read_bytes()),
        "symlink": lambda: (path.unlink(), path.symlink_to(tmp_path / "p2" / "categories_places365.txt")),
        "fifo": lambda: (path.unlink(), os.mkfifo(path)),  # never opened blocking: no hang, rebuilt
        "corrupt header": lambda: path.write_bytes(data[:30] + b"}" + data[31:]),
        "label out of range": lambda: path.write_bytes(_patch(data, "labels", 3, np.int32(7))),
        "offsets decrease": lambda: path.write_bytes(_patch(data, "path_off", 5, np.int64(1))),
    }
    for why, damage in cases.items():
        n = len(_builds(caplog))
        damage()
        again = load_places365(root, "train", check_files=False)
        msgs = _builds(caplog)
        assert len(msgs) == n + 1, why
        assert list(again.samples) == want and again.index_fingerprint == ref.index_fingerprint, why
        assert path.is_file() and not path.is_symlink()
    assert (tmp_path / "p2" / "categories_places365.txt").read_text().startswith("/a/airfield"), \
        "the symlink target was never written"
    assert other.index_fingerprint != ref.index_fingerprint


def test_a_file_planted_at_a_temporary_name_is_never_written_into(tmp_path, cache, caplog, monkeypatch):
    """The cache file is written through crossmae.safeio's atomic write (a fresh ``O_EXCL`` temporary
    name): a hard link planted at the name a pid-based writer would use (``.<file>.<pid>.tmp``, the
    pid made predictable here) keeps its content, and the rebuilt index is correct."""
    caplog.set_level(logging.WARNING, "crossmae.index")
    root = _places_tree(tmp_path / "places", 20)
    want = list(load_places365(root, "train", check_files=False).samples)
    (path,) = cache.glob("places365-*.idx")
    path.write_bytes(b"garbage" * 10)                                  # stale: rebuilt on next load
    victim = tmp_path / "precious.txt"
    victim.write_text("precious\n")
    monkeypatch.setattr(os, "getpid", lambda: 4242)                    # the child inherits it (fork)
    os.link(victim, cache / f".{path.name}.4242.tmp")
    again = load_places365(root, "train", check_files=False)
    assert list(again.samples) == want and len(_builds(caplog)) == 2
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith(".tmp")) == [f".{path.name}.4242.tmp"]


def test_version_change_rebuilds(tmp_path, cache, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, "crossmae.index")
    root = _places_tree(tmp_path / "places", 10)
    load_places365(root, "train", check_files=False)
    (path,) = cache.glob("*.idx")
    # a file of another index version at this key's name (as an older release would have left)
    raw = path.read_bytes()
    hlen = int.from_bytes(raw[16:24], "little")
    header = json.loads(raw[24:24 + hlen])
    header["version"] = I.INDEX_VERSION + 1
    hb = json.dumps(header).encode().ljust(hlen)
    path.write_bytes(raw[:24] + hb + raw[24 + hlen:])
    load_places365(root, "train", check_files=False)
    msgs = _builds(caplog)
    assert len(msgs) == 2 and "index version" in msgs[1]


def test_never_inside_the_data_root(tmp_path, monkeypatch, data_root):
    root = _places_tree(tmp_path / "places", 5)
    monkeypatch.setenv(I.CACHE_ENV, str(root / "cache"))
    with pytest.raises(UserError, match="inside the data folder"):
        load_places365(root, "train", check_files=False)
    assert not (root / "cache").exists()
    # the default and the tests' cache folders: nothing is ever written into the bundled data root
    monkeypatch.setenv(I.CACHE_ENV, str(tmp_path / "c"))
    before = sorted(str(p) for p in data_root.rglob("*"))
    load_imagefolder(data_root / "imagenet", "train")
    load_inat2019(data_root / "inat2019", "val")
    assert sorted(str(p) for p in data_root.rglob("*")) == before
    assert list((tmp_path / "c").glob("*.idx"))


_CONCURRENT = textwrap.dedent("""
    import sys, time, hashlib
    from pathlib import Path
    from transfer.classification.data import load_places365
    ready = Path(sys.argv[2]); ready.mkdir(exist_ok=True); (ready / sys.argv[3]).touch()
    while len(list(ready.iterdir())) < 2:
        time.sleep(0.01)
    d = load_places365(sys.argv[1], "train", check_files=False)
    h = hashlib.sha256("".join(f"{p} {y}\\n" for p, y in d.samples).encode()).hexdigest()
    print(d.index_fingerprint, h, len(d.samples))
""")


def test_two_processes_share_one_build(tmp_path, cache):
    root = _places_tree(tmp_path / "places", 200_000)
    env = dict(os.environ, PYTHONPATH=str(REPO), **{I.CACHE_ENV: str(cache)})
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(root), str(tmp_path / "ready"), name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    err = "".join(e for _, e in outs)
    assert err.count("building the index") == 1, err
    assert err.count("waiting for another process to finish") == 1, err
    assert outs[0][0] == outs[1][0] and outs[0][0].split()[2] == "200000"
    assert len(list(cache.glob("*.idx"))) == 1 and not list(cache.glob(".*.tmp"))


def test_lock_wait_is_bounded(tmp_path, cache, monkeypatch):
    import fcntl
    root = _places_tree(tmp_path / "places", 5)
    cache.mkdir()
    key = I._key("places365", root.absolute(), {"given": str(root), "split": "train", "check_files": False})
    fd = os.open(cache / f"places365-{key}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    monkeypatch.setenv(I.LOCK_TIMEOUT_ENV, "0.3")
    try:
        with pytest.raises(UserError, match=r"waited 0.3 s for another process to finish the index of .*places365_train"):
            load_places365(root, "train", check_files=False)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# workers copy nothing
# --------------------------------------------------------------------------------------------------
def _private_dirty_kb() -> int:
    """Private_Dirty of this process (kB): pages it wrote that no other process shares (copy-on-write
    copies of the parent's pages included)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise RuntimeError("no Private_Dirty in smaps_rollup")


class _ReadAll(Dataset):
    """Reads everything an item holds (the path string and the label)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        p, y = self.samples[i]
        return len(p) + y


def _collate(batch):
    return sum(batch), _private_dirty_kb()


def _worker_gain_kb(samples) -> int:
    loader = DataLoader(_ReadAll(samples), batch_size=8192, num_workers=1, collate_fn=_collate)
    marks = [kb for _, kb in loader]
    return marks[-1] - marks[0]


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc/<pid>/smaps_rollup")
def test_worker_private_memory_stays_flat(tmp_path, cache):
    n = 250_000
    data = load_places365(_places_tree(tmp_path / "places", n), "train", check_files=False)
    assert len(data.samples) == n
    gain_index = _worker_gain_kb(data.samples)
    # the representation the loaders used before: a list of (str, int) tuples
    old = [(p, y) for p, y in data.samples]
    gain_list = _worker_gain_kb(old)
    bound = 8 * 1024   # kB
    assert gain_list > bound, f"the bound must catch the list-of-tuples copy ({gain_list} kB)"
    assert gain_index < bound, f"a worker's private memory grew by {gain_index} kB over one pass"


# --------------------------------------------------------------------------------------------------
# same samples as the original loaders on the bundled data
# --------------------------------------------------------------------------------------------------
def test_pretrain_imagefolder_equals_torchvision(data_root):
    from torchvision import datasets
    from crossmae.data import build_pretrain_dataset
    folder = data_root / "imagenet" / "train"
    ref = datasets.ImageFolder(str(folder))
    ours = build_pretrain_dataset(folder, 32)
    assert list(ours.samples) == ref.samples and ours.classes == ref.classes
    assert ours.class_to_idx == ref.class_to_idx and list(ours.targets) == ref.targets
    sub = build_pretrain_dataset(folder, 32, subset=7)
    step = len(ref.samples) / 7
    assert list(sub.samples) == [ref.samples[int(i * step)] for i in range(7)]


def test_recursive_walk_equals_torchvision_on_an_odd_tree(tmp_path, data_root):
    from torchvision import datasets
    from crossmae.data import PretrainImageFolder
    jpg = next((data_root / "imagenet" / "train").rglob("*.JPEG"))
    root = tmp_path / "odd"
    for rel in ("b/1.JPEG", "b/sub/deeper/0.png", "b/sub/2.jpg", "a/Z.JPG", "a/y.txt", "a/.hidden.jpeg",
                "outside/3.jpg", "outside/4.webp"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpg.read_bytes())
    (root / "a" / "link.jpg").symlink_to(jpg)                 # a symlinked image
    (root / "a" / "linkdir").symlink_to(root / "outside")     # a symlinked folder: walked into
    (root / "a" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (root / "c").mkdir()
    (root / "c" / "x.jpg").mkdir()                            # a folder named like an image: walked into
    (root / "c" / "x.jpg" / "5.jpg").write_bytes(jpg.read_bytes())
    import shutil
    shutil.move(root / "outside", tmp_path / "outside")
    (root / "a" / "linkdir").unlink()
    (root / "a" / "linkdir").symlink_to(tmp_path / "outside")
    ref = datasets.ImageFolder(str(root))
    ours = PretrainImageFolder(root)
    assert list(ours.samples) == ref.samples and ours.classes == ref.classes


def test_classification_loaders_equal_the_original_code(data_root):
    # ImageFolder: the original load_imagefolder listing
    d = data_root / "imagenet" / "train"
    classes = sorted(p.name for p in d.iterdir() if p.is_dir())
    want = [(str(p), k) for k, c in enumerate(classes)
            for p in sorted(q for q in (d / c).iterdir() if q.suffix.lower() in I_EXT)]
    got = load_imagefolder(data_root / "imagenet", "train")
    assert list(got.samples) == want and got.classes == classes
    # Places365: the original list-file reading
    r = data_root / "places365"
    for split, (lst, img) in {"train": ("places365_train_standard.txt", "data_256"),
                              "val": ("places365_val.txt", "val_256")}.items():
        want = [(str(r / img / ln.split()[0].lstrip("/")), int(ln.split()[1]))
                for ln in (r / lst).read_text().splitlines() if ln.strip()]
        assert list(load_places365(r, split).samples) == want
    # iNat 2019: json order of 'images', label = rank of the category id
    r = data_root / "inat2019"
    for split in ("train", "val"):
        js = json.loads((r / f"{split}2019.json").read_text())
        ids = sorted(c["id"] for c in js["categories"])
        lab = {a["image_id"]: ids.index(a["category_id"]) for a in js["annotations"]}
        want = [(str(r / im["file_name"]), lab[im["id"]]) for im in js["images"]]
        got = load_inat2019(r, split)
        assert list(got.samples) == want and got.extra["category_ids"] == ids


I_EXT = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def test_coco_and_ade20k_indexes_equal_the_json_and_the_folder_scan(data_root):
    from transfer.seg.data import _scan_split, scan_split
    from transfer.vitdet.data import CocoInstances
    coco = data_root / "coco"
    ann = coco / "annotations" / "instances_val2017.json"
    js = json.loads(ann.read_text())
    ds = CocoInstances(ann, coco / "val2017", train=False)
    by_img: dict = {}
    for a in js["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    ims = sorted(js["images"], key=lambda im: im["id"])
    assert [im["id"] for im in ds.images] == [im["id"] for im in ims]
    for i, im in enumerate(ims):
        assert ds.images[i] == {k: im[k] for k in ("id", "file_name", "height", "width")}
        kept = [a for a in by_img.get(im["id"], []) if CocoInstances._valid(dict(a))]
        got = ds.anns[i]
        assert [a["id"] for a in got] == [a["id"] for a in kept]
        for g, a in zip(got, kept):
            assert g["bbox"] == [float(v) for v in a["bbox"]] and g["category_id"] == a["category_id"]
            assert g["iscrowd"] == a.get("iscrowd", 0)
            if isinstance(a["segmentation"], list):
                polys = [p for p in a["segmentation"] if len(p) % 2 == 0 and len(p) >= 6]
                assert len(g["segmentation"]) == len(polys)
                for gp, p in zip(g["segmentation"], polys):
                    assert gp.dtype == np.float64 and gp.tolist() == [float(v) for v in p]
            else:
                assert g["segmentation"] == a["segmentation"]
    ade = next(p for p in data_root.rglob("ADEChallengeData2016") if p.is_dir())
    for split in ("training", "validation"):
        assert list(scan_split(ade, split)) == _scan_split(ade, split)


def test_pickles_as_a_reference_to_the_cache_file(tmp_path, cache, data_root):
    import pickle
    from transfer.vitdet.data import CocoInstances
    data = load_places365(_places_tree(tmp_path / "places", 20_000), "train", check_files=False)
    blob = pickle.dumps(data.samples)
    assert len(blob) < 4096, "a worker started with spawn must not receive a copy of the arrays"
    assert list(pickle.loads(blob)) == list(data.samples)
    coco = data_root / "coco"
    ds = CocoInstances(coco / "annotations" / "instances_val2017.json", coco / "val2017", train=False)
    back = pickle.loads(pickle.dumps(ds))
    assert [back.images[i] for i in range(len(ds))] == [ds.images[i] for i in range(len(ds))]
    assert back.index_fingerprint == ds.index_fingerprint


def test_resume_on_a_changed_split_is_refused_naming_the_file(tmp_path, cache):
    from crossmae.runs import RunDir
    root = _places_tree(tmp_path / "places", 40)
    lst = root / "places365_train_standard.txt"

    def run_dir():
        run = RunDir(tmp_path / "run", "places", {"config": {"x": 1}}, "x = 1\n")
        data = load_places365(root, "train", check_files=False)   # inputs are read before start()
        return run, data

    run, data = run_dir()
    run.start()
    assert json.loads((run.out / "run.json").read_text())["data_index"] == {str(lst): data.index_fingerprint}
    torch.save({"model": {}}, run.out / "checkpoint-latest.pth")
    run.close()
    again, _ = run_dir()          # same data: resumes
    assert again.start().resume_from == run.out / "checkpoint-latest.pth"
    again.close()
    lst.write_text(lst.read_text().replace("/b/beach/00000000.jpg 1", "/a/airfield/00000000.jpg 0"))
    changed, _ = run_dir()
    with pytest.raises(UserError, match=rf"^{lst}: the data split changed since the run being resumed started"):
        changed.start()
    fresh, data = run_dir()
    fresh.out = tmp_path / "run2"
    res = fresh.start().finish({"metrics": {}})
    assert res["data_index"] == {str(lst): data.index_fingerprint}
    fresh.close()


def test_build_runs_in_a_child_and_its_errors_come_back(tmp_path, cache):
    data = tmp_path / "data"
    data.mkdir()
    def bad_input():
        raise UserError(f"{tmp_path}: broken list")

    def bug():
        return {}["missing"]

    with pytest.raises(UserError, match="broken list"):
        I.load_or_build("test", data, data, {"n": 1}, bad_input)
    with pytest.raises(RuntimeError, match=r"(?s)index build failed in the child process.*KeyError: 'missing'"):
        I.load_or_build("test", data, data, {"n": 2}, bug)
    made = []
    idx = I.load_or_build("test", data, data, {"n": 3},
                          lambda: made.append(1) or ({"a": np.arange(5)}, {"m": 1}, [I.dir_source(data)]))
    assert not made, "the build ran in the child process, not here"
    assert idx["a"].tolist() == [0, 1, 2, 3, 4] and not idx["a"].flags.writeable and idx.meta == {"m": 1}


def test_a_symlinked_cache_folder_is_refused_before_any_build(tmp_path, caplog, monkeypatch):
    """Like the download cache, the index cache folder must be a real folder: a symlink there is
    one line naming it, before the (at full size, long) build starts, and nothing is written."""
    caplog.set_level(logging.WARNING, "crossmae.index")
    root = _places_tree(tmp_path / "places", 5)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    monkeypatch.setenv(I.CACHE_ENV, str(tmp_path / "link"))
    with pytest.raises(UserError, match=r"link: index cache folder is a symlink; refused"):
        load_places365(root, "train", check_files=False)
    assert _builds(caplog) == [] and list((tmp_path / "real").iterdir()) == []


def test_unwritable_cache_folder_is_one_line(tmp_path, cache, monkeypatch):
    root = _places_tree(tmp_path / "places", 5)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv(I.CACHE_ENV, str(tmp_path / "afile"))
    with pytest.raises(UserError, match=r"afile: cannot create the index cache folder"):
        load_places365(root, "train", check_files=False)
    monkeypatch.setenv(I.CACHE_ENV, str(cache))
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    cache.mkdir()
    cache.chmod(0o500)
    try:
        with pytest.raises(UserError, match=r"cannot open the index lock file"):
            load_places365(root, "train", check_files=False)
    finally:
        cache.chmod(0o700)
