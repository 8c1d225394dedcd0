#!/usr/bin/env bash
# The GPU suite (issue 15 part B) in phases that each fit one device call, resumable across calls:
#
#   bash benchmarks/gpu_suite.sh [--from DIR] [PHASE ...]
#
#   PHASE          what                                                       time cap   estimate (H100)
#   tests          pytest -m gpu                                              360 s      ~190 s
#   small          small preset, batch 1, 8 runners, 25/25/7 steps            270 s      ~150 s
#   karlo-main     karlo, batch 1 and 8: diffusers fp32/fp16, ours fp16       450 s      ~180 s
#                  eager and graphs+kernels (the acceptance numbers)
#   karlo-kernels  karlo, batch 1 and 8: diffusers fp32, ours fp16 eager,     450 s      ~210 s
#                  graphs, graphs with each kernel alone (is each worth it)
#
# Estimates, not measured (docs/gpu.md has the arithmetic): FLOPs and kernel launches counted per
# network call here, at assumed H100 rates and 20 us per eager launch, plus process starts, model
# builds and Triton compilation. Phases run in the order given (default: all four) while the next
# one's cap still fits this call's BUDGET (default 540 s of the device call's 600); otherwise the
# script stops and names the command for the next call. Expected: 3 calls (tests + small, then
# karlo-main, then karlo-kernels).
#
# Everything goes to $OUT (default unclip-out/gpu), at most 7 files: log.txt (all calls, appended),
# phases.txt (one line per finished phase: name, exit status, seconds, dtype), parts/<phase>.json
# (each benchmark phase's results.json), results.json + results.md (all parts merged, rewritten
# after every phase). --from DIR first copies a previous call's files (what came back from its
# $OUT) into $OUT and skips the phases DIR/phases.txt records as passed: a call resumes the last.
#
# On this project's device machine (no network there): the image has torch, triton, transformers,
# onnx and onnxruntime but not diffusers, which travels as wheels in .whl (ignored by git):
#   here:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#            --implementation cp --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
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
PHASES=${*:-tests small karlo-main karlo-kernels}
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
    case $1 in tests) echo 360 ;; small) echo 270 ;; karlo-main | karlo-kernels) echo 450 ;; *) echo 0 ;; esac
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
    [[ $(cap "$p") == 0 ]] && { echo "gpu_suite: unknown phase $p (tests small karlo-main karlo-kernels)"; exit 2; }
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
    tests)
        timeout --signal=INT --kill-after=20 "$(cap tests)" \
            python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests ;;
    small)
        bench small --model small --batch-sizes 1 --warmup 2 --repeat 10 --dtype "$D" --runners \
"diffusers-$D,torch-$D,torch-$D-graphs,torch-$D-graphs-kernels,torch-$D-graphs-gn,torch-$D-graphs-step,torch-$D-graphs-cl" ;;
    karlo-main)
        bench karlo-main --model karlo --batch-sizes 1,8 --warmup 1 --repeat 3 --dtype "$D" \
            --runners "diffusers-$D,torch-$D,torch-$D-graphs-kernels" ;;
    karlo-kernels)
        bench karlo-kernels --model karlo --batch-sizes 1,8 --warmup 1 --repeat 3 --dtype "$D" \
            --runners "torch-$D,torch-$D-graphs,torch-$D-graphs-gn,torch-$D-graphs-step" ;;
    esac
    status=$?
    echo "$p exit=$status seconds=$((SECONDS - t0)) dtype=$D $(date -u +%FT%TZ)" >>"$OUT/phases.txt"
    echo "=== $p: exit $status after $((SECONDS - t0)) s"
    (( status == 0 )) || FAILED=1
done
echo "=== phases so far:"; cat "$OUT/phases.txt"
exit $FAILED
