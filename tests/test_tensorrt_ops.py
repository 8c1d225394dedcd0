"""TensorRT's ONNX parser must accept every operator of a karlo export.

Exporting karlo at full size (3.5 B parameters) is too heavy for CI, so this exports a karlo-like
model: karlo's preset with every width, depth and vocabulary reduced but every structural choice
kept (4-level decoder of ResnetDownsample + SimpleCrossAttn blocks with 3 resnets each, its
UNetMidBlock2DSimpleCrossAttn, scale-shift time embedding, 4-level super-res UNets with 3 resnets
each, 64 px decoder). Operator types depend on the block types, not on their sizes; the first test
proves the reduced model has exactly karlo's block types (karlo built on the meta device, no
memory), the second exports it in fp16 (what TensorRT builds) and checks its operators.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.onnx_artifacts import exported

KARLO_REDUCED = dict(clip_dim=64, text_layers=2, text_heads=2, text_vocab=1024, prior_layers=2, prior_heads=2,
                     prior_head_dim=32, decoder_channels=(32, 64, 96, 128), decoder_head_dim=32,
                     decoder_cross_dim=128, super_res_channels=(32, 64, 96, 128), super_res_size=128)


@pytest.fixture
def karlo_reduced(monkeypatch):
    from unclip.models.presets import PRESETS

    monkeypatch.setitem(PRESETS, "karlo_reduced", dataclasses.replace(PRESETS["karlo"], **KARLO_REDUCED))
    return "karlo_reduced"


def block_types(components) -> dict[str, set[str]]:
    """Module classes of each network, plus the attention processor each Attention module uses."""
    out = {}
    for name, net in components.networks().items():
        types = {type(m).__name__ for m in net.modules()}
        types |= {f"processor:{type(m.processor).__name__}" for m in net.modules() if hasattr(m, "processor")}
        out[name] = types
    return out


def test_reduced_karlo_has_karlos_block_types(karlo_reduced):
    from unclip.models.components import build_preset

    karlo = block_types(build_preset("karlo", device="meta"))
    reduced = block_types(build_preset(karlo_reduced))
    assert reduced == karlo
    assert "SimpleCrossAttnDownBlock2D" in karlo["decoder"]  # the comparison is not vacuous


@pytest.mark.slow
def test_reduced_karlo_fp16_operators_parse_in_tensorrt(karlo_reduced, tmp_path_factory):
    import json

    # the operators are the point here, not accuracy: validated at batch 1 only
    folder = exported(tmp_path_factory, karlo_reduced, "fp16", batch_sizes=(1,))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["networks"]) == 6
    for name, entry in manifest["networks"].items():
        assert entry["tensorrt_unsupported_ops"] == [], name
        assert "Cast" in entry["operators"], name  # the fp16 variant, with its fp32 islands
