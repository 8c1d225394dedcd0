"""docs/variations_strip.png and docs/interpolation_strip.png (and docs/textdiff_strip.png): the demo
model's variations, interpolation and text diff of rendered scenes, made by the CLI commands
(`unclip vary`, `unclip interpolate`, `unclip textdiff`) at the model's defaults, seed 0, not picked.

    PYTHONPATH=$PWD python -m training.make_variation_strips --out docs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from unclip.models.shapes import Scene, render

SCALE = 2  # the demo draws 64 px; shown at 128 px, nearest-neighbour
GAP = 8
# Three rendered scenes of trained combinations (none held out), varied in kind, colour and place.
SOURCES = [Scene("red", "circle", "blue", 0.55, 0.45, 0.5),
           Scene("yellow", "square", "black", 0.5, 0.55, 0.45),
           Scene("white", "triangle", "green", 0.6, 0.5, 0.55)]
INTERPOLATED = (Scene("red", "circle", "blue", 0.55, 0.45, 0.5),
                Scene("green", "triangle", "white", 0.6, 0.55, 0.5))
TEXT_DIFF = (Scene("red", "square", "yellow", 0.5, 0.5, 0.5), "a red square on a yellow background",
             "a blue square on a yellow background")


def unclip_cli(*args: str) -> list[Path]:
    """One CLI run (this interpreter, this checkout); the paths it printed."""
    proc = subprocess.run([sys.executable, "-m", "unclip.cli", *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"unclip {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return [Path(line) for line in proc.stdout.split()]


def big(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)


def row_strip(rows: list[list[Image.Image]], sources: tuple[int, ...]) -> Image.Image:
    """Rows of equal tiles; the source tiles (column indices) set apart by a wider gap."""
    tile = big(rows[0][0]).size
    cols = len(rows[0])
    xs, x = [], GAP
    for c in range(cols):
        x += 2 * GAP if c - 1 in sources and c > 0 or c in sources and c > 0 else 0
        xs.append(x)
        x += tile[0] + GAP
    sheet = Image.new("RGB", (x, len(rows) * (tile[1] + GAP) + GAP), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(big(image), (xs[c], GAP + r * (tile[1] + GAP)))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--seed", default="0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = []
        for i, scene in enumerate([*SOURCES, *INTERPOLATED, TEXT_DIFF[0]]):
            sources.append(work / f"scene{i}.png")
            Image.fromarray(render(scene)).save(sources[-1])
        n = 4
        varied = unclip_cli("vary", *map(str, sources[:3]), "--num-images", str(n), "--seed", args.seed,
                            "--out", str(work / "vary"))
        rows = [[Image.open(sources[i]), *map(Image.open, varied[i * n:(i + 1) * n])] for i in range(3)]
        row_strip(rows, sources=(0,)).save(args.out / "variations_strip.png")

        frames = unclip_cli("interpolate", str(sources[3]), str(sources[4]), "--frames", "7",
                            "--seed", args.seed, "--out", str(work / "interpolate"))
        rows = [[Image.open(sources[3]), *(Image.open(p) for p in frames), Image.open(sources[4])]]
        row_strip(rows, sources=(0, len(rows[0]) - 1)).save(args.out / "interpolation_strip.png")

        _, from_text, to_text = TEXT_DIFF
        moved = unclip_cli("textdiff", str(sources[5]), "--from", from_text, "--to", to_text,
                           "--seed", args.seed, "--out", str(work / "textdiff"))
        rows = [[Image.open(sources[5]), *(Image.open(p) for p in moved)]]
        row_strip(rows, sources=(0,)).save(args.out / "textdiff_strip.png")
    for name in ("variations_strip.png", "interpolation_strip.png", "textdiff_strip.png"):
        print(args.out / name)


if __name__ == "__main__":
    main()
