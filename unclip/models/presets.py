"""Architecture presets: named shapes of the unCLIP networks, built with seeded random weights.

Speed does not depend on weight values, so benchmarks run on real shapes without downloads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A handful of numbers that fix every network's shape."""

    clip_dim: int  # CLIP embedding size; also the text encoder width (the prior reads both)
    text_layers: int
    text_heads: int
    text_vocab: int  # rows of the token embedding table (>= the tokenizer's size)
    prior_layers: int
    prior_heads: int
    prior_head_dim: int
    decoder_channels: tuple[int, ...]
    decoder_layers: int  # resnets per UNet block
    decoder_head_dim: int
    decoder_cross_dim: int
    decoder_size: int  # base image side
    super_res_channels: tuple[int, ...]
    super_res_layers: int
    super_res_size: int
    # CLIP's image tower (variations, interpolations, text diffs); None: the model ships none
    image_size: int | None = None
    image_patch: int = 4
    image_layers: int = 1
    image_heads: int = 2


PRESETS: dict[str, Preset] = {
    # For tests: the whole pipeline in well under a second on CPU.
    "tiny": Preset(
        clip_dim=32, text_layers=2, text_heads=2, text_vocab=1024,
        prior_layers=2, prior_heads=2, prior_head_dim=16,
        decoder_channels=(32, 64), decoder_layers=1, decoder_head_dim=16, decoder_cross_dim=32,
        decoder_size=16,
        super_res_channels=(32, 32), super_res_layers=1, super_res_size=32,
        image_size=16,
    ),
    # For CPU benchmarks: a few seconds per image on 2 cores at reduced steps.
    "small": Preset(
        clip_dim=256, text_layers=4, text_heads=4, text_vocab=1024,
        prior_layers=4, prior_heads=4, prior_head_dim=64,
        decoder_channels=(64, 128, 192, 256), decoder_layers=2, decoder_head_dim=32,
        decoder_cross_dim=256, decoder_size=64,
        super_res_channels=(32, 64, 96, 128), super_res_layers=1, super_res_size=128,
    ),
    # Kakao Brain Karlo v1 alpha: CLIP ViT-L/14 text tower, 20-layer prior, 64px decoder, 64->256 SR.
    "karlo": Preset(
        clip_dim=768, text_layers=12, text_heads=12, text_vocab=49408,
        prior_layers=20, prior_heads=32, prior_head_dim=64,
        decoder_channels=(320, 640, 960, 1280), decoder_layers=3, decoder_head_dim=64,
        decoder_cross_dim=1536, decoder_size=64,
        super_res_channels=(320, 640, 960, 1280), super_res_layers=3, super_res_size=256,
    ),
}


def get_preset(name: str) -> Preset:
    from unclip.errors import UnclipError

    if name not in PRESETS:
        raise UnclipError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
