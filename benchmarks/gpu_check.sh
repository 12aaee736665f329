#!/usr/bin/env bash
# benchmarks/gpu_check.sh — the suite's first-contact check on one GPU (issue 12), at most ~5 minutes.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--only STEP,STEP,...]
#
# Steps, in this order (each with its own time cap, all inside --budget, default 290 s):
#   env       nvidia-smi, torch / CUDA / cuDNN / NCCL versions, an 8192^3 bf16 matmul (TFLOP/s)
#   pytest    pytest -m cuda tests/test_cuda.py (bf16 fwd+bwd of every task, attention backends,
#             GPU decode, inductor, one-process NCCL through crossmae.utils.init_distributed)
#   pretrain  benchmarks.pretrain_speed, ViT-B/16 @ 224, bf16, batch 256, MAE / CrossMAE(0.75) /
#             CrossMAE(0.25), eager: img/s, peak GB (max_memory_allocated), MFU vs the datasheet
#             dense bf16 peak (989.4 TFLOP/s) and vs the measured matmul rate
#   loader    benchmarks.loader_speed: CPU path (PIL) and GPU path (decode_jpeg on CUDA), per worker
#             and with nproc/2 and nproc DataLoader workers, batch 256
#   coco      benchmarks.coco_speed, ViTDet ViT-B Mask R-CNN at 1024^2, bf16, batch 1 and 2
#   ade20k    benchmarks.ade20k_speed, UperNet ViT-B 512^2, bf16, batch 2
#   compile   benchmarks.pretrain_speed --compile (inductor), one process per variant (last: it is
#             the slowest step, compile time included in its warm-up)
#
# Output (DIR = --out, else $OUT when set (the device tool), else output/gpu_check): two files only
# (the device tool returns at most 8): gpu_check.json — every step's status, rc, seconds and full
# JSON result, rewritten after each step (a run cut short keeps what it measured) — and
# gpu_check.log, everything printed. Per-step raw files live in a temporary folder.
# Exit status: 0 all steps passed; 1 some step failed or ran out of time; 2 no CUDA GPU (nothing
# measured; gpu_check.json says so).
#
# The GPU machine has no package registry. It already has torch, torchvision, numpy, pillow,
# pyyaml, rich, matplotlib, opencv, safetensors, huggingface_hub, tensorboard, pytest (see the device
# notes' package list); missing are mmengine (+ addict, yapf, termcolor, platformdirs), pycocotools,
# submitit, and timm is carried at the pinned version. Before the `run` call, in the repository root
# of the checkout the device tool sends (it travels with `carry`; ~4 MB):
#
#   mkdir -p .whl && python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d .whl mmengine==0.10.7 addict==2.4.0 yapf==0.43.0 termcolor==3.3.0 platformdirs==4.14.5 \
#     submitit==1.5.4 pycocotools==2.0.11 timm==1.0.31
#
# and the real images the steps read (ImageNet subset for the loader / GPU-decode test, one ADE20K
# validation image for the sliding-window timing; ~24 MB, git-ignored):
#
#   mkdir -p .gpu_data && cp -r ../shared/data/imagenet ../shared/data/ade20k .gpu_data/
#
# Then the device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu_data"],
#                            timeout_s=330)
# A second, corrected run can select steps: bash benchmarks/gpu_check.sh --only compile,coco
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
DIR="" BUDGET=290 ONLY="env,pytest,pretrain,loader,coco,ade20k,compile"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) DIR="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    -h|--help) sed -n '2,45p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "error: gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "error: gpu_check.sh: --budget $BUDGET is not a whole number of seconds" >&2; exit 2 ;; esac
for s in ${ONLY//,/ }; do
  case "$s" in env|pytest|pretrain|loader|coco|ade20k|compile) ;;
    *) echo "error: gpu_check.sh: --only names unknown step '$s' (env,pytest,pretrain,loader,coco,ade20k,compile)" >&2; exit 2 ;;
  esac
done
DIR="${DIR:-${OUT:-output/gpu_check}}"
mkdir -p "$DIR" || exit 2
SUMMARY="$DIR/gpu_check.json"
LOG="$DIR/gpu_check.log"
RAW="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$RAW"' EXIT
exec > >(tee -a "$LOG") 2> >(tee -a "$LOG" >&2)
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
START=$(date +%s)
FAILED=0

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# merge NAME RC SECONDS [FILE] [NOTE]: record a step in the summary (atomically: temp file + mv)
merge() {
  "$PY" - "$SUMMARY" "$@" <<'EOF'
import json, os, sys, time
summary, name, rc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
path = sys.argv[5] if len(sys.argv) > 5 else ""
note = sys.argv[6] if len(sys.argv) > 6 else ""
doc = json.load(open(summary)) if os.path.exists(summary) else {"steps": {}}
status = {0: "passed", 124: "timed_out", 137: "timed_out", -1: "skipped"}.get(rc, "failed")
if note.startswith("no CUDA"):
    status = "no_cuda"
step = {"status": status, "rc": rc, "seconds": round(secs, 1)}
if note:
    step["note"] = note
if path and os.path.exists(path):
    try:
        step["result"] = json.load(open(path))
    except ValueError:
        step["result_text"] = open(path).read()[-20000:]
doc["steps"][name] = step
if status == "no_cuda":
    doc["status"] = "no_cuda"
doc["updated_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
tmp = summary + ".tmp"
json.dump(doc, open(tmp, "w"), indent=1, default=str)
os.replace(tmp, summary)
EOF
}

# step NAME CAP CMD...: run CMD with min(CAP, remaining budget) seconds, record it
step() {
  local name="$1" cap="$2"; shift 2
  local left; left=$(remaining)
  if [ "$left" -lt 15 ]; then
    echo "=== $name: skipped (budget spent)"; merge "$name" -1 0 "" "budget of ${BUDGET}s spent"
    FAILED=1; return
  fi
  local t=$(( cap < left ? cap : left ))
  echo "=== $name (limit ${t}s, $(remaining)s of budget left): $*"
  local t0; t0=$(date +%s)
  timeout -k 5 "$t" "$@"
  local rc=$?
  echo "=== $name: rc $rc after $(( $(date +%s) - t0 ))s"
  [ "$rc" -eq 0 ] || FAILED=1
  merge "$name" "$rc" "$(( $(date +%s) - t0 ))" "${STEP_FILE:-}"
}

# --- no GPU: say so, write the summary, stop ----------------------------------------------------
# (checked first: needs only torch, which the GPU machine has)
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  msg="no CUDA GPU: torch.cuda.is_available() is False (or torch does not import) on $(hostname); nothing measured"
  echo "error: gpu_check.sh: $msg" >&2
  merge env 2 0 "" "$msg"
  exit 2
fi
# --- wheels and data carried with the working tree ----------------------------------------------
export PYTHONPATH="$REPO"
if ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="$REPO:/tmp/site"
  else
    echo "warning: installing .whl/*.whl failed; using the machine's packages"
  fi
fi
if [ -z "${CROSSMAE_DATA_ROOT:-}" ]; then
  for d in "$REPO/.gpu_data" "$REPO/shared/data" "$REPO/../shared/data"; do
    [ -d "$d/imagenet" ] && { export CROSSMAE_DATA_ROOT="$d"; break; }
  done
fi

[ -n "${CROSSMAE_DATA_ROOT:-}" ] || echo "warning: no data root found (.gpu_data/ not carried?): loader, GPU-decode test and ade20k need it"

# --- steps ----------------------------------------------------------------------------------------
if want env; then
  STEP_FILE="$RAW/env.json" step env 40 "$PY" - <<EOF
import json, os, subprocess, sys, torch, torchvision
from benchmarks.pretrain_speed import measure_matmul_tflops, datasheet_peak_tflops
dev = torch.device("cuda")
env = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
       "nccl": str(torch.cuda.nccl.version()), "device": torch.cuda.get_device_name(dev),
       "capability": list(torch.cuda.get_device_capability(dev)),
       "memory_gb": torch.cuda.get_device_properties(dev).total_memory / 1024**3,
       "cpu_count": os.cpu_count(), "data_root": os.environ.get("CROSSMAE_DATA_ROOT"),
       "pythonpath": os.environ.get("PYTHONPATH")}
for mod in ("timm", "mmengine", "pycocotools", "submitit", "flash_attn", "triton"):
    try:
        m = __import__(mod); env[mod] = getattr(m, "__version__", "importable")
    except Exception as exc:
        env[mod] = f"missing ({type(exc).__name__})"
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:
    env["nvidia_smi"] = f"unavailable ({exc})"
env["matmul_bf16_tflops_8192"] = measure_matmul_tflops(dev)
env["datasheet_bf16_tflops"] = datasheet_peak_tflops(dev)
print(json.dumps(env, indent=1))
json.dump(env, open("$RAW/env.json", "w"), indent=1)
EOF
fi

if want pytest; then
  STEP_FILE="$RAW/pytest.txt" step pytest 130 bash -c \
    "set -o pipefail; '$PY' -m pytest -m cuda -q -rA -p no:cacheprovider tests/test_cuda.py 2>&1 | tee '$RAW/pytest.txt'"
fi

if want pretrain; then
  STEP_FILE="$RAW/pretrain.json" step pretrain 100 "$PY" -m benchmarks.pretrain_speed --device cuda --dtype bf16 \
    --batch-size 256 --sizes base --steps 5 --warmup 2 --measure-peak --out "$RAW/pretrain.json"
fi

if want loader; then
  n=$(nproc)
  STEP_FILE="$RAW/loader.json" step loader 60 "$PY" -m benchmarks.loader_speed --paths cpu-pil,gpu \
    --workers "$(( n / 2 > 0 ? n / 2 : 1 )),$n" --batch-size 256 --images 3072 --per-worker-images 200 \
    --out "$RAW/loader.json"
fi

if want coco; then
  STEP_FILE="$RAW/coco.json" step coco 75 "$PY" -m benchmarks.coco_speed --device cuda --batch-sizes 1 2 \
    --iters 5 --warmup 2 --infer-iters 10 --output "$RAW/coco.json"
fi

if want ade20k; then
  STEP_FILE="$RAW/ade20k.json" step ade20k 50 "$PY" -m benchmarks.ade20k_speed --device cuda --batch-size 2 \
    --iters 5 --warmup 2 --infer-images 3 --json "$RAW/ade20k.json"
fi

if want compile; then
  for v in crossmae-0.25 mae crossmae-0.75; do
    STEP_FILE="$RAW/compile_$v.json" step "compile_$v" 150 "$PY" -m benchmarks.pretrain_speed --device cuda \
      --dtype bf16 --batch-size 256 --sizes base --variants "$v" --steps 5 --warmup 2 --compile \
      --measure-peak --out "$RAW/compile_$v.json"
  done
fi

# --- short table last (the device tool returns the end of the output) ------------------------------
"$PY" - "$SUMMARY" "$FAILED" "$(( $(date +%s) - START ))" <<'EOF' || true
import json, os, sys
doc = json.load(open(sys.argv[1]))
doc["status"] = "failed" if sys.argv[2] != "0" else "passed"
doc["wall_s"] = int(sys.argv[3])
matmul = doc["steps"].get("env", {}).get("result", {}).get("matmul_bf16_tflops_8192")
for key, s in doc["steps"].items():      # MFU against the matmul rate measured in the env step too
    for size in (s.get("result") or {}).get("results", []) if key.startswith(("pretrain", "compile_")) else []:
        for r in size["rows"]:
            if matmul and "model_tflops_s" in r:
                r.setdefault("mfu_vs_measured_matmul", r["model_tflops_s"] / matmul)
json.dump(doc, open(sys.argv[1] + ".tmp", "w"), indent=1, default=str)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print("\n==== gpu_check summary ({})".format(sys.argv[1]))
for name, s in doc["steps"].items():
    print(f"{name:<22}{s['status']:<10}{s['seconds']:>7.1f}s  {s.get('note', '')}")
env = doc["steps"].get("env", {}).get("result", {})
if env:
    print(f"device {env.get('device')}, torch {env.get('torch')}, bf16 matmul {env.get('matmul_bf16_tflops_8192', 0):.0f} TFLOP/s")
for key in ["pretrain"] + [k for k in doc["steps"] if k.startswith("compile_")]:
    res = doc["steps"].get(key, {}).get("result")
    for size in (res or {}).get("results", []):
        for r in size["rows"]:
            mfu = " ".join(f"{k[7:]} {v * 100:.1f}%" for k, v in r.items() if k.startswith("mfu_vs_"))
            print(f"{key:<22}{r['variant']:<14}{r['img_per_s']:>8.0f} img/s  peak {r.get('peak_mem_mb', float('nan')) / 1024:6.1f} GB"
                  f"  MFU {mfu or '-'}  warm-up {r.get('warmup_s', 0):.0f}s")
ld = doc["steps"].get("loader", {}).get("result")
for p, r in (ld or {}).get("paths", {}).items():
    print(f"loader {p:<15} per worker {r.get('per_worker_img_s', 0):8.0f} img/s  totals {r.get('total_img_s')}"
          + (f"  gpu stage {r['gpu_stage_img_s']:.0f}" if "gpu_stage_img_s" in r else ""))
co = doc["steps"].get("coco", {}).get("result")
for r in (co or {}).get("train", []):
    print(f"coco batch {r.get('batch_per_device')}: {r.get('s_per_iter', float('nan')):.3f} s/iter, peak {r.get('peak_mem_gb', float('nan')):.2f} GB {r.get('error', '')}")
if co and "inference" in co:
    print(f"coco inference {co['inference']['images_per_s']:.2f} img/s")
ad = doc["steps"].get("ade20k", {}).get("result")
if ad:
    print(f"ade20k batch {ad['batch_size']}: {ad['train_iter_s_median']:.3f} s/iter, peak {ad['train_peak_memory_gb']:.2f} GB, "
          f"inference {ad['infer_s_per_image_median']:.3f} s/image")
EOF
echo "gpu_check: $(( $(date +%s) - START ))s; results in $SUMMARY and $LOG"
exit $FAILED
