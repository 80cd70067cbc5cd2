#!/usr/bin/env bash
# Issue 9's device calls of the eighth session.  Outputs under $OUT.
#   bash bench/gpu_session11.sh tests           the CUDA tests of the captured step, the kernels, the
#                                               cache and its transformers glue (TESTS: other files)
#   bash bench/gpu_session11.sh speed ARGS      gpu_speed.py ARGS (issue 9's grid; the time budget and
#                                               memory cap of bench/gpu_speed.sh)
# Carry .devdata/compile_cache.bin (an earlier call's torch.compile artifacts) to compile faster.
set -u
OUT="${OUT:-/tmp/kvsink-out}"; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
cc=(); [ -f .devdata/compile_cache.bin ] && cc=(--compile-cache .devdata/compile_cache.bin)
case "${1:-}" in
  tests)
    files=${TESTS:-"tests/test_hf_captured.py tests/test_hf_compile.py tests/test_decode_kernels.py
      tests/test_tensor_decode.py tests/test_accelerated_ops.py tests/test_accelerated_cache.py
      tests/test_accelerated_cache_flush.py tests/test_hf.py tests/test_prefill.py conformance/test_cuda.py"}
    # shellcheck disable=SC2086
    timeout "${TESTS_LIMIT:-280}" python3 -m pytest -q -p no:cacheprovider -n 8 -m "not model" \
      $files > "$OUT/tests.txt" 2>&1
    echo "tests rc=$?"; grep -E "passed|failed|error" "$OUT/tests.txt" | tail -2
    grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20 ;;
  speed) shift
    timeout "${SPEED_LIMIT:-500}" python3 bench/gpu_speed.py --memory-gib 79.6 --rounds 3 \
      --decode-tokens 16 --time-budget-s "${SPEED_BUDGET:-440}" "${cc[@]}" --out "$OUT" "$@" \
      > "$OUT/gpu_speed.log" 2>&1
    echo "speed rc=$?"; grep -v -i warn "$OUT/gpu_speed.log" | tail -15; cat "$OUT/gpu_speed.md" ;;
  *) echo "usage: bash bench/gpu_session11.sh tests | speed ARGS" >&2; exit 2 ;;
esac
