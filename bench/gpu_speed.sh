#!/usr/bin/env bash
# Issue 9's benchmark (bench/gpu_speed.py) on the device, split into calls of under 8 minutes
# (the split and its estimate: bench/gpu_speed.py's header).  Run in the repo root on the GPU
# machine; carry .devdata/whl-quanto (optimum-quanto's wheel + ninja's: the device has no
# optimum-quanto) and, from the second call on, .devdata/compile_cache.bin (the previous call's
# $OUT/X/compile_cache.bin copied there: torch.compile's artifacts, so the compiled StaticCache
# compiles faster) and, for C and F, .devdata/speed_B.json / speed_E.json (call B's / E's
# gpu_speed.json: the reference cells of the largest-batch estimate).
#   bash bench/gpu_speed.sh A|B|C|D|E|F [more gpu_speed.py options]
# Priority: A, B, C (Llama-3-8B: the shapes of issue 9's targets), then D, E, F (Llama-2-7B).
# Merge the calls' tables here: python bench/speed_report.py A/gpu_speed.json B/... --out DIR
set -u
OUT="${OUT:-/tmp/kvsink-speed}"
part="${1:-A}"
shift || true
export PYTHONUNBUFFERED=1 PYTHONPATH=.
caches=dynamic,static-compiled,quanto2,quanto4,kvsink2,kvsink4
# --memory-gib 79.6: the allocator capped at an 80 GB H100's memory (81559 MiB), also on an H200
common=(--caches "$caches" --rounds 3 --decode-tokens 16 --time-budget-s "${BUDGET:-420}"
        --memory-gib "${MEMORY_GIB:-79.6}")
[ -f .devdata/compile_cache.bin ] && common+=(--compile-cache .devdata/compile_cache.bin)
case "$part" in
  A) args=(--model llama3-8b --ctx 4096 --batch 1,8,32) ;;
  B) args=(--model llama3-8b --ctx 32768 --batch 1,8 --no-kernels) ;;
  C) args=(--model llama3-8b --skip-grid --max-batch --max-batch-reference .devdata/speed_B.json --no-kernels) ;;
  D) args=(--model llama2-7b --ctx 4096 --batch 1,8,32) ;;
  E) args=(--model llama2-7b --ctx 32768 --batch 1,4 --no-kernels) ;;
  F) args=(--model llama2-7b --skip-grid --max-batch --max-batch-reference .devdata/speed_E.json --no-kernels) ;;
  *) echo "usage: bash bench/gpu_speed.sh A|B|C|D|E|F [gpu_speed.py options]" >&2; exit 2 ;;
esac
mkdir -p "$OUT/$part"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader > "$OUT/$part/gpu.txt" 2>&1
timeout "${LIMIT:-560}" python3 bench/gpu_speed.py "${common[@]}" "${args[@]}" --out "$OUT/$part" "$@" \
    > "$OUT/$part/gpu_speed.log" 2>&1
rc=$?
grep -v -i "warn" "$OUT/$part/gpu_speed.log" | tail -80
exit $rc
