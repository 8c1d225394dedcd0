"""Stable unCLIP, the second model family: a Stable Diffusion 2.1 latent UNet decoding a noise-augmented
CLIP image embedding (its class embedding), and a VAE.

Two diffusers layouts, loaded as published (safetensors only, no conversion):
  StableUnCLIPPipeline         text to image: prior_tokenizer, prior_text_encoder, prior, prior_scheduler
                               (Karlo's prior) make the image embedding
  StableUnCLIPImg2ImgPipeline  image variations: feature_extractor, image_encoder (CLIP's image tower)
and in both: image_normalizer, image_noising_scheduler, tokenizer, text_encoder, unet, scheduler, vae.

Presets build the same networks with seeded random weights (`sd-unclip-tiny` for tests; a layout is
chosen by `save_stable_unclip`, which writes a preset as the folder diffusers would).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unclip.engine.image_input import ImagePreprocess, from_clip_processor
from unclip.engine.sd_schedulers import SamplerConfig
from unclip.errors import UnclipError
from unclip.models.tokenizer import MAX_LENGTH, write_tokenizer

LAYOUTS = {"StableUnCLIPPipeline": "text", "StableUnCLIPImg2ImgPipeline": "image"}
COMMON = (
    "image_normalizer",
    "image_noising_scheduler",
    "tokenizer",
    "text_encoder",
    "unet",
    "scheduler",
    "vae",
)
BY_LAYOUT = {
    "text": ("prior_tokenizer", "prior_text_encoder", "prior", "prior_scheduler"),
    "image": ("feature_extractor", "image_encoder"),
}
WEIGHTED = ("prior_text_encoder", "prior", "text_encoder", "unet", "vae", "image_encoder", "image_normalizer")


@dataclass
class StableUnclipComponents:
    """A Stable unCLIP model: networks (diffusers/transformers classes), tokenizers and samplers."""

    layout: str  # "text" (StableUnCLIPPipeline) or "image" (StableUnCLIPImg2ImgPipeline)
    tokenizer: object
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    unet: torch.nn.Module  # diffusers UNet2DConditionModel, class_embed_type "projection"
    vae: torch.nn.Module  # diffusers AutoencoderKL
    scheduler: dict  # the UNet's scheduler_config.json (SamplerConfig.from_dict reads it)
    noising: SamplerConfig  # image_noising_scheduler: how noise_level noises the image embedding
    normalizer_mean: torch.Tensor  # image_normalizer: [1, embedding dim]
    normalizer_std: torch.Tensor
    prior_tokenizer: object | None = None
    prior_text_encoder: torch.nn.Module | None = None  # CLIPTextModelWithProjection
    prior: torch.nn.Module | None = None  # PriorTransformer
    prior_scheduler: SamplerConfig | None = None
    image_encoder: torch.nn.Module | None = None  # CLIPVisionModelWithProjection
    image_preprocess: ImagePreprocess | None = None
    name: str = "unnamed"
    extra: dict = field(default_factory=dict)

    def networks(self) -> dict[str, torch.nn.Module]:
        names = ("prior_text_encoder", "prior", "image_encoder", "text_encoder", "unet", "vae")
        return {n: net for n in names if (net := getattr(self, n)) is not None}


# preset name -> layout: text to image, and image variations. sd-unclip-l: the real shapes of
# diffusers/stable-diffusion-2-1-unclip-t2i-l (Karlo's ViT-L prior, SD 2.1's 768 px UNet, OpenCLIP-H text
# encoder, the SD VAE), random weights, for speed and FLOPs
STABLE_PRESETS = {"sd-unclip-tiny": "text", "sd-unclip-tiny-variation": "image", "sd-unclip-l": "text"}


def is_stable_unclip(model) -> bool:
    """A Stable unCLIP preset name, components, or a folder in one of its diffusers layouts."""
    if isinstance(model, StableUnclipComponents):
        return True
    if isinstance(model, (str, Path)) and not Path(model).exists():
        return str(model) in STABLE_PRESETS
    if not isinstance(model, (str, Path)):
        return False
    from unclip.export.stable_unclip_onnx import is_stable_artifact

    return is_stable_unclip_folder(Path(model)) or is_stable_artifact(model)


def is_stable_unclip_folder(folder: Path) -> bool:
    index = Path(folder) / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):  # not ours to judge: the Karlo loader says what is wrong
        return False
    return isinstance(name, str) and name in LAYOUTS


# -- presets -------------------------------------------------------------------------------------

TINY = dict(embed=32, unet_channels=(32, 64), latent=32, vae_channels=(32,))


def _configs(special: dict) -> dict:
    """Constructor arguments of each tiny network (the shapes of diffusers' own Stable unCLIP tests)."""
    e = TINY["embed"]
    text = dict(
        vocab_size=special["size"],
        hidden_size=e,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=e,
        bos_token_id=special["bos_token_id"],
        eos_token_id=special["eos_token_id"],
        pad_token_id=special["pad_token_id"],
    )
    return {
        "prior_text_encoder": text,
        "text_encoder": text,
        "prior": dict(
            num_attention_heads=2,
            attention_head_dim=12,
            embedding_dim=e,
            num_layers=1,
            num_embeddings=MAX_LENGTH,
            additional_embeddings=4,
        ),
        "image_encoder": dict(
            image_size=32,
            patch_size=4,
            num_channels=3,
            hidden_size=e,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=e,
        ),
        "unet": dict(
            sample_size=TINY["latent"],
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=TINY["unet_channels"],
            attention_head_dim=(2, 4),
            class_embed_type="projection",
            projection_class_embeddings_input_dim=2 * e,
            cross_attention_dim=e,
            layers_per_block=1,
            upcast_attention=True,
            use_linear_projection=True,
        ),
        "vae": dict(
            block_out_channels=TINY["vae_channels"],
            latent_channels=4,
            sample_size=TINY["latent"],
            norm_num_groups=32,
        ),
    }


SAMPLERS = {
    "scheduler": {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    },
    "prior_scheduler": {
        "_class_name": "DDPMScheduler",
        "beta_schedule": "squaredcos_cap_v2",
        "num_train_timesteps": 1000,
        "clip_sample": True,
        "clip_sample_range": 5.0,
        "prediction_type": "sample",
        "variance_type": "fixed_small_log",
    },
    "image_noising_scheduler": {
        "_class_name": "DDPMScheduler",
        "beta_schedule": "squaredcos_cap_v2",
        "num_train_timesteps": 1000,
    },
}


def _real_configs(special: dict) -> dict:
    """diffusers/stable-diffusion-2-1-unclip-t2i-l's shapes (the published configs' values)."""
    clip_l = dict(
        vocab_size=special["size"],
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=768,
        hidden_act="quick_gelu",
        bos_token_id=special["bos_token_id"],
        eos_token_id=special["eos_token_id"],
        pad_token_id=special["pad_token_id"],
    )
    open_clip_h = dict(
        clip_l,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        projection_dim=512,
        hidden_act="gelu",
    )
    return {
        "prior_text_encoder": clip_l,
        "text_encoder": open_clip_h,
        "prior": dict(
            num_attention_heads=32,
            attention_head_dim=64,
            embedding_dim=768,
            num_layers=20,
            num_embeddings=MAX_LENGTH,
            additional_embeddings=4,
        ),
        "unet": dict(
            sample_size=96,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            upcast_attention=True,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=1536,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215,
        ),
    }


def build_stable_preset(
    layout: str = "text", seed: int = 0, name: str = "sd-unclip-tiny", device: str | torch.device = "cpu"
) -> StableUnclipComponents:
    """A preset's networks with seeded random weights (same seed and device, same weights) in `layout`,
    built on `device` (the GPU suite builds sd-unclip-l on the GPU: seconds, not minutes)."""
    from diffusers import AutoencoderKL, PriorTransformer, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from unclip.engine.image_input import clip_preprocess
    from unclip.models.components import _fill_zero_parameters

    with tempfile.TemporaryDirectory() as tmp:
        special = write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    real = name == "sd-unclip-l"
    configs = _real_configs(special) if real else _configs(special)
    embed = 768 if real else TINY["embed"]
    nets = {}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        nets["text_encoder"] = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        nets["unet"] = UNet2DConditionModel.from_config(configs["unet"])
        nets["vae"] = AutoencoderKL.from_config(configs["vae"])
        nets["prior_text_encoder"] = CLIPTextModelWithProjection(
            CLIPTextConfig(**configs["prior_text_encoder"])
        )
        nets["prior"] = PriorTransformer.from_config(configs["prior"])
        if not real:  # tiny builds both layouts' networks: a seed gives the same weights in either
            nets["image_encoder"] = CLIPVisionModelWithProjection(
                CLIPVisionConfig(**configs["image_encoder"])
            )
        for net in nets.values():
            _fill_zero_parameters(net)  # the class-embedding projection, positional tables, CLIP stats
            net.eval().requires_grad_(False)
        mean = torch.randn(1, embed) * 0.1
        std = 1.0 + torch.rand(1, embed) * 0.5
    text = layout == "text"
    return StableUnclipComponents(
        layout=layout,
        tokenizer=tokenizer,
        text_encoder=nets["text_encoder"],
        unet=nets["unet"],
        vae=nets["vae"],
        scheduler=dict(SAMPLERS["scheduler"]),
        noising=SamplerConfig.from_dict(SAMPLERS["image_noising_scheduler"]),
        normalizer_mean=mean,
        normalizer_std=std,
        prior_tokenizer=tokenizer if text else None,
        prior_text_encoder=nets["prior_text_encoder"] if text else None,
        prior=nets["prior"] if text else None,
        prior_scheduler=SamplerConfig.from_dict(SAMPLERS["prior_scheduler"]) if text else None,
        image_encoder=None if text else nets["image_encoder"],
        image_preprocess=None if text else clip_preprocess(32),
        name=name,
    )


def load_stable_components(
    model, seed: int = 0, device: str | torch.device = "cpu"
) -> StableUnclipComponents:
    """Components as given, a preset's (random weights from `seed`, built on `device`), or a folder's."""
    if isinstance(model, StableUnclipComponents):
        return model
    if str(model) in STABLE_PRESETS and not Path(model).exists():
        return build_stable_preset(STABLE_PRESETS[str(model)], seed=seed, name=str(model), device=device)
    return load_stable_unclip(model)


def diffusers_pipeline(c: StableUnclipComponents):
    """diffusers' own pipeline over these networks: the parity baseline, and how a folder is written."""
    import diffusers
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    normalizer = StableUnCLIPImageNormalizer(embedding_dim=c.normalizer_mean.shape[-1])
    with torch.no_grad():
        normalizer.mean.copy_(c.normalizer_mean)
        normalizer.std.copy_(c.normalizer_std)

    def sampler(config: dict | SamplerConfig):
        data = config if isinstance(config, dict) else _sampler_dict(config)
        return getattr(diffusers, data["_class_name"]).from_config(data)

    common = dict(
        image_normalizer=normalizer,
        image_noising_scheduler=sampler(c.noising),
        tokenizer=c.tokenizer,
        text_encoder=c.text_encoder,
        unet=c.unet,
        scheduler=sampler(c.scheduler),
        vae=c.vae,
    )
    if c.layout == "text":
        return diffusers.StableUnCLIPPipeline(
            prior_tokenizer=c.prior_tokenizer,
            prior_text_encoder=c.prior_text_encoder,
            prior=c.prior,
            prior_scheduler=sampler(c.prior_scheduler),
            **common,
        )
    from transformers import CLIPImageProcessor

    p = c.image_preprocess
    processor = CLIPImageProcessor(
        size={"shortest_edge": p.size},
        crop_size={"height": p.crop, "width": p.crop},
        image_mean=list(p.mean),
        image_std=list(p.std),
    )
    return diffusers.StableUnCLIPImg2ImgPipeline(
        feature_extractor=processor, image_encoder=c.image_encoder, **common
    )


def _sampler_dict(config: SamplerConfig) -> dict:
    from dataclasses import asdict

    from unclip.engine.sd_schedulers import NAMES

    data = {k: v for k, v in asdict(config).items() if k not in ("kind", "extra")}
    return {"_class_name": NAMES[config.kind], **config.extra, **data}


def save_stable_unclip(c: StableUnclipComponents, folder: str | Path) -> Path:
    """The model as diffusers writes it (save_pretrained, safetensors): a folder `load_stable_unclip`
    and diffusers' from_pretrained both read."""
    folder = Path(folder)
    diffusers_pipeline(c).save_pretrained(folder, safe_serialization=True)
    return folder


def load_stable_unclip(folder: str | Path) -> StableUnclipComponents:
    """A Stable unCLIP folder in either diffusers layout, component by component."""
    import diffusers
    import transformers

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    layout = LAYOUTS[index["_class_name"]]
    wanted = COMMON + BY_LAYOUT[layout]
    missing = [n for n in wanted if not (folder / n).is_dir()]
    if missing:
        raise UnclipError(
            f"{folder} is a {index['_class_name']} folder without {', '.join(missing)}; "
            "download the whole model folder"
        )
    for name in WEIGHTED:
        sub = folder / name
        if name in wanted and not any(sub.glob("*.safetensors")):
            raise UnclipError(
                f"{sub} has no .safetensors weights (unclip loads no pickle weights for Stable "
                "unCLIP); download the safetensors files of this model"
            )

    def load(name: str):
        library, cls = index[name]
        module = transformers if library == "transformers" else diffusers
        if name == "image_normalizer":  # diffusers keeps it with the pipeline ("stable_diffusion")
            from diffusers.pipelines.stable_diffusion import stable_unclip_image_normalizer as module
        kwargs = (
            {} if name in ("tokenizer", "prior_tokenizer", "feature_extractor") else {"use_safetensors": True}
        )
        try:
            return getattr(module, cls).from_pretrained(folder / name, **kwargs)
        except Exception as exc:  # noqa: BLE001 - each library raises its own types
            raise UnclipError(
                f"{folder / name} cannot be loaded as {cls} ({str(exc).splitlines()[0]})"
            ) from None

    def sampler(name: str) -> SamplerConfig:
        files = list((folder / name).glob("*.json"))
        return SamplerConfig.from_dict(json.loads(files[0].read_text()))

    from transformers.utils import logging as transformers_logging

    bar = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its "Loading weights" bars are not ours to show
    try:
        return _load_parts(folder, index, layout, load, sampler)
    finally:
        if bar:
            transformers_logging.enable_progress_bar()


def _load_parts(folder: Path, index: dict, layout: str, load, sampler) -> StableUnclipComponents:
    normalizer = load("image_normalizer")
    scheduler_file = next((folder / "scheduler").glob("*.json"))
    nets = {n: load(n).eval().requires_grad_(False) for n in ("text_encoder", "unet", "vae")}
    parts = dict(
        layout=layout,
        tokenizer=load("tokenizer"),
        scheduler=json.loads(scheduler_file.read_text()),
        noising=sampler("image_noising_scheduler"),
        normalizer_mean=normalizer.mean.detach(),
        normalizer_std=normalizer.std.detach(),
        name=folder.name,
        extra={"folder": str(folder)},
        **nets,
    )
    if layout == "text":
        parts.update(
            prior_tokenizer=load("prior_tokenizer"),
            prior_text_encoder=load("prior_text_encoder").eval().requires_grad_(False),
            prior=load("prior").eval().requires_grad_(False),
            prior_scheduler=sampler("prior_scheduler"),
        )
    else:
        config = json.loads(next((folder / "feature_extractor").glob("*.json")).read_text())
        fix = "re-download the model's feature_extractor folder"
        parts.update(
            image_encoder=load("image_encoder").eval().requires_grad_(False),
            image_preprocess=from_clip_processor(config, str(folder / "feature_extractor"), fix),
        )
    return StableUnclipComponents(**parts)
