"""`unclip generate | init | info | evaluate`: the command line. User mistakes become one line and
exit 1; Ctrl-C exits 130 with no output half-written."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import click

from unclip.bench.cli import bench
from unclip.engine.settings import (
    GenerationSettings,
    Limits,
    check_prompts,
    check_seed,
    read_sampler_defaults,
)
from unclip.errors import UnclipError
from unclip.export.cli import export
from unclip.folders import check_output_folder, interrupt_after, write_file_atomic
from unclip.models import DEFAULT_MODEL, DEMO_FOLDER
from unclip.serve.cli import serve
from unclip.serve.loadtest import loadtest

MODEL_HELP = ("demo (the trained model shipped in the package), a checkpoint folder (diffusers "
              "UnCLIPPipeline layout) or a random-weight preset: tiny, small, karlo")
IMAGE_NAME = re.compile(r"\d{4}\.png")  # what generate writes: 0000.png, 0001.png, ...
LIMITS = Limits()  # the CLI runs with the default limits (docs/validation.md)


def _setting_help(field: str) -> str:
    """The range, and the value the default model runs with (its sampler_defaults.json, if any)."""
    allowed = (f"2..{LIMITS.max_steps}" if field.endswith("steps")
               else f"1.0 (unguided) .. {LIMITS.max_guidance:g}")
    engine = getattr(GenerationSettings(), field)
    demo = read_sampler_defaults(DEMO_FOLDER).get(field) if DEMO_FOLDER.is_dir() else None
    if demo is None or DEFAULT_MODEL != "demo":
        return f"{allowed}  [default: {engine}; a model's sampler_defaults.json may set its own]"
    return f"{allowed}  [default: {demo} for demo (its sampler_defaults.json); {engine} without one]"


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UnclipError as exc:
            click.echo(f"unclip: error: {_option_spelling(exc)}", err=True)
            sys.exit(1)
        except click.UsageError as exc:  # click's own: not a number, an unknown option (exit 2, as click)
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            click.echo(f"unclip: error: {exc.format_message()}{where}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # the shell's convention for Ctrl-C: 128 + SIGINT
            click.echo("unclip: interrupted", err=True)
            sys.exit(130)


def _option_spelling(exc: UnclipError) -> str:
    """The validation layer names a field as the API does (`decoder_steps ...`); here it is an option."""
    text = str(exc)
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


def earlier_images(out: Path) -> list[Path]:
    """The images an earlier `unclip generate` wrote into `out` (NNNN.png whose PNG text says
    software=unclip): a new run replaces them. A NNNN.png that unclip did not write is the user's,
    and is refused before any work."""
    from PIL import Image

    found = []
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        if IMAGE_NAME.fullmatch(path.name):
            try:
                with Image.open(path) as img:
                    ours = img.info.get("software") == "unclip"
            except (OSError, ValueError):
                ours = False
            if not ours:
                raise UnclipError(f"--out {out} holds {path.name}, which unclip did not write; a run would "
                                  "replace it: move it away or choose another folder", param="out")
            found.append(path)
    return found


def write_images(images: list, out: Path, metadata: list[dict[str, str]]) -> list[Path]:
    """All or nothing: each PNG goes to a temporary name, renamed into place once all are written;
    then an earlier run's images that this run did not overwrite are removed."""
    from PIL.PngImagePlugin import PngInfo

    out.mkdir(parents=True, exist_ok=True)
    earlier = earlier_images(out)
    staged: list[tuple[Path, Path]] = []
    try:
        for i, (image, meta) in enumerate(zip(images, metadata, strict=True)):
            info = PngInfo()
            for key, value in meta.items():
                info.add_text(key, value)
            fd, tmp = tempfile.mkstemp(prefix=f".{i:04d}.", suffix=".png.tmp", dir=out)
            staged.append((Path(tmp), out / f"{i:04d}.png"))
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", pnginfo=info)
    except BaseException as exc:  # an error or a Ctrl-C: no temporary file stays behind
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UnclipError(f"cannot write images to {out}: {exc.strerror or exc}") from None
        raise
    umask = os.umask(0)
    os.umask(umask)
    with interrupt_after():
        for tmp, final in staged:
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; images should read like any other file
            os.replace(tmp, final)
        written = {final for _, final in staged}
        for path in earlier:
            if path not in written:
                path.unlink(missing_ok=True)
    return [final for _, final in staged]


@cli.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--backend", default="torch", show_default=True,
              help="torch, onnxruntime or openvino (then --model is a folder made by `unclip export onnx`), "
                   "or tensorrt (--device cuda; the folder also has `unclip export tensorrt` engines)")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--dtype", default="fp32", show_default=True,
              help="fp32; fp16/bf16 with --backend torch on cuda; bf16 with --backend torch or openvino on a "
                   "CPU with native bf16 (half networks, float32 scheduler; docs/cpu.md)")
@click.option("--cuda-graphs", is_flag=True, help="cuda: replay each stage's loop as one captured CUDA graph")
@click.option("--kernels", is_flag=True, help="cuda: fused Triton kernels (GroupNorm+SiLU, guidance step)")
@click.option("--seed", type=int, default=0, show_default=True,
              help="0 <= seed < 2**64; seeds torch.Generator('cpu'): the same seed gives the same images")
@click.option("--num-images", type=int, default=1, show_default=True,
              help=f"images per prompt (at most {LIMITS.max_images} images per call: prompts x num-images)")
@click.option("--prior-steps", type=int, default=None, help=_setting_help("prior_steps"))
@click.option("--decoder-steps", type=int, default=None, help=_setting_help("decoder_steps"))
@click.option("--super-res-steps", type=int, default=None, help=_setting_help("super_res_steps"))
@click.option("--prior-guidance", type=float, default=None, help=_setting_help("prior_guidance"))
@click.option("--decoder-guidance", type=float, default=None, help=_setting_help("decoder_guidance"))
@click.option("--no-prior", is_flag=True, help="skip the prior: the CLIP text embedding goes to the decoder")
@click.option("--out", type=click.Path(path_type=Path), default=Path("unclip-out"), show_default=True,
              help="folder for the images; a reused folder gets this run's images, and the earlier "
                   "run's NNNN.png are removed (other files are left alone; a NNNN.png that unclip "
                   "did not write is refused)")
@click.option("--allow-pickle", is_flag=True, help="allow pickle (.bin) weights, which can run code")
def generate(prompts: tuple[str, ...], model: str, backend: str, device: str, dtype: str,
             cuda_graphs: bool, kernels: bool, seed: int,
             num_images: int, prior_steps: int | None, decoder_steps: int | None,
             super_res_steps: int | None, prior_guidance: float | None, decoder_guidance: float | None,
             no_prior: bool, out: Path,
             allow_pickle: bool) -> None:
    """Generate images for PROMPTS; writes OUT/0000.png, ... (prompt-major) and prints the paths."""
    import unclip

    given = {name: value for name, value in (
        ("prior_steps", prior_steps), ("decoder_steps", decoder_steps), ("super_res_steps", super_res_steps),
        ("prior_guidance", prior_guidance), ("decoder_guidance", decoder_guidance)) if value is not None}
    given.update(num_images=num_images, use_prior=not no_prior)
    # every value is checked before the model loads, by the same layer generate() uses
    GenerationSettings(**given).validate(LIMITS)
    LIMITS.check_images(len(check_prompts(list(prompts), LIMITS)), num_images)
    check_seed(seed)
    check_output_folder(out)
    earlier_images(out)
    pipe = unclip.load(model, backend=backend, device=device, allow_pickle=allow_pickle, dtype=dtype,
                       cuda_graphs=cuda_graphs, kernels=kernels)
    s = pipe.settings(**given)
    images = pipe.generate(list(prompts), seed=seed, progress=True, **vars(s))
    steps = f"prior {s.prior_steps}, decoder {s.decoder_steps}, super-res {s.super_res_steps}"
    metadata = [{"prompt": prompt, "seed": str(seed), "image_index": str(k), "steps": steps,
                 "guidance": f"prior {s.prior_guidance}, decoder {s.decoder_guidance}",
                 "prior": "no" if no_prior else "yes", "model": str(model), "software": "unclip"}
                for prompt in prompts for k in range(num_images)]
    for path in write_images(images, out, metadata):
        click.echo(str(path))


@cli.command()
@click.option("--preset", required=True, help="tiny, small or karlo")
@click.option("--out", type=click.Path(path_type=Path), required=True)
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
        click.echo(f"  {key:<16} {value}")


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


cli.add_command(export)
cli.add_command(bench)
cli.add_command(serve)
cli.add_command(loadtest)


def main() -> None:
    cli(prog_name="unclip")


if __name__ == "__main__":
    main()
