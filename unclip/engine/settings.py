"""What a generate call may ask for: sampler settings, limits, seeds, and the files that set them.

One validation layer for every entry point (the Python API, the CLI, a model's
sampler_defaults.json, an artifact's schedulers, the HTTP server): pydantic checks types and
ranges, `Limits` bounds the size of a call, and every refusal is one `UnclipError` line that
names the field, the bad value and the fix, with `param` set to the field's API name.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from unclip.errors import UnclipError, schema_error

TRAIN_TIMESTEPS = 1000  # unCLIP's schedules (Karlo's and ours) are trained on t = 0..999
STRICT = ConfigDict(strict=True, extra="forbid")  # no "3" for 3, no True for 1, no unknown keys


def _plain_number(value):
    """numpy scalars (a seed from np.random, a step count from an array) count as numbers."""
    if isinstance(value, np.integer):
        return int(value)
    return float(value) if isinstance(value, np.floating) else value


Count = Annotated[int, BeforeValidator(_plain_number), Field(ge=1)]
Steps = Annotated[int, BeforeValidator(_plain_number), Field(ge=2)]
Guidance = Annotated[float, BeforeValidator(_plain_number), Field(ge=1.0, allow_inf_nan=False)]

# What each field must be, in words, for the one-line error (pydantic checks it).
REQUIREMENTS = {
    "num_images": "a positive integer (images per prompt)",
    "prior_steps": "an integer of at least 2 (the schedule runs from t=999 to t=0)",
    "decoder_steps": "an integer of at least 2 (the schedule runs from t=999 to t=0)",
    "super_res_steps": "an integer of at least 2 (the schedule runs from t=999 to t=0)",
    "prior_guidance": "a finite number of at least 1.0 (1.0 is unguided; scales below 1 are not used)",
    "decoder_guidance": "a finite number of at least 1.0 (1.0 is unguided; scales below 1 are not used)",
    "use_prior": "true or false",
    "seed": "an integer with 0 <= seed < 2**64 (what torch.Generator.manual_seed takes)",
}


def _one_line(where: str = "", fix: str = ""):
    """A pydantic wrap validator: the schema's errors leave as one UnclipError line."""
    def validate(cls, values, handler):
        try:
            return handler(values)
        except ValidationError as exc:
            raise schema_error(exc, where=where, fix=fix, requirements=REQUIREMENTS,
                               unknown=f"choose from {', '.join(f.name for f in fields(cls))}") from None
    return model_validator(mode="wrap")(classmethod(validate))


@dataclass(frozen=True, config=STRICT)
class GenerationSettings:
    """The sampler settings of one generate call. Immutable and hashable: a serving engine
    batches requests whose settings are equal. Constructing one validates it."""

    num_images: Count = 1  # per prompt
    prior_steps: Steps = 25
    decoder_steps: Steps = 25
    super_res_steps: Steps = 7
    prior_guidance: Guidance = 4.0
    decoder_guidance: Guidance = 8.0
    use_prior: bool = True  # False: the CLIP text embedding goes to the decoder

    _check = _one_line()

    def validate(self, limits: Limits | None = None) -> GenerationSettings:
        """Within `limits` (default: `Limits()`); types and ranges were checked on construction."""
        (limits or Limits()).check_settings(self)
        return self


TUNABLE = ("prior_steps", "decoder_steps", "super_res_steps", "prior_guidance", "decoder_guidance")


@dataclass(frozen=True, config=STRICT)
class Limits:
    """How much one generate call may ask for. The defaults are generous for one user; a service
    passes its own (`unclip.load(..., limits=Limits(max_images=4))`). docs/validation.md says why
    each default is what it is."""

    max_images: Count = 16  # per call: prompts x num_images, generated as one batch
    max_prompts: Count = 16  # per call
    max_steps: Annotated[int, Field(ge=2, le=TRAIN_TIMESTEPS)] = TRAIN_TIMESTEPS  # per stage
    max_guidance: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] = 50.0
    max_prompt_chars: Count = 1000  # CLIP reads 77 tokens, about 300 characters of English
    # per input image (variations, interpolations, text diffs), checked from the file's header before
    # decoding: a PNG of a few KB can declare a 100000 x 100000 image, 30 GB once decoded
    max_image_pixels: Count = 4096 * 4096

    _check = _one_line("Limits: ")

    def check_settings(self, s: GenerationSettings) -> None:
        for name in ("prior_steps", "decoder_steps", "super_res_steps"):
            if getattr(s, name) > self.max_steps:
                raise UnclipError(f"{name} {getattr(s, name)} is above the limit of {self.max_steps} steps "
                                  f"(Limits.max_steps; the schedule has {TRAIN_TIMESTEPS} timesteps): "
                                  "ask for fewer", param=name)
        for name in ("prior_guidance", "decoder_guidance"):
            if getattr(s, name) > self.max_guidance:
                raise UnclipError(f"{name} {getattr(s, name)} is above the limit of {self.max_guidance} "
                                  "(Limits.max_guidance; useful scales are about 1 to 20): "
                                  "use a smaller scale", param=name)
        if s.num_images > self.max_images:
            self.check_images(1, s.num_images)

    def check_images(self, prompts: int, num_images: int) -> None:
        if prompts * num_images > self.max_images:
            raise UnclipError(f"num_images {num_images} for {prompts} prompt(s) is {prompts * num_images} "
                              f"images in one call, above the limit of {self.max_images} "
                              "(Limits.max_images); ask for fewer per call", param="num_images")


def check_schedules(s: GenerationSettings, schedulers: dict) -> None:
    """More steps than a schedule has timesteps would repeat timesteps (a zero-width step)."""
    for stage in ("prior", "decoder", "super_res"):
        if f"{stage}_scheduler" not in schedulers:  # a variation-only model has no prior
            continue
        steps, timesteps = getattr(s, f"{stage}_steps"), schedulers[f"{stage}_scheduler"].num_train_timesteps
        if steps > timesteps:
            raise UnclipError(f"{stage}_steps {steps} is more than this model's {stage} schedule has "
                              f"timesteps ({timesteps}): ask for at most {timesteps}", param=f"{stage}_steps")


def check_prompts(prompts: str | list[str], limits: Limits | None = None) -> list[str]:
    limits = limits or Limits()
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise UnclipError(f"prompts must be a text or a list of texts, got {type(prompts).__name__}",
                          param="prompts")
    if not prompts:
        raise UnclipError("no prompt given: pass at least one prompt", param="prompts")
    if len(prompts) > limits.max_prompts:
        raise UnclipError(f"{len(prompts)} prompts in one call is above the limit of {limits.max_prompts} "
                          "(Limits.max_prompts); split them over several calls", param="prompts")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise UnclipError(f"prompt {i + 1} is a {type(prompt).__name__}, not a text", param="prompts")
        if not prompt.strip():
            raise UnclipError(f"prompt {i + 1} is empty; give a text that describes the image",
                              param="prompts")
        if len(prompt) > limits.max_prompt_chars:
            raise UnclipError(f"prompt {i + 1} is {len(prompt)} characters, above the limit of "
                              f"{limits.max_prompt_chars} (Limits.max_prompt_chars; the text encoder reads "
                              "only its first 77 tokens, about 300 characters): shorten it", param="prompts")
        try:  # a lone UTF-16 surrogate (JSON's "\ud800") is no text the tokenizer can read
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UnclipError(f"prompt {i + 1} has an invalid character at position {exc.start} (a lone "
                              "surrogate, not Unicode text); send valid UTF-8 text",
                              param="prompts") from None
    return list(prompts)


_SEED = TypeAdapter(Annotated[int, BeforeValidator(_plain_number), Field(ge=0, lt=2**64)],
                    config=ConfigDict(strict=True))
OUTPUT_TYPES = ("pil", "np", "pt")


def check_seed(seed) -> int:
    try:
        return _SEED.validate_python(seed)
    except ValidationError:
        raise UnclipError(f"seed must be {REQUIREMENTS['seed']}, got {seed!r}", param="seed") from None


def check_generator(generator) -> None:
    import torch

    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        got = f"a {generator.device} generator" if isinstance(generator, torch.Generator) else repr(generator)
        raise UnclipError(f"generator must be a CPU torch.Generator (noise is drawn on the CPU, so every "
                          f"backend and device gets the same images), got {got}; or pass seed=",
                          param="generator")


def check_output_type(output_type) -> None:
    if output_type not in OUTPUT_TYPES:
        raise UnclipError(f"output_type must be 'pil' (PIL images), 'np' (NHWC float32 array in [0, 1]) "
                          f"or 'pt' (NCHW float32 torch tensor in [0, 1]), got {output_type!r}",
                          param="output_type")


# -- a model's own defaults: sampler_defaults.json --------------------------------------------------

SAMPLER_DEFAULTS = "sampler_defaults.json"  # optional, in a checkpoint or artifact folder
# The file's optional section for variations, interpolations and text diffs, whose best settings may
# differ from text-to-image's: the demo draws text-to-image best unguided, variations guided.
IMAGE_CONDITIONED = "image_conditioned"


@dataclass(frozen=True, config=STRICT)
class _SamplerDefaults:
    """The file's schema: any of the tunable settings, nothing else."""

    prior_steps: Steps | None = None
    decoder_steps: Steps | None = None
    super_res_steps: Steps | None = None
    prior_guidance: Guidance | None = None
    decoder_guidance: Guidance | None = None


def read_sampler_defaults(folder: str | Path) -> dict:
    """A model's own sampler defaults (`{"decoder_guidance": 1.0}`): Karlo's 25/25/7 steps and
    guidance 4/8 are tuned for Karlo, and another model may draw best elsewhere. Absent: {}."""
    path = Path(folder) / SAMPLER_DEFAULTS
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnclipError(f"{path} cannot be read ({exc}); fix or delete it") from None
    allowed = f"allowed: {', '.join(TUNABLE)}, {IMAGE_CONDITIONED}"
    if not isinstance(data, dict):
        raise UnclipError(f"{path} must hold a JSON object of settings, got {type(data).__name__}; "
                          f"{allowed}; fix or delete the file")
    section = data.get(IMAGE_CONDITIONED, {})
    if not isinstance(section, dict):
        raise UnclipError(f"{path}: {IMAGE_CONDITIONED} must be a JSON object of settings, got "
                          f"{type(section).__name__}; fix or delete the file")
    top = {k: v for k, v in data.items() if k != IMAGE_CONDITIONED}
    inner = f"allowed: {', '.join(TUNABLE)}"
    for where, settings, words in ((f"{path}: ", top, allowed),
                                   (f"{path}: {IMAGE_CONDITIONED}.", section, inner)):
        try:
            _SamplerDefaults(**settings)
        except ValidationError as exc:
            raise schema_error(exc, where=where, fix="fix or delete the file", requirements=REQUIREMENTS,
                               unknown=words) from None
    return data


def write_sampler_defaults(folder: Path, defaults: dict) -> None:
    """The reader's counterpart, for checkpoints and artifacts; nothing is written for {}."""
    if defaults:
        (Path(folder) / SAMPLER_DEFAULTS).write_text(json.dumps(defaults, indent=2) + "\n")


# -- scheduler configs (a checkpoint's scheduler_config.json, an artifact's schedulers.json) ------

@dataclass(frozen=True, config=ConfigDict(strict=True, extra="ignore"))
class _SchedulerFile:
    """The keys SchedulerConfig reads; diffusers writes more (ignored). 10**5 bounds the tables."""

    num_train_timesteps: Annotated[int, Field(ge=2, le=100_000)] = TRAIN_TIMESTEPS
    variance_type: str = "fixed_small_log"
    clip_sample: bool = True
    clip_sample_range: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    prediction_type: str = "epsilon"
    beta_schedule: str = "squaredcos_cap_v2"


def scheduler_config(data, where: str, fix: str):
    """A SchedulerConfig from a scheduler's JSON, or one line naming the bad key."""
    from unclip.engine.scheduler import SchedulerConfig

    if not isinstance(data, dict):
        raise UnclipError(f"{where} must be a JSON object, got {type(data).__name__}; {fix}")
    try:
        _SchedulerFile(**{k: v for k, v in data.items() if k in _SchedulerFile.__dataclass_fields__})
        return SchedulerConfig.from_dict(data)
    except ValidationError as exc:
        raise schema_error(exc, where=f"{where}: ", fix=fix) from None
    except (TypeError, ValueError) as exc:  # from_dict's own checks (variance and prediction types)
        raise UnclipError(f"{where} is not supported: {exc}; {fix}") from None
