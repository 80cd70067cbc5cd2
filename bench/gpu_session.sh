#!/usr/bin/env bash
# One device call: install the carried test wheels, run the CUDA tests, then the end-to-end script.
# Usage on the GPU machine (repo root): bash bench/gpu_session.sh  (writes logs under $OUT)
set -u
OUT="${OUT:-/tmp/kvsink-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m "not model" -x \
  tests/test_accelerated_ops.py tests/test_accelerated_cache.py tests/test_accelerated_cache_kvquant.py \
  tests/test_hf.py conformance/test_cuda.py conformance/test_quantize.py conformance/test_attention.py \
  conformance/test_cache.py 2>&1 | tail -25 | tee "$OUT/pytest_cuda.log"
timeout 240 python3 bench/gpu_e2e.py --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/gpu_e2e.log"
