"""The half-precision policy of the torch path (`--dtype fp16|bf16` on cuda, `--dtype bf16` on cpu).

* Weights and activations in half: every network is cast once at load time.
* float32 where accuracy needs it: latents, the guidance combine and all scheduler arithmetic
  stay float32 (a network's output is read back as float32, or read as half by the fused step
  kernel, which computes in float32); normalisation statistics are float32 inside torch's own
  GroupNorm/LayerNorm kernels for half inputs (and inside our fused GroupNorm+SiLU kernel).
* Attention through PyTorch's scaled-dot-product attention (diffusers' AttnProcessor2_0 /
  AttnAddedKVProcessor2_0; recent diffusers pick them already, `use_sdpa` makes it certain).
* Channels-last memory format for the UNets on CPU (oneDNN's bf16 convolutions are NHWC-native;
  measured in docs/cpu.md); off on GPU, where it measured no faster (docs/gpu.md).
* bf16 on CPU only where the CPU computes it natively (AVX512-BF16 or AMX); elsewhere torch
  emulates it, slower than fp32, and `unclip.load` refuses it.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def use_sdpa(model: torch.nn.Module) -> int:
    """Give every diffusers Attention module the SDPA version of its processor; returns how many changed."""
    from diffusers.models.attention_processor import (
        Attention,
        AttnAddedKVProcessor,
        AttnAddedKVProcessor2_0,
        AttnProcessor,
        AttnProcessor2_0,
    )

    changed = 0
    for module in model.modules():
        if isinstance(module, Attention):
            processor = module.processor
            if type(processor) is AttnProcessor:
                module.set_processor(AttnProcessor2_0())
                changed += 1
            elif type(processor) is AttnAddedKVProcessor:
                module.set_processor(AttnAddedKVProcessor2_0())
                changed += 1
    return changed


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX, as torch's CPU feature probe reports them (absent probes: no)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


class PrecisionBackend:
    """A torch backend with its networks in `dtype`: inputs cast in, outputs read back as float32.

    `run_native` leaves outputs in the network dtype, for the fused step kernel that reads half
    directly (saves one cast kernel per step). Networks named in `channels_last` get their
    weights, and their 4-D inputs, in channels-last memory format.
    """

    name = "torch"

    def __init__(self, backend, precision: str, channels_last: tuple[str, ...] = ()):
        self._backend = backend
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.device = backend.device
        self.specs = backend.specs
        self.dims = getattr(backend, "dims", None)  # Stable unCLIP's pipeline reads its backend's dims
        self.networks = backend.networks
        self.channels_last = channels_last
        for name, network in self.networks.items():
            network.to(self.dtype)
            if name in channels_last:
                network.to(memory_format=torch.channels_last)  # 4-D weights only
            use_sdpa(network)
        # the prior's CLIP statistics de-normalise float32 latents
        self._constants = {k: v.float() for k, v in backend.constants().items()}

    def _cast(self, inputs: dict[str, torch.Tensor], channels_last: bool) -> dict[str, torch.Tensor]:
        # timesteps stay float32: bf16 cannot hold 999 exactly, and the networks' sinusoidal
        # time projections compute in float32 anyway
        out = {k: v.to(self.dtype) if v.is_floating_point() and k != "timestep" else v
               for k, v in inputs.items()}
        if channels_last:
            out = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                   for k, v in out.items()}
        return out

    def run_native(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._backend.run(network, **self._cast(inputs, network in self.channels_last))

    def run(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.float() if v.is_floating_point() else v
                for k, v in self.run_native(network, **inputs).items()}

    def constants(self) -> dict[str, torch.Tensor]:
        return self._constants
