"""The fast path of the torch backend, assembled in one place from three named options (`unclip.load`).

  dtype="fp16"|"bf16"  PrecisionBackend: half weights and activations, float32 scheduler (precision.py);
                       on CPU only bf16, with the UNets in channels-last memory format
  cuda_graphs=True     one step of each network captured once as a CUDA graph and replayed (cuda_graphs.py)
  kernels=True         Triton: GroupNorm+SiLU in the UNets, guidance+scheduler+noise in one step kernel
                       (unclip/kernels/)
"""

from __future__ import annotations

from unclip.engine.cuda_graphs import StageRunner
from unclip.engine.precision import PrecisionBackend
from unclip.models.step_cache import CACHED  # the step cache's pair: the decoder's own modules

UNETS = ("decoder", "super_res_first", "super_res_last")  # the networks built of resnet blocks


def fast_path(backend, dtype: str, cuda_graphs: bool, kernels: bool):
    """(backend, stage runner or None) for a TorchBackend; options are checked by the caller."""
    if dtype != "fp32":
        # channels-last measured faster on CPU only (docs/cpu.md)
        channels_last = UNETS + CACHED if backend.device.type == "cpu" else ()
        backend = PrecisionBackend(backend, dtype, channels_last=channels_last)
    if kernels:
        from unclip.kernels.group_norm_silu import fuse_group_norm_silu

        for name in UNETS:
            fuse_group_norm_silu(backend.networks[name], use_triton=True)
    runner = StageRunner(backend, capture=cuda_graphs, kernels=kernels) if cuda_graphs or kernels else None
    return backend, runner
