"""Shared fixtures: the tiny preset (random weights) built once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Reduced step counts keep each tiny end-to-end run well under a second.
FAST_STEPS = dict(prior_steps=3, decoder_steps=4, super_res_steps=2)


@pytest.fixture(scope="session")
def tiny_components():
    from unclip.models.components import build_preset

    return build_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_components):
    from unclip.engine.backends.torch_backend import TorchBackend
    from unclip.engine.pipeline import Pipeline
    from unclip.models.networks import model_dims

    c = tiny_components
    return Pipeline(TorchBackend(c), c.tokenizer, model_dims(c), c.schedulers, model_name="tiny",
                    image_preprocess=c.image_preprocess)


@pytest.fixture(scope="session")
def demo_pipeline():
    """The trained demo model that ships in the package, on the torch backend."""
    import unclip

    return unclip.load("demo")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_components):
    """The tiny preset saved as a checkpoint folder (tests must not modify it)."""
    from unclip.models.checkpoint import save_components

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_components(tiny_components, out)
    return out


def pytest_collection_modifyitems(config, items):
    """gpu/tensorrt/cpu_bf16 tests skip with a reason naming what is missing; nothing else skips."""
    from unclip.engine.precision import cpu_has_native_bf16

    has_cuda = torch.cuda.is_available()
    has_bf16 = cpu_has_native_bf16()
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    for item in items:
        missing = []
        if "gpu" in item.keywords and not has_cuda:
            missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
        if "tensorrt" in item.keywords and not has_trt:
            missing.append("TensorRT (import tensorrt failed)")
        if "cpu_bf16" in item.keywords and not has_bf16:
            missing.append("a CPU with native bf16 (AVX512-BF16 or AMX): torch reports none on this one")
        if missing:
            item.add_marker(pytest.mark.skip(reason="needs " + " and ".join(missing)))
