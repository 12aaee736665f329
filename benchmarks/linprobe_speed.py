"""Linear-probe speed: the MAE-protocol probe vs the fast cached multi-head probe, one backbone, one run.

    python -m benchmarks.linprobe_speed                                   # tiny CrossMAE, iNat copy, 90 ep
    python -m benchmarks.linprobe_speed --backbone ckpt.pth --config paper_vit_base --epochs 90

Both protocols run through ``transfer.linprobe`` on the same checkpoint, data, input size, epochs,
batch size and seed:

* ``mae``: MAE ``main_linprobe.py`` (RandomResizedCrop + flip, frozen encoder forward every step,
  one BN+Linear head, LARS blr ``blr``).
* ``fast (cold)``: features extracted once with the eval transform into an EMPTY cache, then the whole
  grid (``fast.blrs`` × {token, avg} × {last, last-4}) trained in one pass per epoch; the head chosen
  on a hold-out of the train split; its val top-1 reported.
* ``fast (warm)``: the same again with the cache filled (what every later probe of that checkpoint
  costs).

Wall time is each protocol's own ``wall_time_s`` (data listing, model load, extraction, training,
evaluation). The speed-up is mae / fast(cold). Target of the issue: ≥ 20× at no lower top-1.
Without ``--backbone`` a tiny CrossMAE is pretrained first with ``crossmae.pretrain`` (config
``smoke_crossmae``, kept in the output folder and reused). Results: table on stdout and
``<output-dir>/linprobe_speed.json`` (atomic).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from crossmae.utils import UserError, atomic_write_json, cli_entry, load_config
from crossmae.utils import check_writable

DEFAULT_OUT = Path("output/benchmarks/linprobe_speed")


def _pretrained_tiny(out: Path, data_root: str | None) -> Path:
    ckpt = out / "pretrain" / "checkpoint-latest.pth"
    if (out / "pretrain" / "metrics.json").exists():
        return ckpt
    from crossmae import pretrain
    argv = ["--config", "smoke_crossmae", "--output-dir", str(out / "pretrain"), "--cfg-options", "num_workers=0"]
    if data_root:
        argv += ["--data-root", data_root]
    pretrain.main(argv)
    return ckpt


def _run(protocol: str, args, out: Path, cache: Path, extra: list[str]) -> dict:
    from transfer.classification import common as C
    from transfer.classification.linprobe import PRESET_DIR, run_linprobe
    run_dir = out / f"run_{protocol}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    opts = [f"protocol={'mae' if protocol == 'mae' else 'fast'}", f"epochs={args.epochs}",
            f"fast.cache_dir={cache}", f"seed={args.seed}"] + extra + list(args.cfg_options)
    ns = argparse.Namespace(backbone=str(args.backbone), config=args.config, cfg_options=opts, seed=None,
                            protocol=None, data_root=args.data_root, output_dir=str(run_dir), resume=None)
    cfg = C.resolve_config(ns, PRESET_DIR)
    t = time.time()
    res = run_linprobe(ns, cfg, "linprobe")
    res["outer_wall_s"] = time.time() - t
    return res


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    """Run both protocols, print the table, write the JSON. Returns the JSON dict."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.linprobe_speed", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default=None, help="checkpoint (default: pretrain a tiny CrossMAE first)")
    p.add_argument("--config", default="configs/inat/linprobe_smoke.py",
                   help="linear-probe config (preset of configs/linprobe or a path); default: tiny ViT on iNat")
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=90, help="epochs of BOTH protocols (MAE: 90)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--output-dir", default=str(DEFAULT_OUT))
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    check_writable(args.output_dir, "--output-dir", folder=True)  # before any work
    if args.epochs <= 0:
        raise UserError(f"--epochs {args.epochs}: must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.backbone is None:
        args.backbone = _pretrained_tiny(out, args.data_root)
    else:
        from crossmae.zoo import resolve_backbone
        args.backbone = str(resolve_backbone(args.backbone))
    load_config(args.config, None, Path(__file__).resolve().parent.parent / "configs" / "linprobe")  # validate early
    # import the heavy libraries once, before any timed run, so no protocol pays them
    import importlib
    for mod in ("matplotlib.pyplot", "timm", "torch.utils.tensorboard", "torchvision"):
        importlib.import_module(mod)
    cache = out / "feature_cache"
    if cache.exists():
        shutil.rmtree(cache)  # cold cache for the timed fast run
    rows = {}
    rows["mae"] = _run("mae", args, out, cache, [])
    rows["fast_cold"] = _run("fast_cold", args, out, cache, [])
    rows["fast_warm"] = _run("fast_warm", args, out, cache, [])
    mae, cold, warm = rows["mae"], rows["fast_cold"], rows["fast_warm"]
    table = []
    for name, r in (("mae probe", mae), ("fast (cold cache)", cold), ("fast (warm cache)", warm)):
        heads = 1 if r is mae else len(r["grid"])
        table.append({"protocol": name, "epochs": r["epochs"], "heads": heads, "wall_s": r["wall_time_s"],
                      "top1": r["metrics"]["top1"], "top5": r["metrics"]["top5"],
                      "speedup_vs_mae": mae["wall_time_s"] / r["wall_time_s"]})
    result = {
        "backbone": str(args.backbone), "backbone_sha256": mae["backbone_sha256"], "config": args.config,
        "dataset": mae["dataset"], "epochs": args.epochs, "device": mae["device"],
        "threads": torch.get_num_threads(), "table": table,
        "speedup_cold": mae["wall_time_s"] / cold["wall_time_s"],
        "fast_choice": cold["choice"], "fast_selection_split": cold["selection_split"],
        "target": {"speedup": ">= 20x", "accuracy": "fast top1 >= mae top1"},
        "target_met": {"speedup": mae["wall_time_s"] / cold["wall_time_s"] >= 20,
                       "accuracy": cold["metrics"]["top1"] >= mae["metrics"]["top1"]},
    }
    print(f"backbone {args.backbone} ({mae['backbone_sha256'][:12]}), data {mae['dataset']['type']}, "
          f"{args.epochs} epochs, device {mae['device']}, {torch.get_num_threads()} thread(s)")
    print(f"{'protocol':<20}{'epochs':>7}{'heads':>7}{'wall s':>10}{'top1':>8}{'top5':>8}{'speed-up':>10}")
    for r in table:
        print(f"{r['protocol']:<20}{r['epochs']:>7}{r['heads']:>7}{r['wall_s']:>10.2f}{r['top1']:>8.2f}"
              f"{r['top5']:>8.2f}{r['speedup_vs_mae']:>9.1f}x")
    print(f"fast head chosen on the train hold-out: {cold['choice']}")
    print(f"target (>= 20x, top1 >= mae): speed-up {'met' if result['target_met']['speedup'] else 'NOT met'}, "
          f"accuracy {'met' if result['target_met']['accuracy'] else 'NOT met'}")
    atomic_write_json(result, out / "linprobe_speed.json")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
