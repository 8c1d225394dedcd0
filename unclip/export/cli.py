"""`unclip export ...`: the export command group (`onnx` here; other formats add subcommands)."""

from __future__ import annotations

from pathlib import Path

import click

from unclip.errors import UnclipError

MODEL_HELP = "checkpoint folder (diffusers UnCLIPPipeline layout) or preset: tiny, small, karlo"


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UnclipError(f"--batch-sizes {text!r} must be comma-separated integers, e.g. 1,4") from None
    if not sizes or min(sizes) < 1:
        raise UnclipError(f"--batch-sizes {text!r} must be positive integers, e.g. 1,4")
    return sizes


@click.group()
def export() -> None:
    """Export a model for a runtime: a folder of validated networks plus a manifest."""


@export.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="artifact folder to create or replace (atomically)")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: half-precision weights and activations, fp32 inputs/outputs and norms")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset, 14..20")
@click.option("--batch-sizes", default="1,4", show_default=True,
              help="batch sizes to validate each network at against PyTorch")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of a preset's random weights")
@click.option("--allow-pickle", is_flag=True, help="allow pickle (.bin) weights, which can run code")
@click.option("--step-cache", is_flag=True,
              help="also export the decoder's step-cache pair (decoder_full, decoder_shallow), so the "
                   "artifact runs with step_cache=N")
def onnx(model: str, out: Path, precision: str, opset: int, batch_sizes: str, seed: int,
         allow_pickle: bool, step_cache: bool) -> None:
    """Export every network to ONNX in OUT: validated, with manifest.json, tokenizer and configs."""
    from unclip.export.onnx_export import check_export_args, export_onnx
    from unclip.models.stable_unclip import is_stable_unclip

    sizes = parse_batch_sizes(batch_sizes)
    check_export_args(precision, opset, sizes)
    if is_stable_unclip(model):  # the second family: its own networks and runtime files
        from unclip.export.stable_unclip_onnx import export_stable_onnx

        if step_cache or allow_pickle:
            raise UnclipError("--step-cache and --allow-pickle apply to Karlo-style models; drop them")
        manifest = export_stable_onnx(model, out, precision=precision, opset=opset, batch_sizes=sizes,
                                      seed=seed)
    else:
        manifest = export_onnx(model, out, precision=precision, opset=opset, batch_sizes=sizes,
                               allow_pickle=allow_pickle, seed=seed, step_cache=step_cache)
    for name, entry in manifest["networks"].items():
        worst = max(e["max_abs"] for errors in entry["validation"].values() for e in errors.values())
        trt = ", ".join(entry["tensorrt_unsupported_ops"]) or "none"
        click.echo(f"  {name:<16} max abs error {worst:.2e}   TensorRT-unsupported ops: {trt}")
    click.echo(str(out))


@export.command()
@click.option("--artifacts", type=click.Path(path_type=Path), required=True,
              help="folder made by `unclip export onnx`; engines go to DIR/engines/")
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="must match the ONNX export's precision (TensorRT builds strongly typed engines)")
@click.option("--batch-sizes", default="1,4,8", show_default=True,
              help="images per call; profiles: min = smallest unguided, opt = middle, max = largest "
                   "(x2 rows where guidance doubles the batch)")
@click.option("--workspace", type=float, default=4.0, show_default=True, help="builder workspace limit, GB")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="tactic timing cache file reused across builds "
                   "[default: one per GPU and TensorRT version in DIR/engines]")
@click.option("--opt-level", type=int, default=3, show_default=True,
              help="builder optimisation level 0..5 (higher: longer build, maybe faster engine)")
@click.option("--rebuild", is_flag=True, help="rebuild every engine, replacing stale or foreign ones")
@click.option("--check", is_flag=True,
              help="run each engine and ONNX Runtime on the same inputs at min/opt/max rows; exit 1 on NaN "
                   "or error above the export tolerance")
def tensorrt(artifacts: Path, precision: str, batch_sizes: str, workspace: float, timing_cache: Path | None,
             opt_level: int, rebuild: bool, check: bool) -> None:
    """Build FP16 TensorRT engines for the ONNX networks in DIR (needs TensorRT and an NVIDIA GPU)."""
    from unclip.export.tensorrt_build import BuildOptions, check_build_args, export_tensorrt

    sizes = parse_batch_sizes(batch_sizes)
    check_build_args(workspace, opt_level)
    if timing_cache is not None and timing_cache.is_dir():
        raise UnclipError(f"--timing-cache {timing_cache} is a folder; give a file path")
    manifest, built, current = export_tensorrt(artifacts, precision, sizes,
                                               BuildOptions(workspace, opt_level, timing_cache), rebuild)
    for name, entry in manifest["tensorrt"]["engines"].items():
        state = "built" if name in built else "up to date"
        click.echo(f"  {name:<16} {state:<10} rows {entry['profile']}  {entry['file']}")
    if check:
        from unclip.export.tensorrt_check import check_engines, format_report

        rows, precision = check_engines(artifacts)
        for line in format_report(rows, precision):
            click.echo(line)
        failed = [r for r in rows if not r.ok]
        if failed:
            first = failed[0]
            raise UnclipError(f"--check: {len(failed)} of {len(rows)} outputs failed (first: {first.network} "
                              f"at {first.shape} rows {first.rows}); try --opt-level 5, a narrower "
                              f"--batch-sizes range, or --precision fp32")
    click.echo(str(artifacts))
