"""The unCLIP sampling pipeline: text -> prior -> text_proj -> decoder -> super-resolution.

`Pipeline.generate` reads in the order data flows. The loops drive a backend by network
name, never knowing which backend it is. Noise is drawn from the caller's CPU generator in
a fixed order (per stage: initial latents, then one draw per noisy step), so the same seed
gives the same image on every backend, and the fp32 CPU path matches diffusers' UnCLIPPipeline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from unclip.engine import image_conditioned
from unclip.engine.backends import Backend
from unclip.engine.batch import Batch, PartialCallback, Request, check_partial_images, send_preview, take_rows
from unclip.engine.image_input import ImagePreprocess
from unclip.engine.image_output import convert_images
from unclip.engine.scheduler import SchedulerConfig, StepTable, predicted_x0, step_table
from unclip.engine.settings import (
    IMAGE_CONDITIONED,
    GenerationSettings,
    Limits,
    check_generator,
    check_output_type,
    check_prompts,
    check_schedules,
    check_seed,
)
from unclip.engine.step import EagerRun
from unclip.errors import GenerationError, UnclipError
from unclip.kernels.guidance_step import GuidanceStep
from unclip.models.step_cache import schedule
from unclip.specs import ModelDims

log = logging.getLogger("unclip")
StepCallback = Callable[[str, int, int], None]  # (stage, step index, rows the step computed)


@dataclass
class TextConditioning:
    """The CLIP text encoding: one conditional row per image, and the empty prompt's single row,
    which a guided stage expands into its unconditional half."""

    embeds: torch.Tensor  # [B, D]
    hidden: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, L] bool
    uncond: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # "" encoded, [1, ...]; None: unguided

    def rows(self, guided: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeds, hidden, mask) for a stage: [unconditional; conditional] rows when guided."""
        cond = (self.embeds, self.hidden, self.mask)
        if not guided:
            return cond
        return tuple(torch.cat([u.expand(c.shape[0], *u.shape[1:]), c])
                     for u, c in zip(self.uncond, cond, strict=True))

    def keep(self, rows: torch.Tensor) -> None:
        self.embeds, self.hidden, self.mask = (take_rows(t, rows, guided=False)
                                               for t in (self.embeds, self.hidden, self.mask))


def stage_guided(s: GenerationSettings, image_conditioned: bool = False) -> dict[str, bool]:
    """Which stages run unconditional rows: a stage whose guidance is <= 1 would combine
    u + 1 * (c - u) = c, so it runs its conditional rows only (diffusers runs both in every
    stage whenever any stage is guided; the image is the same). Image-conditioned requests skip
    the prior."""
    prior = s.use_prior and not image_conditioned and s.prior_guidance > 1.0
    return {"prior": prior, "decoder": s.decoder_guidance > 1.0}


class Pipeline:
    """Load once, generate many times. Thread-safe: calls are serialised on the shared buffers."""

    def __init__(self, backend: Backend, tokenizer, dims: ModelDims,
                 schedulers: dict[str, SchedulerConfig], model_name: str = "unnamed",
                 stage_runner=None, sampler_defaults: dict | None = None, limits: Limits | None = None,
                 image_preprocess: ImagePreprocess | None = None, step_cache: int = 1):
        self.backend = backend
        # the decoder's step cache (unclip.models.step_cache): a full step every `step_cache` steps
        self.step_cache = check_step_cache(step_cache, backend)
        self.image_preprocess = image_preprocess  # how images reach the image encoder (None: it has none)
        # what generate() uses for settings the caller leaves out: the model's, then Karlo's; and
        # vary/interpolate/text_diff: the model's image_conditioned section over those
        defaults = dict(sampler_defaults or {})
        image_defaults = defaults.pop(IMAGE_CONDITIONED, {})
        self.defaults = GenerationSettings(**defaults)
        self.image_defaults = replace(self.defaults, **image_defaults)
        self.limits = limits or Limits()  # how much one call may ask for (engine.settings.Limits)
        self.limits.check_settings(self.defaults)
        self.limits.check_settings(self.image_defaults)
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
                 progress: bool = False, partial_images: int = 0, on_partial: PartialCallback | None = None,
                 **settings) -> list | np.ndarray | torch.Tensor:
        """Images for each prompt (prompt-major, then image index): PIL images ("pil"), an NHWC float32
        array in [0, 1] ("np") or an NCHW float32 tensor in [0, 1] on the CPU ("pt"). Bad input:
        UnclipError. Streaming: `on_partial(index, images)` receives up to `partial_images` (0-3)
        previews while it runs (unclip.engine.batch.partial_steps; images as "pt"); the final images
        are the same with or without them."""
        prompts = check_prompts(prompts, self.limits)
        s = self.settings(**settings)
        self.check_prior(s)
        self.limits.check_images(len(prompts), s.num_images)
        check_output_type(output_type)
        check_partial_images(partial_images, on_partial)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(check_seed(seed))
        else:
            check_generator(generator)
        request = Request(prompts, s, generator, partial_images=partial_images, on_partial=on_partial)
        [images] = self.generate_requests([request], progress=progress)
        return convert_images(images, output_type)

    def generate_requests(self, requests: list[Request], *, progress: bool = False,
                          on_step: StepCallback | None = None) -> list[torch.Tensor | None]:
        """Several callers' requests as one batch (same steps, guidance and prior; any prompts,
        image counts and generators; each checked as `generate` checks its arguments). Per request:
        NCHW float32 images in [0, 1] on the CPU, or None if it was cancelled. Each request's images
        equal what it gives alone (its noise comes from its own generator in the same order); a
        request whose `cancelled()` turns true leaves the batch before the next denoising step.
        `on_step(stage, step, rows)` is called after every step with the rows that step computed."""
        batch = Batch(requests)
        s, guided = batch.settings, stage_guided(batch.settings, batch.image_conditioned)
        with self._lock, torch.inference_mode():
            text = self.encode_text(batch, guided["prior"] or guided["decoder"])
            if batch.image_conditioned:  # variations, interpolations, text diffs: no prior
                image_embeds = self.given_image_embeds(batch)
            elif s.use_prior:
                image_embeds = self.prior(batch, text, guided["prior"], progress, on_step)
            else:  # prior-free ablation: the CLIP text embedding stands in for the image embedding
                image_embeds = text.embeds
            if not batch.active:
                return batch.split(None)
            decoder_hidden, decoder_time = self.project(image_embeds, text, guided["decoder"])
            image_small = self.decoder(batch, decoder_hidden, decoder_time, text, guided["decoder"],
                                       progress, on_step)
            if not batch.active:
                return batch.split(None)
            for request, start, rows in batch.previews_final():  # the decoder's output, before super-res
                self._send_preview(request, image_small[start:start + rows])
            image = self.super_res(batch, image_small, progress, on_step)
            if not batch.active:
                return batch.split(None)
        return batch.split((image * 0.5 + 0.5).clamp(0, 1).float().cpu())

    def settings(self, **overrides) -> GenerationSettings:
        """The settings a generate call with these keyword arguments runs with, checked against the
        limits and this model's schedules."""
        s = replace(self.defaults, **overrides)
        self.limits.check_settings(s)
        check_schedules(s, self.schedulers)
        return s

    def image_settings(self, **overrides) -> GenerationSettings:
        """`settings` for vary, interpolate and text_diff: over the model's image_conditioned defaults."""
        s = replace(self.image_defaults, **overrides)
        self.limits.check_settings(s)
        check_schedules(s, self.schedulers)
        return s

    def encode_text(self, batch: Batch, guided: bool) -> TextConditioning:
        prompts = [p for i in batch.active for p in batch.requests[i].prompts]
        repeats = torch.tensor([batch.requests[i].settings.num_images
                                for i in batch.active for _ in batch.requests[i].prompts])
        ids, mask = self.tokenize(([""] if guided else []) + prompts)  # one encoder call; "" is unconditional
        out = self.backend.run("text_encoder", input_ids=ids.to(self.device))
        encoded = (out["text_embeds"], out["text_hidden"], mask.to(self.device))
        cond = [x[-len(prompts):].repeat_interleave(repeats.to(x.device), dim=0) for x in encoded]
        return TextConditioning(*cond, uncond=tuple(x[:1] for x in encoded) if guided else None)

    def given_image_embeds(self, batch: Batch) -> torch.Tensor:
        """The image-conditioned requests' embeddings, one row per image: as given, or from one
        image-encoder call for every request that brought pixels."""
        requests = [batch.requests[i] for i in batch.active]
        pixels = [r.pixel_values for r in requests if r.image_embeds is None]
        sizes = [len(p) for p in pixels]
        encoded = iter(self._encode_images(torch.cat(pixels)).split(sizes) if pixels else [])
        rows = [next(encoded) if r.image_embeds is None else r.image_embeds.to(self.device) for r in requests]
        repeats = torch.tensor([r.settings.num_images for r in requests for _ in r.prompts],
                               device=self.device)
        return torch.cat(rows).repeat_interleave(repeats, dim=0)

    def prior(self, batch: Batch, text: TextConditioning, guided: bool, progress: bool,
              on_step: StepCallback | None) -> torch.Tensor:
        s = batch.settings
        config = self.schedulers["prior_scheduler"]
        table = self._table("prior", config, s.prior_steps)
        x, noise = batch.draw((self.dims.clip_dim,), table.has_noise, self.device)
        embeds, hidden, mask = text.rows(guided)
        x, kept = self._denoise(
            "prior", batch, x, noise, config, table, ["prior"] * s.prior_steps,
            dict(text_embeds=embeds, text_hidden=hidden, text_mask=mask),
            s.prior_guidance if guided else None, None, progress, on_step)
        if kept is not None:
            text.keep(kept)
        constants = self.backend.constants()
        image_embeds = x * constants["clip_std"] + constants["clip_mean"]
        self._check_finite("prior", image_embeds)
        return image_embeds

    def project(self, image_embeds: torch.Tensor, text: TextConditioning,
                guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        unconditional = torch.zeros(image_embeds.shape[0], dtype=torch.bool, device=self.device)
        if guided:  # unconditional rows get the learned guidance embedding inside text_proj
            image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
            unconditional = torch.cat([~unconditional, unconditional])
        embeds, hidden, _ = text.rows(guided)
        out = self.backend.run("text_proj", image_embeds=image_embeds, unconditional=unconditional,
                               text_embeds=embeds, text_hidden=hidden)
        return out["decoder_hidden"], out["decoder_time_embeds"]

    def decoder(self, batch: Batch, decoder_hidden: torch.Tensor, decoder_time: torch.Tensor,
                text: TextConditioning, guided: bool, progress: bool,
                on_step: StepCallback | None) -> torch.Tensor:
        s = batch.settings
        config = self.schedulers["decoder_scheduler"]
        table = self._table("decoder", config, s.decoder_steps)
        c, size = self.dims.decoder_channels, self.dims.decoder_size
        x, noise = batch.draw((c, size, size), table.has_noise, self.device)
        conditioning = dict(decoder_hidden=decoder_hidden, decoder_time_embeds=decoder_time,
                            text_mask=text.rows(guided)[2])
        networks = schedule(s.decoder_steps, self.step_cache)
        x, _ = self._denoise(
            "decoder", batch, x, noise, config, table, networks, conditioning,
            s.decoder_guidance if guided else None, c, progress, on_step, previews=True)
        x = x.clamp(-1, 1)
        self._check_finite("decoder", x)
        return x

    def super_res(self, batch: Batch, image_small: torch.Tensor, progress: bool,
                  on_step: StepCallback | None) -> torch.Tensor:
        s = batch.settings
        config = self.schedulers["super_res_scheduler"]
        table = self._table("super_res", config, s.super_res_steps)
        size = self.dims.super_res_size
        x, noise = batch.draw((image_small.shape[1], size, size), table.has_noise, self.device)
        lowres = F.interpolate(image_small, size=[size, size], mode="bicubic", align_corners=False,
                               antialias=True)
        # Karlo trains a separate network for the final step
        networks = ["super_res_first"] * (s.super_res_steps - 1) + ["super_res_last"]
        x, _ = self._denoise("super_res", batch, x, noise, config, table, networks,
                             dict(image_lowres=lowres), None, None, progress, on_step)
        self._check_finite("super-resolution", x)
        return x

    def _denoise(self, stage: str, batch: Batch, x: torch.Tensor, noise: list[torch.Tensor | None],
                 config: SchedulerConfig, table: StepTable, networks: list[str],
                 conditioning: dict[str, torch.Tensor], guidance: float | None, channels: int | None,
                 progress: bool, on_step: StepCallback | None, previews: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One stage's loop: the final latents of the requests still running, and which of the
        stage's first rows they are (None: all of them). `guidance` None: conditional rows only;
        `channels` splits a decoder's output into its prediction and its variance; `previews`: streamed
        requests get the step's prediction of the clean image at their partial steps. Every path runs
        this loop; only how a step runs differs (EagerRun, or the stage runner's StageRun)."""
        guided, kept = guidance is not None, None
        spec = GuidanceStep(config, guided=guided, channels=channels)
        if self.stage_runner is not None:  # static buffers, each step replayed from a CUDA graph
            run = self.stage_runner.begin(stage, spec, x, noise, table, networks, conditioning, guidance)
        else:
            run = EagerRun(self.backend, spec, x, noise, table, conditioning, guidance)
        label = stage.replace("_", "-")
        for i, network in enumerate(tqdm(networks, desc=label, disable=not progress, leave=False)):
            keep = batch.poll()  # between steps: the rows of cancelled requests leave
            if keep is not None:
                run.drop(keep)
                kept = keep if kept is None else kept[keep]
            if not batch.active:
                break
            wanted = batch.previews_at(i) if previews else ()
            x_before = run.x.clone() if wanted else None  # a stage runner updates its latents in place
            run.step(i, network)
            if wanted:
                x0 = predicted_x0(config, table, i, run.prediction(), x_before)
                for request, start, rows in wanted:
                    self._send_preview(request, x0[start:start + rows])
            if on_step is not None:
                on_step(stage, i, run.rows * (2 if guided else 1))
        return run.result(), kept

    # -- image-conditioned generation (unclip.engine.image_conditioned) --------------------------

    def vary(self, images, *, seed: int = 0, generator: torch.Generator | None = None,
             output_type: str = "pil", progress: bool = False, partial_images: int = 0,
             on_partial: PartialCallback | None = None, **settings) -> list | np.ndarray | torch.Tensor:
        """Variations of each image (image-major, then index; `num_images` per image): its CLIP image
        embedding decoded with new noise. `images`: one or a list of file paths, PNG/JPEG bytes, PIL
        images, HxWx3 arrays or 3xHxW tensors in [0, 1]. Settings, seeds, output types and streaming
        as `generate`."""
        return image_conditioned.vary(self, images, seed=seed, generator=generator, output_type=output_type,
                                      progress=progress, partial_images=partial_images, on_partial=on_partial,
                                      **settings)

    def interpolate(self, a, b, frames: int = 5, *, seed: int = 0, generator: torch.Generator | None = None,
                    output_type: str = "pil", progress: bool = False,
                    **settings) -> list | np.ndarray | torch.Tensor:
        """`frames` images from a to b: their image embeddings spherically interpolated, the decoder's
        noise the same in every frame. a, b: images (as `vary` takes them) or prompts (a `str`, which
        goes through the prior)."""
        return image_conditioned.interpolate(self, a, b, frames, seed=seed, generator=generator,
                                             output_type=output_type, progress=progress, **settings)

    def text_diff(self, image, from_text: str, to_text: str, amounts=(0.0, 0.25, 0.5, 0.75, 1.0), *,
                  seed: int = 0, generator: torch.Generator | None = None, output_type: str = "pil",
                  progress: bool = False, **settings) -> list | np.ndarray | torch.Tensor:
        """One image per amount: `image`'s embedding moved towards `to_text` and away from `from_text`
        (0: unchanged, 1: the whole difference of the two captions), the decoder's noise fixed."""
        return image_conditioned.text_diff(self, image, from_text, to_text, amounts, seed=seed,
                                           generator=generator, output_type=output_type, progress=progress,
                                           **settings)

    @property
    def has_prior(self) -> bool:
        return self.dims.has_prior

    def check_prior(self, s: GenerationSettings) -> None:
        if s.use_prior and not self.has_prior:
            raise UnclipError(f"model {self.model_name} has no prior (a variation-only checkpoint): it makes "
                              "images from images (vary, interpolate between images, text_diff); for text, "
                              "pass use_prior=False (the CLIP text embedding goes to the decoder)",
                              param="use_prior")

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings [N, clip_dim] in the space the decoder reads, from the encoder's input."""
        with self._lock, torch.inference_mode():
            return self._encode_images(pixel_values)

    def _encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = self.backend.run("image_encoder", pixel_values=pixel_values.to(self.device))["image_embeds"]
        return F.normalize(embeds, dim=-1) if self.image_preprocess.normalize_embeds else embeds

    def encode_prompts(self, prompts: list[str], s: GenerationSettings, generator: torch.Generator,
                       progress: bool = False) -> torch.Tensor:
        """The image embedding `generate` would decode for each prompt: the prior's sample (noise from
        `generator`, as generate draws it), or the text embedding with use_prior=False."""
        batch = Batch([Request(prompts, replace(s, num_images=1), generator)])
        guided = stage_guided(s)["prior"]
        with self._lock, torch.inference_mode():
            text = self.encode_text(batch, guided)
            return self.prior(batch, text, guided, progress, None) if s.use_prior else text.embeds

    def encode_captions(self, texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings [N, clip_dim] (the text encoder's projection, as the prior reads it)."""
        ids, _ = self.tokenize(texts)
        with self._lock, torch.inference_mode():
            return self.backend.run("text_encoder", input_ids=ids.to(self.device))["text_embeds"]

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

    def _send_preview(self, request: Request, x: torch.Tensor) -> None:
        """One preview to a streamed request: decoder-space images in [-1, 1], brought to the output
        size as super-resolution sees its input (bicubic, antialiased)."""
        size = self.dims.super_res_size
        up = F.interpolate(x.float(), size=[size, size], mode="bicubic", align_corners=False, antialias=True)
        send_preview(request, (up * 0.5 + 0.5).clamp(0, 1).cpu())

    def _check_finite(self, stage: str, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():  # one reduction per stage, outside the loops
            precision = getattr(self.backend, "precision", "fp32")
            raise GenerationError(f"the {stage} stage produced non-finite values (precision {precision}, "
                              f"batch {x.shape[0]}); use --dtype fp32 or a smaller guidance scale")


MAX_STEP_CACHE = 8


def check_step_cache(step_cache, backend) -> int:
    """`step_cache` (1: off) as an int, or an UnclipError naming the fix."""
    if isinstance(step_cache, bool) or not isinstance(step_cache, int) \
            or not 1 <= step_cache <= MAX_STEP_CACHE:
        raise UnclipError(f"step_cache must be an integer from 1 (off) to {MAX_STEP_CACHE} (a full decoder "
                          f"step every N steps), got {step_cache!r}", param="step_cache")
    if step_cache > 1 and "decoder_shallow" not in backend.specs:
        if backend.name == "torch":
            fix = "its decoder UNet has one level, nothing deeper to cache: drop --step-cache"
        else:
            fix = ("this artifact was exported without it: re-export with `unclip export onnx --step-cache`, "
                   "or drop --step-cache")
        raise UnclipError(f"step_cache={step_cache} needs the decoder's cached pair (decoder_full, "
                          f"decoder_shallow), which the {backend.name} backend of this model does not have; "
                          f"{fix}", param="step_cache")
    return step_cache
