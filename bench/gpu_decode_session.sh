#!/usr/bin/env bash
# One device call: decode speed before/after the per-step host-work cut, then the CUDA tests.
# "before" = the tree of an earlier commit, via KVSINK_ROOT: make it here, git-ignored, and carry it:
#   echo /.before/ >> .git/info/exclude; mkdir -p .before && git archive fc4bb95 accelerated reference | tar -x -C .before
# then run with carry [".whl", ".before"].
# Usage on the GPU machine (repo root, test wheels carried as .whl/): bash bench/gpu_decode_session.sh
set -u
OUT="${OUT:-/tmp/kvsink-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 180 python3 bench/gpu_decode_profile.py --out "$OUT" 2>&1 | grep -v Warning > "$OUT/profile_after.log"
KVSINK_ROOT=.before timeout 180 python3 bench/gpu_decode_profile.py --out "$OUT" 2>&1 | grep -v Warning > "$OUT/profile_before.log"
timeout 60 python3 bench/gpu_e2e.py --parts speed --out "$OUT" 2>&1 | grep -v Warning > "$OUT/e2e_speed.log"
KVSINK_ROOT=.before timeout 60 python3 bench/gpu_e2e.py --parts speed --out "$OUT" 2>&1 | grep -v Warning >> "$OUT/e2e_speed.log"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m "not model" tests/test_hf.py tests/test_accelerated_cache.py 2>&1 | tail -25 > "$OUT/pytest_cuda.log"
grep -h "ms/token\|per decode step\|device " "$OUT"/profile_*.log "$OUT/e2e_speed.log"; cat "$OUT/pytest_cuda.log"
