#!/usr/bin/env bash
# One device call: the whole CPU-runnable suite on CUDA (accelerated port on the GPU, Triton paths),
# then decode speed after/before the per-step host-work cut (KVSINK_ROOT=.before, see gpu_decode_session.sh).
# Carry [".whl", ".before"]; .whl holds pytest, hypothesis, pytest-xdist and their dependencies.
set -u
OUT="${OUT:-/tmp/kvsink-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 290 python3 -m pytest -n 8 -q -p no:cacheprovider -m "not model" -rs tests conformance 2>&1 | tail -40 > "$OUT/pytest_cuda.log"
timeout 110 python3 bench/gpu_decode_profile.py --rounds 3 --warmup-s 10 --out "$OUT" 2>&1 | grep -v Warning > "$OUT/profile_after.log"
KVSINK_ROOT=.before timeout 110 python3 bench/gpu_decode_profile.py --rounds 3 --warmup-s 10 --out "$OUT" 2>&1 | grep -v Warning > "$OUT/profile_before.log"
tail -5 "$OUT/pytest_cuda.log"; grep -h "ms/token\|per decode step\|launch\|sync" "$OUT"/profile_*.log
