"""``python -m transfer.coco`` end to end on the real mini COCO: outputs, resume equality, --eval-only,
and one-line errors (exit 2, no metrics.json) for bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from transfer import coco

# 128-px tiny detector; score threshold 0 so that the untrained model produces detections and the
# whole inference path (mask pasting, RLE, COCOeval on real predictions) runs.
OPTS = ["model.img_size=128", "data.image_size=128", "data.test_short_edge=128", "data.test_max_size=128",
        "train.checkpoint_period=1", "train.eval_period=0", "train.log_period=1",
        "model.roi_heads.score_thresh=0.0", "model.roi_heads.detections_per_img=20"]



def _run(tmp, name, backbone, data_root, *extra, iters=2):
    out = tmp / name
    argv = ["--config", "smoke", "--backbone", str(backbone), "--data-root", str(data_root), "--output-dir", str(out),
            "--cfg-options", *OPTS, f"train.max_iter={iters}", *extra]
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # also for the module-scoped run: equal thread counts give equal sums
    try:
        return out, coco.main(argv)
    finally:
        torch.set_num_threads(n)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root, tiny_mae_official):
    tmp = tmp_path_factory.mktemp("coco_cli")
    return _run(tmp, "straight", tiny_mae_official, data_root)


def test_outputs_and_metrics(straight, tiny_mae_official):
    out, result = straight
    for f in ("config.py", "log.txt", "checkpoint-latest.pth", "checkpoint-1.pth", "checkpoint-2.pth",
              "model_final.pth", "metrics.json", "inference/coco_instances_results.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text(), parse_constant=float)
    assert m["task"] == "coco" and m["protocol"] == "mask_rcnn_vitdet_smoke" and m["iters"] == 2
    for k in ("APbox", "APmask", "bbox/AP50", "bbox/APl", "segm/AP75", "segm/APs"):
        assert k in m["metrics"]
    assert not math.isnan(m["metrics"]["APbox"])                     # real predictions were evaluated
    assert set(m["per_category"]) == {"bbox", "segm"} and len(m["per_category"]["bbox"]) == 80
    rep = m["backbone_report"]
    assert rep["format"] == "mae_pretrain" and rep["n_missing"] == 8 and all(".rel_pos_" in k for k in rep["missing"])
    assert m["backbone_sha256"] == rep["sha256"] and m["backbone"] == str(tiny_mae_official)
    preds = json.loads((out / "inference/coco_instances_results.json").read_text())
    assert preds and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(preds[0])
    assert len(m["train_losses"]) >= 6 and result["metrics"].keys() == m["metrics"].keys()


def test_resume_equals_uninterrupted(straight, tmp_path, data_root, tiny_mae_official):
    out_a, res_a = straight
    out_1, _ = _run(tmp_path, "one", tiny_mae_official, data_root, iters=1)
    # a finished run is final: continue from its checkpoint in a new folder
    out_b, res_b = _run(tmp_path, "resumed", tiny_mae_official, data_root,
                        "--resume", str(out_1 / "checkpoint-latest.pth"), iters=2)   # resumes at iter 1
    assert "resumed from iteration 1" in (out_b / "log.txt").read_text()
    sa = torch.load(out_a / "checkpoint-latest.pth", weights_only=False)
    sb = torch.load(out_b / "checkpoint-latest.pth", weights_only=False)
    assert sa["iter"] == sb["iter"] == 2
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert res_a["train_losses"] == res_b["train_losses"]
    assert all(_same(res_a["metrics"][k], res_b["metrics"][k]) for k in res_a["metrics"])
    assert res_b["backbone_report"] == res_a["backbone_report"]   # carried through the checkpoint


def test_eval_only_reproduces_final_metrics(straight, tmp_path, data_root):
    out_a, res_a = straight
    res = coco.main(["--eval-only", "--weights", str(out_a / "model_final.pth"), "--config", "smoke",
                     "--data-root", str(data_root), "--output-dir", str(tmp_path / "ev"), "--cfg-options", *OPTS])
    assert (tmp_path / "ev/metrics.json").is_file()
    assert all(_same(res_a["metrics"][k], res["metrics"][k]) for k in res_a["metrics"])


def _fails(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        coco.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and match in err[-1], err


def test_bad_input_exits_2_without_metrics(tmp_path, capsys, data_root, tiny_mae_official):
    out = tmp_path / "bad"
    base = ["--config", "smoke", "--output-dir", str(out)]
    _fails(capsys, base + ["--backbone", str(tiny_mae_official), "--data-root", str(tmp_path)],
           "COCO folder not found")
    _fails(capsys, base + ["--backbone", str(tmp_path / "missing.pth"), "--data-root", str(data_root)],
           "missing.pth: --backbone checkpoint not found")
    _fails(capsys, base + ["--data-root", str(data_root)], "--backbone is required")
    _fails(capsys, base + ["--eval-only", "--data-root", str(data_root)], "--eval-only needs --weights")
    _fails(capsys, base + ["--backbone", "none", "--cfg-options", "nope=1"], "unknown key")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    _fails(capsys, base + ["--eval-only", "--weights", str(junk), "--data-root", str(data_root)], "junk.pth")
    assert not (out / "metrics.json").exists()


def test_ddp_two_processes_with_accumulation(tmp_path, data_root, tiny_mae_official):
    """torchrun, 2 CPU processes (gloo), total batch 4 = 2 processes x 1 image x 2 accumulation steps;
    the evaluation is sharded over the ranks and gathered on rank 0."""
    import os
    import subprocess
    import sys
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", CROSSMAE_DATA_ROOT=str(data_root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29761",
           "-m", "transfer.coco", "--config", "smoke", "--backbone", str(tiny_mae_official),
           "--output-dir", str(out), "--cfg-options", *OPTS, "train.max_iter=1", "train.total_batch_size=4",
           "train.batch_size=1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                       cwd=str(coco.REPO_ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es), accumulation 2" in (out / "log.txt").read_text()
    preds = json.loads((out / "inference/coco_instances_results.json").read_text())
    assert len({p["image_id"] for p in preds}) == 20          # both ranks' shards gathered
    assert json.loads((out / "metrics.json").read_text(), parse_constant=float)["iters"] == 1
