"""What one benchmark run measures: a small dataclass, its checks, and suite files.

A suite file (benchmarks/suites/*.json) holds `unclip bench` options by their command-line
names; options given on the command line win over the file.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from unclip.errors import UnclipError
from unclip.models import DEFAULT_MODEL

# The bench's generation settings for a random-weight preset: reduced steps (Karlo's own 25/25/7 take
# about 3x the time) and Karlo's guidance. A checkpoint ('demo' included) benches at the settings
# `unclip generate` uses for it: its sampler_defaults.json, else Karlo's 25/25/7 steps, guidance 4/8.
BENCH_SETTINGS = dict(prior_steps=8, decoder_steps=8, super_res_steps=3, prior_guidance=4.0,
                      decoder_guidance=8.0)


KARLO_PROMPT = "a photograph of an astronaut riding a horse"
# a shapes-world model (the demo) draws only its world: out of it, its sampling is chaotic and a
# first-image comparison says little (bf16 moved an astronaut image by 55 levels, a red circle by 0.3)
SHAPES_PROMPT = "a red circle on a blue background"


@dataclass(frozen=True)
class BenchConfig:
    """The defaults (also the CLI's). Left out: `backends` = every runner that can run here
    (unclip.bench.runners); the generation settings = what `generate` uses for a checkpoint, or
    BENCH_SETTINGS for a preset; `evaluate` = on where the model can be scored (a shapes-world
    model with its CLIP image tower, such as demo). `check` returns the config with these filled in.
    `model` is DEFAULT_MODEL ("demo"), as for every other command: offline, and scored for accuracy.
    `--model small` with the two fp32 runners of torch and onnxruntime took about 4 minutes on an
    idle 2-core CPU (10 with the CPU shared 2.5 ways): ONNX export (~1 min, then cached), cold
    starts, 1 warm-up and 5 measured repeats per runner at batch 1 and 2."""

    model: str = DEFAULT_MODEL
    backends: tuple[str, ...] | None = None
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 2)
    prior_steps: int | None = None
    decoder_steps: int | None = None
    super_res_steps: int | None = None
    prior_guidance: float | None = None
    decoder_guidance: float | None = None
    warmup: int = 1
    repeat: int = 5
    seed: int = 0
    prompt: str | None = None  # None: KARLO_PROMPT, or SHAPES_PROMPT for a model that can be scored
    out: Path = Path("unclip-out/bench")
    cache_dir: Path = Path.home() / ".cache" / "unclip" / "bench"
    plots: bool = True
    suite: str | None = None
    evaluate: bool | None = None
    skipped: dict = field(default_factory=dict)  # default runners that cannot run here -> why

    @property
    def settings(self) -> dict:
        """The generation settings both the baseline and every runner get."""
        return {name: getattr(self, name) for name in BENCH_SETTINGS}

    def command(self) -> str:
        """The full command that repeats this run (every option spelled out)."""
        args = ["unclip", "bench", "--model", self.model, "--backends", ",".join(self.backends or ()),
                "--device", self.device, "--batch-sizes", ",".join(map(str, self.batch_sizes))]
        for name, value in self.settings.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        args += ["--warmup", str(self.warmup), "--repeat", str(self.repeat), "--seed", str(self.seed),
                 "--prompt", self.prompt, "--out", str(self.out),
                 "--evaluate" if self.evaluate else "--no-evaluate"]
        return shlex.join(args + ([] if self.plots else ["--no-plots"]))


def model_folder(model: str) -> Path | None:
    """The checkpoint folder of `model` ('demo' included); None for a preset name."""
    from unclip.models import resolve_model_path
    from unclip.models.presets import PRESETS
    from unclip.models.stable_unclip import STABLE_PRESETS

    if not Path(model).exists() and (model in PRESETS or model in STABLE_PRESETS):
        return None
    try:
        return resolve_model_path(model)
    except UnclipError:
        raise UnclipError(f"--model {model!r} is neither an existing folder nor a preset "
                          f"({', '.join(PRESETS)}) nor 'demo'") from None


def can_evaluate(folder: Path | None) -> bool:
    """The scorer reads shapes-world images and needs the model's CLIP image tower."""
    from unclip.models.stable_unclip import is_stable_unclip

    return folder is not None and (folder / "image_encoder").is_dir() and not is_stable_unclip(folder)


def parse_list(option: str, text: str, item=str) -> tuple:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = tuple(item(p) for p in parts)
    except ValueError:
        raise UnclipError(f"--{option} {text!r} must be comma-separated integers, e.g. 1,4") from None
    if not values:
        raise UnclipError(f"--{option} is empty; give at least one value, e.g. --{option} 1")
    if len(set(values)) != len(values):
        raise UnclipError(f"--{option} {text!r} repeats a value; give each once")
    return values


def check(cfg: BenchConfig, known_backends: tuple[str, ...]) -> BenchConfig:
    """User input, checked before anything is loaded; returns the config with its defaults filled in."""
    from unclip.bench.runners import check_runners, default_runners
    from unclip.engine.settings import IMAGE_CONDITIONED, GenerationSettings, read_sampler_defaults

    folder = model_folder(cfg.model)
    if cfg.device != "cpu" and not cfg.device.startswith("cuda"):
        raise UnclipError(f"--device {cfg.device!r} is unknown: use cpu or cuda")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UnclipError("--device cuda was asked for but this torch build sees no CUDA GPU; "
                              "use --device cpu")
    if cfg.backends is None:
        runners, skipped = default_runners(cfg.device, known_backends)
    else:
        runners, skipped = check_runners(cfg.backends, cfg.device, known_backends), {}
    if cfg.evaluate and not can_evaluate(folder):
        raise UnclipError(f"--evaluate scores shapes-world images with the model's CLIP image tower; "
                          f"--model {cfg.model} has no image_encoder/ (use --model demo, or --no-evaluate)")
    given = {k: v for k, v in cfg.settings.items() if v is not None}
    if folder is None:
        defaults = BENCH_SETTINGS
    else:  # exactly what `unclip generate` runs for this checkpoint
        # text-to-image's: the file's image_conditioned section is for variations and the like
        model = {k: v for k, v in read_sampler_defaults(folder).items() if k != IMAGE_CONDITIONED}
        generate = vars(GenerationSettings(**model))
        defaults = {name: generate[name] for name in BENCH_SETTINGS}
    if cfg.prompt is None:
        cfg = replace(cfg, prompt=SHAPES_PROMPT if can_evaluate(folder) else KARLO_PROMPT)
    cfg = replace(cfg, backends=tuple(r.name for r in runners), skipped=skipped,
                  evaluate=can_evaluate(folder) if cfg.evaluate is None else cfg.evaluate,
                  **{**defaults, **given})
    if min(cfg.batch_sizes) < 1:
        raise UnclipError(f"--batch-sizes {list(cfg.batch_sizes)} must be positive integers, e.g. 1,2")
    if cfg.warmup < 0:
        raise UnclipError(f"--warmup must be 0 or more, got {cfg.warmup}")
    if cfg.repeat < 1:
        raise UnclipError(f"--repeat must be at least 1 (a median needs a sample), got {cfg.repeat}")
    if not cfg.prompt.strip():
        raise UnclipError("--prompt is empty; give a text that describes the image")
    for name in ("prior_guidance", "decoder_guidance"):
        if not math.isfinite(getattr(cfg, name)):
            raise UnclipError(f"--{name.replace('_', '-')} must be a finite number")
    GenerationSettings(**cfg.settings).validate()
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UnclipError(f"--out {cfg.out} is a file; give a folder path")
    if cfg.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UnclipError("the plots need matplotlib: pip install 'unclip[bench]', "
                              "or pass --no-plots") from None
    return cfg


def read_suite(path: Path, option_names: set[str]) -> dict:
    """A suite file's options, keyed by parameter name (--batch-sizes -> batch_sizes)."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UnclipError(f"--suite {path}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise UnclipError(f"--suite {path} is not valid JSON ({exc.msg}, line {exc.lineno}); "
                          "fix the file") from None
    options = data.get("options") if isinstance(data, dict) else None
    if not isinstance(options, dict):
        raise UnclipError(f"--suite {path} needs an object \"options\" of bench options")
    out = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in option_names:
            raise UnclipError(f"--suite {path}: unknown option {key!r}; use bench option names, "
                              "e.g. \"batch-sizes\"")
        out[name] = value
    return out
