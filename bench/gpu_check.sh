#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check OUT=folder`): build, every non-slow test with the CUDA
# ones, the benchmark subsets, a sanitizer pass, and a one-page summary of the targets, all under
# one hard deadline. Made for the lent GPU machine: no network, torch/triton/nvcc/pytest-benchmark
# already installed; it creates no venv and downloads nothing. Without a GPU it is a dry run: the
# GPU steps are skipped with a message and the summary says so.
#
#   bash bench/gpu_check.sh OUT [DEADLINE_SECONDS]     (default deadline: 480 s)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bench/gpu_check.sh OUT_FOLDER [DEADLINE_SECONDS]}"
DEADLINE=$(( $(date +%s) + ${2:-480} ))
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
: > "$LOG"
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\n' > "$STEPS"

say() { echo "gpu-check: $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - $(date +%s) )); }

# step NAME BUDGET_SECONDS COMMAND...: run under `timeout min(budget, time left - 20 s reserve)`.
step() {
  local name="$1" budget="$2"; shift 2
  local avail=$(( $(left) - 20 ))
  local limit=$(( budget < avail ? budget : avail ))
  if (( limit < 10 )); then
    say "$name: skipped, the deadline is near"
    printf '%s\tskipped (deadline)\t0\n' "$name" >> "$STEPS"
    return 0
  fi
  say "$name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="timed out after ${limit}s"; elif (( rc != 0 )); then status="failed (rc $rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$STEPS"
  say "$name: $status"
  return 0
}

$PY - > "$OUT/environment.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs")
else:
    print("gpu: none")
EOF
cat "$OUT/environment.txt" | tee -a "$LOG"
nvidia-smi >> "$OUT/environment.txt" 2>&1 || true

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no GPU here: dry run. The build, the CUDA tests, the benchmarks and the sanitizer are skipped."
  step "collect cuda tests" 120 $PY -m pytest -q --collect-only -m cuda -p no:cacheprovider tests
  $PY bench/summarize.py "$OUT" | tee -a "$LOG"
  exit 0
fi

# 1. build for this GPU only (sm_90 on H100/H200), in place
ARCH=$($PY -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')")
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
step "build" 240 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
$PY -c "from cdfast import _ops; print('cdfast._C:', 'built' if _ops.HAS_EXTENSION else 'MISSING', 'CUDA' if _ops.WITH_CUDA else '')" \
  | tee -a "$LOG"

# 2. every non-slow test, CUDA ones included (the most important evidence first)
step "tests" 200 $PY -m pytest -q -m "not slow" -p no:cacheprovider --junitxml="$OUT/junit.xml" tests

# 3. benchmarks, cheapest and most important first; statistics only (bench/conftest.py)
BENCH=(-q -p no:cacheprovider --benchmark-only --benchmark-max-time=0.3 --benchmark-min-rounds=5)
step "bench election" 90 $PY -m pytest "${BENCH[@]}" bench/test_competitive_ce.py \
  --benchmark-json="$OUT/bench-election.json"
step "bench student loss" 150 $PY -m pytest "${BENCH[@]}" bench/test_student_loss.py \
  --benchmark-json="$OUT/bench-student-loss.json"
step "bench engines" 150 $PY -m pytest "${BENCH[@]}" bench/test_engines.py \
  -k "(2xresnet32 or 4xresnet32) and not compile" --benchmark-json="$OUT/bench-engines.json"

# 4. memory and race checks of the election kernel on a small case
if command -v compute-sanitizer > /dev/null; then
  SMALL='import torch, cdfast
z = torch.randn(3, 37, 101, device="cuda", requires_grad=True); y = torch.randint(0, 101, (37,), device="cuda")
ce, t = cdfast.competitive_ce(z, y); ce.sum().backward(); torch.cuda.synchronize(); print("ok", t.item())'
  step "memcheck" 60 compute-sanitizer --tool memcheck --error-exitcode 3 $PY -c "$SMALL"
  step "racecheck" 60 compute-sanitizer --tool racecheck --error-exitcode 3 $PY -c "$SMALL"
else
  say "compute-sanitizer not found: memcheck/racecheck skipped"
fi

$PY bench/summarize.py "$OUT" | tee -a "$LOG"
