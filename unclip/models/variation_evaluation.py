"""Scores image-conditioned generation on the demo model's world: variations, interpolations and
text diffs of rendered scenes, read back by the scene scorer (unclip.models.shapes.score) and the
trained CLIP's image tower.

* variations: one rendered scene per trained combination, `per_scene` variations of each; a
  variation is correct when background colour, shape colour and shape kind match the scene's.
* interpolations: pairs of rendered scenes of different combinations; the first frame should read
  as A, the last as B, and the CLIP image similarity of the frames to A should fall frame by frame.
* text diffs: rendered red shapes moved from "a red S on a B background" to "a blue S on a B
  background"; at full amount the shape should be blue and keep its kind (and the background).
* caption dependence (a diagnosis, not a feature): each scene's own image embedding decoded with
  an empty caption, as a variation is, and with the scene's caption tokens, as the decoder saw it
  in most of its training: how much of the shape the embedding alone carries to the decoder.

Scenes come from a seeded generator (`seed`), so a run is reproducible; choose settings on
another seed than the one reported.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from unclip.models.shapes import Scene, random_scene, render, score, training_combinations

FIELDS = ("background", "colour", "shape")


def scenes_for(combinations: list[tuple[str, str, str]], rng: np.random.Generator) -> list[Scene]:
    return [random_scene(rng, [c]) for c in combinations]


def matches(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    got = score(image)
    return {"background": got["background"] == scene.background, "colour": got["colour"] == scene.colour,
            "shape": got["shape"] == scene.shape}


def _rates(rows: list[dict[str, bool]]) -> dict[str, float]:
    out = {f"{f}_accuracy": float(np.mean([r[f] for r in rows])) for f in FIELDS}
    out["all_three"] = float(np.mean([all(r[f] for f in FIELDS) for r in rows]))
    out["images"] = len(rows)
    return out


def _uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def evaluate_variations(pipe, seed: int = 0, per_scene: int = 4, chunk: int = 4, progress: bool = False,
                        **settings) -> dict:
    """Every trained combination, one rendered scene each, `per_scene` variations of each."""
    rng = np.random.default_rng(seed)
    scenes = scenes_for(training_combinations(), rng)
    generator = torch.Generator("cpu").manual_seed(seed)
    rows, per_combination = [], []
    for start in tqdm(range(0, len(scenes), chunk), desc="variations", disable=not progress):
        part = scenes[start:start + chunk]
        images = _uint8(pipe.vary([render(s) for s in part], generator=generator, output_type="np",
                                  num_images=per_scene, **settings))
        for k, scene in enumerate(part):
            got = [matches(img, scene) for img in images[k * per_scene:(k + 1) * per_scene]]
            rows += got
            per_combination.append({"caption": scene.caption, "correct": [all(g.values()) for g in got]})
    return {"summary": _rates(rows), "scenes": len(scenes), "per_scene": per_scene,
            "per_combination": per_combination}


def evaluate_interpolations(pipe, clip_encode, pairs: int = 96, frames: int = 7, seed: int = 0,
                            progress: bool = False, **settings) -> dict:
    """`pairs` pairs of rendered scenes (different trained combinations), `frames` frames each.
    `clip_encode(uint8 NHWC) -> unit CLIP image embeddings` measures each frame's similarity to A."""
    rng = np.random.default_rng(seed)
    combos = training_combinations()
    generator = torch.Generator("cpu").manual_seed(seed)
    similarity, first, last, monotonic = [], [], [], []
    for _ in tqdm(range(pairs), desc="interpolations", disable=not progress):
        i, j = rng.choice(len(combos), size=2, replace=False)
        a, b = random_scene(rng, [combos[i]]), random_scene(rng, [combos[j]])
        images = _uint8(pipe.interpolate(render(a), render(b), frames, generator=generator, output_type="np",
                                         **settings))
        first.append(matches(images[0], a))
        last.append(matches(images[-1], b))
        source = clip_encode(render(a)[None])
        sims = (clip_encode(images) @ source.T).squeeze(1).tolist()
        similarity.append(sims)
        monotonic.append(all(x > y for x, y in zip(sims, sims[1:], strict=False)))
    mean = np.mean(similarity, axis=0).tolist()
    return {"pairs": pairs, "frames": frames, "first_frame_reads_as_a": _rates(first),
            "last_frame_reads_as_b": _rates(last), "mean_similarity_to_a": mean,
            "mean_falls_monotonically": all(x > y for x, y in zip(mean, mean[1:], strict=False)),
            "pairs_monotonic": float(np.mean(monotonic)), "similarity_to_a": similarity}


def evaluate_text_diffs(pipe, per_combination: int = 4, amounts=(0.0, 0.25, 0.5, 0.75, 1.0),
                        seed: int = 0, source: str = "red", target: str = "blue", progress: bool = False,
                        **settings) -> dict:
    """Rendered `source`-coloured shapes on every trained background the target colour can sit on,
    `per_combination` scenes each, moved from "a red S on a B background" to "a blue S on a B
    background"; per amount, how often the shape has the target colour and keeps kind and background."""
    rng = np.random.default_rng(seed)
    combos = [c for c in training_combinations() if c[0] == source and c[2] != target]
    generator = torch.Generator("cpu").manual_seed(seed)
    per_amount: list[list[dict[str, bool]]] = [[] for _ in amounts]
    for colour, shape, background in tqdm(combos, desc="text diffs", disable=not progress):
        for _ in range(per_combination):
            scene = random_scene(rng, [(colour, shape, background)])
            images = _uint8(pipe.text_diff(render(scene), scene.caption,
                                           f"a {target} {shape} on a {background} background", list(amounts),
                                           generator=generator, output_type="np", **settings))
            wanted = Scene(target, shape, background, scene.size, scene.cx, scene.cy)
            for k, image in enumerate(images):
                per_amount[k].append(matches(image, wanted))
    table = {f"{a:g}": _rates(rows) for a, rows in zip(amounts, per_amount, strict=True)}
    full = per_amount[-1]
    return {"combinations": [f"a {source} {s} on a {b} background" for _, s, b in combos],
            "per_combination": per_combination, "by_amount": table,
            "full_amount_blue_and_kind_kept": float(np.mean([r["colour"] and r["shape"] for r in full]))}


def evaluate_caption_dependence(pipe, seed: int = 0, chunk: int = 12, progress: bool = False,
                                **settings) -> dict:
    """Every trained combination, one rendered scene each, decoded from its own image embedding with
    the same noise twice: empty caption (a variation) and the scene's caption."""
    from unclip.engine.batch import Request
    from unclip.engine.image_conditioned import preprocess

    rng = np.random.default_rng(seed)
    scenes = scenes_for(training_combinations(), rng)
    s = pipe.image_settings(**settings)
    rows: dict[str, list[dict[str, bool]]] = {"empty_caption": [], "scene_caption": []}
    for start in tqdm(range(0, len(scenes), chunk), desc="caption dependence", disable=not progress):
        part = scenes[start:start + chunk]
        embeds = pipe.encode_images(preprocess(pipe, [render(x) for x in part], "the evaluation"))
        for key in rows:  # the same noise for both: one generator per scene, seeded alike
            requests = [Request([x.caption if key == "scene_caption" else ""], s,
                                torch.Generator("cpu").manual_seed(seed * 10_000 + start + i),
                                image_embeds=embeds[i:i + 1]) for i, x in enumerate(part)]
            images = _uint8(torch.cat(pipe.generate_requests(requests)).permute(0, 2, 3, 1).numpy())
            rows[key] += [matches(img, x) for img, x in zip(images, part, strict=True)]
    return {"scenes": len(scenes), **{key: _rates(r) for key, r in rows.items()}}


def clip_image_encoder(pipe):
    """The pipeline's own image tower as a scorer: uint8 NHWC images -> unit CLIP image embeddings."""
    from unclip.engine.image_input import pixel_values

    def encode(images: np.ndarray) -> torch.Tensor:
        from PIL import Image

        pixels = pixel_values([Image.fromarray(img) for img in images], pipe.image_preprocess)
        return F.normalize(pipe.encode_images(pixels), dim=-1).cpu()

    return encode

