"""One runner's accuracy on a larger evaluation than the bench's: is a reduced-precision runner's
difference from fp32 real, or one or two images of sampling noise?

    PYTHONPATH=$PWD python3 benchmarks/runner_accuracy.py --backend openvino --dtype bf16 \
        --trained-prompts 84 --seed 1 --out benchmarks/results/cpu/demo-accuracy/openvino-bf16.json

`unclip bench` scores every runner on `unclip evaluate`'s default subset (24 trained + 6 held-out
prompts x 4, seed 0: one image is 1.04 / 4.2 points). This scores one runner on any subset; the
torch-fp32 row of the same subset is `unclip evaluate` with the same options. The exported
backends load the bench's cached ONNX export of the model (made once, as `unclip bench` does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import unclip
from unclip.bench.artifacts import prepare
from unclip.bench.config import BenchConfig
from unclip.models import resolve_model_path
from unclip.models.evaluation import evaluate_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--backend", default="openvino", choices=["torch", "onnxruntime", "openvino"])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--trained-prompts", type=int, default=84)
    parser.add_argument("--held-out-prompts", type=int, default=6)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--step-cache", type=int, default=1, help="a full decoder step every N (1: off)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    folder = resolve_model_path(args.model)
    source, _, _ = prepare(args.backend, args.model, BenchConfig.cache_dir, step_cache=args.step_cache > 1)
    pipe = unclip.load(source, backend=args.backend, dtype=args.dtype, step_cache=args.step_cache)
    result = evaluate_pipeline(pipe, folder, args.trained_prompts, args.held_out_prompts,
                               args.images_per_prompt, seed=args.seed)
    cache = f"+cache{args.step_cache}" if args.step_cache > 1 else ""
    result["runner"] = f"{args.backend}-{args.dtype}{cache}"
    result["step_cache"] = args.step_cache
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for group, row in result["summary"].items():
        right = 100 * row["attribute_accuracy"]
        print(f"{result['runner']} {group}: {row['images']} images, all three {right:.1f} %")


if __name__ == "__main__":
    main()
