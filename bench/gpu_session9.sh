#!/usr/bin/env bash
# Issue 9's device calls after the fused decode kernel, the SDPA prefill and the sync-free step
# landed.  Outputs under $OUT.  Carry .devdata/whl-quanto (bench/gpu_speed.sh).
#   bash bench/gpu_session9.sh tests     the CUDA tests of the cache, kernels and transformers glue
#   bash bench/gpu_session9.sh suite     the whole suite (tests/ and conformance/, not the model checks)
#   bash bench/gpu_session9.sh kernels   bench_kernels.py --quick ("layer ..." rows: fused vs split)
#                                        and gpu_decode_profile.py (launches, syncs, GPU time per step)
#   bash bench/gpu_session9.sh speed ARGS  bench/gpu_speed.py ARGS (issue 9's grid, see its header)
# Several parts in one call: bash bench/gpu_session9.sh tests speed --ctx 4096 --batch 1,8
set -u
OUT="${OUT:-/tmp/kvsink-out}"; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
run_tests() {
  timeout "${TESTS_LIMIT:-200}" python3 -m pytest -q -p no:cacheprovider -n 8 -m "not model" \
    tests/test_decode_kernels.py tests/test_prefill.py tests/test_hf.py tests/test_hf_compile.py tests/test_accelerated_cache.py \
    tests/test_accelerated_ops.py tests/test_accelerated_cache_kvquant.py conformance/test_cuda.py \
    conformance/test_attention.py conformance/test_cache.py > "$OUT/tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "passed|failed|error" "$OUT/tests.txt" | tail -2
  grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
}
run_suite() {
  timeout "${SUITE_LIMIT:-540}" python3 -m pytest -q -p no:cacheprovider -n 8 -m "not model" -rs \
    tests conformance > "$OUT/suite.txt" 2>&1
  echo "suite rc=$?"; grep -E "passed|failed|error" "$OUT/suite.txt" | tail -2
  grep -E "^(FAILED|ERROR)" "$OUT/suite.txt" | head -20
  grep -E "^SKIPPED" "$OUT/suite.txt" | sed -E 's/\[[0-9]+\] //; s/:[0-9]+:/:/' | sort | uniq -c | sort -rn | head -8
}
run_kernels() {
  timeout 100 python3 bench/bench_kernels.py --quick --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1
  echo "kernels rc=$?"; grep -i -E "layer|floor" "$OUT/kernels.txt" | tail -20
  timeout 120 python3 bench/gpu_decode_profile.py --prompt 4096 --steps 32 --rounds 3 --warmup-s 10 \
    --out "$OUT" > "$OUT/profile.txt" 2>&1
  echo "profile rc=$?"; tail -15 "$OUT/profile.txt"
}
run_speed() {
  mkdir -p "$OUT/speed"
  timeout "${SPEED_LIMIT:-400}" python3 bench/gpu_speed.py --memory-gib 79.6 --rounds 3 --decode-tokens 16 \
    --caches "${CACHES:-dynamic,static-compiled,quanto2,quanto4,kvsink2,kvsink4}" \
    --time-budget-s "${SPEED_BUDGET:-360}" --out "$OUT/speed" "$@" > "$OUT/speed/log.txt" 2>&1
  echo "speed rc=$?"; grep -v -i warn "$OUT/speed/log.txt" | tail -15; cat "$OUT/speed/gpu_speed.md"
}
while [ $# -gt 0 ]; do
  part="$1"; shift
  case "$part" in
    tests) run_tests ;;
    suite) run_suite ;;
    kernels) run_kernels ;;
    speed) run_speed "$@"; break ;;
    *) echo "usage: bash bench/gpu_session9.sh [tests] [suite] [kernels] [speed gpu_speed.py-args]" >&2; exit 2 ;;
  esac
done
