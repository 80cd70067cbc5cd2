#!/usr/bin/env bash
# Issue 9's device calls after the exact-bfloat16 tensor-core decode programs (both sides folded,
# codes unpacked by inline PTX) and the one-read flush.  Outputs under $OUT.
#   bash bench/gpu_session10.sh tests      the CUDA tests of the kernels, the cache and its flush
#   bash bench/gpu_session10.sh tc [OLD]   bench_decode_tc.py over its shapes: this tree's launch
#                                          variants, then (OLD: a `git archive` tarball of an
#                                          earlier commit, carried) that tree's default, same call
#   bash bench/gpu_session10.sh syncs      gpu_decode_profile.py: the syncs of each decode step
#   bash bench/gpu_session10.sh speed ARGS bench/gpu_speed.sh ARGS (issue 9's grid; carry
#                                          .devdata/whl-quanto)
# Several parts in one call: bash bench/gpu_session10.sh tests tc .devdata/old.tar syncs
set -u
OUT="${OUT:-/tmp/kvsink-out}"; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
VARIANTS='[{}, {"max_registers": 168}, {"max_registers": 168, "pps": 12}, {"max_registers": 168, "pps": 6},
           {"num_warps": 4}, {"num_stages": 2}, {"pps": 4}, {"pps": 12}, {"value_fold": false},
           {"fold": false, "value_fold": false}]'
run_tests() {
  timeout "${TESTS_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider -n 8 -m "not model" \
    tests/test_tensor_decode.py tests/test_decode_kernels.py tests/test_accelerated_cache_flush.py \
    tests/test_prefill.py tests/test_hf.py tests/test_hf_compile.py tests/test_accelerated_cache.py \
    tests/test_accelerated_ops.py conformance/test_cuda.py conformance/test_cache.py > "$OUT/tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "passed|failed|error" "$OUT/tests.txt" | tail -2
  grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
}
run_tc() {
  timeout 200 python3 bench/bench_decode_tc.py --variants "$VARIANTS" --json "$OUT/decode_tc.json" \
    > "$OUT/decode_tc.txt" 2>&1
  echo "tc rc=$?"; grep -E "^B|v3|v4|copy" "$OUT/decode_tc.txt"
  if [ -n "${1:-}" ] && [ -f "$1" ]; then          # the earlier tree, its default launch
    mkdir -p /tmp/old-tree && tar -xf "$1" -C /tmp/old-tree
    (cd /tmp/old-tree && PYTHONPATH=. timeout 120 python3 bench/bench_decode_tc.py --variants '[{}]' \
       --json "$OUT/decode_tc_old.json" > "$OUT/decode_tc_old.txt" 2>&1)
    echo "old tree rc=$?"; grep -E "^B|v3|v4" "$OUT/decode_tc_old.txt"
  fi
}
run_syncs() {
  timeout 150 python3 bench/gpu_decode_profile.py --prompt 4096 --steps 4 --rounds 1 --warmup-s 1 \
    --profile-steps 32 --host-profile --out "$OUT" > "$OUT/syncs.txt" 2>&1
  echo "syncs rc=$?"; tail -20 "$OUT/syncs.txt"
}
while [ $# -gt 0 ]; do
  part="$1"; shift
  case "$part" in
    tests) run_tests ;;
    tc) if [ $# -gt 0 ] && [ -f "$1" ]; then run_tc "$1"; shift; else run_tc; fi ;;
    syncs) run_syncs ;;
    speed) OUT="$OUT/speed" bash bench/gpu_speed.sh "$@"; break ;;
    *) echo "usage: bash bench/gpu_session10.sh [tests] [tc [OLD.tar]] [syncs] [speed ARGS]" >&2; exit 2 ;;
  esac
done
