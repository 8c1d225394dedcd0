"""`unclip generate | vary | interpolate | textdiff | init | info | evaluate`: the command line.
User mistakes become one line and exit 1; Ctrl-C exits 130 with no output half-written."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import click

from unclip.bench.cli import bench
from unclip.cli_options import (
    LIMITS,
    MODEL_HELP,
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
from unclip.engine.settings import check_prompts, check_seed
from unclip.errors import UnclipError
from unclip.export.cli import export
from unclip.folders import check_output_folder, write_file_atomic
from unclip.image_commands import interpolate, textdiff, vary
from unclip.models import DEFAULT_MODEL
from unclip.output_images import write_images
from unclip.serve.cli import serve
from unclip.serve.loadtest import loadtest


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UnclipError as exc:
            name = ctx.invoked_subcommand
            command = self.get_command(ctx, name) if name else None
            click.echo(f"unclip: error: {_option_spelling(exc, command)}", err=True)
            sys.exit(1)
        except click.UsageError as exc:  # click's own: not a number, an unknown option (exit 2, as click)
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            click.echo(f"unclip: error: {exc.format_message()}{where}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # the shell's convention for Ctrl-C: 128 + SIGINT
            click.echo("unclip: interrupted", err=True)
            sys.exit(130)


def _option_spelling(exc: UnclipError, command: click.Command | None) -> str:
    """The validation layer names a field as the API does (`decoder_steps ...`); here it is an option,
    unless the command has no such option (`image ...` of `unclip vary` is its IMAGES argument)."""
    text = str(exc)
    if isinstance(command, click.Command) and not isinstance(command, click.Group) and \
            exc.param not in {p.name for p in command.params if isinstance(p, click.Option)}:
        return text
    if exc.param and re.fullmatch(r"[a-z_]+", exc.param) and text.startswith(exc.param + " "):
        return f"--{exc.param.replace('_', '-')}{text[len(exc.param):]}"
    return text


@click.group(cls=_Group)
@click.version_option(package_name="unclip")
def cli() -> None:
    """Inference engine for unCLIP text-to-image models."""
    logger = logging.getLogger("unclip")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
    logger.setLevel(logging.INFO)
    _quiet_libraries()


class _EchoHandler(logging.Handler):
    """Warnings as one line on the current stderr (click swaps streams under test)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"unclip: {record.levelname.lower()}: {record.getMessage()}", err=True)


def _quiet_libraries() -> None:
    """diffusers/transformers chatter (deprecation notes, their own truncation warning) is not ours."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


@cli.command()
@click.argument("prompts", nargs=-1, required=True)
@model_options
@seed_option
@click.option("--num-images", type=int, default=1, show_default=True,
              help=f"images per prompt (at most {LIMITS.max_images} images per call: prompts x num-images)")
@sampler_options()
@click.option("--no-prior", is_flag=True, help="skip the prior: the CLIP text embedding goes to the decoder")
@stable_options
@out_option
@allow_pickle_option
def generate(prompts: tuple[str, ...], seed: int, num_images: int, no_prior: bool, out: Path,
             **options) -> None:
    """Generate images for PROMPTS; writes OUT/0000.png, ... (prompt-major) and prints the paths."""
    # every value is checked before the model loads, by the same layer generate() uses
    given = given_settings(options, num_images=num_images, use_prior=not no_prior)
    LIMITS.check_images(len(check_prompts(list(prompts), LIMITS)), num_images)
    check_noise_level(options)
    check_run(out, seed)
    pipe = load_pipeline(options)
    stable = stable_settings(pipe, options, num_images=num_images)
    if stable is not None:  # Stable unCLIP: prior, noised image embedding, latent UNet, VAE
        if no_prior:
            raise UnclipError("--no-prior: Stable unCLIP decodes the prior's image embedding; drop it")
        images = pipe.generate(list(prompts), seed=seed, **stable)
        run = stable_metadata(stable, seed, options["model"])
        metadata = [{"prompt": prompt, "image_index": str(k), **run}
                    for prompt in prompts for k in range(num_images)]
        for path in write_images(images, out, metadata):
            click.echo(str(path))
        return
    s = pipe.settings(**given)
    images = pipe.generate(list(prompts), seed=seed, progress=True, **vars(s))
    run = run_metadata(s, seed, options["model"])
    if pipe.step_cache > 1:  # a load option, but it changes the image: the file says so
        run["step_cache"] = str(pipe.step_cache)
    metadata = [{"prompt": prompt, "image_index": str(k), "prior": "no" if no_prior else "yes", **run}
                for prompt in prompts for k in range(num_images)]
    for path in write_images(images, out, metadata):
        click.echo(str(path))


@cli.command()
@click.option("--preset", required=True, help="tiny, small or karlo")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="the checkpoint folder to write (an existing one is replaced); then --model OUT loads it")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random weights")
def init(preset: str, out: Path, seed: int) -> None:
    """Write a preset (random weights) as a checkpoint folder."""
    from unclip.models.checkpoint import save_components
    from unclip.models.components import build_preset
    from unclip.models.presets import get_preset

    get_preset(preset)
    check_output_folder(out)
    save_components(build_preset(preset, seed=seed), out)
    click.echo(str(out))


# `unclip info`'s names and notes for the sizes: ModelDims calls the CLIP tower's input `image_size`
# (its key in exported model_dims.json), which beside a model that outputs 64x64 reads as the output
INFO_SIZES = {"decoder_size": ("decoder_size", "(the decoder's image side)"),
              "super_res_size": ("super_res_size", "(the output image side)"),
              "image_size": ("clip_image_size", "(the CLIP image tower's input side, not the output)")}


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
def info(model: str) -> None:
    """Parameter counts and sizes of a model's networks."""
    from unclip.models import load_model
    from unclip.models.components import build_preset
    from unclip.models.networks import model_dims
    from unclip.models.presets import PRESETS

    # a preset is built on the meta device: shapes without allocating weights
    components = (build_preset(model, device="meta") if model in PRESETS and not Path(model).exists()
                  else load_model(model))
    counts = components.parameter_counts()
    click.echo(f"model: {model}")
    for name, count in counts.items():
        click.echo(f"  {name:<16} {count:>15,d} parameters")
    click.echo(f"  {'total':<16} {sum(counts.values()):>15,d} parameters")
    for key, value in model_dims(components).to_dict().items():
        label, note = INFO_SIZES.get(key, (key, ""))
        if key == "image_size" and value is None:
            value, note = "none", "(no CLIP image tower: no variations)"
        click.echo(f"  {label:<17} {value}" + (f"  {note}" if note else ""))


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="a shapes-world model folder with a CLIP image_encoder/")
@click.option("--trained-prompts", type=int, default=24, show_default=True,
              help="how many trained colour/shape/background combinations to test (seeded choice)")
@click.option("--held-out-prompts", type=int, default=6, show_default=True,
              help="how many of the combinations held out of training to test")
@click.option("--images-per-prompt", type=int, default=4, show_default=True,
              help=f"at most {LIMITS.max_images}")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the full results as JSON")
def evaluate(model: str, trained_prompts: int, held_out_prompts: int, images_per_prompt: int, seed: int,
             out: Path | None) -> None:
    """Score generated images: colours and shape read from the pixels, and CLIP retrieval."""
    import json

    from unclip.models.evaluation import evaluate as run_evaluation

    if min(trained_prompts, held_out_prompts) < 0 or images_per_prompt < 1:
        raise UnclipError("prompt counts must be >= 0 and --images-per-prompt >= 1")
    LIMITS.check_images(1, images_per_prompt)
    check_seed(seed)
    if out is not None:
        check_output_folder(out.parent if out.parent != Path("") else Path("."))
        if out.is_dir():
            raise UnclipError(f"--out {out} is a folder; give a file path for the JSON results")
    result = run_evaluation(model, trained=trained_prompts, held_out=held_out_prompts,
                            images_per_prompt=images_per_prompt, seed=seed, progress=True)
    click.echo(f"{'group':<10} {'prompts':>7} {'images':>6} {'all three':>9} {'background':>10} "
               f"{'colour':>6} {'shape':>5} {'CLIP top-1':>10}")
    for group, row in result["summary"].items():
        click.echo(f"{group:<10} {row['prompts']:>7} {row['images']:>6} {row['attribute_accuracy']:>9.1%} "
                   f"{row['background_accuracy']:>10.1%} {row['colour_accuracy']:>6.1%} "
                   f"{row['shape_accuracy']:>5.1%} {row['clip_retrieval_top1']:>10.1%}")
    if out is not None:
        write_file_atomic(out, json.dumps(result, indent=2))


for command in (vary, interpolate, textdiff, export):
    cli.add_command(command)
cli.add_command(bench)
cli.add_command(serve)
cli.add_command(loadtest)


def main() -> None:
    cli(prog_name="unclip")


if __name__ == "__main__":
    main()
