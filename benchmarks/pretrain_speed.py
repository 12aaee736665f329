"""Pretraining step speed, memory and FLOPs: MAE vs CrossMAE(γ) side by side.

    python -m benchmarks.pretrain_speed                       # ViT-B/16@224 and tiny, CPU or GPU
    python -m benchmarks.pretrain_speed --device cpu --batch-size 8 --sizes base,tiny --steps 6
    python -m benchmarks.pretrain_speed --device cuda --dtype bf16 --batch-size 256 --sizes base

For each size it builds one MAE (paper decoder 8×512 at ViT-B) and one CrossMAE (decoder 12×512,
inter-block attention over all encoder blocks; γ = 0.75 and 0.25 share that model — they differ
only in how many queries are decoded) and measures, per variant:

* **throughput** of one full training step — forward + backward + ``AdamW.step`` +
  ``zero_grad(set_to_none=True)``, the optimizer the fused AdamW kernel when the device has one —
  in images/s. The variants are run **interleaved** (round-robin, the order rotated every round),
  so on a shared machine every variant sees the same background load; the table reports the median
  step time and the median over rounds of the per-round speed-up over MAE (adjacent steps,
  so a load change between rounds cancels out).
* **peak memory** of one step. CUDA: ``torch.cuda.max_memory_allocated`` during the step minus
  what was allocated before it, plus the model's resident bytes (parameters + AdamW state), i.e.
  what this model alone would need (the other benchmark models are not counted). CPU: the same
  quantity, with the step's peak taken from ``torch.profiler``'s allocator events
  (``profile_memory=True``: every CPU tensor allocation / free of the step, cumulative maximum).
  RSS is not used: glibc keeps freed pages and several engineers share the machine.
* **FLOPs per image** (``benchmarks.flops``, ``FlopCounterMode``, matmul/conv/attention only):
  decoder forward, total forward, total forward+backward.

Results: a table on stdout and a JSON file (``--out``, default
``output/benchmarks/pretrain_speed.json``) written atomically. Paper expectation (CrossMAE Tables
4–5, Appendix C, A100): CrossMAE(0.25) decodes with 2.5–3.7× fewer FLOPs than MAE and trains
~1.5× faster per epoch.

Errors: a bad option value (unknown size, CUDA requested but absent, non-positive counts) is a
one-line ``UserError`` (exit 2) and nothing is written.
"""
from __future__ import annotations

from crossmae.utils import check_writable

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from crossmae.attention import ATTN_IMPLS, set_attn_impl
from crossmae.models import ARCHS, create_model
from crossmae.utils import (UserError, atomic_write_json, atomic_write_text, check_compile_option, cli_entry,
                            maybe_compile)

from .flops import count_flops

DEFAULT_OUT = Path("output/benchmarks/pretrain_speed.json")
#: Size aliases → (arch, image size). ``tiny`` is the suite's test ViT (64 wide, 4 deep).
SIZE_ALIASES = {"base": ("vit_base_patch16", 224), "tiny": ("vit_tiny_patch16", 224),
                "small": ("vit_small_patch16", 224), "large": ("vit_large_patch16", 224)}
VARIANTS = ("mae", "crossmae-0.75", "crossmae-0.25")


def parse_size(spec: str) -> tuple[str, str, int]:
    """``"base"`` / ``"tiny"`` / ``"vit_base_patch16@224"`` → ``(label, arch, img_size)``.

    Raises:
        UserError: unknown alias or architecture, or an image size not divisible by the patch.
    """
    spec = spec.strip()
    if spec in SIZE_ALIASES:
        arch, img = SIZE_ALIASES[spec]
        return spec, arch, img
    arch, _, img_s = spec.partition("@")
    if arch not in ARCHS:
        raise UserError(f"--sizes {spec!r}: expected one of {sorted(SIZE_ALIASES)} or ARCH[@IMG] "
                        f"with ARCH in {sorted(ARCHS)}")
    try:
        img = int(img_s) if img_s else 224
    except ValueError:
        raise UserError(f"--sizes {spec!r}: image size {img_s!r} is not an integer")
    if img <= 0 or img % ARCHS[arch].patch_size:
        raise UserError(f"--sizes {spec!r}: image size must be a positive multiple of the patch size "
                        f"{ARCHS[arch].patch_size}")
    return spec, arch, img


def parse_variant(v: str, mask_ratio: float) -> tuple[str, str, float]:
    """``"mae"`` / ``"crossmae-0.25"`` → ``(label, method, γ)``. Raises UserError on a bad name / γ."""
    v = v.strip()
    if v == "mae":
        return v, "mae", mask_ratio
    if v.startswith("crossmae-"):
        try:
            g = float(v[len("crossmae-"):])
        except ValueError:
            g = -1.0
        if 0.0 < g <= mask_ratio + 1e-9:
            return v, "crossmae", g
    raise UserError(f"--variants {v!r}: expected 'mae' or 'crossmae-<γ>' with 0 < γ ≤ mask ratio {mask_ratio}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrain_speed", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--sizes", default="base,tiny",
                   help="comma list of base|tiny|small|large or ARCH@IMG (default base,tiny)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list (default %(default)s)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast (meant for CUDA; on CPU only fast with AMX)")
    p.add_argument("--attn-impl", choices=ATTN_IMPLS, default="sdpa")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--no-backward-flops", action="store_true", help="count forward FLOPs only")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler op table per variant next to --out")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="torch.compile the models (crossmae.utils.maybe_compile, dynamic=False); optional "
                        "backend name (default inductor). The warm-up steps include the compilation.")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for the MFU column (default: the datasheet value for known GPUs, "
                        f"e.g. H100/H200 SXM {989.4})")
    p.add_argument("--measure-peak", action="store_true",
                   help="also time an 8192^3 bf16 matmul (CUDA) and report MFU against that measured rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON results path (default {DEFAULT_OUT})")
    return p


def resolve_device(arg: str) -> torch.device:
    """``auto`` → CUDA if available else CPU. Raises UserError for an unusable device."""
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(arg)
    except RuntimeError:
        raise UserError(f"--device {arg!r}: not a torch device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {arg}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {arg}: only cpu and cuda are supported")
    return dev


def make_optimizer(model: torch.nn.Module, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW with the pretraining recipe's betas / weight decay; the fused kernel when available."""
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    try:
        return torch.optim.AdamW(params, fused=True, **kw), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=device.type == "cuda", **kw), "foreach" if device.type == "cuda" else "for-loop"


def resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the parameters and optimizer state (what stays allocated between steps)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(p.numel() * p.element_size() for p in model.buffers())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


class Runner:
    """One benchmark variant: a model (shared between CrossMAE γ's), its optimizer and a step."""

    def __init__(self, label: str, method: str, gamma: float, model, opt, opt_kind: str, imgs, mask_ratio: float,
                 device: torch.device, dtype: str):
        self.label, self.method, self.gamma = label, method, gamma
        self.model, self.opt, self.opt_kind = model, opt, opt_kind
        self.imgs, self.mask_ratio, self.device, self.dtype = imgs, mask_ratio, device, dtype
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def _autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> None:
        with self._autocast():
            loss, _, _ = self.model(self.imgs, self.mask_ratio, self.gamma)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_step(self) -> float:
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self.step()
        self.sync()
        dt = time.perf_counter() - t0
        self.times.append(dt)
        self.cpu_times.append(time.process_time() - c0)
        return dt

    def peak_memory(self) -> tuple[int, int]:
        """(peak bytes of one step for this model alone, resident bytes). See the module docstring."""
        resident = resident_bytes(self.model, self.opt)
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.step()
            self.sync()
            self.raw_peak = torch.cuda.max_memory_allocated(self.device)   # all models of the process
            return self.raw_peak - before + resident, resident
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step()
        evs = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        evs.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in evs:
            if e.device_type() == torch.autograd.DeviceType.CPU:
                cur += e.nbytes()
                peak = max(peak, cur)
        return peak + resident, resident

    def profile_table(self) -> str:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            self.step()
            self.sync()
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=30)


def bench_size(label: str, arch: str, img: int, variants, args, device: torch.device, out_dir: Path) -> dict:
    """Build the models of one size, time the variants interleaved, count memory and FLOPs."""
    torch.manual_seed(args.seed)
    models: dict[str, tuple] = {}
    runners: list[Runner] = []
    imgs = torch.randn(args.batch_size, 3, img, img, generator=torch.Generator().manual_seed(args.seed)).to(device)
    for vlabel, method, gamma in variants:
        if method not in models:
            model = create_model(f"{method}_{arch}", img_size=img).to(device).train()
            set_attn_impl(model, args.attn_impl)
            maybe_compile(model, args.compile, option="--compile", dynamic=False)
            opt, kind = make_optimizer(model, device)
            models[method] = (model, opt, kind)
        model, opt, kind = models[method]
        runners.append(Runner(vlabel, method, gamma, model, opt, kind, imgs, args.mask_ratio, device, args.dtype))

    warm = {r.label: 0.0 for r in runners}
    for _ in range(args.warmup):
        for r in runners:
            r.sync()
            t0 = time.perf_counter()
            r.step()
            r.sync()
            warm[r.label] += time.perf_counter() - t0
    rounds: list[dict[str, float]] = []
    for i in range(args.steps):
        order = runners[i % len(runners):] + runners[:i % len(runners)]
        rounds.append({r.label: r.timed_step() for r in order})
    cpu_rounds = [{r.label: r.cpu_times[i] for r in runners} for i in range(args.steps)]

    rows = []
    base = next((r for r in runners if r.method == "mae"), None)
    for r in runners:
        model = r.model
        dec = (f"{len(model.decoder_blocks)}x{model.decoder_pred.in_features}")
        med = statistics.median(r.times)
        row = {
            "variant": r.label, "method": r.method, "mask_ratio": args.mask_ratio, "kept_mask_ratio": r.gamma,
            "decoder": dec, "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            "optimizer": f"AdamW ({r.opt_kind})",
            "step_s_median": med, "step_s_min": min(r.times), "step_s_all": r.times,
            "cpu_s_median": statistics.median(r.cpu_times), "cpu_s_all": r.cpu_times,
            "img_per_s": args.batch_size / med, "warmup_s": warm[r.label],
        }
        with torch.compiler.set_stance("force_eager"):     # count the eager graph's FLOPs
            flops = count_flops(model, args.mask_ratio, r.gamma, device=device,
                                backward=not args.no_backward_flops, seed=args.seed)
        row.update({f"gflops_{k}": v / 1e9 for k, v in flops.items()})
        if "total_fwdbwd" in flops:
            achieved = flops["total_fwdbwd"] * row["img_per_s"] / 1e12
            row["model_tflops_s"] = achieved
            for key, peak in (args.peaks or {}).items():
                row[f"mfu_vs_{key}"] = achieved / peak
        if not args.no_memory:
            peak, res = r.peak_memory()
            row.update({"peak_mem_mb": peak / 2**20, "resident_mem_mb": res / 2**20})
            if getattr(r, "raw_peak", None) is not None:
                row["cuda_max_memory_allocated_mb"] = r.raw_peak / 2**20
        if args.profile:
            path = out_dir / f"profile_{label}_{r.label}.txt"
            atomic_write_text(r.profile_table(), path)
            row["profile_table"] = str(path)
        rows.append(row)
    if base is not None:
        b = next(x for x in rows if x["variant"] == base.label)
        for row in rows:
            per_round = [rd[base.label] / rd[row["variant"]] for rd in rounds]
            row["speedup_vs_mae"] = statistics.median(per_round)
            row["speedup_vs_mae_all"] = per_round
            row["speedup_vs_mae_of_min"] = b["step_s_min"] / row["step_s_min"]
            row["cpu_speedup_vs_mae"] = statistics.median(
                [rd[base.label] / rd[row["variant"]] for rd in cpu_rounds])
            row["fwd_flops_reduction_vs_mae"] = b["gflops_total_fwd"] / row["gflops_total_fwd"]
            row["decoder_flops_reduction_vs_mae"] = b["gflops_decoder_fwd"] / row["gflops_decoder_fwd"]
            if "gflops_total_fwdbwd" in row:
                row["fwdbwd_flops_reduction_vs_mae"] = b["gflops_total_fwdbwd"] / row["gflops_total_fwdbwd"]
            if "peak_mem_mb" in row:
                row["memory_reduction_vs_mae"] = b["peak_mem_mb"] / row["peak_mem_mb"]
    return {"size": label, "arch": arch, "img_size": img, "rows": rows, "rounds": rounds, "cpu_rounds": cpu_rounds}


def format_table(res: dict, batch: int) -> str:
    hdr = (f"{'variant':<14}{'decoder':>8}{'img/s':>9}{'step ms':>9}{'speedup':>8}{'min x':>7}{'cpu ms':>9}{'cpu x':>7}"
           f"{'peak MB':>9}"
           f"{'dec GF':>8}{'fwd GF':>8}{'f+b GF':>8}{'fwdFLOP÷':>9}{'decFLOP÷':>9}")
    lines = [f"{res['arch']} @ {res['img_size']}px, batch {batch}", hdr, "-" * len(hdr)]
    for r in res["rows"]:
        fb = r.get("gflops_total_fwdbwd")
        lines.append(
            f"{r['variant']:<14}{r['decoder']:>8}{r['img_per_s']:>9.2f}{r['step_s_median'] * 1e3:>9.1f}"
            f"{r.get('speedup_vs_mae', float('nan')):>7.2f}x{r.get('speedup_vs_mae_of_min', float('nan')):>6.2f}x"
            f"{r['cpu_s_median'] * 1e3:>9.1f}"
            f"{r.get('cpu_speedup_vs_mae', float('nan')):>6.2f}x{r.get('peak_mem_mb', float('nan')):>9.0f}"
            f"{r['gflops_decoder_fwd']:>8.2f}{r['gflops_total_fwd']:>8.2f}"
            f"{(fb if fb is not None else float('nan')):>8.2f}"
            f"{r.get('fwd_flops_reduction_vs_mae', float('nan')):>8.2f}x"
            f"{r.get('decoder_flops_reduction_vs_mae', float('nan')):>8.2f}x")
    for r in res["rows"]:
        mfu = ", ".join(f"MFU vs {k[7:]} {v * 100:.1f}%" for k, v in r.items() if k.startswith("mfu_vs_"))
        if "model_tflops_s" in r:
            lines.append(f"  {r['variant']}: {r['model_tflops_s']:.1f} model TFLOP/s" + (f", {mfu}" if mfu else "")
                         + f"; warm-up {r['warmup_s']:.1f} s")
    return "\n".join(lines)


#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets, by device-name
#: substring: H100 / H200 SXM 989.4 (the PCIe/NVL H100 is lower: 756), A100 312.
DATASHEET_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0))


def datasheet_peak_tflops(device: torch.device) -> float | None:
    """The datasheet dense bf16 peak of ``device`` (:data:`DATASHEET_BF16_TFLOPS`), None if unknown/CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_BF16_TFLOPS if k in name), None)


def measure_matmul_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float:
    """TFLOP/s of an n×n×n bf16 matmul on random data (3 warm-ups, mean of ``iters``, CUDA events):
    the practical ceiling the MFU is also reported against (an H200 of this workplace gave ~790)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = platform.processor() or "cpu"
    return env


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results dict (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    check_writable(args.out, "--out", folder=False)  # before any work
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be ≥ 0, got {args.warmup}")
    if not 0.0 < args.mask_ratio < 1.0:
        raise UserError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    device = resolve_device(args.device)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    variants = [parse_variant(v, args.mask_ratio) for v in args.variants.split(",") if v.strip()]
    if not sizes or not variants:
        raise UserError("--sizes and --variants must name at least one entry")
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a .json file path")
    check_compile_option(args.compile, "--compile")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UserError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.measure_peak and device.type != "cuda":
        raise UserError("--measure-peak: times a bf16 matmul on CUDA; the device is cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.peaks = {}
    spec = args.peak_tflops if args.peak_tflops is not None else datasheet_peak_tflops(device)
    if spec:
        args.peaks["spec"] = spec
    if args.measure_peak:
        args.peaks["measured_matmul"] = measure_matmul_tflops(device)
    load0 = os.getloadavg()
    t0 = time.time()
    results: list[dict] = []
    doc = {
        "command": "python -m benchmarks.pretrain_speed " + " ".join(sys.argv[1:] if argv is None else argv),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype,
        "attn_impl": args.attn_impl, "mask_ratio": args.mask_ratio,
        "timing": "training step = fwd + bwd + AdamW.step + zero_grad; variants interleaved round-robin; "
                  "median step time; speedup = median over rounds of t_mae / t_variant (wall clock); "
                  "min x = fastest MAE step / fastest variant step (load only adds time); "
                  "cpu = time.process_time of the step (all threads; on a shared CPU less sensitive to "
                  "other processes than wall clock, exact with --threads 1)",
        "memory": ("cuda max_memory_allocated during one step − allocated before + params/optimizer state"
                   if device.type == "cuda" else
                   "torch.profiler(profile_memory=True) peak of cumulative CPU allocations during one step "
                   "+ params/optimizer state"),
        "flops": "torch.utils.flop_counter.FlopCounterMode per image (matmul/conv/SDPA; 1 MAC = 2 FLOPs); "
                 "decoder = total − encoder",
        "compile": args.compile,
        "mfu": "model FLOPs utilisation = fwd+bwd FLOPs per image (FlopCounterMode, eager graph) x img/s / peak; "
               "peaks (TFLOP/s): " + (", ".join(f"{k} {v:.1f}" for k, v in args.peaks.items()) or "none known"),
        "peak_tflops": args.peaks,
        "environment": environment(device),
        "loadavg_start": load0,
        "results": results,
    }
    for label, arch, img in sizes:
        res = bench_size(label, arch, img, variants, args, device, out.parent)
        print(format_table(res, args.batch_size), flush=True)
        print(flush=True)
        results.append(res)
        doc.update(loadavg_end=os.getloadavg(), wall_s=time.time() - t0, complete=len(results) == len(sizes))
        atomic_write_json(doc, out)     # after every size: an interrupted run keeps what it measured
    print(f"wrote {out}")
    if device.type == "cpu" and max(load0 + os.getloadavg()) > (os.cpu_count() or 1):
        print(f"note: load average {load0[0]:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: "
              "the machine was shared; compare the interleaved speed-ups, not absolute img/s")
    return doc


if __name__ == "__main__":
    main()
