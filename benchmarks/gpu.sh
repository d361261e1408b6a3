#!/usr/bin/env bash
# Every GPU measurement of the benchmarks in one run (about 8 minutes at most), one table at the end.
#
#   bash benchmarks/gpu.sh            # CUDA GPU required; run from anywhere, works in the repo root
#   bash benchmarks/gpu.sh --smoke    # (or GPU_SH_SMOKE=1) every step on the CPU, smallest sizes, 1 round
#
# camgate runs from the source tree (PYTHONPATH=src) with the machine's own torch ($PYTHON, default
# python3). Modules it lacks are installed offline from the wheels folder ($GPU_WHEELS, default
# .cache/gpu-wheels, filled by benchmarks/gpu-wheels.sh) into a temporary --target folder.
# Output in ${OUT:-benchmarks/out}: gpu-results.md (device, versions, the table with each command)
# and gpu-log.txt (every step's full output). Each step has its own timeout; a failed step is marked
# in the table and the next one runs. GPU_SH_BUDGET (seconds, default 450) caps the steps' total.
set -u

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
SMOKE=${GPU_SH_SMOKE:-0}
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$a'" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUTDIR=${OUT:-benchmarks/out}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
MD="$OUTDIR/gpu-results.md"
LOG="$OUTDIR/gpu-log.txt"
WHEELS=${GPU_WHEELS:-.cache/gpu-wheels}
BUDGET=${GPU_SH_BUDGET:-450}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/camgate-gpu-XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
: >"$LOG"

say() { echo "$@" | tee -a "$LOG"; }

# --- modules: what the benchmarks import beyond torch; install the missing ones from the wheels folder
MODULES="torch torchvision numpy PIL yaml safetensors pyarrow pandas scipy skimage cv2 tqdm ttach pytorch_grad_cam"
missing() {
  "$PY" - $MODULES <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
MISS=$(missing) || { echo "gpu.sh: '$PY' does not run" >&2; exit 2; }
if [ -n "$MISS" ]; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    say "installing from $WHEELS (missing: $MISS)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
      --find-links "$WHEELS" "$WHEELS"/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
    MISS=$(missing)
  fi
  [ -n "$MISS" ] && say "WARNING: still missing: $MISS (run benchmarks/gpu-wheels.sh and carry $WHEELS); steps that need them fail"
fi

# --- device
if [ "$SMOKE" = 1 ]; then
  DEV=cpu
else
  DEV=cuda
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu.sh: no CUDA GPU visible to $PY (torch: $("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1))." >&2
    echo "gpu.sh: run it on a machine with a CUDA GPU, or pass --smoke (GPU_SH_SMOKE=1) for a CPU check of the script." >&2
    exit 3
  fi
fi
{
  echo "# GPU benchmarks ($(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$SMOKE" = 1 ] && echo ', SMOKE: CPU, smallest sizes'))"
  echo
  echo '```'
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1
  else echo "nvidia-smi: not found"; fi
  "$PY" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__,
"torchvision", torchvision.__version__, "cuda", torch.version.cuda,
"device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' 2>&1
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo '```'
} >"$WORK/head.md"
tee -a "$LOG" <"$WORK/head.md"

# --- steps: name, timeout (s), command
ROWS=()
START=$SECONDS
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START))) status t0 rc
  [ "$limit" -gt "$left" ] && limit=$left
  say ""
  say "=== $name: $* (timeout ${limit}s)"
  if [ "$limit" -lt 15 ]; then
    status="skipped (budget)"
    t0=$SECONDS
  else
    t0=$SECONDS
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status="failed (timeout ${limit}s)" ;;
      *) status="failed (rc $rc)" ;;
    esac
  fi
  say "=== $name: $status in $((SECONDS - t0)) s"
  ROWS+=("| $name | $status | $((SECONDS - t0)) | \`$(printf '%q ' "$@" | sed 's/\\,/,/g; s/ $//')\` |")
}
# amp_effect.py's inputs (JPEGs, mask, manifest, card) in $WORK/amp -> AMP_IN (its arguments)
fixture() {
  say ""
  say "=== amp inputs: benchmarks/gpu_fixture.py $WORK/amp $*"
  AMP_IN=(--model "$WORK/amp/card.yaml" --data "$WORK/amp/manifest.csv" --static-mask "$WORK/amp/mask.png")
  timeout -k 10 120 "$PY" benchmarks/gpu_fixture.py "$WORK/amp" "$@" >>"$LOG" 2>&1 || say "amp inputs: failed"
}

if [ "$SMOKE" = 1 ]; then
  step bench 120 "$PY" -m camgate.cli bench --device cpu --arch resnet18 --layers layer4 --batch-size 2 \
    --size 64 --rounds 1 --warmup 0 --threads 1 --mem-images ''
  step e2e 120 "$PY" benchmarks/e2e_bench.py --device cpu --arch resnet18 --size 64 --image-size 96x64 \
    --count 4 --batch-size 2 --rounds 1 --warmup 0 --workers 1 --threads 1 --variants engine,process,e2e
  fixture --count 4 --image-size 96x64 --arch resnet18 --size 64
  step amp-bf16 120 "$PY" benchmarks/amp_effect.py "${AMP_IN[@]}" --device cpu --amp bf16 --batch-size 2 --threads 1
  step layers 120 "$PY" benchmarks/layers_bench.py --device cpu --arch resnet18 --batch 1 --size 64 --rounds 1 \
    --sample 2 --threads 1 --no-memory
  step road 120 "$PY" benchmarks/road_bench.py --device cpu --images 2 --size 32 --rounds 1 --threads 1
  step detection 120 "$PY" benchmarks/detection_bench.py --device cpu --batch 1 --dets 1 --size 64 \
    --classes 3 --rounds 1 --threads 1
  step sanity 120 "$PY" benchmarks/sanity_bench.py --device cpu --images 2 --size 32 --rounds 1 --threads 1
else
  step bench 100 "$PY" -m camgate.cli bench --device cuda --batch-size 64 --rounds 5 --warmup 1 --threads 0 \
    --mem-images ''
  step e2e 90 "$PY" benchmarks/e2e_bench.py --device cuda --count 1000 --batch-size 64 --rounds 3 --workers 8 \
    --variants engine,process,e2e
  step e2e-bf16 75 "$PY" benchmarks/e2e_bench.py --device cuda --count 1000 --batch-size 64 --rounds 3 \
    --workers 8 --variants engine,process,e2e --amp bf16
  fixture --count 256
  step amp-bf16 60 "$PY" benchmarks/amp_effect.py "${AMP_IN[@]}" --device cuda --amp bf16 --batch-size 64
  step layers 60 "$PY" benchmarks/layers_bench.py --device cuda --arch resnet50 --batch 16 --size 224 --rounds 3
  step road 90 "$PY" benchmarks/road_bench.py --device cuda --images 16 --size 64 --rounds 3 --large
  step detection 60 "$PY" benchmarks/detection_bench.py --device cuda --batch 4 --dets 5 --size 320 --rounds 3
  step sanity 45 "$PY" benchmarks/sanity_bench.py --device cuda --images 32 --size 224 --rounds 3 --threads 0
fi

{
  cat "$WORK/head.md"
  echo
  echo "| step | status | seconds | command |"
  echo "|---|---|---:|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "Full output of every step: gpu-log.txt. Not run here: benchmarks/blackbox_eval.py (its black box is"
  echo "pinned to the CPU and it measures map quality, with no throughput-only mode)."
} >"$MD"
echo
cat "$MD"
echo
echo "table: $MD; log: $LOG"
