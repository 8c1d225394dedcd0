"""The same seeds and prompts with the decoder's step cache at N = 1 (off), 2, 3, 4: one picture for
docs/step_cache.md, and each image's difference from N = 1.

    PYTHONPATH=$PWD python3 benchmarks/step_cache_pictures.py --out docs/step_cache.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import unclip

PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a black background", "a blue circle on a yellow background"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="1,2,3,4", help="the N to show, 1 = off")
    parser.add_argument("--scale", type=int, default=2, help="pixels per image pixel in the picture")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ns = [int(n) for n in args.cache.split(",")]
    rows = {}
    for n in ns:
        pipe = unclip.load(args.model, step_cache=n)
        rows[n] = pipe.generate(PROMPTS, seed=args.seed, output_type="np")  # NHWC in [0, 1]
    size = rows[ns[0]].shape[1] * args.scale
    label_w, pad = 80, 4
    sheet = Image.new("RGB", (label_w + len(PROMPTS) * (size + pad), len(ns) * (size + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, n in enumerate(ns):
        diff = np.abs(rows[n] - rows[ns[0]]).mean() * 255
        name = f"N = {n}" + (" (off)" if n == 1 else "")
        draw.text((4, r * (size + pad) + size // 2 - 12), name, fill="black")
        draw.text((4, r * (size + pad) + size // 2 + 2), f"{diff:.2f} levels", fill="gray")
        for c, image in enumerate(rows[n]):
            tile = Image.fromarray((image * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (label_w + c * (size + pad), r * (size + pad)))
        print(f"N = {n}: mean difference from N = {ns[0]}: {diff:.3f} uint8 levels; "
              f"max {np.abs(rows[n] - rows[ns[0]]).max() * 255:.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
