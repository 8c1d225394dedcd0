"""`unclip vary | interpolate | textdiff`: image-conditioned generation on the command line.

The conventions of `unclip generate` (unclip.cli_options, unclip.output_images): every argument is
checked, and every input image read, before the model loads; a mistake is one line and exit 1;
the images are written all or nothing, with PNG text saying how each was made.
"""

from __future__ import annotations

from pathlib import Path

import click

from unclip.cli_options import (
    LIMITS,
    allow_pickle_option,
    check_noise_level,
    check_run,
    given_settings,
    load_pipeline,
    model_options,
    out_option,
    run_metadata,
    sampler_options,
    seed_option,
    stable_metadata,
    stable_options,
    stable_settings,
)
from unclip.engine.image_conditioned import DEFAULT_AMOUNTS, check_amounts, check_caption, check_count
from unclip.engine.image_input import load_image
from unclip.engine.settings import check_prompts
from unclip.errors import UnclipError
from unclip.output_images import strip_files, write_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


def read_images(paths: list[str]) -> list:
    """Each file decoded now (within the pixel limit): a bad one stops the run before the model loads."""
    return [load_image(Path(p), LIMITS.max_image_pixels) for p in paths]


@click.command()
@click.argument("images", nargs=-1, required=True)
@model_options
@seed_option
@click.option("--num-images", type=int, default=1, show_default=True,
              help=f"variations per image (at most {LIMITS.max_images} per call: images x num-images)")
@sampler_options(("decoder", "super_res"), image=True)
@stable_options
@out_option
@allow_pickle_option
def vary(images: tuple[str, ...], seed: int, num_images: int, out: Path, **options) -> None:
    """Variations of each IMAGE (PNG, JPEG, ...): its CLIP image embedding decoded with new noise;
    writes OUT/0000.png, ... (image-major, then index) and prints the paths."""
    given = given_settings(options, num_images=num_images)
    if len(images) > LIMITS.max_prompts:
        raise UnclipError(f"{len(images)} images in one call is above the limit of {LIMITS.max_prompts}; "
                          "split them over several runs")
    LIMITS.check_images(len(images), num_images)
    check_noise_level(options)
    check_run(out, seed)
    decoded = read_images(list(images))
    pipe = load_pipeline(options)
    stable = stable_settings(pipe, options, num_images=num_images)
    if stable is not None:  # Stable unCLIP: image encoder, noised embedding, latent UNet, VAE
        results = pipe.vary(decoded, seed=seed, **stable)
        run = stable_metadata(stable, seed, options["model"], prior=False)
        metadata = [{"mode": "variation", "source": source, "image_index": str(k), **run}
                    for source in images for k in range(num_images)]
        for path in write_images(results, out, metadata):
            click.echo(str(path))
        return
    s = pipe.image_settings(**given)
    results = pipe.vary(decoded, seed=seed, progress=True, **vars(s))
    run = run_metadata(s, seed, options["model"], prior=False)
    metadata = [{"mode": "variation", "source": source, "image_index": str(k), **run}
                for source in images for k in range(num_images)]
    for path in write_images(results, out, metadata):
        click.echo(str(path))


def endpoint(text: str):
    """A or B: an existing image file, or else a prompt; a name that looks like an image file must exist."""
    path = Path(text)
    if path.is_file() or path.suffix.lower() in IMAGE_SUFFIXES:
        return load_image(path, LIMITS.max_image_pixels)
    return check_prompts(text, LIMITS)[0]


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--frames", type=int, default=5, show_default=True,
              help=f"images from A to B, both included (2..{LIMITS.max_images})")
@model_options
@seed_option
@sampler_options(image=True)
@out_option
@allow_pickle_option
def interpolate(a: str, b: str, frames: int, seed: int, out: Path, **options) -> None:
    """FRAMES images from A to B (each an image file or, if no such file, a prompt for the prior): their
    CLIP image embeddings spherically interpolated, the decoder's noise the same in every frame.
    Writes OUT/0000.png, ..., plus OUT/strip.png (the frames side by side) and OUT/frames.gif, and
    prints every path."""
    given = given_settings(options)
    check_count(LIMITS, frames, "--frames", 2, "from A to B, both included")
    check_run(out, seed)
    ends = [endpoint(a), endpoint(b)]
    pipe = load_pipeline(options)
    s = pipe.image_settings(**given)
    results = pipe.interpolate(*ends, frames, seed=seed, progress=True, **vars(s))
    prior = any(isinstance(x, str) for x in ends)
    sequence = {"mode": "interpolation", "a": a, "b": b, **run_metadata(s, seed, options["model"], prior)}
    metadata = [{**sequence, "frame": str(i), "t": f"{i / (frames - 1):.4f}"} for i in range(frames)]
    for path in write_images(results, out, metadata, extras=strip_files(results, sequence)):
        click.echo(str(path))


def parse_amounts(text: str) -> list[float]:
    try:
        amounts = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UnclipError(f"--amounts {text!r} must be comma-separated numbers from 0 to 1, e.g. "
                          "0,0.25,0.5,0.75,1", param="amounts") from None
    return check_amounts(LIMITS, amounts)


@click.command()
@click.argument("image")
@click.option("--from", "from_text", required=True,
              help="the caption of what is in IMAGE, e.g. 'a red circle'")
@click.option("--to", "to_text", required=True,
              help="the caption of what it should become, e.g. 'a blue circle'")
@click.option("--amounts", default=",".join(f"{a:g}" for a in DEFAULT_AMOUNTS), show_default=True,
              help="how far to move, one image each: 0 is IMAGE's embedding, 1 the whole caption difference")
@model_options
@seed_option
@sampler_options(("decoder", "super_res"), image=True)
@out_option
@allow_pickle_option
def textdiff(image: str, from_text: str, to_text: str, amounts: str, seed: int, out: Path, **options) -> None:
    """IMAGE's CLIP image embedding moved along the difference of two captions' text embeddings, one
    image per amount, the decoder's noise fixed. Writes OUT/0000.png, ..., plus OUT/strip.png and
    OUT/frames.gif, and prints every path."""
    given = given_settings(options)
    captions = [check_caption(LIMITS, text, name)
                for text, name in ((from_text, "--from"), (to_text, "--to"))]
    steps = parse_amounts(amounts)
    check_run(out, seed)
    [decoded] = read_images([image])
    pipe = load_pipeline(options)
    s = pipe.image_settings(**given)
    results = pipe.text_diff(decoded, *captions, steps, seed=seed, progress=True, **vars(s))
    sequence = {"mode": "text diff", "source": image, "from": captions[0], "to": captions[1],
                **run_metadata(s, seed, options["model"], prior=False)}
    metadata = [{**sequence, "amount": f"{a:g}"} for a in steps]
    for path in write_images(results, out, metadata, extras=strip_files(results, sequence)):
        click.echo(str(path))
