"""One denoising step for a set of rows: network call -> guidance -> scheduler update (+ noise).

Every path runs this body, and one loop (Pipeline._denoise) drives it a step at a time, dropping the
rows of cancelled requests, sending previews and reporting progress between steps. The loop steps a
stage run: EagerRun here (ordinary tensors), or the stage runner's StageRun (cuda_graphs.py: static
buffers, each step eagerly or replayed from a CUDA graph captured per network and row count).
`kernels` swaps the plain-torch update (`guidance_step_reference`, the oracle) for the Triton kernel
that does the same update in one launch (`guidance_step_triton`). The step index is a device tensor
and the noise of every step is one tensor, so a step is a pure function of buffers (CUDA-graph
safe). A network's outputs after its first (the step cache's deep features) are carried, by name,
to the later steps that take them.
"""

from __future__ import annotations

import torch

from unclip.engine.batch import take_rows
from unclip.engine.scheduler import StepTable
from unclip.kernels import guidance_step as step_kernels
from unclip.kernels.guidance_step import GuidanceStep, guidance_step_reference, split_output


class StepBody:
    """The step of one backend; `kernels` selects the Triton update where it can run."""

    def __init__(self, backend, kernels: bool = False):
        self.backend = backend
        self.kernels = kernels

    def __call__(self, network: str, spec: GuidanceStep, table: StepTable, step: torch.Tensor,
                 x: torch.Tensor, noise: torch.Tensor, guidance: torch.Tensor,
                 conditioning: dict[str, torch.Tensor], carried: dict[str, torch.Tensor],
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the latents after step `step`, the network's prediction output). `noise` holds every
        step's noise ([steps, *x.shape], zeros where a step adds none), `guidance` is a [1] tensor,
        `carried` is updated in place; `out` (x itself: in place) receives the new latents."""
        run = getattr(self.backend, "run_native", self.backend.run)  # half outputs for the kernel
        x_in = torch.cat([x, x]) if spec.guided else x
        timestep = table.timesteps.index_select(0, step).expand(x_in.shape[0])
        outputs = run(network, sample=x_in, timestep=timestep, **conditioning, **carried)
        first = self.backend.specs[network].output_names[0]
        model_output = outputs[first]  # the output dict is the backend's: read, never changed
        carried.update({k: v for k, v in outputs.items() if k != first})
        if self.kernels and step_kernels.runs_on(x):
            return step_kernels.guidance_step_triton(spec, table, step, model_output.contiguous(), x, noise,
                                                     guidance, out=out), model_output
        x_next = guidance_step_reference(spec, table, step, model_output, x, noise, guidance)
        if out is not None:
            x_next = out.copy_(x_next)
        return x_next, model_output


def guided_prediction(spec: GuidanceStep, model_output: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """The step's guided prediction (what a preview's clean-image estimate starts from)."""
    return split_output(spec, model_output.float(), guidance)[0]


class EagerRun:
    """One stage of one batch stepped on ordinary tensors: the plain path, and the interface a
    StageRun (cuda_graphs.py) shares — `step`, `drop`, `prediction`, `x`, `rows`, `result`."""

    def __init__(self, backend, spec: GuidanceStep, x: torch.Tensor, noise: list[torch.Tensor | None],
                 table: StepTable, conditioning: dict[str, torch.Tensor], guidance: float | None):
        self.body, self.spec, self.table = StepBody(backend), spec, table
        self.x, self.conditioning = x, conditioning
        # [steps, rows, ...]: zeros where a step adds no noise
        self.noise = torch.stack([torch.zeros_like(x) if n is None else n for n in noise])
        self.scale = torch.tensor([1.0 if guidance is None else guidance], dtype=torch.float32,
                                  device=x.device)
        self.carried: dict[str, torch.Tensor] = {}  # a full step's extra outputs (the step cache's features)
        self._output: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def step(self, i: int, network: str) -> None:
        step = torch.tensor([i], device=self.x.device)
        self.x, self._output = self.body(network, self.spec, self.table, step, self.x, self.noise, self.scale,
                                         self.conditioning, self.carried)

    def prediction(self) -> torch.Tensor:
        return guided_prediction(self.spec, self._output, self.scale)

    def drop(self, keep: torch.Tensor) -> None:
        guided = self.spec.guided
        self.x = take_rows(self.x, keep, guided=False)
        self.noise = self.noise.index_select(1, keep.to(self.noise.device))
        self.conditioning = {k: take_rows(v, keep, guided) for k, v in self.conditioning.items()}
        self.carried = {k: take_rows(v, keep, guided) for k, v in self.carried.items()}

    def result(self) -> torch.Tensor:
        return self.x
