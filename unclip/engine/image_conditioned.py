"""Variations, interpolations and text diffs: DALL-E 2's image-conditioned generation (Ramesh et
al. 2022, sections 3.1-3.3), built on `Pipeline.generate_requests`.

All three enter the sampling loops at the CLIP image embedding, as image-conditioned requests
that skip the prior; the decoder's caption is the empty prompt, as in diffusers'
UnCLIPImageVariationPipeline. What differs is where the embedding comes from:

* variation: the image encoder's embedding of each input image, decoded with new noise;
* interpolation: the spherical interpolation (slerp) between two endpoint embeddings (an image's
  from the image encoder, a prompt's from the prior), one request per frame, all frames with
  generators in the same state, so that every frame draws the same decoder noise;
* text diff: the image's embedding moved along the difference of two captions' text embeddings,
  one request per amount, the noise fixed the same way.

The arguments are checked here, in the order that costs least (settings, counts, then the images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from unclip.engine.batch import Request, check_partial_images
from unclip.engine.image_input import load_image, pixel_values
from unclip.engine.image_output import convert_images
from unclip.engine.settings import check_generator, check_output_type, check_prompts, check_seed
from unclip.errors import UnclipError

DEFAULT_AMOUNTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def vary(pipe, images, *, seed: int, generator, output_type: str, progress: bool, partial_images: int = 0,
         on_partial=None, **settings):
    images = as_image_list(images)
    s = pipe.image_settings(**settings)
    check_input_count(pipe.limits, len(images))
    pipe.limits.check_images(len(images), s.num_images)
    check_output_type(output_type)
    check_partial_images(partial_images, on_partial)
    generator = make_generator(seed, generator)
    pixels = preprocess(pipe, images, "vary")
    request = Request([""] * len(images), s, generator, pixel_values=pixels, partial_images=partial_images,
                      on_partial=on_partial)
    [out] = pipe.generate_requests([request], progress=progress)
    return convert(out, output_type)


def interpolate(pipe, a, b, frames: int, *, seed: int, generator, output_type: str, progress: bool,
                **settings):
    s = one_image_per_row(pipe, settings, "interpolate makes one image per frame")
    check_count(pipe.limits, frames, "frames", 2, "from a to b, both included")
    check_output_type(output_type)
    ends = [check_prompts(x, pipe.limits)[0] if isinstance(x, str) else x for x in (a, b)]
    prompts = [x for x in ends if isinstance(x, str)]
    if prompts:
        pipe.check_prior(s)
    images = [x for x in ends if not isinstance(x, str)]
    pixels = preprocess(pipe, images, "interpolate between images") if images else None
    generator = make_generator(seed, generator)
    embeds = dict(zip([i for i, x in enumerate(ends) if not isinstance(x, str)],
                      pipe.encode_images(pixels) if images else [], strict=True))
    if prompts:  # the prior's noise first, drawn as generate draws it for these prompts
        embeds.update(zip([i for i, x in enumerate(ends) if isinstance(x, str)],
                          pipe.encode_prompts(prompts, s, generator, progress), strict=True))
    steps = torch.linspace(0, 1, frames).tolist()
    frames_embeds = [slerp(embeds[0], embeds[1], t) for t in steps]
    return decode_fixed_noise(pipe, frames_embeds, s, generator, output_type, progress)


def text_diff(pipe, image, from_text: str, to_text: str, amounts, *, seed: int, generator, output_type: str,
              progress: bool, **settings):
    s = one_image_per_row(pipe, settings, "text_diff makes one image per amount")
    captions = [check_caption(pipe.limits, text, name)
                for text, name in ((from_text, "from_text"), (to_text, "to_text"))]
    amounts = check_amounts(pipe.limits, amounts)
    check_output_type(output_type)
    pixels = preprocess(pipe, as_image_list(image, one=True), "text_diff")
    generator = make_generator(seed, generator)
    [z] = pipe.encode_images(pixels)
    start, end = pipe.encode_captions(captions)
    return decode_fixed_noise(pipe, [diff_embedding(z, start, end, a) for a in amounts], s, generator,
                              output_type, progress)


def decode_fixed_noise(pipe, embeds: list[torch.Tensor], s, generator: torch.Generator, output_type: str,
                       progress: bool):
    """One request per embedding, each with a generator in `generator`'s state: the same noise for all."""
    state = generator.get_state()
    requests = [Request([""], s, torch.Generator("cpu").set_state(state), image_embeds=e[None])
                for e in embeds]
    return convert(torch.cat(pipe.generate_requests(requests, progress=progress)), output_type)


# -- the geometry ---------------------------------------------------------------------------------

def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation (Shoemake; DALL-E 2's interpolations): along the great circle from a's
    direction to b's, the length interpolated linearly. Nearly parallel vectors: linear."""
    a_unit, b_unit = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    omega = torch.arccos((a_unit * b_unit).sum().clamp(-1.0, 1.0))
    if float(omega) < 1e-4:  # sin(omega) ~ 0: the two directions agree to 1e-4 rad
        direction = F.normalize(torch.lerp(a_unit, b_unit, t), dim=-1)
    else:
        direction = (torch.sin((1 - t) * omega) * a_unit + torch.sin(t * omega) * b_unit) / torch.sin(omega)
    return direction * torch.lerp(a.norm(), b.norm(), t)


def diff_embedding(image: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                   amount: float) -> torch.Tensor:
    """The image embedding moved by `amount` of the caption difference, on the unit sphere: the
    text embeddings are normalised first (CLIP compares directions), the image's length is kept."""
    moved = F.normalize(image, dim=-1) + amount * (F.normalize(end, dim=-1) - F.normalize(start, dim=-1))
    return F.normalize(moved, dim=-1) * image.norm()


# -- checks and conversions -----------------------------------------------------------------------

def as_image_list(images, one: bool = False) -> list:
    """One image or a list of them; an N-image batch array/tensor (as generate returns) is N images."""
    if isinstance(images, (list, tuple)) and not one:
        if not images:
            raise UnclipError("no image given: pass at least one", param="image")
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4 and not one:
        return list(images)
    if isinstance(images, (list, tuple)):
        raise UnclipError(f"text_diff takes one image, got a {type(images).__name__} of {len(images)}",
                          param="image")
    return [images]


def check_input_count(limits, n: int) -> None:
    if n > limits.max_prompts:
        raise UnclipError(f"{n} images in one call is above the limit of {limits.max_prompts} inputs "
                          "(Limits.max_prompts); split them over several calls", param="image")


def preprocess(pipe, images: list, what: str) -> torch.Tensor:
    """The image encoder's input for each image, read within the pixel limit (Limits.max_image_pixels)."""
    if pipe.image_preprocess is None:
        raise UnclipError(f"{what} needs a CLIP image encoder, and model {pipe.model_name} has none (no "
                          "image_encoder/ in its folder, or an export made without one); use a model that "
                          "ships CLIP's image tower, such as the demo model", param="image")
    loaded = [load_image(x, pipe.limits.max_image_pixels, f"image {i + 1}" if len(images) > 1 else "image")
              for i, x in enumerate(images)]
    return pixel_values(loaded, pipe.image_preprocess)


def one_image_per_row(pipe, settings: dict, why: str):
    s = pipe.image_settings(**settings)
    if s.num_images != 1:
        raise UnclipError(f"num_images {s.num_images}: {why}; drop num_images (use a seed per run for other "
                          "noise)", param="num_images")
    return s


def check_count(limits, n, name: str, low: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not low <= n <= limits.max_images:
        raise UnclipError(f"{name} must be an integer from {low} to {limits.max_images} (Limits.max_images: "
                          f"one image each, {what}), got {n!r}", param=name)


def check_caption(limits, text, name: str) -> str:
    if not isinstance(text, str) or not text.strip():
        got = "empty" if isinstance(text, str) else type(text).__name__
        raise UnclipError(f"{name} is {got}: a text diff needs two captions that say what changes, e.g. "
                          "'a red circle' -> 'a blue circle'", param=name)
    try:
        return check_prompts(text, limits)[0]
    except UnclipError as exc:
        raise UnclipError(str(exc).replace("prompt 1", name), param=name) from None


def check_amounts(limits, amounts) -> list[float]:
    if isinstance(amounts, (int, float)) and not isinstance(amounts, bool):
        amounts = [amounts]
    if not isinstance(amounts, Sequence) or isinstance(amounts, str) or not amounts:
        raise UnclipError(f"amounts must be a list of numbers from 0 to 1, got {amounts!r}", param="amounts")
    out = []
    for a in amounts:
        if isinstance(a, bool) or not isinstance(a, (int, float, np.number)) or not math.isfinite(a) \
                or not 0 <= a <= 1:
            raise UnclipError(f"amounts must be numbers from 0 (the image as it is) to 1 (the whole caption "
                              f"difference), got {a!r}", param="amounts")
        out.append(float(a))
    check_count(limits, len(out), "the number of amounts", 1, "one per amount")
    return out


def make_generator(seed, generator) -> torch.Generator:
    if generator is None:
        return torch.Generator("cpu").manual_seed(check_seed(seed))
    check_generator(generator)
    return generator


def convert(images: torch.Tensor, output_type: str):
    return convert_images(images, output_type)
