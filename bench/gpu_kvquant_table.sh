#!/usr/bin/env bash
# The KVQuant table (docs/08-kvquant.md §8.12) on the GPU machine, with the real SmolLM2-135M GGUF.
#
# The GGUF (98 MB) is larger than what one device call carries (64 MiB), so it travels in two
# halves over two calls on the same warm machine (files outside the repo, such as /tmp, stay
# there between calls while it is warm; it stays warm ~30 s after a call):
#
#   here, once:   echo /.devdata/ >> .git/info/exclude; mkdir -p .devdata/{a,b,whl,wiki}
#                 G=~/.cache/kvsink/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#                 split -n 2 -d -a 1 "$G" .devdata/p && mv .devdata/p0 .devdata/a/gguf.part0 \
#                   && mv .devdata/p1 .devdata/b/gguf.part1
#                 sha256sum "$G" | cut -d' ' -f1 > .devdata/b/gguf.sha256
#                 cp ../shared/data/wikitext-2-raw/wiki.test.raw .devdata/wiki/     (never commit it)
#                 pip download (device README) gguf==0.19.0 into .devdata/whl   (the device lacks gguf)
#   call 1:       carry [".devdata/a", ".devdata/whl"]          bash bench/gpu_kvquant_table.sh part0
#   call 2 (at once, same warm machine):
#                 carry [".devdata/b", ".devdata/whl", ".devdata/wiki"]
#                 bash bench/gpu_kvquant_table.sh run [extra bench/kvquant_table.py options]
#
# "calib" instead of "run": the first 192 windows calibrated on three other held-out pairs of windows
# (CALIB_OFFSETS="2 4 6"), each into $OUT/calN/ -- how much the table depends on the calibration text.
# "run" also works where both halves are in .devdata/ (a local check on CPU: add --device cpu).
# Everything is written under $OUT (default /tmp/kvsink-out): the table's JSON and markdown are
# rewritten after every batch of windows, so a run cut by `timeout` still returns its windows.
set -u
OUT="${OUT:-/tmp/kvsink-out}"; mkdir -p "$OUT"
KV=/tmp/kv; mkdir -p "$KV"
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
mode="${1:-run}"; shift || true

install_wheels() {
    if ls .devdata/whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .devdata/whl/*.whl || { echo "wheel install failed"; exit 3; }
        export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    fi
    export PYTHONPATH=.:${PYTHONPATH:-}
}

case "$mode" in
part0)
    cp .devdata/a/gguf.part0 "$KV/gguf.part0" || { echo "no .devdata/a/gguf.part0 (carry .devdata/a)"; exit 2; }
    install_wheels
    ls -l "$KV" | tee "$OUT/part0.txt"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/part0.txt"
    ;;
run|calib)
    p0="$KV/gguf.part0"; [ -f "$p0" ] || p0=.devdata/a/gguf.part0
    if [ ! -f "$p0" ]; then
        echo "PART0 MISSING: the machine was not warm (run part0 then run again, at once)"; exit 2
    fi
    [ -f .devdata/b/gguf.part1 ] || { echo "no .devdata/b/gguf.part1 (carry .devdata/b)"; exit 2; }
    cat "$p0" .devdata/b/gguf.part1 > "$KV/$NAME"
    want=$(cat .devdata/b/gguf.sha256); got=$(sha256sum "$KV/$NAME" | cut -d' ' -f1)
    if [ "$want" != "$got" ]; then echo "SHA256 MISMATCH: $got != $want"; exit 4; fi
    echo "gguf sha256 ok: $got"
    install_wheels
    corpus=.devdata/wiki/wiki.test.raw; [ -f "$corpus" ] || corpus=../shared/data/wikitext-2-raw/wiki.test.raw
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
    # the torch path of accelerated.kvquant (the ops that mirror the reference), not the Triton kernels,
    # unless the caller sets KVSINK_KVQUANT_KERNEL=1 (recorded in the JSON either way)
    export KVSINK_KVQUANT_KERNEL="${KVSINK_KVQUANT_KERNEL:-0}"
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; \
      python3 -c "import torch, transformers, importlib.metadata as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'gguf', m.version('gguf'))" 2>&1; \
    } | tee "$OUT/env.txt"
    set -o pipefail
    if [ "$mode" = run ]; then
        [ $# -gt 0 ] || set -- --device cuda --windows 592 --batch 16 --time-limit "${BENCH_LIMIT:-470}"
        timeout "${BENCH_TIMEOUT:-530}" python3 bench/kvquant_table.py --model "$KV/$NAME" --corpus "$corpus" \
            --out "$OUT" "$@" 2>&1 | grep --line-buffered -v -i warning | tee "$OUT/kvquant_table.log"
        rc=$?
    else
        # calibration sensitivity: the same first windows, calibrated on other held-out pairs of windows
        # (--calib-offset N: the 2 windows that end N windows before the end of the text); one log for all
        for off in ${CALIB_OFFSETS:-2 4 6}; do
            [ $# -gt 0 ] && args=("$@") || args=(--device cuda --windows 192 --batch 16 --time-limit 160)
            echo "=== calibration offset $off" | tee -a "$OUT/calib.log"
            timeout "${BENCH_TIMEOUT:-175}" python3 bench/kvquant_table.py --model "$KV/$NAME" --corpus "$corpus" \
                --out "$OUT/cal$off" --calib-offset "$off" "${args[@]}" 2>&1 \
                | grep --line-buffered -v -i -e warning -e 'GGUF tensors' -e 'Loading weights' | tee -a "$OUT/calib.log"
            rc=$?
        done
    fi
    echo "bench exit status $rc"
    exit $rc
    ;;
*)
    echo "usage: bash bench/gpu_kvquant_table.sh part0 | run [bench options] | calib [bench options]"; exit 1 ;;
esac
