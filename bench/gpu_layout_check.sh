#!/usr/bin/env bash
# Device check of the restructured layout (issue 14): the suite on CUDA, then decode speed and the
# kernels before/after. "before" = the tree of commit b89abe6 (the last one before the restructure),
# made here and carried:
#   echo /.before/ >> .git/info/exclude; mkdir -p .before && git archive b89abe6 accelerated reference | tar -x -C .before
# Usage on the GPU machine (repo root, carry [".before"]):
#   bash bench/gpu_layout_check.sh tests      # the CPU-runnable suite on CUDA (pytest-xdist, 8 workers)
#   bash bench/gpu_layout_check.sh speed      # decode profile after then before, the kernels' timings
set -u
OUT="${OUT:-/tmp/kvsink-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
case "${1:-tests}" in
tests)
  timeout 540 python3 -m pytest -n 8 -q -p no:cacheprovider -m "not model" -rs tests conformance \
      > "$OUT/pytest_cuda.log" 2>&1
  grep -E "passed|failed|error" "$OUT/pytest_cuda.log" | tail -5
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_cuda.log" | head -30 ;;
speed)
  for tree in after before; do
    root=""; [ "$tree" = before ] && root=.before
    KVSINK_ROOT=$root timeout 130 python3 bench/gpu_decode_profile.py --rounds 3 --warmup-s 10 --out "$OUT" \
        2>&1 | grep -v Warning > "$OUT/profile_$tree.log"
  done
  timeout 100 python3 bench/bench_kernels.py --quick > "$OUT/bench_kernels.log" 2>&1
  for f in "$OUT"/profile_*.log; do echo "== $f"; grep -h "ms/token\|per decode step\|launch\|sync" "$f"; done
  tail -25 "$OUT/bench_kernels.log" ;;
esac
