"""The networks of one unCLIP model and how a preset builds them with random weights."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unclip.engine.image_input import ImagePreprocess, clip_preprocess
from unclip.engine.scheduler import SchedulerConfig
from unclip.models.presets import Preset, get_preset
from unclip.models.tokenizer import MAX_LENGTH, write_tokenizer

# UnCLIPPipeline's networks
NETWORKS = ("text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last")
# Every network a model may have, in the order data flows (the spec table's order); a model has the
# image encoder only if it ships CLIP's image tower, and a variation-only checkpoint has no prior.
ALL_NETWORKS = ("text_encoder", "image_encoder", "prior", "text_proj", "decoder", "super_res_first",
                "super_res_last")
SCHEDULERS = ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")

# Karlo's scheduler settings (prior predicts x0 with a wider clip range; decoder learns its variance).
PRESET_SCHEDULERS = {
    "prior_scheduler": SchedulerConfig(variance_type="fixed_small_log", prediction_type="sample",
                                       clip_sample_range=5.0),
    "decoder_scheduler": SchedulerConfig(variance_type="learned_range", prediction_type="epsilon"),
    "super_res_scheduler": SchedulerConfig(variance_type="fixed_small_log", prediction_type="epsilon"),
}


@dataclass
class UnclipComponents:
    """Everything a pipeline needs: tokenizer, networks (diffusers/transformers classes), schedulers."""

    tokenizer: object  # transformers.CLIPTokenizer
    text_encoder: torch.nn.Module
    prior: torch.nn.Module | None  # None: a variation-only checkpoint (UnCLIPImageVariationPipeline)
    text_proj: torch.nn.Module
    decoder: torch.nn.Module
    super_res_first: torch.nn.Module
    super_res_last: torch.nn.Module
    schedulers: dict[str, SchedulerConfig]
    name: str = "unnamed"
    extra: dict = field(default_factory=dict)  # e.g. the source folder
    sampler_defaults: dict = field(default_factory=dict)  # sampler_defaults.json (engine.pipeline)
    image_encoder: torch.nn.Module | None = None  # transformers.CLIPVisionModelWithProjection
    image_preprocess: ImagePreprocess | None = None  # with the image encoder: how images reach it

    def networks(self) -> dict[str, torch.nn.Module]:
        """The networks this model has, in the order data flows."""
        return {name: net for name in ALL_NETWORKS if (net := getattr(self, name)) is not None}

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in net.parameters()) for name, net in self.networks().items()}


def network_configs(preset: Preset, special_tokens: dict[str, int]) -> dict[str, dict]:
    """Constructor arguments of each network class, in the keys diffusers/transformers use."""
    p = preset
    image = {} if p.image_size is None else {"image_encoder": dict(
        image_size=p.image_size, patch_size=p.image_patch, num_channels=3, hidden_size=p.clip_dim,
        intermediate_size=4 * p.clip_dim, num_hidden_layers=p.image_layers, num_attention_heads=p.image_heads,
        projection_dim=p.clip_dim, hidden_act="quick_gelu")}
    down = ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (len(p.decoder_channels) - 1)
    up = ["SimpleCrossAttnUpBlock2D"] * (len(p.decoder_channels) - 1) + ["ResnetUpsampleBlock2D"]
    super_res = dict(
        sample_size=p.super_res_size, layers_per_block=p.super_res_layers,
        down_block_types=["ResnetDownsampleBlock2D"] * len(p.super_res_channels),
        up_block_types=["ResnetUpsampleBlock2D"] * len(p.super_res_channels),
        block_out_channels=list(p.super_res_channels), in_channels=6, out_channels=3,
        add_attention=False,
    )
    return {
        "text_encoder": dict(
            vocab_size=p.text_vocab, hidden_size=p.clip_dim, intermediate_size=4 * p.clip_dim,
            num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
            max_position_embeddings=MAX_LENGTH, projection_dim=p.clip_dim, hidden_act="quick_gelu",
            bos_token_id=special_tokens["bos_token_id"], eos_token_id=special_tokens["eos_token_id"],
            pad_token_id=special_tokens["pad_token_id"],
        ),
        "prior": dict(
            num_attention_heads=p.prior_heads, attention_head_dim=p.prior_head_dim,
            num_layers=p.prior_layers, embedding_dim=p.clip_dim, num_embeddings=MAX_LENGTH,
            additional_embeddings=4,
        ),
        "text_proj": dict(
            clip_extra_context_tokens=4, clip_embeddings_dim=p.clip_dim,
            time_embed_dim=4 * p.decoder_channels[0], cross_attention_dim=p.decoder_cross_dim,
        ),
        "decoder": dict(
            sample_size=p.decoder_size, layers_per_block=p.decoder_layers,
            down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            block_out_channels=list(p.decoder_channels), in_channels=3, out_channels=6,
            cross_attention_dim=p.decoder_cross_dim, class_embed_type="identity",
            attention_head_dim=p.decoder_head_dim, resnet_time_scale_shift="scale_shift",
        ),
        "super_res_first": super_res,
        "super_res_last": dict(super_res),
        **image,
    }


def network_classes() -> dict[str, type]:
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    return {
        "text_encoder": CLIPTextModelWithProjection, "image_encoder": CLIPVisionModelWithProjection,
        "prior": PriorTransformer,
        "text_proj": UnCLIPTextProjModel, "decoder": UNet2DConditionModel,
        "super_res_first": UNet2DModel, "super_res_last": UNet2DModel,
    }


def build_network(name: str, config: dict) -> torch.nn.Module:
    cls = network_classes()[name]
    if name == "text_encoder":
        from transformers import CLIPTextConfig

        return cls(CLIPTextConfig(**config))
    if name == "image_encoder":
        from transformers import CLIPVisionConfig

        return cls(CLIPVisionConfig(**config))
    return cls.from_config(config)


def _fill_zero_parameters(net: torch.nn.Module) -> None:
    """Zero-initialised tensors (positional tables, CFG embedding, CLIP stats) would hide whole
    code paths from tests; give them small random values (clip_std must stay positive)."""
    with torch.no_grad():
        for name, param in net.named_parameters():
            if torch.count_nonzero(param) == 0:
                param.normal_(0.0, 0.02)
                if name == "clip_std":
                    param.add_(1.0)


def build_preset(name: str, seed: int = 0, device: str | torch.device = "cpu") -> UnclipComponents:
    """A preset's networks with seeded random weights (same seed, same weights)."""
    from transformers import CLIPTokenizer

    preset = get_preset(name)
    with tempfile.TemporaryDirectory() as tmp:
        special = write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    configs = network_configs(preset, special)
    networks = {}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        # the image encoder last: adding it to a preset leaves the other networks' weights as they were
        for net_name in [*NETWORKS, *(["image_encoder"] if "image_encoder" in configs else [])]:
            net = build_network(net_name, configs[net_name])
            if device != "meta":
                _fill_zero_parameters(net)
            networks[net_name] = net.eval().requires_grad_(False)
    image_preprocess = None if preset.image_size is None else clip_preprocess(preset.image_size)
    return UnclipComponents(tokenizer=tokenizer, schedulers=dict(PRESET_SCHEDULERS),
                            name=name, image_preprocess=image_preprocess, **networks)
