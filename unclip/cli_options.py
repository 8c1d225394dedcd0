"""The options every image command shares (model and backend, seed, sampler settings, --out), and
the steps they share: settings checked before the model loads, the model loaded, PNG metadata."""

from __future__ import annotations

from pathlib import Path

import click

from unclip.engine.settings import (
    IMAGE_CONDITIONED,
    GenerationSettings,
    Limits,
    check_seed,
    read_sampler_defaults,
)
from unclip.folders import check_output_folder
from unclip.models import DEFAULT_MODEL, DEMO_FOLDER
from unclip.options import MODEL_HELP, LoadOptions, click_options, from_cli  # noqa: F401 - MODEL_HELP: cli.py
from unclip.output_images import earlier_images

LIMITS = Limits()  # the CLI runs with the default limits (docs/validation.md)
SETTINGS = ("prior_steps", "decoder_steps", "super_res_steps", "prior_guidance", "decoder_guidance")


def _setting_help(field: str, image: bool = False) -> str:
    """The range, and the value the default model runs with (its sampler_defaults.json, if any; for
    the image commands, its image_conditioned section first)."""
    allowed = (f"2..{LIMITS.max_steps}" if field.endswith("steps")
               else f"1.0 (unguided) .. {LIMITS.max_guidance:g}")
    engine = getattr(GenerationSettings(), field)
    file = read_sampler_defaults(DEMO_FOLDER) if DEMO_FOLDER.is_dir() else {}
    demo = {**file, **(file.get(IMAGE_CONDITIONED, {}) if image else {})}.get(field)
    if demo is None or DEFAULT_MODEL != "demo":
        return f"{allowed}  [default: {engine}; a model's sampler_defaults.json may set its own]"
    return f"{allowed}  [default: {demo} for demo (its sampler_defaults.json); {engine} without one]"


def _apply(options: list, f):
    for option in reversed(options):
        f = option(f)
    return f


def model_options(f):
    """--model, --backend, --device, --dtype, --cuda-graphs, --kernels, --step-cache
    (unclip.options.LoadOptions)."""
    return click_options(LoadOptions, "model", "backend", "device", "dtype", "cuda_graphs", "kernels",
                         "step_cache")(f)


def seed_option(f):
    return click.option("--seed", type=int, default=0, show_default=True,
                        help="0 <= seed < 2**64; seeds torch.Generator('cpu'): the same seed gives the same "
                             "images")(f)


def sampler_options(stages: tuple[str, ...] = ("prior", "decoder", "super_res"), image: bool = False):
    """--{stage}-steps and --{stage}-guidance (super-resolution is unguided) for the stages a command
    runs; `image`: an image command's defaults (the model's image_conditioned section)."""
    def decorate(f):
        options = [click.option(f"--{stage.replace('_', '-')}-steps", type=int, default=None,
                                help=_setting_help(f"{stage}_steps", image)) for stage in stages]
        options += [click.option(f"--{stage}-guidance", type=float, default=None,
                                 help=_setting_help(f"{stage}_guidance", image))
                    for stage in stages if stage != "super_res"]
        return _apply(options, f)
    return decorate


def out_option(f):
    return click.option(
        "--out", type=click.Path(path_type=Path), default=Path("unclip-out"), show_default=True,
        help="folder for the images; a reused folder gets this run's images, and the earlier run's "
             "NNNN.png (and strip.png, frames.gif) are removed (other files are left alone; one of those "
             "names that unclip did not write is refused)")(f)


def allow_pickle_option(f):
    return click_options(LoadOptions, "allow_pickle")(f)


def given_settings(options: dict, **fixed) -> dict:
    """The sampler settings given on the command line, checked by the layer generate() uses, before
    any model loads."""
    given = {name: options[name] for name in SETTINGS if options.get(name) is not None}
    given.update(fixed)
    GenerationSettings(**given).validate(LIMITS)
    return given


def load_pipeline(options: dict):
    import unclip

    return unclip.load(**from_cli(LoadOptions, options).load_kwargs())


def run_metadata(s: GenerationSettings, seed: int, model: str, prior: bool = True) -> dict[str, str]:
    """The PNG text every image of a run carries: the settings used (the prior's only where it ran)."""
    steps = f"decoder {s.decoder_steps}, super-res {s.super_res_steps}"
    guidance = f"decoder {s.decoder_guidance}"
    if prior:
        steps, guidance = f"prior {s.prior_steps}, {steps}", f"prior {s.prior_guidance}, {guidance}"
    return {"seed": str(seed), "steps": steps, "guidance": guidance, "model": str(model),
            "software": "unclip"}


def check_run(out: Path, seed: int) -> None:
    """The seed and the output folder, checked before the model loads (an earlier run's images in
    OUT are found now and replaced only when the new ones are written)."""
    check_seed(seed)
    check_output_folder(out)
    earlier_images(out)


# -- Stable unCLIP (unclip.engine.stable_unclip): its two settings, and its runs' settings and metadata --

STABLE_SAMPLERS = ("pndm", "ddim", "dpm++")


def stable_options(f):
    """--noise-level and --scheduler: settings of Stable unCLIP models (a Karlo model refuses them)."""
    f = click.option("--scheduler", type=click.Choice(STABLE_SAMPLERS), default=None,
                     help="Stable unCLIP: the latent UNet's sampler  [default: the checkpoint's own]")(f)
    return click.option("--noise-level", type=int, default=None,
                        help="Stable unCLIP: noise added to the image embedding, 0 (none) to the noising "
                             "schedule's last timestep (999)  [default: 0]")(f)


def check_noise_level(options: dict) -> None:
    """Before the model loads: a negative level is wrong for every model (the top depends on its schedule)."""
    from unclip.errors import UnclipError

    level = options.get("noise_level")
    if level is not None and level < 0:
        raise UnclipError(f"--noise-level must be from 0 (no noise) to the noising schedule's last timestep "
                          f"(999 for the published models), got {level}", param="noise_level")


def stable_settings(pipe, options: dict, **fixed) -> dict | None:
    """A Stable unCLIP run's settings, checked by the pipeline (defaults filled in); None for a Karlo model,
    which refuses the Stable unCLIP options."""
    from unclip.errors import UnclipError

    extra = {k: options[k] for k in ("noise_level", "scheduler") if options.get(k) is not None}
    if getattr(pipe, "family", "karlo") != "stable-unclip":
        if extra:
            flag = "--" + next(iter(extra)).replace("_", "-")
            raise UnclipError(f"{flag} applies to Stable unCLIP models; {options['model']} is a Karlo-style "
                              "unCLIP model: drop it", param=next(iter(extra)))
        return None
    if options.get("super_res_steps") is not None:
        raise UnclipError("--super-res-steps: Stable unCLIP has no super-resolution stage (its VAE decodes "
                          "the latents); drop it", param="super_res_steps")
    given = {k: options[k] for k in ("prior_steps", "decoder_steps", "prior_guidance", "decoder_guidance")
             if options.get(k) is not None}
    return pipe.check({**given, **extra, **fixed})


def stable_metadata(s: dict, seed: int, model: str, prior: bool = True) -> dict[str, str]:
    steps, guidance = f"decoder {s['decoder_steps']}", f"decoder {s['decoder_guidance']}"
    if prior:
        steps, guidance = f"prior {s['prior_steps']}, {steps}", f"prior {s['prior_guidance']}, {guidance}"
    return {"seed": str(seed), "steps": steps, "guidance": guidance, "noise_level": str(s["noise_level"]),
            "scheduler": s["scheduler"] or "checkpoint's", "model": str(model), "software": "unclip"}
