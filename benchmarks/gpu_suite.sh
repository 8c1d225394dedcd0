#!/usr/bin/env bash
# Issue 7 on a CUDA machine in one call: the `gpu` tests, then the fast-path benchmarks
# (benchmarks/gpu_fastpath.py) for `small` at batch 1 and `karlo` at batch 1 and 8, 25/25/7 steps.
#
#   bash benchmarks/gpu_suite.sh [PHASE ...]     PHASE: tests small karlo (default: all three)
#
# On this project's device machine (no network there; diffusers travels as wheels):
#   here:   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#             --implementation cp --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#   run:    command="bash benchmarks/gpu_suite.sh", carry=[".whl"]
# Everything is written under $OUT (default unclip-out/gpu): log.txt (this whole log, pytest's
# included), env.txt, small/results.{json,md}, karlo/results.{json,md} — 7 files.
# Estimated (not measured) time on an H100: tests ~3 min, small ~2.5 min, karlo ~6-7 min (its
# checkpoint is built once on local disk and loaded by each runner). That is more than one device
# call's 10 minutes, so on that machine run it as two calls on the same warm machine:
# `bash benchmarks/gpu_suite.sh tests small`, then `bash benchmarks/gpu_suite.sh karlo` (OUT is
# emptied between calls: fetch the first call's files before the second).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-unclip-out/gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
PHASES=${*:-tests small karlo}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/unclip-site .whl/*.whl || { echo "gpu_suite: installing .whl failed"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/unclip-site"
fi
{
    date -u; nvidia-smi; git log -1 --oneline 2>/dev/null; git status --short 2>/dev/null | head -50
    python3 -c "import sys, torch, triton, diffusers, transformers; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name()); \
print('triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

declare -A STATUS
phase() {  # name, time limit (s), command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $* (limit ${limit}s) $(date -u +%T)"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    STATUS[$name]="exit $? after $((SECONDS - t0)) s"
    echo "=== $name: ${STATUS[$name]}"
}

for p in $PHASES; do
    case $p in
    tests)
        phase tests 300 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests ;;
    small)
        phase small 240 python3 benchmarks/gpu_fastpath.py --model small --batch-sizes 1 \
            --warmup 2 --repeat 10 --out "$OUT/small" --runners diffusers-fp16,torch-fp16,torch-fp16-graphs,\
torch-fp16-graphs-kernels,torch-fp16-graphs-gn,torch-fp16-graphs-step,torch-fp16-graphs-cl ;;
    karlo)
        # one checkpoint on local disk: each runner loads it instead of initialising 3.4e9 weights
        [ -f /tmp/unclip-karlo/model_index.json ] ||
            phase karlo-checkpoint 150 python3 -m unclip.cli init --preset karlo --out /tmp/unclip-karlo
        phase karlo 420 python3 benchmarks/gpu_fastpath.py --model /tmp/unclip-karlo --batch-sizes 1,8 \
            --warmup 1 --repeat 3 --out "$OUT/karlo"
        # random weights may overflow fp16 (the runtime's non-finite check says so): then bf16
        if [[ ${STATUS[karlo]} != "exit 0 "* ]] && grep -q "non-finite values (precision fp16" "$OUT/log.txt"; then
            phase karlo-bf16 420 python3 benchmarks/gpu_fastpath.py --model /tmp/unclip-karlo --dtype bf16 \
                --batch-sizes 1,8 --warmup 1 --repeat 3 --out "$OUT/karlo"
        fi ;;
    *)
        echo "gpu_suite: unknown phase $p (use tests, small, karlo)"; exit 2 ;;
    esac
done
echo "=== summary"
for name in "${!STATUS[@]}"; do echo "$name: ${STATUS[$name]}"; done
for name in "${!STATUS[@]}"; do [[ ${STATUS[$name]} == "exit 0 "* ]] || exit 1; done
