#!/usr/bin/env bash
# The GPU suite (issue 26) in phases that each fit one device call, resumable across calls:
#
#   bash benchmarks/gpu_suite.sh [--from DIR] [PHASE ...]
#
#   PHASE          what                                                           time cap
#   tests          pytest -m gpu over the files that hold gpu tests (xdist -n 8)  200 s
#   curve          decoder per-step time against rows 1..16, small and karlo      90 s
#                  (benchmarks/gpu_step_curve.py: the continuous-batching question)
#   small          small preset, batch 1: diffusers fp32/half, ours half eager,   150 s
#                  graphs, graphs+kernels (the 3x acceptance number)
#   karlo-main     karlo, batch 1 and 8: diffusers fp32/half, ours half eager     300 s
#                  and graphs+kernels (the 1.5x acceptance number)
#   small-kernels  small, batch 1: ours half eager, graphs, graphs + each kernel   150 s
#                  alone, channels-last (is each worth it)
#   karlo-kernels  karlo, batch 1 and 8: ours half eager, graphs, graphs + each   300 s
#                  kernel alone
#   karlo-cache    karlo, batch 1: the decoder step cache at N = 2, 3, 4, eager   300 s
#   sd-unclip      Stable unCLIP at real shapes (sd-unclip-l, 768 px), batch 1 and 4: diffusers    300 s
#                  fp32/half, ours half eager and half + CUDA graphs (its fast path)
#
# A lease is 15 minutes of device time in all (the machine's start counted), one command at most
# 10: the first call runs what fits of the first four (BUDGET, default 540 s of the call's 600: a
# phase starts only if its cap still fits), the script then names the command for the next call.
#
# Everything goes to $OUT (default unclip-out/gpu), at most 7 files: log.txt (all calls, appended),
# phases.txt (one line per finished phase: name, exit status, seconds, dtype), step_curve.json,
# parts/<phase>.json (each benchmark phase's results.json), results.json + results.md (all parts
# and the curve merged, rewritten after every phase). --from DIR first copies a previous call's files
# (what came back from its $OUT) into $OUT and skips the phases DIR/phases.txt records as passed.
#
# On this project's device machine (no network there): the image has torch, triton, transformers,
# onnx and onnxruntime but not diffusers or pydantic, which travel as wheels in .whl (git-ignored):
#   here:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#            -d .whl diffusers==0.42.1 importlib_metadata==8.7.0 pydantic==2.13.4 pydantic_core==2.46.4 \
#            annotated_types==0.8.0 typing_inspection==0.4.5
#   call 1: command="bash benchmarks/gpu_suite.sh", carry=[".whl"]
#   call 2: copy call 1's files to .gpu-prev/ (ignored too), then
#           command="bash benchmarks/gpu_suite.sh --from .gpu-prev", carry=[".whl", ".gpu-prev"]
# The first line after the wheels install says whether everything the suite imports is there.
# DTYPE=bf16 reruns a phase in bf16 if the random weights overflow fp16 (the log then says so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-unclip-out/gpu}
BUDGET=${BUDGET:-540}
D=${DTYPE:-fp16}
FROM=""
if [[ ${1:-} == --from ]]; then FROM=$2; shift 2; fi
PHASES=${*:-tests curve small karlo-main small-kernels karlo-kernels karlo-cache}
mkdir -p "$OUT/parts"
if [[ -n $FROM ]]; then
    [[ -d $FROM ]] || { echo "gpu_suite: --from $FROM is not a folder"; exit 2; }
    cp -r "$FROM"/. "$OUT"/ && chmod -R u+w "$OUT"  # what came back from a call is read-only here
fi
touch "$OUT/phases.txt"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "=== gpu_suite $(date -u +%FT%TZ): phases: $PHASES; dtype $D; budget ${BUDGET}s; from ${FROM:-nothing}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/unclip-site .whl/*.whl || { echo "gpu_suite: installing .whl failed"; exit 3; }
    export PYTHONPATH="$PYTHONPATH:/tmp/unclip-site"
fi
python3 benchmarks/gpu_fastpath.py --preflight || exit 3
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; git log -1 --oneline
  git status --short | head -20; } 2>&1

cap() {  # the time cap of a phase, seconds
    case $1 in tests) echo 200 ;; curve) echo 90 ;; small | small-kernels) echo 150 ;; karlo-main) echo 300 ;;
        karlo-kernels | karlo-cache | sd-unclip) echo 300 ;; *) echo 0 ;; esac
}
bench() {  # phase, gpu_fastpath options...: its results.json becomes parts/<phase>.json
    local name=$1 tmp status
    tmp=$(mktemp -d)
    shift
    timeout --signal=INT --kill-after=20 "$(cap "$name")" python3 benchmarks/gpu_fastpath.py --out "$tmp" "$@" \
        2>&1 | tee "$tmp/output.txt"
    status=${PIPESTATUS[0]}
    [[ -f $tmp/results.json ]] && cp "$tmp/results.json" "$OUT/parts/$name.json"
    if (( status != 0 )) && [[ $D == fp16 ]] && grep -q "non-finite values (precision fp16" "$tmp/output.txt"; then
        echo "=== $name: the random weights overflow fp16; next call:" \
            "DTYPE=bf16 bash benchmarks/gpu_suite.sh --from <this call's files> $name"
    fi
    rm -rf "$tmp"
    python3 benchmarks/gpu_fastpath.py --merge "$OUT"
    return "$status"
}

START=$SECONDS
FAILED=0
todo=()
for p in $PHASES; do
    [[ $(cap "$p") == 0 ]] && { echo "gpu_suite: unknown phase $p (tests curve small karlo-main small-kernels karlo-kernels karlo-cache sd-unclip)"; exit 2; }
    grep -q "^$p exit=0 " "$OUT/phases.txt" && { echo "=== $p: passed in an earlier call, skipped"; continue; }
    todo+=("$p")
done
for i in "${!todo[@]}"; do
    p=${todo[$i]}
    if (( SECONDS - START + $(cap "$p") > BUDGET )); then
        echo "=== not started, would not fit this call: ${todo[*]:$i}"
        echo "=== next call: bash benchmarks/gpu_suite.sh --from <this call's files> ${todo[*]:$i}"
        break
    fi
    echo "=== $p: start $(date -u +%T), cap $(cap "$p") s"
    t0=$SECONDS
    case $p in
    tests)  # only the files with gpu tests: the others import the serving stack, absent there
        mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
        extra=()
        python3 -c "import xdist" 2>/dev/null && extra+=(-n 8)  # Triton compiles on 8 cores
        python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 150)
        timeout --signal=INT --kill-after=20 "$(cap tests)" \
            python3 -m pytest -m gpu -q -rs -p no:cacheprovider -p no:benchmark "${extra[@]}" "${files[@]}" ;;
    curve)
        tmp=$(mktemp -d)
        timeout --signal=INT --kill-after=20 "$(cap curve)" python3 benchmarks/gpu_step_curve.py \
            --models small,karlo --rows 1,2,4,8,16 --dtype "$D" --out "$tmp"
        status=$?
        [[ -f $tmp/step_curve.json ]] && cp "$tmp/step_curve.json" "$OUT/step_curve.json"
        rm -rf "$tmp"
        python3 benchmarks/gpu_fastpath.py --merge "$OUT"
        (exit $status) ;;
    small)
        bench small --model small --batch-sizes 1 --warmup 1 --repeat 5 --dtype "$D" \
            --runners "diffusers-$D,torch-$D,torch-$D-graphs,torch-$D-graphs-kernels" ;;
    karlo-main)
        bench karlo-main --model karlo --batch-sizes 1,8 --warmup 1 --repeat 3 --dtype "$D" \
            --runners "diffusers-$D,torch-$D,torch-$D-graphs-kernels" ;;
    small-kernels)
        bench small-kernels --model small --batch-sizes 1 --warmup 1 --repeat 5 --dtype "$D" \
            --runners "torch-$D,torch-$D-graphs,torch-$D-graphs-gn,torch-$D-graphs-step,torch-$D-graphs-cl" ;;
    karlo-kernels)
        bench karlo-kernels --model karlo --batch-sizes 1,8 --warmup 1 --repeat 3 --dtype "$D" \
            --runners "torch-$D,torch-$D-graphs,torch-$D-graphs-gn,torch-$D-graphs-step" ;;
    karlo-cache)
        c="torch-$D-graphs-gn"
        bench karlo-cache --model karlo --batch-sizes 1 --warmup 1 --repeat 3 --dtype "$D" \
            --runners "diffusers-$D,torch-$D,torch-$D+cache2,torch-$D+cache3,torch-$D+cache4,$c,$c+cache2,$c+cache3,$c+cache4" ;;
    sd-unclip)  # the second family at real shapes, built on the GPU: diffusers fp32/half against ours
        # half eager and half + CUDA graphs of each prior/UNet call (its fast path; no kernels for it)
        bench sd-unclip --model sd-unclip-l --batch-sizes 1,4 --warmup 1 --repeat 3 --dtype "$D" \
            --prior-steps 25 --decoder-steps 20 \
            --runners "diffusers-$D,torch-$D,torch-$D-graphs" ;;
    esac
    status=$?
    echo "$p exit=$status seconds=$((SECONDS - t0)) dtype=$D $(date -u +%FT%TZ)" >>"$OUT/phases.txt"
    echo "=== $p: exit $status after $((SECONDS - t0)) s"
    (( status == 0 )) || FAILED=1
done
echo "=== phases so far:"; cat "$OUT/phases.txt"
exit $FAILED
