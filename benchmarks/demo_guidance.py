"""The demo model's text-to-image decoder guidance, validated apart from the evaluation.

    PYTHONPATH=$PWD python3 benchmarks/demo_guidance.py [--model demo]

Seed 100, 16 trained prompts x 2 images (the evaluation is seed 0 / seed 1), every image scored
as `unclip evaluate` scores it; the model card types in what this printed when its sampler
defaults were chosen (the guidance with the most images right in all three fields).
"""

from __future__ import annotations

import argparse

import unclip
from unclip.models import resolve_model_path
from unclip.models.evaluation import evaluate_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--guidance", default="1,2,4,8", help="decoder guidance values to try")
    args = parser.parse_args()
    folder = resolve_model_path(args.model)
    pipe = unclip.load(folder)
    for g in (float(x) for x in args.guidance.split(",")):
        r = evaluate_pipeline(pipe, folder, trained=16, held_out=0, images_per_prompt=2, seed=100,
                              decoder_guidance=g)
        right = r["summary"]["trained"]["attribute_accuracy"]
        print(f"decoder guidance {g:g}: all three right {100 * right:.1f} %", flush=True)


if __name__ == "__main__":
    main()
