"""`unclip bench`: every backend against the diffusers baseline, in one run."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from unclip.bench.config import BenchConfig, check, parse_list, read_suite
from unclip.errors import UnclipError
from unclip.folders import check_output_folder

D = BenchConfig  # the defaults live on the dataclass, documented there
SETTINGS_DEFAULT = "a checkpoint's (as `unclip generate`); a preset's:"
# what each option must be (values from a suite file arrive as JSON types, unchecked by click)
TYPES = {"prior_steps": (int, "an integer"), "decoder_steps": (int, "an integer"),
         "super_res_steps": (int, "an integer"), "warmup": (int, "an integer"), "repeat": (int, "an integer"),
         "seed": (int, "an integer"), "prior_guidance": ((float, int), "a number"),
         "decoder_guidance": ((float, int), "a number"), "model": (str, "a text"), "device": (str, "a text"),
         "prompt": (str, "a text")}
OPTIONAL = ("prompt", "prior_steps", "decoder_steps", "super_res_steps", "prior_guidance", "decoder_guidance")


def option_names() -> set[str]:
    """What a suite file may set: every option but --suite itself."""
    return {p.name for p in bench.params if p.name != "suite"}


@click.command()
@click.option("--model", default=D.model, show_default=True,
              help="demo (the built-in model, scored for accuracy too), a checkpoint folder (diffusers "
                   "UnCLIPPipeline layout) or a preset: tiny, small, karlo")
@click.option("--backends", default=None,
              help="comma-separated runners, each a backend and optionally its precision: torch-fp32, "
                   "torch-bf16, onnxruntime, openvino-fp32, openvino-bf16, tensorrt (a bare name is fp32) "
                   "[default: every runner that can run on this machine and device]")
@click.option("--device", default=D.device, show_default=True, help="cpu or cuda")
@click.option("--batch-sizes", default=",".join(map(str, D.batch_sizes)), show_default=True,
              help="prompts per request, comma-separated")
@click.option("--prior-steps", type=int, default=None, help=f"[default: {SETTINGS_DEFAULT} 8]")
@click.option("--decoder-steps", type=int, default=None, help=f"[default: {SETTINGS_DEFAULT} 8]")
@click.option("--super-res-steps", type=int, default=None, help=f"[default: {SETTINGS_DEFAULT} 3]")
@click.option("--prior-guidance", type=float, default=None, help=f"[default: {SETTINGS_DEFAULT} 4.0]")
@click.option("--decoder-guidance", type=float, default=None, help=f"[default: {SETTINGS_DEFAULT} 8.0]")
@click.option("--warmup", type=int, default=D.warmup, show_default=True,
              help="unmeasured runs per runner and batch size")
@click.option("--repeat", type=int, default=D.repeat, show_default=True,
              help="measured runs per runner and batch size")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--prompt", default=None,
              help="[default: 'a red circle on a blue background' for a shapes-world model such as demo, "
                   "else 'a photograph of an astronaut riding a horse']")
@click.option("--out", type=click.Path(path_type=Path), default=D.out, show_default=True,
              help="folder for results.json, results.md and the PNG plots")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=D.cache_dir, show_default=True,
              help="where exported artifacts (e.g. ONNX for onnxruntime) are kept between runs")
@click.option("--no-plots", is_flag=True, help="skip the PNG plots (no matplotlib needed)")
@click.option("--evaluate/--no-evaluate", default=None,
              help="score each runner's images on `unclip evaluate`'s prompts and seeds (shapes-world models "
                   "such as demo) [default: on where the model can be scored]")
@click.option("--suite", type=click.Path(path_type=Path), default=None,
              help="a suite file (benchmarks/suites/*.json); options given here win over it")
@click.pass_context
def bench(ctx: click.Context, suite: Path | None, no_plots: bool, **options) -> None:
    """Benchmark backends against diffusers' UnCLIPPipeline (interleaved); writes results to OUT."""
    import unclip
    from unclip.bench.suite import run_suite

    if suite is not None:
        for name, value in read_suite(suite, option_names()).items():
            if ctx.get_parameter_source(name) == ParameterSource.DEFAULT:
                if name == "no_plots":
                    no_plots = value is True
                else:
                    options[name] = value
    if options["backends"] is not None:
        options["backends"] = parse_list("backends", options["backends"])
    options["batch_sizes"] = parse_list("batch-sizes", options["batch_sizes"], int)
    for name, (kind, what) in TYPES.items():
        if name in OPTIONAL and options[name] is None:
            continue
        if not isinstance(options[name], kind) or isinstance(options[name], bool):
            raise UnclipError(f"--{name.replace('_', '-')} must be {what}, got {options[name]!r}")
    for name in ("prior_guidance", "decoder_guidance"):
        if options[name] is not None:
            options[name] = float(options[name])
    options["out"], options["cache_dir"] = Path(options["out"]), Path(options["cache_dir"])
    check_output_folder(options["out"])  # a read-only --out is one line, before any work
    cfg = check(BenchConfig(**options, plots=not no_plots, suite=None if suite is None else str(suite)),
                unclip.BACKENDS)
    try:
        results = run_suite(cfg, argv=["unclip", *sys.argv[1:]])
    except KeyboardInterrupt:
        click.echo(f"unclip: interrupted; partial results in {cfg.out}", err=True)
        sys.exit(130)
    for name, reason in cfg.skipped.items():
        click.echo(f"{name:<16} skipped: {reason}")
    document = results.document()
    for run in document["runs"]:
        ratio = run["speedup_vs_baseline"]
        click.echo(f"{run['backend']:<16} batch {run['batch_size']:<3} "
                   f"median {run['latency_ms']['median']:>10,.1f} ms  {run['images_per_s']:.3f} images/s  "
                   f"{ratio:.2f}x baseline")
    for name, runner in document["runners"].items():
        if "accuracy" in runner:
            click.echo(f"{name:<16} {accuracy_line(runner['accuracy'])}")
    click.echo(str(cfg.out))


def accuracy_line(accuracy: dict) -> str:
    """One runner's evaluation as the bench prints it: 'all three right' and CLIP top-1 per group."""
    groups = ", ".join(f"{group.replace('_', '-')} {row['attribute_accuracy']:.1%} "
                       f"(CLIP top-1 {row['clip_retrieval_top1']:.1%}, {row['images']} images)"
                       for group, row in accuracy["summary"].items())
    return f"accuracy, all three attributes right: {groups}"
