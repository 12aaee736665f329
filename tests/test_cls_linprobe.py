"""Linear probing end to end on the real mini datasets: MAE protocol, fast cached multi-head probe
(cache hits, hold-out selection blind to val, resume), per-block curve, kNN."""
from __future__ import annotations

import json

import pytest
import torch

from transfer import inat, linprobe, places
from transfer.classification import linprobe as lp_protocol
from transfer.classification.data import ClassificationData



def _argv(ckpt, data_root, out, cache, *opts, config="smoke"):  # noqa: F811
    return ["--backbone", str(ckpt), "--config", config, "--data-root", str(data_root), "--output-dir", str(out),
            "--cfg-options", f"fast.cache_dir={cache}", "deterministic=True", *opts]


def test_fast_probe_grid_cache_and_blind_selection(tiny_crossmae_ckpt, data_root, tmp_path, monkeypatch):  # noqa: F811
    cache = tmp_path / "cache"
    a = linprobe.main(_argv(tiny_crossmae_ckpt, data_root, tmp_path / "a", cache, "protocol=fast"))
    assert a["protocol"] == "linprobe_fast"
    # 4 blocks x {token, avg} entries, train + val, all misses on a cold cache
    assert a["cache"] == {"hits": 0, "misses": 16}
    assert len(a["grid"]) == 3 * 4  # 3 blrs x {token, avg} x {last, last4}
    assert {g["features"] for g in a["grid"]} == {"token_last", "token_last4", "avg_last", "avg_last4"}
    best = max(a["grid"], key=lambda g: g["holdout_top1"])
    assert a["choice"]["holdout_top1"] == best["holdout_top1"]
    assert a["selection_split"].startswith("train holdout (30 of 120")
    assert not any("val" in k for g in a["grid"] for k in g)
    for k in ("top1", "top5", "knn_token_top1", "knn_avg_top1"):
        assert 0.0 <= a["metrics"][k] <= 100.0
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["choice"] == a["choice"] and saved["grid"] == a["grid"]

    # warm cache: same grid, same result, no extraction
    b = linprobe.main(_argv(tiny_crossmae_ckpt, data_root, tmp_path / "b", cache, "protocol=fast"))
    assert b["cache"] == {"hits": 16, "misses": 0}
    assert b["grid"] == a["grid"] and b["metrics"] == a["metrics"]

    # corrupt the VAL labels: the selection (hold-out scores, choice, hold-out indices) cannot change
    real = lp_protocol.load_train_val

    def scrambled(data_cfg, data_root):
        tr, va = real(data_cfg, data_root)
        g = torch.Generator().manual_seed(0)
        ys = torch.randint(0, va.num_classes, (len(va.samples),), generator=g).tolist()
        return tr, ClassificationData([(p, y) for (p, _), y in zip(va.samples, ys)], va.classes, va.source)

    monkeypatch.setattr(lp_protocol, "load_train_val", scrambled)
    c = linprobe.main(_argv(tiny_crossmae_ckpt, data_root, tmp_path / "c", cache, "protocol=fast"))
    assert c["cache"] == {"hits": 8, "misses": 8}  # train hit, val (other labels) re-extracted
    assert c["grid"] == a["grid"] and c["choice"] == a["choice"]
    assert c["holdout_indices_sha256"] == a["holdout_indices_sha256"]


class Preempted(Exception):
    pass


def test_fast_probe_resume_and_blocks_curve(tiny_crossmae_ckpt, data_root, tmp_path, monkeypatch,  # noqa: F811
                                           optimizer_steps):
    cache = tmp_path / "cache"
    opts = ("protocol=fast", "fast.checkpoint_period=1")
    optimizer_steps.reset()
    full = linprobe.main(_argv(tiny_crossmae_ckpt, data_root, tmp_path / "full", cache, *opts))
    epochs = len(full["history"])
    per_epoch, rest = divmod(optimizer_steps.n, epochs)
    assert epochs == 3 and per_epoch > 0 and rest == 0

    def stop(epoch):
        if epoch == 1:
            raise Preempted()

    monkeypatch.setattr(lp_protocol, "EPOCH_END_HOOK", stop)
    with pytest.raises(Preempted):
        linprobe.main(_argv(tiny_crossmae_ckpt, data_root, tmp_path / "part", cache, *opts))
    assert not (tmp_path / "part" / "metrics.json").exists()
    assert torch.load(tmp_path / "part" / "checkpoint-latest.pth", weights_only=False)["epoch"] == 1
    trained = []  # the epochs the resumed process runs
    monkeypatch.setattr(lp_protocol, "EPOCH_END_HOOK", trained.append)
    optimizer_steps.reset()
    res = linprobe.main(_argv(tiny_crossmae_ckpt, data_root, tmp_path / "part", cache, *opts))
    # started after the checkpoint's epoch 1, trained only epoch 2 (a restart would redo 0 and 1)
    assert trained == [2] and optimizer_steps.n == per_epoch
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2]
    assert res["metrics"] == full["metrics"] and res["grid"] == full["grid"]
    monkeypatch.setattr(lp_protocol, "EPOCH_END_HOOK", None)

    blk = linprobe.main(_argv(tiny_crossmae_ckpt, data_root, tmp_path / "blocks", cache, "protocol=blocks"))
    curve = json.loads((tmp_path / "blocks" / "blocks.json").read_text())["curve"]
    assert set(curve) == {"token", "avg"} and [r["block"] for r in curve["token"]] == [0, 1, 2, 3]
    assert (tmp_path / "blocks" / "blocks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert blk["cache"]["misses"] == 0  # every block was already cached by the fast runs
    assert blk["metrics"]["top1"] == blk["choice"]["top1"]


def test_mae_protocol_on_places_and_knn_on_inat(tiny_crossmae_ckpt, data_root, tmp_path, user_error):  # noqa: F811
    from crossmae import load_backbone
    cache = tmp_path / "cache"
    res = places.main(_argv(tiny_crossmae_ckpt, data_root, tmp_path / "pl", cache, "epochs=2", "total_batch_size=32") + ["--protocol", "linprobe"])
    assert res["task"] == "places" and res["protocol"] == "linprobe_mae" and res["num_classes"] == 365
    assert res["feature_norm"] == "paramfree_ln" and res["pooling"] == "token"
    st = torch.load(tmp_path / "pl" / "checkpoint-latest.pth", weights_only=False)["model"]
    # head = BatchNorm1d(affine=False) + Linear; only the head is stored / trained
    assert set(st) == {"0.running_mean", "0.running_var", "0.num_batches_tracked", "1.weight", "1.bias"}
    assert st["1.weight"].shape == (365, 64)
    vit, rep = load_backbone(tiny_crossmae_ckpt, arch="vit_tiny_patch16", img_size=32)
    probe = lp_protocol.LinearProbe(lp_protocol.FeatureEncoder(vit, rep.has_final_norm), 365, "avg").train()
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    assert probe.head[0].affine is False and not probe.encoder.training and probe.head.training

    k = inat.main(_argv(tiny_crossmae_ckpt, data_root, tmp_path / "knn", cache, "protocol=knn") + ["--protocol", "linprobe"])
    assert k["protocol"] == "linprobe_knn" and k["epochs"] == 0
    assert k["metrics"]["top1"] == k["metrics"]["knn_token_top1"]
    # a fine-tuning config given to --protocol linprobe
    err = user_error(inat.main, ["--backbone", str(tiny_crossmae_ckpt), "--config", "configs/inat/smoke.py",
                                 "--data-root", str(data_root), "--output-dir", str(tmp_path / "x"),
                                 "--protocol", "linprobe"])
    assert err == "error: configs/inat/smoke.py: config is for protocol 'finetune', --protocol is 'linprobe'"
    assert not (tmp_path / "x").exists()
