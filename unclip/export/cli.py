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
def onnx(model: str, out: Path, precision: str, opset: int, batch_sizes: str, seed: int,
         allow_pickle: bool) -> None:
    """Export every network to ONNX in OUT: validated, with manifest.json, tokenizer and configs."""
    from unclip.export.onnx_export import check_export_args, export_onnx

    sizes = parse_batch_sizes(batch_sizes)
    check_export_args(precision, opset, sizes)
    manifest = export_onnx(model, out, precision=precision, opset=opset, batch_sizes=sizes,
                           allow_pickle=allow_pickle, seed=seed)
    for name, entry in manifest["networks"].items():
        worst = max(e["max_abs"] for errors in entry["validation"].values() for e in errors.values())
        trt = ", ".join(entry["tensorrt_unsupported_ops"]) or "none"
        click.echo(f"  {name:<16} max abs error {worst:.2e}   TensorRT-unsupported ops: {trt}")
    click.echo(str(out))
