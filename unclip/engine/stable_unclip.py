"""The Stable unCLIP runtime: text to image (Karlo's prior -> noise-augmented image embedding -> latent
UNet -> VAE) and image variations (CLIP image encoder -> the same), through the backend protocol.

Seeds mean what they mean in diffusers: one generator per call, drawn in diffusers' order (prior
latents, each prior step's noise, the image embedding's noise, the UNet's latents), so the same seed
gives diffusers' image (tests/test_stable_unclip.py). The UNet's sampler is the checkpoint's or the
one `scheduler` names (pndm, ddim, dpm++: unclip.engine.sd_schedulers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from unclip.engine.batch import send_preview, take_rows
from unclip.engine.sd_schedulers import KINDS, NAMES, SamplerConfig, Solver, add_noise
from unclip.engine.settings import Limits
from unclip.errors import UnclipError
from unclip.specs import NetworkSpec, TensorSpec

SCHEDULERS = tuple(NAMES)  # what --scheduler may name
DEFAULTS = dict(
    num_images=1,
    prior_steps=25,
    prior_guidance=4.0,
    decoder_steps=20,
    decoder_guidance=10.0,
    noise_level=0,
    scheduler=None,
)  # diffusers' StableUnCLIP defaults


@dataclass(frozen=True)
class StableDims:
    embed_dim: int  # the CLIP image embedding the UNet is conditioned on
    text_len: int
    text_vocab: int  # token ids below this are valid for both tokenizers (export's example inputs)
    text_dim: int  # the UNet text encoder's width (its cross-attention input)
    latent_channels: int
    latent_size: int
    image_size: int  # the VAE's output side
    prior_text_dim: int | None  # None: no prior (the image-variation layout)
    image_input: int | None  # the image encoder's input side; None: no image encoder


def _t(name: str, dtype: str, *shape) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def stable_specs(d: StableDims) -> dict[str, NetworkSpec]:
    """The networks of this family, named tensors as for Karlo's (unclip.specs)."""
    seq, c, s = d.text_len, d.latent_channels, d.latent_size
    specs = []
    if d.prior_text_dim is not None:
        specs += [
            NetworkSpec(
                "prior_text_encoder",
                (_t("input_ids", "int64", "batch", seq),),
                (
                    _t("text_embeds", "float32", "batch", d.embed_dim),
                    _t("text_hidden", "float32", "batch", seq, d.prior_text_dim),
                ),
            ),
            NetworkSpec(
                "prior",
                (
                    _t("sample", "float32", "batch", d.embed_dim),
                    _t("timestep", "float32", "batch"),
                    _t("text_embeds", "float32", "batch", d.embed_dim),
                    _t("text_hidden", "float32", "batch", seq, d.prior_text_dim),
                    _t("text_mask", "bool", "batch", seq),
                ),
                (_t("predicted_image_embedding", "float32", "batch", d.embed_dim),),
            ),
        ]
    if d.image_input is not None:
        specs.append(
            NetworkSpec(
                "image_encoder",
                (_t("pixel_values", "float32", "batch", 3, d.image_input, d.image_input),),
                (_t("image_embeds", "float32", "batch", d.embed_dim),),
            )
        )
    specs += [
        NetworkSpec(
            "text_encoder",
            (_t("input_ids", "int64", "batch", seq),),
            (_t("text_hidden", "float32", "batch", seq, d.text_dim),),
        ),
        NetworkSpec(
            "unet",
            (
                _t("sample", "float32", "batch", c, s, s),
                _t("timestep", "float32", "batch"),
                _t("text_hidden", "float32", "batch", seq, d.text_dim),
                _t("class_labels", "float32", "batch", 2 * d.embed_dim),
            ),
            (_t("model_output", "float32", "batch", c, s, s),),
        ),
        NetworkSpec(
            "vae_decoder",
            (_t("latents", "float32", "batch", c, s, s),),
            (_t("image", "float32", "batch", 3, d.image_size, d.image_size),),
        ),
    ]
    return {spec.name: spec for spec in specs}


class TextHidden(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, input_ids):
        return self.net(input_ids)[0]


class LatentUNet(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, sample, timestep, text_hidden, class_labels):
        return self.net(sample, timestep, encoder_hidden_states=text_hidden, class_labels=class_labels).sample


class VaeDecoder(nn.Module):
    """Latents in the UNet's scale to an image in [-1, 1] (the scaling divide is diffusers')."""

    def __init__(self, vae):
        super().__init__()
        self.net = vae

    def forward(self, latents):
        return self.net.decode(latents / self.net.config.scaling_factor).sample


def stable_dims(c) -> StableDims:
    vae_scale = 2 ** (len(c.vae.config.block_out_channels) - 1)
    return StableDims(
        embed_dim=c.normalizer_mean.shape[-1],
        text_len=c.tokenizer.model_max_length,
        text_vocab=min(
            c.text_encoder.config.vocab_size,
            c.text_encoder.config.vocab_size if c.prior is None else c.prior_text_encoder.config.vocab_size,
        ),
        text_dim=c.text_encoder.config.hidden_size,
        latent_channels=c.unet.config.in_channels,
        latent_size=c.unet.config.sample_size,
        image_size=c.unet.config.sample_size * vae_scale,
        prior_text_dim=None if c.prior is None else c.prior_text_encoder.config.hidden_size,
        image_input=None if c.image_encoder is None else c.image_encoder.config.image_size,
    )


class StableTorchBackend:
    """The networks of StableUnclipComponents in torch, run by name (the Backend protocol)."""

    name = "torch"

    def __init__(self, components, device: str | torch.device = "cpu"):
        from unclip.models.networks import ImageEncoder, Prior, TextEncoder

        self.device = torch.device(device)
        self.dims = stable_dims(components)
        self.specs = stable_specs(self.dims)
        wrap = {
            "prior_text_encoder": TextEncoder,
            "prior": Prior,
            "image_encoder": ImageEncoder,
            "text_encoder": TextHidden,
            "unet": LatentUNet,
            "vae": VaeDecoder,
        }
        self.networks = {
            ("vae_decoder" if n == "vae" else n): wrap[n](net).to(self.device)
            for n, net in components.networks().items()
        }
        prior = components.prior
        self._constants = (
            {}
            if prior is None
            else {
                "clip_mean": prior.clip_mean.detach().to(self.device),
                "clip_std": prior.clip_std.detach().to(self.device),
            }
        )

    def run(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.specs[network]
        with torch.inference_mode():
            out = self.networks[network](*(inputs[name] for name in spec.input_names))
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(spec.output_names, out, strict=True))

    def constants(self) -> dict[str, torch.Tensor]:
        return self._constants


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the noise level (diffusers' get_timestep_embedding with
    flip_sin_to_cos=True, downscale_freq_shift=0, scale 1, max_period 10000)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(
        start=0, end=half, dtype=torch.float32, device=timesteps.device
    )
    emb = torch.exp(exponent / half)
    emb = timesteps[:, None].float() * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


class StableUnclipPipeline:
    """generate (text layout) and vary (image layout) with diffusers' settings and seeds."""

    family = "stable-unclip"

    def __init__(self, backend, components):
        self.backend = backend
        self.device = backend.device
        self.dims = backend.dims
        self.layout = components.layout
        self.tokenizer = components.tokenizer
        self.prior_tokenizer = components.prior_tokenizer
        self.scheduler = components.scheduler  # the checkpoint's config (dict)
        self.prior_scheduler = components.prior_scheduler
        self.noising = components.noising
        self.mean = components.normalizer_mean.to(self.device)
        self.std = components.normalizer_std.to(self.device)
        self.image_preprocess = components.image_preprocess
        self.model_name = components.name
        self.limits = Limits()  # unclip.load(limits=...) and the server set theirs

    # -- settings --------------------------------------------------------------------------------

    def check(self, s: dict) -> dict:
        """Settings merged over the defaults, each checked with a one-line error naming it."""
        unknown = sorted(set(s) - set(DEFAULTS))
        if unknown:
            raise UnclipError(
                f"unknown setting {unknown[0]!r} for Stable unCLIP; known: {', '.join(DEFAULTS)}",
                param=unknown[0],
            )
        s = {**DEFAULTS, **s}
        levels = self.noising.num_train_timesteps
        level = s["noise_level"]
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < levels:
            raise UnclipError(
                f"noise_level must be an integer from 0 to {levels - 1} (a timestep of the image "
                f"embedding's noising schedule; 0: no noise), got {level!r}",
                param="noise_level",
            )
        for name in ("num_images", "prior_steps", "decoder_steps"):
            v = s[name]
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1000:
                raise UnclipError(f"{name} must be an integer from 1 to 1000, got {v!r}", param=name)
        for name in ("prior_guidance", "decoder_guidance"):
            v = s[name]
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or not 0 <= v <= 100
            ):
                raise UnclipError(
                    f"{name} must be a number from 0 to 100 (above 1: classifier-free guidance), got {v!r}",
                    param=name,
                )
        # the caller's limits (unclip.Limits)
        for name in ("prior_steps", "decoder_steps"):
            if s[name] > self.limits.max_steps:
                raise UnclipError(
                    f"{name} {s[name]} is above the limit of {self.limits.max_steps} steps "
                    "(Limits.max_steps)",
                    param=name,
                )
        for name in ("prior_guidance", "decoder_guidance"):
            if s[name] > self.limits.max_guidance:
                raise UnclipError(
                    f"{name} {s[name]} is above the limit of {self.limits.max_guidance} "
                    "(Limits.max_guidance)",
                    param=name,
                )
        if s["num_images"] > self.limits.max_images:
            raise UnclipError(
                f"num_images {s['num_images']} is above the limit of {self.limits.max_images} "
                "images per call (Limits.max_images)",
                param="num_images",
            )
        if s["scheduler"] is not None and s["scheduler"] not in SCHEDULERS:
            raise UnclipError(
                f"scheduler must be one of {', '.join(SCHEDULERS)} (or left out: the checkpoint's "
                f"{KINDS.get(self.scheduler.get('_class_name'), '?')}), got {s['scheduler']!r}",
                param="scheduler",
            )
        return s

    def settings(self, **given) -> StableSettings:
        """The checked settings of one request (the serving engine's batch key is built from them)."""
        return StableSettings(**self.check(given))

    image_settings = settings  # variations take the same settings (the prior's are unused)

    @property
    def defaults(self) -> StableSettings:
        """What a request gets for the settings it leaves out (the server's /v1/unclip/info)."""
        return self.settings()

    image_defaults = defaults

    def check_prior(self, s) -> None:
        """Every Stable unCLIP text request runs the prior (no prior-free mode)."""

    @property
    def has_prior(self) -> bool:
        return self.layout == "text"

    @property
    def output_size(self) -> int:
        return self.dims.image_size

    # -- entry points ---------------------------------------------------------------------------

    def generate(
        self,
        prompts,
        *,
        seed: int = 0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        partial_images: int = 0,
        on_partial=None,
        **settings,
    ):
        """Images for `prompts` (prompt-major, `num_images` each): the prior's image embedding, noised
        at `noise_level`, decoded by the latent UNet and the VAE. Streaming: `on_partial(index, images)`
        gets up to `partial_images` (0-3) previews, each the UNet's clean-latent estimate at an even
        fraction of the loop through the VAE (images as "pt"); the final images are the same either way."""
        from unclip.engine.batch import Request, check_partial_images

        if self.layout != "text":
            raise UnclipError(
                f"model {self.model_name} is an image-variation Stable unCLIP "
                "(StableUnCLIPImg2ImgPipeline): it makes images from images (vary); for text, "
                "load a StableUnCLIPPipeline folder",
                param="prompt",
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_partial_images(partial_images, on_partial)
        request = Request(
            prompts,
            self.settings(**settings),
            generator or torch.Generator().manual_seed(seed),
            partial_images=partial_images,
            on_partial=on_partial,
        )
        return _convert(self.generate_requests([request])[0], output_type)

    def vary(
        self,
        images,
        *,
        seed: int = 0,
        generator: torch.Generator | None = None,
        prompt: str = "",
        output_type: str = "pil",
        partial_images: int = 0,
        on_partial=None,
        **settings,
    ):
        """`num_images` variations of each image: its CLIP image embedding, noised at `noise_level`,
        decoded with new noise (and `prompt`, "" by default, as diffusers has it). Streaming as `generate`."""
        from unclip.engine.batch import Request, check_partial_images
        from unclip.engine.image_input import load_image, pixel_values

        if self.layout != "image":
            raise UnclipError(
                f"model {self.model_name} is a text-to-image Stable unCLIP (StableUnCLIPPipeline) "
                "with no image encoder; for variations, load a StableUnCLIPImg2ImgPipeline folder",
                param="image",
            )
        check_partial_images(partial_images, on_partial)
        images = images if isinstance(images, list) else [images]
        pixels = pixel_values(
            [load_image(im, self.limits.max_image_pixels) for im in images], self.image_preprocess
        )
        request = Request(
            [prompt] * len(images),
            self.settings(**settings),
            generator or torch.Generator().manual_seed(seed),
            pixel_values=pixels,
            partial_images=partial_images,
            on_partial=on_partial,
        )
        return _convert(self.generate_requests([request])[0], output_type)

    def generate_requests(self, requests: list, on_step=None) -> list[torch.Tensor | None]:
        """Requests sharing settings but the image count (the serving engine's batches), each with its
        own generator, run as one batch: per request, images [rows, 3, H, W] in [0, 1] on the CPU, or
        None where it was cancelled. Each request's draws come from its generator in diffusers' order,
        so batched images are those of the request alone. A request whose `cancelled()` turns true
        leaves before the next network call (its rows leave every tensor and the sampler's history);
        a streamed one gets its previews (`partial_images`) from the UNet loop."""
        from unclip.engine.batch import Batch

        batch = Batch(requests)
        s = vars(batch.settings)
        with torch.inference_mode():
            if batch.image_conditioned:
                pixels = torch.cat([r.pixel_values for r in requests]).to(self.device)
                embeds = self.backend.run("image_encoder", pixel_values=pixels)["image_embeds"]
                # one noise draw per image, then repeated for its images
                embeds = self._noise_embeds(embeds, s["noise_level"], batch, per_image=True)
                embeds = embeds.repeat_interleave(_repeats(batch, self.device), dim=0)
            else:
                embeds = self._prior(batch, s, on_step)
                if not batch.active:
                    return batch.split(None)
                embeds = self._noise_embeds(embeds, s["noise_level"], batch)
            images = self._decode(batch, embeds, s, on_step)
        if not batch.active:
            return batch.split(None)
        return batch.split(images.cpu())

    # -- stages ---------------------------------------------------------------------------------

    def _tokens(self, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        t = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return t.input_ids.to(self.device), t.attention_mask.bool().to(self.device)

    def _draw(self, batch, tail: tuple, per_image: bool = False) -> torch.Tensor:
        """One draw per running request from its generator: a row per image (per input image with
        `per_image`), on the generator's device, then moved (diffusers' randn_tensor)."""
        requests = [batch.requests[i] for i in batch.active]
        return torch.cat(
            [
                torch.randn(
                    (len(r.prompts) if per_image else r.rows, *tail),
                    generator=r.generator,
                    device=r.generator.device,
                ).to(self.device)
                for r in requests
            ]
        )

    def _prior(self, batch, s: dict, on_step) -> torch.Tensor | None:
        guided = s["prior_guidance"] > 1.0
        requests = [batch.requests[i] for i in batch.active]
        prompts = [p for r in requests for p in r.prompts]
        repeats = _repeats(batch, self.device)
        ids, mask = self._tokens(self.prior_tokenizer, prompts)
        out = self.backend.run("prior_text_encoder", input_ids=ids)
        embeds, hidden = (
            out["text_embeds"].repeat_interleave(repeats, 0),
            out["text_hidden"].repeat_interleave(repeats, 0),
        )
        mask = mask.repeat_interleave(repeats, 0)
        if guided:
            uids, umask = self._tokens(self.prior_tokenizer, [""] * len(prompts))
            u = self.backend.run("prior_text_encoder", input_ids=uids)
            embeds = torch.cat([u["text_embeds"].repeat_interleave(repeats, 0), embeds])
            hidden = torch.cat([u["text_hidden"].repeat_interleave(repeats, 0), hidden])
            mask = torch.cat([umask.repeat_interleave(repeats, 0), mask])
        solver = Solver(self.prior_scheduler, s["prior_steps"])
        x = self._draw(batch, (self.dims.embed_dim,))
        for i, t in enumerate(solver.timesteps):
            keep = batch.poll()  # between calls: the rows of cancelled requests leave
            if keep is not None:
                if not batch.active:
                    return None
                x, embeds, hidden, mask = (
                    take_rows(v, keep, g)
                    for v, g in ((x, False), (embeds, guided), (hidden, guided), (mask, guided))
                )
                solver.keep(keep)
            x_in = torch.cat([x, x]) if guided else x
            timestep = torch.full((x_in.shape[0],), float(t), device=self.device)
            pred = self.backend.run(
                "prior",
                sample=x_in,
                timestep=timestep,
                text_embeds=embeds,
                text_hidden=hidden,
                text_mask=mask,
            )["predicted_image_embedding"]
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + s["prior_guidance"] * (cond - uncond)
            noise = self._draw(batch, pred.shape[1:]) if solver.has_noise[i] else None
            x = solver.step(i, pred, x, noise)
            if on_step is not None:
                on_step("prior", i, x_in.shape[0])
        c = self.backend.constants()
        return x * c["clip_std"] + c["clip_mean"]

    def _noise_embeds(self, embeds: torch.Tensor, level: int, batch, per_image: bool = False) -> torch.Tensor:
        """diffusers' noise_image_embeddings: normalise, noise to `level`, unnormalise, append the level's
        sinusoidal embedding."""
        noise = self._draw(batch, embeds.shape[1:], per_image)
        embeds = (embeds - self.mean) * 1.0 / self.std
        embeds = add_noise(self.noising, embeds, noise, level)
        embeds = embeds * self.std + self.mean
        levels = torch.tensor([level] * embeds.shape[0], device=self.device)
        return torch.cat((embeds, timestep_embedding(levels, embeds.shape[-1]).to(embeds.dtype)), 1)

    def _decode(self, batch, class_labels: torch.Tensor, s: dict, on_step) -> torch.Tensor | None:
        guided = s["decoder_guidance"] > 1.0
        requests = [batch.requests[i] for i in batch.active]
        prompts = [p for r in requests for p in r.prompts]
        repeats = _repeats(batch, self.device)
        ids, _ = self._tokens(self.tokenizer, prompts)
        hidden = self.backend.run("text_encoder", input_ids=ids)["text_hidden"].repeat_interleave(repeats, 0)
        if guided:
            uids, _ = self._tokens(self.tokenizer, [""] * len(prompts))
            uncond = self.backend.run("text_encoder", input_ids=uids)["text_hidden"].repeat_interleave(
                repeats, 0
            )
            hidden = torch.cat([uncond, hidden])
            class_labels = torch.cat([torch.zeros_like(class_labels), class_labels])
        config = SamplerConfig.from_dict(self.scheduler, kind=s["scheduler"])
        solver = Solver(config, s["decoder_steps"])
        d = self.dims
        x = self._draw(batch, (d.latent_channels, d.latent_size, d.latent_size))
        calls = len(solver.timesteps)  # PNDM repeats its first timestep: one call more than steps
        for i, t in enumerate(solver.timesteps):
            keep = batch.poll()
            if keep is not None:
                if not batch.active:
                    return None
                x, hidden, class_labels = (
                    take_rows(v, keep, g) for v, g in ((x, False), (hidden, guided), (class_labels, guided))
                )
                solver.keep(keep)
            x_in = torch.cat([x, x]) if guided else x
            timestep = torch.full((x_in.shape[0],), float(t), device=self.device)
            pred = self.backend.run(
                "unet", sample=x_in, timestep=timestep, text_hidden=hidden, class_labels=class_labels
            )["model_output"]
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + s["decoder_guidance"] * (cond - uncond)
            wanted = batch.previews_at(i, steps=calls, last_is_output=False)
            if wanted:  # the call's estimate of the clean latents, through the VAE: what the image looks like
                x0 = solver.predicted_x0(i, pred, x)
                for request, start, rows in wanted:  # decoded by the VAE at the output size
                    send_preview(request, self._vae(x0[start : start + rows]).float().cpu())
            x = solver.step(i, pred, x)
            if on_step is not None:
                on_step("decoder", i, x_in.shape[0])
        return self._vae(x)

    def _vae(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.backend.run("vae_decoder", latents=latents)["image"]
        return (image / 2 + 0.5).clamp(0, 1)


@dataclass(frozen=True)
class StableSettings:
    """One request's settings (hashable: the serving engine batches requests whose settings, but the
    image count, are equal)."""

    num_images: int
    prior_steps: int
    prior_guidance: float
    decoder_steps: int
    decoder_guidance: float
    noise_level: int
    scheduler: str | None


def _repeats(batch, device) -> torch.Tensor:
    """Each running request's image count, once per prompt (a prompt's rows are its images)."""
    requests = [batch.requests[i] for i in batch.active]
    return torch.tensor([r.settings.num_images for r in requests for _ in r.prompts], device=device)


def _convert(images: torch.Tensor, output_type: str):
    """[N, 3, H, W] in [0, 1] as diffusers' image processor returns it: pt, np (NHWC) or PIL."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray(im) for im in (array * 255).round().astype(np.uint8)]


# the networks called once per sampler step: their calls are replayed from CUDA graphs with cuda_graphs
STEP_NETWORKS = ("prior", "unet")


def load_stable_pipeline(
    model, device: str = "cpu", dtype: str = "fp32", cuda_graphs: bool = False
) -> StableUnclipPipeline:
    """A Stable unCLIP folder (either diffusers layout) or loaded components, on the torch backend; the
    fast path as for Karlo: every network in `dtype` (the samplers in float32, engine/precision.py) and
    the per-step networks' calls replayed from CUDA graphs (engine/network_graphs.py)."""
    from unclip.models.stable_unclip import load_stable_components

    components = load_stable_components(model)
    backend = StableTorchBackend(components, device)
    if dtype != "fp32":
        from unclip.engine.precision import PrecisionBackend

        backend = PrecisionBackend(backend, dtype)
    if cuda_graphs:
        from unclip.engine.network_graphs import GraphedBackend

        backend = GraphedBackend(backend, STEP_NETWORKS)
    return StableUnclipPipeline(backend, components)
