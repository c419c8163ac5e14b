#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check OUT=folder`, or `bash bench/gpu_check.sh OUT` where make
# is missing): build, the error-path probe, the CUDA tests, the benchmark subsets, a sanitizer pass,
# the CUDA tests that compile, every other non-slow test, and a one-page summary of the targets,
# all under one hard deadline. Made for the lent GPU
# machine: no network, torch/triton/nvcc/pytest-benchmark already installed; it creates no venv
# and downloads nothing. Without a GPU it is a dry run: the GPU steps are skipped with a message.
#
#   bash bench/gpu_check.sh OUT [DEADLINE_SECONDS]     (default deadline: 540 s; the device tool's
#   per-call limit is 600 s and a lent machine has 15 min in all, its start-up included)
#
# OUT ends up with at most 8 files (the device tool brings back 8): summary.md, gpu-check.log,
# the junit XMLs, the benchmark JSONs and raw.tar.gz (steps.tsv, environment.txt, the compile tests'
# junit); the sanitizers' output is in gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bench/gpu_check.sh OUT_FOLDER [DEADLINE_SECONDS]}"
DEADLINE=$(( $(date +%s) + ${2:-540} ))
PY="${PYTHON:-python3}"
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT/raw"
LOG="$OUT/gpu-check.log"
: > "$LOG"
STEPS="$OUT/raw/steps.tsv"
printf 'step\tstatus\tseconds\n' > "$STEPS"

say() { echo "gpu-check: $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - $(date +%s) )); }

# step NAME BUDGET_SECONDS COMMAND...: run under `timeout min(budget, time left - 25 s reserve)`.
# Returns the command's status (0 when skipped), so a caller may fall back.
step() {
  local name="$1" budget="$2"; shift 2
  local avail=$(( $(left) - 25 ))
  local limit=$(( budget < avail ? budget : avail ))
  if (( limit < 10 )); then
    say "$name: skipped, the deadline is near"
    printf '%s\tskipped (deadline)\t0\n' "$name" >> "$STEPS"
    return 0
  fi
  say "$name (limit ${limit}s): $*"
  local t0=$(date +%s)
  # SIGINT first: pytest stops like on Ctrl-C and still writes its junit XML
  timeout -s INT --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="timed out after ${limit}s"; elif (( rc != 0 )); then status="failed (rc $rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$STEPS"
  say "$name: $status"
  return $rc
}

finish() {
  $PY bench/summarize.py "$OUT" | tee -a "$LOG"
  tar -czf "$OUT/raw.tar.gz" -C "$OUT" raw && rm -rf "$OUT/raw"
}

# What this machine has: the summary's first lines, and the first thing to read when a step fails.
{
  $PY - <<'EOF'
import importlib.util, platform, sysconfig, os, torch
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
mods = ["pytest", "pytest_benchmark", "yaml", "tqdm", "ninja", "pybind11", "setuptools", "numpy", "matplotlib"]
print("modules:", ", ".join(f"{m} {'yes' if importlib.util.find_spec(m) else 'NO'}" for m in mods))
inc = sysconfig.get_paths()["include"]
print("Python.h:", "yes" if os.path.isfile(os.path.join(inc, "Python.h")) else f"NO ({inc})")
# what built torch, against what the extension is built with (C++ exceptions cross the two)
print("torch built with:", " | ".join(line.strip() for line in torch.__config__.show().splitlines()
                                      if line.strip().startswith(("- GCC", "- clang", "- C++ Version")))[:400])
print("torch cxx11 abi:", torch._C._GLIBCXX_USE_CXX11_ABI)
EOF
  for tool in nvcc ninja pip compute-sanitizer make; do
    printf '%s: %s\n' "$tool" "$(command -v "$tool" || echo 'not on PATH')"
  done
  printf 'c++: %s\n' "$(c++ --version 2>&1 | head -1)"
  printf 'libstdc++: %s\n' "$(ldconfig -p 2>/dev/null | grep -m1 'libstdc++.so.6 ' || echo '?')"
  printf 'glibc: %s\n' "$(ldd --version 2>&1 | head -1)"
  nvidia-smi 2>&1 || true
} > "$OUT/raw/environment.txt" 2>&1
head -5 "$OUT/raw/environment.txt" | tee -a "$LOG"

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no GPU here: dry run. The build, the CUDA tests, the benchmarks and the sanitizer are skipped."
  step "collect cuda tests" 120 $PY -m pytest -q --collect-only -m cuda -p no:cacheprovider tests
  finish
  exit 0
fi

# 1. build for this GPU only (sm_90 on H100/H200). The toolkit: CUDA_HOME if it has nvcc, else
# nvcc's own folder, else /usr/local/cuda; without one, the CPU kernels only (the CUDA tests of
# the election op then fail and say so). Fallbacks keep the rest of the check alive.
ARCH=$($PY -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')")
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}"
for home in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(command -v nvcc || echo /none/bin/nvcc)")")" /usr/local/cuda; do
  if [[ -n "$home" && -x "$home/bin/nvcc" ]]; then export CUDA_HOME="$home"; break; fi
done
if [[ -z "${CUDA_HOME:-}" || ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  say "no nvcc found: building the CPU kernels only"; unset CUDA_HOME; export CDFAST_BUILD_CUDA=0
fi
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
PIP_E=($PY -m pip install --no-build-isolation --no-deps --no-index -e .)
step "build" 240 "${PIP_E[@]}" \
  || step "build (CPU kernels only)" 120 env CDFAST_BUILD_CUDA=0 "${PIP_E[@]}" \
  || step "install (no extension)" 60 env CDFAST_BUILD_EXT=0 "${PIP_E[@]}" \
  || { # last resort: no pip install at all; the package runs from the checkout
       step "build_ext --inplace" 240 $PY setup.py build_ext --inplace
       export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
$PY -c "from cdfast.ops import competitive_ce as _ops; print('cdfast._C:', 'built' if _ops.HAS_EXTENSION else 'MISSING', 'CUDA' if _ops.WITH_CUDA else '')" \
  2>&1 | tee -a "$LOG"

# 1b. errors raised in cdfast._C must reach Python (the first H200 run segfaulted on every one)
OTHER_ENV=()
CUDA_MARKS="cuda and not slow"
if ! step "error path" 90 $PY bench/error_path_probe.py; then
  # every C++ error would kill a pytest process at its first error-path test, and every test after
  # it with it: the CUDA tests leave out those that expect an op error (marker op_error), the
  # other tests run on the reference ops
  say "error path broken: the CUDA tests deselect -m op_error, the other tests run with CDFAST_DISABLE_OPS=1"
  OTHER_ENV=(CDFAST_DISABLE_OPS=1)
  CUDA_MARKS="cuda and not slow and not op_error"
fi

# 2. the CUDA tests first (the evidence this check exists for), those that compile with inductor
# last (minutes of compilation); every other non-slow test at the end
step "cuda tests" 150 $PY -m pytest -q -m "$CUDA_MARKS" -k "not compile and not inductor" -p no:cacheprovider \
  --continue-on-collection-errors --junitxml="$OUT/junit-cuda.xml" tests

# 3. benchmarks, cheapest and most important first; statistics only (bench/conftest.py)
BENCH=(-q -p no:cacheprovider --benchmark-only --benchmark-max-time=0.3 --benchmark-min-rounds=5)
step "bench election" 60 $PY -m pytest "${BENCH[@]}" bench/test_competitive_ce.py \
  --benchmark-json="$OUT/bench-election.json"
step "bench student loss" 90 $PY -m pytest "${BENCH[@]}" bench/test_student_loss.py \
  -k "host_overhead or (forward_backward and (N2-B128-K100-D256 or N4-B128-K100-D256 or N4-B256-K1000-D2048))" \
  --benchmark-json="$OUT/bench-student-loss.json"
# one network alone, eager and graphed: the yardstick of the groups and their serial floor
step "bench engines" 170 $PY -m pytest "${BENCH[@]}" bench/test_engines.py \
  -k "(2xresnet32 and fp32 and not compile) or (2xresnet32 and bf16 and competitive and (sequential or graph) and not fused and not compile) or (2xresnet50 and bf16 and competitive and not graph and not compile) or (alone and ((resnet50 and bf16) or (resnet32 and fp32)) and not compile)" \
  --benchmark-json="$OUT/bench-engines.json"

# 4. memory and race checks of the election kernel on a small case (no caching allocator, so
# memcheck sees every allocation's true bounds)
SANITIZER=$(command -v compute-sanitizer || { [[ -x "${CUDA_HOME:-/none}/bin/compute-sanitizer" ]] && echo "$CUDA_HOME/bin/compute-sanitizer"; })
if [[ -n "$SANITIZER" ]]; then
  # every target form: class indices, smoothing + ignored labels + mixing, class probabilities
  SMALL='import torch, cdfast
z = torch.randn(3, 37, 101, device="cuda", requires_grad=True); y = torch.randint(0, 101, (37,), device="cuda")
ce, t = cdfast.competitive_ce(z, y); ce.sum().backward()
yi = y.clone(); yi[::5] = -100; lam = torch.rand(3, device="cuda")
ce, t = cdfast.competitive_ce(z, yi, y.flip(0), lam, label_smoothing=0.1, ignore_index=-100); ce.sum().backward()
q = torch.softmax(torch.randn(37, 101, device="cuda"), -1)
ce, t = cdfast.competitive_ce(z, q, q.flip(0), lam, label_smoothing=0.1); ce.sum().backward()
torch.cuda.synchronize(); print("ok", t.item())'
  step "memcheck" 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 3 $PY -c "$SMALL"
  step "racecheck" 45 "$SANITIZER" --tool racecheck --error-exitcode 3 $PY -c "$SMALL"
else
  say "compute-sanitizer not found: memcheck/racecheck skipped"
fi

# 5. the CUDA tests that compile, then the rest of the suite, with the time that is left
step "cuda compile tests" 90 $PY -m pytest -q -m "$CUDA_MARKS" -k "compile or inductor" -p no:cacheprovider \
  --junitxml="$OUT/raw/junit-cuda-compile.xml" tests
step "other tests" 200 env "${OTHER_ENV[@]}" $PY -m pytest -q -m "not slow and not cuda" -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" tests

finish
