"""Backends: something that runs a named network on named tensors (see unclip.specs)."""

from __future__ import annotations

from typing import Protocol

import torch

from unclip.specs import NetworkSpec


class Backend(Protocol):
    name: str
    device: torch.device
    specs: dict[str, NetworkSpec]

    def run(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run one network; inputs and outputs are keyed by the spec's tensor names."""
        ...

    def constants(self) -> dict[str, torch.Tensor]:
        """Weights the sampling loop itself needs (the prior's CLIP statistics)."""
        ...
