"""The demo model's world: one filled, upright shape on a plain background, and its caption.

Generated on the fly from a seed. The same module scores generated images: it recovers the
background colour, the shape's colour and the shape's kind from the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 220, 40), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")

# Combinations never shown in training (CLIP, prior, decoder, super-res): each colour, shape and
# pair of them still appears in other combinations, so these test composition.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("green", "circle", "red"), ("blue", "square", "yellow"), ("yellow", "triangle", "blue"),
    ("white", "circle", "black"), ("black", "square", "white"), ("red", "triangle", "green"),
)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: float = 0.55  # side (or diameter) as a fraction of the image side, 0.35-0.75
    cx: float = 0.5  # centre, as a fraction of the image side
    cy: float = 0.5

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"

    @property
    def combination(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.background)


def all_combinations() -> list[tuple[str, str, str]]:
    return [(fg, shape, bg) for fg in COLOURS for shape in SHAPES for bg in COLOURS if fg != bg]


def training_combinations() -> list[tuple[str, str, str]]:
    return [c for c in all_combinations() if c not in HELD_OUT]


def random_scene(rng: np.random.Generator, combinations: list[tuple[str, str, str]]) -> Scene:
    colour, shape, background = combinations[rng.integers(len(combinations))]
    size = float(rng.uniform(0.35, 0.75))
    margin = size / 2 + 0.04  # keep a ring of background at the border for scoring
    cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
    return Scene(colour, shape, background, size, cx, cy)


def render(scene: Scene, resolution: int = 64) -> np.ndarray:
    """HxWx3 uint8, 2x2 supersampled so edges are anti-aliased like a photo of a drawing."""
    n = resolution * 2
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords, coords)
    half = scene.size / 2
    dx, dy = x - scene.cx, y - scene.cy
    if scene.shape == "circle":
        mask = dx**2 + dy**2 <= half**2
    elif scene.shape == "square":
        mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # upright triangle: apex at the top, base at the bottom, as wide as it is tall
        depth = (dy + half) / scene.size  # 0 at the apex, 1 at the base
        mask = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * half)
    image = np.where(mask[..., None], COLOURS[scene.colour], COLOURS[scene.background]).astype(np.float32)
    image = image.reshape(resolution, 2, resolution, 2, 3).mean(axis=(1, 3))
    return np.round(image).astype(np.uint8)


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def score(image: np.ndarray) -> dict[str, str]:
    """Recover (shape colour, shape kind, background colour) from an HxWx3 uint8 image."""
    img = image.astype(np.float32)
    h, w, _ = img.shape
    ring = max(1, h // 32)
    border = np.concatenate([img[:ring].reshape(-1, 3), img[-ring:].reshape(-1, 3),
                             img[:, :ring].reshape(-1, 3), img[:, -ring:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _nearest_colour(bg_rgb)
    # shape pixels: clearly away from the background colour
    distance = np.sqrt(((img - bg_rgb) ** 2).sum(axis=-1))
    mask = distance > 80.0  # palette colours are >= 110 apart; halfway-blended edges fall out
    if mask.sum() < 0.02 * h * w:
        return {"colour": "none", "shape": "none", "background": background}
    colour = _nearest_colour(np.median(img[mask], axis=0))
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    box = mask[top:bottom + 1, left:right + 1]
    fill = box.mean()
    rows = box.shape[0]
    upper = box[: max(1, rows // 4)].mean()
    lower = box[-max(1, rows // 4):].mean()
    if fill > 0.9:
        shape = "square"
    elif lower > 1.6 * upper and fill < 0.7:  # narrow apex, wide base
        shape = "triangle"
    else:
        shape = "circle"
    return {"colour": colour, "shape": shape, "background": background}
