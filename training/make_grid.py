"""The README's grid: one demo image per prompt, held-out combinations marked with '*'.

    python -m training.make_grid --out docs/demo_grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

import unclip
from unclip.models.evaluation import caption
from unclip.models.shapes import HELD_OUT

PROMPTS = [
    "a red circle on a blue background", "a yellow square on a black background",
    "a white triangle on a green background", "a blue circle on a yellow background",
    "a black triangle on a white background", "a green square on a red background",
    caption(HELD_OUT[0]), caption(HELD_OUT[1]), caption(HELD_OUT[2]), caption(HELD_OUT[3]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("docs/demo_grid.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipe = unclip.load("demo")
    images = pipe.generate(PROMPTS, seed=args.seed)  # default sampler settings
    scale, label_h, cols = 2, 34, 5
    tile_w, tile_h = 64 * scale + 8, 64 * scale + label_h
    rows = (len(PROMPTS) + cols - 1) // cols
    grid = Image.new("RGB", (cols * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (prompt, image) in enumerate(zip(PROMPTS, images, strict=True)):
        x, y = (i % cols) * tile_w + 4, (i // cols) * tile_h + 2
        grid.paste(image.resize((64 * scale, 64 * scale), Image.NEAREST), (x, y))
        words = prompt.split()
        mark = "*" if tuple(words[i] for i in (1, 2, 5)) in HELD_OUT else ""
        draw.text((x, y + 64 * scale + 2), f"{' '.join(words[1:3])}{mark}", fill="black")
        draw.text((x, y + 64 * scale + 16), f"on {words[5]}", fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
