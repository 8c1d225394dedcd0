"""What one benchmark run measures: a small dataclass, its checks, and suite files.

A suite file (benchmarks/suites/*.json) holds `unclip bench` options by their command-line
names; options given on the command line win over the file.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from unclip.errors import UnclipError


@dataclass(frozen=True)
class BenchConfig:
    """The defaults (also the CLI's) fit `--model small --backends torch,onnxruntime` on an idle
    2-core CPU in about 4 minutes (10 with the CPU shared 2.5 ways): ONNX export (~1 min, then
    cached), three cold starts, 1 warm-up and 5 measured repeats of baseline + 2 backends at
    batch 1 and 2, at reduced steps (8/8/3; Karlo's own are 25/25/7)."""

    model: str = "small"
    backends: tuple[str, ...] = ("torch",)
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 2)
    prior_steps: int = 8
    decoder_steps: int = 8
    super_res_steps: int = 3
    prior_guidance: float = 4.0
    decoder_guidance: float = 8.0
    warmup: int = 1
    repeat: int = 5
    seed: int = 0
    prompt: str = "a photograph of an astronaut riding a horse"
    out: Path = Path("unclip-out/bench")
    cache_dir: Path = Path.home() / ".cache" / "unclip" / "bench"
    plots: bool = True
    suite: str | None = None

    @property
    def settings(self) -> dict:
        """The generation settings both the baseline and every backend get."""
        return dict(prior_steps=self.prior_steps, decoder_steps=self.decoder_steps,
                    super_res_steps=self.super_res_steps, prior_guidance=self.prior_guidance,
                    decoder_guidance=self.decoder_guidance)

    def command(self) -> str:
        """The full command that repeats this run (every option spelled out)."""
        args = ["unclip", "bench", "--model", self.model, "--backends", ",".join(self.backends),
                "--device", self.device, "--batch-sizes", ",".join(map(str, self.batch_sizes)),
                "--prior-steps", str(self.prior_steps), "--decoder-steps", str(self.decoder_steps),
                "--super-res-steps", str(self.super_res_steps),
                "--prior-guidance", str(self.prior_guidance),
                "--decoder-guidance", str(self.decoder_guidance), "--warmup", str(self.warmup),
                "--repeat", str(self.repeat), "--seed", str(self.seed), "--prompt", self.prompt,
                "--out", str(self.out)]
        return shlex.join(args + ([] if self.plots else ["--no-plots"]))


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
    """User input, checked before anything is loaded."""
    from unclip.engine.pipeline import GenerationSettings
    from unclip.models.presets import PRESETS

    for b in cfg.backends:
        if b not in known_backends:
            raise UnclipError(f"--backends: unknown backend {b!r}; choose from {', '.join(known_backends)}")
    if not Path(cfg.model).exists() and cfg.model not in PRESETS:
        raise UnclipError(f"--model {cfg.model!r} is neither an existing folder nor a preset "
                          f"({', '.join(PRESETS)})")
    if cfg.device != "cpu" and not cfg.device.startswith("cuda"):
        raise UnclipError(f"--device {cfg.device!r} is unknown: use cpu or cuda")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UnclipError("--device cuda was asked for but this torch build sees no CUDA GPU; "
                              "use --device cpu")
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
