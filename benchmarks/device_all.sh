#!/usr/bin/env bash
# Every GPU measurement in one command, for a CUDA machine with torch and triton already installed
# (written for torch 2.11 / triton 3.6; it never installs or upgrades torch):
#
#   bash benchmarks/device_all.sh            # ~8 minutes on one H100/H200
#   bash benchmarks/device_all.sh --dry-run  # the same steps on the CPU: interpreter, tiny shapes
#
# Steps, each under its own time limit so that the whole stays within 8 minutes:
#   1. install: the project in editable mode without dependencies, and only the missing few that the
#      steps import (pytest, pydantic, safetensors, faiss-cpu ...); torch is checked unchanged after
#   2. the kernel tests compiled for the GPU (TRITON_INTERPRET=0), bf16 included
#   3. bench_attention.py: prefill TFLOP/s vs FlexAttention (Gemma 2 softcap + window, hd256; prefix-LM)
#      and vs SDPA flash (causal hd128); decode GB/s vs memory bandwidth
#   4. bench_maxsim.py --gpu: the Triton MaxSim kernel vs the torch specification
#   5. bench_colpali.py: ColPali page embedding pages/s, Triton vs torch attention
# then one table of every figure (benchmarks/device_results.py), also saved with the logs in
# $OUT (or a temporary directory). A failed or timed-out step is reported in the table and the
# next step still runs. The dry run measures nothing: it checks that every step runs here.
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
PY="${PYTHON:-python}"
DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$DIR"
export DEVICE_RESULTS="$DIR/device_results.jsonl"
: > "$DEVICE_RESULTS"
export PYTHONPATH="$PWD/benchmarks:$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

note() {  # one row of the table for a step: name, seconds, status
    printf '{"section": "step", "case": "%s", "value": %s, "unit": "s", "baseline": null, "baseline_name": "", "target": "", "note": "%s"}\n' \
        "$1" "$2" "$3" >> "$DEVICE_RESULTS"
}

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it with a time limit, log it, note how it ended
    local name=$1 limit=$2
    shift 2
    local began=$(date +%s)
    echo "== $name (limit ${limit} s; $(( began - START )) s elapsed)"
    timeout --kill-after=10 "$limit" "$@" > "$DIR/$name.log" 2>&1
    local rc=$?
    cat "$DIR/$name.log"
    local took=$(( $(date +%s) - began ))
    if [ $rc -eq 0 ]; then note "$name" "$took" "ok"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "$name" "$took" "TIMED OUT after ${limit} s"
    else note "$name" "$took" "FAILED (exit $rc): see $DIR/$name.log"
    fi
}

if [ $DRY = 1 ]; then
    export TRITON_INTERPRET=1
    # Collecting the kernel tests checks the pytest step's imports; the suite itself runs them
    # interpreted (make test), so they are not run twice here.
    step kernel-tests 120 "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/kernels/test_kernel_maxsim.py
    step bench-attention 120 "$PY" benchmarks/bench_attention.py --dry-run
    step bench-maxsim-gpu 60 "$PY" benchmarks/bench_maxsim.py --gpu --dry-run
    step bench-colpali 60 "$PY" benchmarks/bench_colpali.py --dry-run
else
    export TRITON_INTERPRET=0
    step install 60 bash -c '
        '"$PY"' -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.cuda.is_available())" || exit 1
        before=$('"$PY"' -c "import torch; print(torch.__version__)")
        '"$PY"' -m pip install -q --no-deps --no-build-isolation -e . || echo "editable install failed: using PYTHONPATH"
        missing=""
        for pair in pytest:pytest pytest_timeout:pytest-timeout numpy:numpy pydantic:pydantic safetensors:safetensors \
                    PIL:pillow faiss:faiss-cpu tokenizers:tokenizers tqdm:tqdm; do
            '"$PY"' -c "import ${pair%%:*}" 2>/dev/null || missing="$missing ${pair#*:}"
        done
        if [ -n "$missing" ]; then echo "installing:$missing"; '"$PY"' -m pip install -q $missing || exit 1; fi
        after=$('"$PY"' -c "import torch; print(torch.__version__)")
        [ "$before" = "$after" ] || { echo "torch changed from $before to $after"; exit 1; }'
    step kernel-tests 150 "$PY" -m pytest -q -p no:cacheprovider --timeout=120 tests/kernels
    step bench-attention 170 "$PY" benchmarks/bench_attention.py --seq-lens 1024 4096 16384 \
        --prefix-seq-lens 4096 --decode-contexts 4096 16384 32768
    step bench-maxsim-gpu 40 "$PY" benchmarks/bench_maxsim.py --gpu
    step bench-colpali 60 "$PY" benchmarks/bench_colpali.py
fi

echo
echo "== all figures ($(( $(date +%s) - START )) s; logs and device_results.jsonl in $DIR)"
"$PY" benchmarks/device_results.py "$DEVICE_RESULTS" | tee "$DIR/device_results.md"
