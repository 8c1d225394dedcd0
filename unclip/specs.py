"""The network-spec table: the contract between export and runtime.

Each network the pipeline calls is described once here: its input and output names, dtypes
and shapes (symbolic axes are strings). The exporter writes these into the artifact manifest,
every backend binds tensors by these names, and validation draws example inputs from them.
This module imports only torch, so every backend can use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "bool": torch.bool}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of DTYPES
    shape: tuple[int | str, ...]  # str = dynamic axis name


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelDims:
    """The sizes the runtime needs to allocate buffers, read from the network configs."""

    clip_dim: int
    text_len: int
    text_vocab: int
    extra_tokens: int  # CLIP image embedding -> this many extra decoder context tokens
    decoder_cross_dim: int
    decoder_time_dim: int
    decoder_size: int
    decoder_channels: int  # image channels (the decoder predicts twice as many: eps + variance)
    super_res_size: int
    # Which networks the model has beyond the five every unCLIP decoder needs. A variation-only
    # checkpoint (diffusers' UnCLIPImageVariationPipeline) has no prior; a text-to-image one may
    # ship no CLIP image tower (None). Both default to a text-to-image model without one, which is
    # what an artifact exported before the image encoder existed describes.
    image_size: int | None = None  # the image encoder's input side; None: no image encoder
    has_prior: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _t(name: str, dtype: str, *shape: int | str) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def network_specs(d: ModelDims) -> dict[str, NetworkSpec]:
    """Guided stages run conditional and unconditional rows as one batch, hence the axis 'batch'."""
    seq, ctx = d.text_len, d.text_len + d.extra_tokens
    c, s, sr = d.decoder_channels, d.decoder_size, d.super_res_size
    specs = [
        NetworkSpec("text_encoder",
                    (_t("input_ids", "int64", "batch", seq),),
                    (_t("text_embeds", "float32", "batch", d.clip_dim),
                     _t("text_hidden", "float32", "batch", seq, d.clip_dim))),
    ]
    if d.image_size is not None:  # CLIP's image tower: RGB pixels -> the (unnormalised) image embedding
        specs.append(NetworkSpec("image_encoder",
                                 (_t("pixel_values", "float32", "batch", 3, d.image_size, d.image_size),),
                                 (_t("image_embeds", "float32", "batch", d.clip_dim),)))
    if d.has_prior:
        specs.append(NetworkSpec(
            "prior",
            (_t("sample", "float32", "batch", d.clip_dim), _t("timestep", "float32", "batch"),
             _t("text_embeds", "float32", "batch", d.clip_dim),
             _t("text_hidden", "float32", "batch", seq, d.clip_dim),
             _t("text_mask", "bool", "batch", seq)),
            (_t("predicted_image_embeds", "float32", "batch", d.clip_dim),)))
    specs += [
        NetworkSpec("text_proj",
                    (_t("image_embeds", "float32", "batch", d.clip_dim),
                     _t("unconditional", "bool", "batch"),
                     _t("text_embeds", "float32", "batch", d.clip_dim),
                     _t("text_hidden", "float32", "batch", seq, d.clip_dim)),
                    (_t("decoder_hidden", "float32", "batch", ctx, d.decoder_cross_dim),
                     _t("decoder_time_embeds", "float32", "batch", d.decoder_time_dim))),
        NetworkSpec("decoder",
                    (_t("sample", "float32", "batch", c, s, s), _t("timestep", "float32", "batch"),
                     _t("decoder_hidden", "float32", "batch", ctx, d.decoder_cross_dim),
                     _t("decoder_time_embeds", "float32", "batch", d.decoder_time_dim),
                     _t("text_mask", "bool", "batch", seq)),
                    (_t("model_output", "float32", "batch", 2 * c, s, s),)),
    ]
    for name in ("super_res_first", "super_res_last"):
        specs.append(NetworkSpec(
            name,
            (_t("sample", "float32", "batch", c, sr, sr), _t("timestep", "float32", "batch"),
             _t("image_lowres", "float32", "batch", c, sr, sr)),
            (_t("model_output", "float32", "batch", c, sr, sr),)))
    return {spec.name: spec for spec in specs}


def example_inputs(spec: NetworkSpec, dims: ModelDims, batch: int,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random inputs in each tensor's realistic range, for export tracing and validation."""
    out = {}
    for t in spec.inputs:
        shape = tuple(batch if isinstance(a, str) else a for a in t.shape)
        if t.name == "input_ids":
            ids = torch.randint(1, dims.text_vocab, shape, generator=generator)
            out[t.name] = ids
        elif t.name == "timestep":
            out[t.name] = torch.randint(0, 1000, shape, generator=generator).float()
        elif t.name == "text_mask":
            lengths = torch.randint(2, shape[1] + 1, (shape[0], 1), generator=generator)
            out[t.name] = torch.arange(shape[1])[None, :] < lengths
        elif t.name == "unconditional":
            out[t.name] = torch.arange(shape[0]) < shape[0] // 2
        else:
            out[t.name] = torch.randn(shape, generator=generator)
    return out
