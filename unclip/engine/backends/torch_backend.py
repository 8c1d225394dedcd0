"""The PyTorch backend: the reference, eager networks on any torch device.

On a CPU its thread count follows the machine's load (unclip.engine.cpu_threads): torch's spinning
OpenMP threads collapse when another process holds a core.
"""

from __future__ import annotations

import torch

from unclip.engine.cpu_threads import CpuThreadPolicy
from unclip.models.components import UnclipComponents
from unclip.models.networks import adapters, model_dims
from unclip.models.step_cache import cached_adapters, cached_specs, feature_channels
from unclip.specs import network_specs


class TorchBackend:
    name = "torch"

    def __init__(self, components: UnclipComponents, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.components = components
        self.dims = model_dims(components)
        self.specs = network_specs(self.dims)
        networks = adapters(components)
        if len(components.decoder.config.block_out_channels) > 1:  # the step cache's pair (step_cache.py)
            networks.update(cached_adapters(networks["decoder"]))
            self.specs.update(cached_specs(self.specs["decoder"], feature_channels(components.decoder)))
        self.networks = {k: m.to(self.device).eval() for k, m in networks.items()}
        prior = components.prior  # a variation-only model has none, and no CLIP statistics
        self._constants = {} if prior is None else {"clip_mean": prior.clip_mean.detach().to(self.device),
                                                     "clip_std": prior.clip_std.detach().to(self.device)}
        self.threads = CpuThreadPolicy() if self.device.type == "cpu" else None

    def run(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.specs[network]
        if self.threads is not None:
            self.threads.update()
        with torch.inference_mode():
            out = self.networks[network](*(inputs[name] for name in spec.input_names))
        outputs = out if isinstance(out, tuple) else (out,)
        return dict(zip(spec.output_names, outputs, strict=True))

    def constants(self) -> dict[str, torch.Tensor]:
        return self._constants
