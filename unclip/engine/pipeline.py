"""The unCLIP sampling pipeline: text -> prior -> text_proj -> decoder -> super-resolution.

`Pipeline.generate` reads in the order data flows. The loops drive a backend by network
name, never knowing which backend it is. Noise is drawn from the caller's CPU generator in
a fixed order (per stage: initial latents, then one draw per noisy step), so the same seed
gives the same image on every backend, and the fp32 CPU path matches diffusers' UnCLIPPipeline.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from unclip.engine.backends import Backend
from unclip.engine.scheduler import SchedulerConfig, StepTable, scheduler_step, step_table
from unclip.engine.settings import (  # noqa: F401 (their home before engine.settings; kept importable)
    SAMPLER_DEFAULTS,
    TUNABLE,
    GenerationSettings,
    Limits,
    check_generator,
    check_output_type,
    check_prompts,
    check_schedules,
    check_seed,
    read_sampler_defaults,
    write_sampler_defaults,
)
from unclip.errors import GenerationError
from unclip.specs import ModelDims

log = logging.getLogger("unclip")


@dataclass
class TextConditioning:
    embeds: torch.Tensor  # [R, D]: R = 2B rows (unconditional first) when guided, else B
    hidden: torch.Tensor  # [R, L, D]
    mask: torch.Tensor  # [R, L] bool


class Pipeline:
    """Load once, generate many times. Thread-safe: calls are serialised on the shared buffers."""

    def __init__(self, backend: Backend, tokenizer, dims: ModelDims,
                 schedulers: dict[str, SchedulerConfig], model_name: str = "unnamed",
                 stage_runner=None, sampler_defaults: dict | None = None, limits: Limits | None = None):
        self.backend = backend
        # what generate() uses for settings the caller leaves out: the model's, then Karlo's
        self.defaults = GenerationSettings(**(sampler_defaults or {}))
        self.limits = limits or Limits()  # how much one call may ask for (engine.settings.Limits)
        self.limits.check_settings(self.defaults)
        # None: the plain loops below; else the GPU fast path (unclip.engine.cuda_graphs.StageRunner)
        # runs each stage's loop on static buffers, captured as a CUDA graph and/or with fused kernels
        self.stage_runner = stage_runner
        self.tokenizer = tokenizer
        self.dims = dims
        self.schedulers = schedulers
        self.model_name = model_name
        self.device = backend.device
        self._tables: dict[tuple[str, int], StepTable] = {}
        self._lock = threading.Lock()

    # -- the data path ------------------------------------------------------------------------

    def generate(self, prompts: str | list[str], *, seed: int = 0,
                 generator: torch.Generator | None = None, output_type: str = "pil",
                 progress: bool = False, **settings) -> list | np.ndarray:
        """Images for each prompt (prompt-major, then image index): PIL images ("pil"), an NHWC float32
        array in [0, 1] ("np") or an NCHW float32 tensor in [0, 1] ("pt"). Bad input: UnclipError."""
        prompts = check_prompts(prompts, self.limits)
        s = self.settings(**settings)
        self.limits.check_images(len(prompts), s.num_images)
        check_output_type(output_type)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(check_seed(seed))
        else:
            check_generator(generator)
        with self._lock, torch.inference_mode():
            text = self.encode_text(prompts, s)
            if s.use_prior:
                image_embeds = self.prior(text, s, generator, progress)
            else:  # prior-free ablation: the CLIP text embedding stands in for the image embedding
                image_embeds = text.embeds[-len(prompts) * s.num_images:]
            decoder_hidden, decoder_time = self.project(image_embeds, text, s)
            image_small = self.decoder(decoder_hidden, decoder_time, text, s, generator, progress)
            image = self.super_res(image_small, s, generator, progress)
        return to_output(image, output_type)

    def settings(self, **overrides) -> GenerationSettings:
        """The settings a generate call with these keyword arguments runs with, checked against the
        limits and this model's schedules."""
        s = replace(self.defaults, **overrides)
        self.limits.check_settings(s)
        check_schedules(s, self.schedulers)
        return s

    def encode_text(self, prompts: list[str], s: GenerationSettings) -> TextConditioning:
        batch = ([""] if s.guided else []) + prompts  # one encoder call; "" is the unconditional text
        ids, mask = self.tokenize(batch)
        out = self.backend.run("text_encoder", input_ids=ids.to(self.device))
        embeds, hidden, mask = out["text_embeds"], out["text_hidden"], mask.to(self.device)

        def rows(x: torch.Tensor) -> torch.Tensor:
            cond = x[-len(prompts):].repeat_interleave(s.num_images, dim=0)
            if not s.guided:
                return cond
            uncond = x[:1].expand(cond.shape[0], *x.shape[1:])
            return torch.cat([uncond, cond])

        return TextConditioning(rows(embeds), rows(hidden), rows(mask))

    def prior(self, text: TextConditioning, s: GenerationSettings,
              generator: torch.Generator, progress: bool) -> torch.Tensor:
        config = self.schedulers["prior_scheduler"]
        table = self._table("prior", config, s.prior_steps)
        batch = text.embeds.shape[0] // (2 if s.guided else 1)
        x, noise = self._draw(generator, (batch, self.dims.clip_dim), table)
        if self.stage_runner is not None:
            x = self.stage_runner.denoise(
                "prior", x, noise, config, table, ["prior"] * s.prior_steps,
                dict(text_embeds=text.embeds, text_hidden=text.hidden, text_mask=text.mask),
                guidance=s.prior_guidance if s.guided else None)
        else:
            for i in tqdm(range(s.prior_steps), desc="prior", disable=not progress, leave=False):
                x_in = torch.cat([x, x]) if s.guided else x
                pred = self.backend.run("prior", sample=x_in, timestep=table.timesteps[i].expand(len(x_in)),
                                        text_embeds=text.embeds, text_hidden=text.hidden,
                                        text_mask=text.mask)["predicted_image_embeds"]
                if s.guided:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + s.prior_guidance * (cond - uncond)
                x = scheduler_step(config, table, i, pred, x, noise[i])
        constants = self.backend.constants()
        image_embeds = x * constants["clip_std"] + constants["clip_mean"]
        self._check_finite("prior", image_embeds, s)
        return image_embeds

    def project(self, image_embeds: torch.Tensor, text: TextConditioning,
                s: GenerationSettings) -> tuple[torch.Tensor, torch.Tensor]:
        batch = image_embeds.shape[0]
        unconditional = torch.zeros(batch, dtype=torch.bool, device=self.device)
        if s.guided:  # unconditional rows get the learned guidance embedding inside text_proj
            image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
            unconditional = torch.cat([~unconditional, unconditional])
        out = self.backend.run("text_proj", image_embeds=image_embeds, unconditional=unconditional,
                               text_embeds=text.embeds, text_hidden=text.hidden)
        return out["decoder_hidden"], out["decoder_time_embeds"]

    def decoder(self, decoder_hidden: torch.Tensor, decoder_time: torch.Tensor,
                text: TextConditioning, s: GenerationSettings, generator: torch.Generator,
                progress: bool) -> torch.Tensor:
        config = self.schedulers["decoder_scheduler"]
        table = self._table("decoder", config, s.decoder_steps)
        c, size = self.dims.decoder_channels, self.dims.decoder_size
        batch = decoder_hidden.shape[0] // (2 if s.guided else 1)
        x, noise = self._draw(generator, (batch, c, size, size), table)
        if self.stage_runner is not None:
            x = self.stage_runner.denoise(
                "decoder", x, noise, config, table, ["decoder"] * s.decoder_steps,
                dict(decoder_hidden=decoder_hidden, decoder_time_embeds=decoder_time, text_mask=text.mask),
                guidance=s.decoder_guidance if s.guided else None, channels=c)
        else:
            for i in tqdm(range(s.decoder_steps), desc="decoder", disable=not progress, leave=False):
                x_in = torch.cat([x, x]) if s.guided else x
                out = self.backend.run("decoder", sample=x_in, timestep=table.timesteps[i].expand(len(x_in)),
                                       decoder_hidden=decoder_hidden, decoder_time_embeds=decoder_time,
                                       text_mask=text.mask)["model_output"]
                if s.guided:
                    uncond, cond = out.chunk(2)
                    eps_uncond, eps_cond, variance = uncond[:, :c], cond[:, :c], cond[:, c:]
                    eps = eps_uncond + s.decoder_guidance * (eps_cond - eps_uncond)
                else:
                    eps, variance = out[:, :c], out[:, c:]
                x = scheduler_step(config, table, i, eps, x, noise[i],
                                   predicted_variance=variance if variance.shape[1] == c else None)
        x = x.clamp(-1, 1)
        self._check_finite("decoder", x, s)
        return x

    def super_res(self, image_small: torch.Tensor, s: GenerationSettings,
                  generator: torch.Generator, progress: bool) -> torch.Tensor:
        config = self.schedulers["super_res_scheduler"]
        table = self._table("super_res", config, s.super_res_steps)
        size = self.dims.super_res_size
        x, noise = self._draw(generator, (image_small.shape[0], image_small.shape[1], size, size), table)
        lowres = F.interpolate(image_small, size=[size, size], mode="bicubic", align_corners=False,
                               antialias=True)
        if self.stage_runner is not None:
            networks = ["super_res_first"] * (s.super_res_steps - 1) + ["super_res_last"]
            x = self.stage_runner.denoise("super_res", x, noise, config, table, networks,
                                          dict(image_lowres=lowres))
        else:
            last = s.super_res_steps - 1
            for i in tqdm(range(s.super_res_steps), desc="super-res", disable=not progress, leave=False):
                # Karlo trains a separate network for the final step
                network = "super_res_last" if i == last else "super_res_first"
                out = self.backend.run(network, sample=x, timestep=table.timesteps[i].expand(len(x)),
                                       image_lowres=lowres)["model_output"]
                x = scheduler_step(config, table, i, out, x, noise[i])
        self._check_finite("super-resolution", x, s)
        return x

    # -- helpers ------------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self.tokenizer.model_max_length
        for text in texts:
            n = len(self.tokenizer(text, verbose=False).input_ids)
            if n > limit:
                log.warning("prompt %r is %d tokens long; truncated to the tokenizer's limit of %d",
                            text[:40] + ("..." if len(text) > 40 else ""), n, limit)
        enc = self.tokenizer(texts, padding="max_length", max_length=limit, truncation=True,
                             return_tensors="pt")
        return enc.input_ids, enc.attention_mask.bool()

    def _table(self, stage: str, config: SchedulerConfig, steps: int) -> StepTable:
        key = (stage, steps)
        if key not in self._tables:
            self._tables[key] = step_table(config, steps).to(self.device)
        return self._tables[key]

    def _draw(self, generator: torch.Generator, shape: tuple[int, ...],
              table: StepTable) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Initial latents, then one noise tensor per noisy step, in diffusers' order."""
        latents = torch.randn(shape, generator=generator).to(self.device)
        noise = [torch.randn(shape, generator=generator).to(self.device) if has else None
                 for has in table.has_noise]
        return latents, noise

    def _check_finite(self, stage: str, x: torch.Tensor, s: GenerationSettings) -> None:
        if not torch.isfinite(x).all():  # one reduction per stage, outside the loops
            precision = getattr(self.backend, "precision", "fp32")
            raise GenerationError(f"the {stage} stage produced non-finite values (precision {precision}, "
                              f"batch {x.shape[0]}); use --dtype fp32 or a smaller guidance scale")


def to_output(image: torch.Tensor, output_type: str) -> list | np.ndarray | torch.Tensor:
    """[-1, 1] NCHW -> "pt": NCHW float32 in [0, 1] on the pipeline's device (as diffusers' "pt");
    "np": NHWC float32 in [0, 1]; "pil": PIL images."""
    pixels = (image * 0.5 + 0.5).clamp(0, 1).float()
    if output_type == "pt":
        return pixels
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return array if output_type == "np" else to_pil(array)


def to_pil(array: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(img) for img in (array * 255).round().astype("uint8")]
