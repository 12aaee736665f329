"""Evaluation across ranks: per-sample predictions and metric sums travel through the process group
(never through a shared folder) and equal a one-process evaluation of the same weights.

Each case evaluates the same seeded tiny model on the bundled data once without a process group and
once as 2 gloo processes on 127.0.0.1 (``torch.multiprocessing`` spawn; one thread everywhere, so
both do the same float operations per image), over an odd number of images so that the shards are
uneven (each image must be counted exactly once: no ``DistributedSampler`` padding).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from crossmae.utils import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, port, *args)``: in this process (one thread) for world 1, else in
    ``world`` fresh processes forming a gloo process group."""
    if world == 1:
        n = torch.get_num_threads()
        try:
            return fn(0, 1, 0, *args)
        finally:
            torch.set_num_threads(n)
    mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, join=True, start_method="spawn")


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        import torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)


def _done(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# classification: counts reduced, per-image top-5 rows gathered to rank 0
# --------------------------------------------------------------------------------------------------
def _cls_worker(rank: int, world: int, port: int, data_root: str, out: str) -> None:
    from types import SimpleNamespace

    from crossmae.utils import load_config
    from transfer.classification import common as C
    from transfer.classification.data import ImageDataset, ShardSampler, eval_transform, load_train_val
    _init(rank, world, port)
    cfg = load_config("smoke", [], REPO_ROOT / "configs" / "inat")
    _, val = load_train_val(cfg.data, Path(data_root))
    val.samples = val.samples[:39]                     # odd: shards of 20 and 19 images
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(32, val.num_classes))
    ds = ImageDataset(val, eval_transform(32))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=ShardSampler(len(ds), rank, world))
    rows: list = []
    metrics = C.evaluate(model, loader, torch.device("cpu"), None, collect=rows)
    run = SimpleNamespace(main=rank == 0, out=Path(out))
    C.write_predictions(run, rows, val, data_root)
    if rank == 0:
        (Path(out) / "metrics.json").write_text(json.dumps({**metrics, "n": len(ds), "rows": len(rows)}))
    else:
        assert rows == []          # the rows went to rank 0 only
    _done(world)


def test_classification_two_ranks_equal_one(tmp_path, data_root):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _spawn(_cls_worker, 1, str(data_root), str(one))
    _spawn(_cls_worker, 2, str(data_root), str(two))
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["n"] == 39
    assert m1["rows"] == m2["rows"] == m1["n"]       # every val image exactly once
    assert (m1["top1"], m1["top5"]) == (m2["top1"], m2["top5"])
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-6)   # float sums in another batch grouping
    p1, p2 = (json.loads((d / "predictions.json").read_text()) for d in (one, two))
    assert p1["images"] == p2["images"] and p1["labels"] == p2["labels"] and p1["top5"] == p2["top5"]
    flat = lambda p: [v for row in p["scores"] for v in row]  # noqa: E731
    assert flat(p1) == pytest.approx(flat(p2), rel=1e-6, abs=1e-7)   # per-image: batch of 3 vs its shard
    assert len(set(p1["images"])) == m1["n"]


# --------------------------------------------------------------------------------------------------
# ADE20K: confusion matrices reduced, per-image counts and overlays gathered to rank 0
# --------------------------------------------------------------------------------------------------
def _ade_worker(rank: int, world: int, port: int, data_root: str, out: str) -> None:
    from crossmae.utils import load_config
    from transfer import ade20k
    from transfer.seg.data import SegTestDataset, read_class_names
    _init(rank, world, port)
    cfg = load_config("smoke", ["test.max_images=5", "test.num_overlays=3"], ade20k.PRESET_DIR)
    root = Path(data_root) / cfg.data.dataset
    ds = SegTestDataset(root, cfg.data.val_split, cfg.model.num_classes, tuple(cfg.data.scale),
                        cfg.data.reduce_zero_label)
    torch.manual_seed(0)
    model = ade20k.build_model(cfg)
    # each rank its own overlay folder: only rank 0 may write (the others' images reach it gathered)
    overlays = Path(out) / ("overlays" if rank == 0 else f"overlays_rank{rank}")
    res = ade20k.evaluate(model, ds, cfg, read_class_names(root, cfg.model.num_classes), None, overlays, None)
    if rank == 0:
        (Path(out) / "result.json").write_text(json.dumps(res))
    else:
        assert res["per_image"]["images"] == [] and not overlays.exists()
    _done(world)


def test_ade20k_two_ranks_equal_one(tmp_path, data_root):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _spawn(_ade_worker, 1, str(data_root), str(one))
    _spawn(_ade_worker, 2, str(data_root), str(two))
    r1, r2 = (json.loads((d / "result.json").read_text()) for d in (one, two))
    assert len(r1["per_image"]["images"]) == 5                  # 5 images over 2 ranks: 3 + 2, none twice
    assert r1 == r2                                              # per-image counts, mIoU / mAcc / aAcc, per class
    o1, o2 = sorted((one / "overlays").iterdir()), sorted((two / "overlays").iterdir())
    assert [p.name for p in o1] == [p.name for p in o2] and len(o1) == 3   # the first 3 images, both ranks' ones
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(o1, o2))


# --------------------------------------------------------------------------------------------------
# COCO: the command's --eval-only as 1 and as 2 processes (torchrun): detections gathered to rank 0
# --------------------------------------------------------------------------------------------------
COCO_OPTS = ["model.img_size=128", "data.image_size=128", "data.test_short_edge=128", "data.test_max_size=128",
             "model.roi_heads.score_thresh=0.0", "model.roi_heads.detections_per_img=20"]


def test_coco_eval_only_two_ranks_equal_one(tmp_path, data_root):
    from crossmae.utils import load_config
    from transfer import coco
    from transfer.vitdet.model import build_model
    cfg = load_config("smoke", COCO_OPTS, coco.PRESET_DIR)
    torch.manual_seed(0)
    weights = tmp_path / "model_final.pth"
    torch.save({"model": build_model(cfg.model.to_dict()).state_dict()}, weights)
    env = dict(os.environ, OMP_NUM_THREADS="1", CROSSMAE_DATA_ROOT=str(data_root),
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "transfer.coco", "--config", "smoke",
               "--eval-only", "--weights", str(weights), "--output-dir", str(out), "--cfg-options", *COCO_OPTS]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO_ROOT))
        assert r.returncode == 0, r.stderr[-2000:]
        outs[n] = out
    f1, f2 = (outs[n] / "inference" / "coco_instances_results.json" for n in (1, 2))
    assert f1.read_bytes() == f2.read_bytes()                    # the same detections, in dataset order
    assert len({d["image_id"] for d in json.loads(f1.read_text())}) == 20
    m1, m2 = (json.loads((outs[n] / "metrics.json").read_text(), parse_constant=float) for n in (1, 2))
    assert m1["metrics"] == m2["metrics"] and m1["per_category"] == m2["per_category"]
    assert (m1["world_size"], m2["world_size"]) == (1, 2) and m2["num_nodes"] == 1
