#!/usr/bin/env bash
# Tensor parallelism on GPUs (issue 11; docs/11 §11.10). Needs a machine with 4 GPUs (2 are enough
# for the first half): the CPU checks of tests/test_tensor_parallel.py with NCCL on 1, 2 and 4
# GPUs, then decode ms/token of a random Llama-3-8B-shaped model at B=8, N=32k on 1, 2 and 4 GPUs,
# then device_map over two GPUs (bench/gpu_e2e.py). Results land in $OUT (or bench/results/tp).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/tp}"; mkdir -p "$OUT"
NGPU=$(python -c 'import torch; print(torch.cuda.device_count())')
python bench/tp_check.py --make-tiny /tmp/tp-tiny
python bench/tp_check.py --make-tiny /tmp/tp-8b --shape llama3-8b
python bench/tp_check.py --model /tmp/tp-tiny --device cuda --out "$OUT/checks_1.json"
for n in 2 4; do
  [ "$n" -le "$NGPU" ] || continue
  torchrun --standalone --nproc_per_node "$n" bench/tp_check.py --model /tmp/tp-tiny --device cuda --out "$OUT/checks_$n.json"
done
python bench/tp_check.py --compare "$OUT"/checks_*.json | tee "$OUT/checks.md"
python bench/tp_check.py --model /tmp/tp-8b --device cuda --decode 8 32768 32 --out "$OUT/decode_1.json"
for n in 2 4; do
  [ "$n" -le "$NGPU" ] || continue
  torchrun --standalone --nproc_per_node "$n" bench/tp_check.py --model /tmp/tp-8b --device cuda --decode 8 32768 32 --out "$OUT/decode_$n.json"
done
[ "$NGPU" -ge 2 ] && python bench/gpu_e2e.py --out "$OUT" --parts device_map
