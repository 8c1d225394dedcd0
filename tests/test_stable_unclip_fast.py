"""Stable unCLIP's fast path: half precision and one CUDA graph per network call (prior, UNet).

On CPU the graph backend runs its buffer path uncaptured and must give the plain backend's images
exactly (padding to row buckets, static buffers, copies); `unclip.load` refuses what this family
does not have, in one line. The `gpu` tests check capture and fp16 against float32 (issue 26 runs
them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unclip.errors import UnclipError

STEPS = dict(prior_steps=2, decoder_steps=3)


def tiny(device: str = "cpu", dtype: str = "fp32", cuda_graphs: bool = False):
    """The tiny text preset (seed 0: the same weights each call) on the torch backend."""
    from unclip.engine.stable_unclip import load_stable_pipeline
    from unclip.models.stable_unclip import build_stable_preset

    return load_stable_pipeline(build_stable_preset("text"), device, dtype=dtype, cuda_graphs=cuda_graphs)


def images(pipe, n: int = 3, **settings) -> np.ndarray:
    return pipe.generate("a red circle", seed=4, num_images=n, output_type="np", **{**STEPS, **settings})


# A padded batch is a larger matrix for the CPU's GEMM and convolution kernels, which block it
# differently: float32 rounding moves, nothing else (measured max 6.2e-6 over the three calls below).
PADDED = 2e-5


def test_uncaptured_graph_buffers_give_the_plain_images():
    """3 images, guided prior and UNet (6 rows, padded to the bucket of 8), then 1 image unguided
    (bucket 1), then 2 (bucket 4): the plain backend's arrays; entries per (network, bucket)."""
    from unclip.engine.network_graphs import GraphedBackend

    plain = tiny()
    pipe = tiny()
    pipe.backend = GraphedBackend(pipe.backend, ("prior", "unet"), capture=False)
    worst = 0.0
    for settings in ({}, {"n": 1, "prior_guidance": 1.0, "decoder_guidance": 1.0}, {"n": 2}):
        worst = max(worst, float(np.abs(images(pipe, **settings) - images(plain, **settings)).max()))
    print(f"max abs difference {worst:.1e}")
    assert worst <= PADDED
    assert set(pipe.backend.entries) == {("prior", 8), ("unet", 8), ("prior", 1), ("unet", 1),
                                         ("prior", 4), ("unet", 4)}
    assert pipe.backend.entries[("unet", 8)].inputs["sample"].shape[0] == 8


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(dtype="fp16"), "needs --device cuda"),
        (dict(cuda_graphs=True), "needs --device cuda"),
        (dict(kernels=True), "--kernels is not available for Stable unCLIP"),
        (dict(step_cache=2), "--step-cache 2 is not available for Stable unCLIP"),
        (dict(backend="onnxruntime", dtype="bf16"), "--dtype bf16 applies to --backend torch for Stable"),
        (dict(backend="openvino", cuda_graphs=True), "--cuda-graphs applies to --backend torch or tensorrt"),
        (dict(backend="tensorrt"), "must be a folder made by `unclip export onnx`"),
    ],
)
def test_load_refuses_what_this_family_or_device_lacks_in_one_line(options, message):
    import unclip

    with pytest.raises(UnclipError, match=message) as error:
        unclip.load("sd-unclip-tiny", **options)
    assert "\n" not in str(error.value)


# -- GPU -----------------------------------------------------------------------------------------

# fp16 against float32 on random tiny weights: a different precision; the bound is the Karlo fast
# path's (tests/test_cuda_graphs.py PRECISION_TOLERANCE: mean 2e-2, at most 5 % of values off by
# more than 5e-2). Captured against uncaptured, fp16: the same kernels on the same buffers, nearly
# nothing may move (CAPTURE_TOLERANCE).
PRECISION = (2e-2, 5e-2, 5e-2)
CAPTURE = (1e-3, 1e-2, 1e-3)


def close(got: np.ndarray, expected: np.ndarray, tolerance: tuple[float, float, float]) -> None:
    mean_bound, threshold, share = tolerance
    diff = np.abs(got.astype(np.float64) - expected)
    assert np.isfinite(got).all()
    assert diff.mean() <= mean_bound, f"mean abs difference {diff.mean():.2e} > {mean_bound}"
    assert (diff > threshold).mean() <= share


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_on_the_gpu_is_close_to_float32(dtype):
    close(images(tiny("cuda", dtype)), images(tiny("cuda")), PRECISION)


@pytest.mark.gpu
def test_captured_calls_match_eager_and_replay_the_same():
    eager = images(tiny("cuda", "fp16"))
    pipe = tiny("cuda", "fp16", cuda_graphs=True)
    got = images(pipe)
    close(got, eager, CAPTURE)
    assert np.array_equal(images(pipe), got)  # a replay of the cached graphs: bit for bit
    entries = pipe.backend.entries
    assert {k for k, e in entries.items() if e.graph is not None} == {("prior", 8), ("unet", 8)}
    assert entries[("unet", 8)].replays == 2 * 4  # PNDM: 3 steps, 4 calls, two runs


@pytest.mark.gpu
def test_captured_streams_and_drops_rows_like_eager():
    """Previews and a request leaving mid-batch on the graph path: the stayer's images and the
    streamed previews equal the eager fp16 path's."""
    from unclip.engine.batch import Request

    def run(pipe):
        previews, gone = [], {"flag": False}
        s = pipe.settings(num_images=2, **STEPS)
        requests = [Request(["a red circle"], s, torch.Generator().manual_seed(1),
                            partial_images=2, on_partial=lambda i, x: previews.append(x)),
                    Request(["a cat"], s, torch.Generator().manual_seed(2), cancelled=lambda: gone["flag"])]

        def on_step(stage, i, rows):
            gone["flag"] = stage == "decoder" and i >= 0

        out = pipe.generate_requests(requests, on_step=on_step)
        assert out[1] is None
        return out[0].numpy(), [p.numpy() for p in previews]

    eager_images, eager_previews = run(tiny("cuda", "fp16"))
    got_images, got_previews = run(tiny("cuda", "fp16", cuda_graphs=True))
    close(got_images, eager_images, CAPTURE)
    assert len(got_previews) == len(eager_previews) == 2
    for got, want in zip(got_previews, eager_previews, strict=True):
        close(got, want, CAPTURE)
