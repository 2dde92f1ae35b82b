#!/usr/bin/env bash
# `make gpu-check`: everything the first minutes on a lent GPU should answer, in one
# call that fits the device tool's 10-minute command limit with room to rerun.
#
# Phases, each under its own timeout so a hang in one still returns the others' logs:
#   1. environment (GPU, driver, torch/triton versions, commit)        ~5 s
#   2. the CUDA C++ extension built once for this GPU (kept in its cache)  <= 95 s
#   3. the CUDA GEMM engines' first contact (scripts/gpu_smoke.py: one small problem
#      per engine against the reference, then its time at the MFB default beside the
#      model's, each engine in its own process under 20 s): an engine that hangs or
#      is wrong is recorded and kept out of the phases below (staging.env)  <= 85 s
#   4. correctness on the GPU (split, triton, cuda, auto/explain, dropout,
#      determinism, large offsets): the interpreter cannot see the GPU
#      compiler's arithmetic, the ticket protocol or CUDA graphs            <= 180 s
#   5. the benchmark (measured beside the cost model's prediction)          <= 110 s
# Worst case 470 s of phases: under 8 minutes with the environment and the install.
# Results and logs go under $OUT (the device tool's output folder), a short summary
# is printed last.  GPU_CHECK_TESTS (a pytest -k expression) / GPU_CHECK_BENCH override
# the test selection and the benchmark arguments.  The test files whose checks only a
# GPU can make (graphs and streams, real sizes, large offsets, the wide and split
# kernels, auto) run first, so a timeout cuts the rest, not them.  Runs with the
# machine's own Python (FBP_SYSTEM_PYTHON).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PY:-python3}
TESTS=${GPU_CHECK_TESTS:-"split or strategy or triton or wide or cuda_graphs or cuda_backend or dropout or determinism or large_offsets or correctness or gradcheck"}
FIRST="tests/test_cuda_graphs.py tests/test_large_offsets.py tests/test_wide.py tests/test_split.py tests/test_strategy.py tests/test_correctness.py tests/test_cuda_backend.py"
BENCH=${GPU_CHECK_BENCH:-"--sweep rows,coatt --no-compile --time-budget 85"}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git rev-parse HEAD 2>/dev/null || echo "commit: (no .git here)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

FBP_SKIP_CUDA_BUILD=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  > "$OUT/install.log" 2>&1 || echo "install failed: see install.log"

# The CUDA backend's extension: one build (all cores), so the tests below load it.
MAX_JOBS=${MAX_JOBS:-16} timeout 95 "$PY" -c \
  "from fbp_kernels.backends import cuda_build; print(cuda_build.load())" \
  > "$OUT/cuda_build.log" 2>&1
build_rc=$?
echo "cuda extension build rc $build_rc (124 = timed out): see cuda_build.log"

# Each GEMM engine once, alone: a hang or a wrong engine must not eat the test phase.
timeout 85 "$PY" scripts/gpu_smoke.py --out "$OUT" --timeout 20 > "$OUT/smoke.log" 2>&1
echo "engine smoke rc $? (124 = timed out): see smoke.log / smoke.json"
if [ -s "$OUT/staging.env" ]; then
  while IFS= read -r setting; do export "${setting?}"; done < "$OUT/staging.env"
  echo "later phases run with: $(tr '\n' ' ' < "$OUT/staging.env")"
fi

# The -k expression is one argument (it has spaces); FIRST's files before the rest, as
# files (given a directory too, pytest collects in the directory's order).
REST=$(for f in tests/test_*.py; do case " $FIRST " in *" $f "*) ;; *) echo "$f" ;; esac; done)
# shellcheck disable=SC2086
timeout 180 "$PY" -m pytest $FIRST $REST -q -p no:cacheprovider -rs -k "$TESTS" \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tests_rc=$?

# shellcheck disable=SC2086
timeout 110 "$PY" benchmarks/run.py $BENCH --out "$OUT/bench" > "$OUT/bench.log" 2>&1
bench_rc=$?

echo "== engine smoke"
cat "$OUT/smoke.log" 2>/dev/null
echo "== tests (rc $tests_rc; 124 = timed out)"
tail -n 15 "$OUT/tests.log"
echo "== bench (rc $bench_rc)"
tail -n 40 "$OUT/bench.log"
