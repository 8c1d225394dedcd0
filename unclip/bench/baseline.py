"""The baseline: diffusers' UnCLIPPipeline, eager PyTorch, over the very networks we loaded.

Forward hooks on its six networks feed the same `CallTimeline` our backends feed, so its
stages and per-network times are measured by the same rule.
"""

from __future__ import annotations

import torch

from unclip.engine.profiling import CallTimeline
from unclip.models.components import NETWORKS, UnclipComponents


def diffusers_pipeline(components: UnclipComponents, device: str):
    from diffusers import UnCLIPPipeline, UnCLIPScheduler

    def scheduler(name: str) -> UnCLIPScheduler:
        config = components.schedulers[name].to_dict()
        config.pop("_class_name")
        return UnCLIPScheduler(**config)

    c = components
    pipe = UnCLIPPipeline(
        prior=c.prior,
        decoder=c.decoder,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        text_proj=c.text_proj,
        super_res_first=c.super_res_first,
        super_res_last=c.super_res_last,
        prior_scheduler=scheduler("prior_scheduler"),
        decoder_scheduler=scheduler("decoder_scheduler"),
        super_res_scheduler=scheduler("super_res_scheduler"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _rows(args: tuple, kwargs: dict) -> int:
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0]
    return max(t.shape[0] for t in tensors)


def attach_timeline(pipe, timeline: CallTimeline) -> None:
    """Record every call of the pipeline's networks (they are called as modules, so hooks see all)."""
    for name in NETWORKS:
        _hook(getattr(pipe, name), name, timeline)


def _hook(module: torch.nn.Module, name: str, timeline: CallTimeline) -> None:
    """Each forward of `module` becomes one call `name` on the timeline."""

    def before(_module, args, kwargs):
        timeline.begin(name, _rows(args, kwargs))

    def after(_module, _args, _kwargs, _output):
        timeline.end()

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True)


STABLE_HOOKS = {
    "prior_text_encoder": "prior_text_encoder",
    "prior": "prior",
    "image_encoder": "image_encoder",
    "text_encoder": "text_encoder",
    "unet": "unet",
    "vae_decoder": "vae",
}


def attach_stable_timeline(pipe, timeline: CallTimeline) -> None:
    """diffusers' Stable unCLIP pipelines: the same hooks, on the networks it has; its VAE is called by
    `decode` (a method, not forward), so the VAE's hooks sit on `vae.decoder` and `post_quant_conv` runs
    just outside (a 1x1 convolution)."""
    for name, attribute in STABLE_HOOKS.items():
        module = getattr(pipe, attribute, None)
        if module is None:
            continue
        _hook(module.decoder if name == "vae_decoder" else module, name, timeline)


def generate_stable(pipe, prompts: list[str], seed: int, settings: dict):
    """The request our StableUnclipPipeline.generate gets, in diffusers' argument names."""
    return pipe(
        prompt=prompts,
        num_images_per_prompt=1,
        prior_num_inference_steps=settings["prior_steps"],
        num_inference_steps=settings["decoder_steps"],
        prior_guidance_scale=settings["prior_guidance"],
        guidance_scale=settings["decoder_guidance"],
        noise_level=settings.get("noise_level", 0),
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
    ).images


def generate(pipe, prompts: list[str], seed: int, settings: dict):
    """The same request our Pipeline.generate gets, in diffusers' argument names."""
    return pipe(
        prompts,
        num_images_per_prompt=1,
        prior_num_inference_steps=settings["prior_steps"],
        decoder_num_inference_steps=settings["decoder_steps"],
        super_res_num_inference_steps=settings["super_res_steps"],
        prior_guidance_scale=settings["prior_guidance"],
        decoder_guidance_scale=settings["decoder_guidance"],
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
    ).images
