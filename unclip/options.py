"""The options of `generate`, `serve` and the Ray Serve app, declared once (as nanoGPT declares its
one config): each field is the option's name, type, default and help. The click options of the CLI
(`click_options`) and the `args:` of a Ray Serve config (`ReplicaOptions`) are derived from here, so
an option added here reaches every front end that takes its class.

  LoadOptions     what to load and how: model, backend, device, precision, the GPU fast path
  ReplicaOptions  + one serving replica: its engine, the caps on what one request may cost, the
                  HTTP limits it enforces itself, health, API-key digests (a Ray Serve replica's args)
  ServeOptions    + the process: address, keys, connection limits, drain, Ray (`unclip serve`)

Imports only pydantic and click (Ray's proxy and the CLI's --help stay fast).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import click
from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unclip.errors import UnclipError

DEFAULT_MODEL = "demo"  # unclip.models.DEFAULT_MODEL, without importing torch
MODEL_HELP = ("demo (the trained model shipped in the package), a checkpoint folder (diffusers "
              "UnCLIPPipeline layout), an export folder (with --backend onnxruntime, openvino, mixed or "
              "tensorrt) or a random-weight preset: tiny, small, karlo")
API_KEY_ENV = "UNCLIP_API_KEY"


def cli(**extra: Any) -> dict:
    """A field's command-line extras: envvar, metavar, hidden (not an option), show_default."""
    return {"cli": extra}


class LoadOptions(BaseModel):
    """What to load and how (unclip.load's arguments)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description=MODEL_HELP)
    backend: str = Field("torch", description=(
        "torch, onnxruntime, openvino or mixed (each network on the faster of the two, measured at load) "
        "(then --model is a folder made by `unclip export onnx`), or "
        "tensorrt (--device cuda; the folder also has `unclip export tensorrt` engines)"))
    device: str = Field("cpu", description="cpu or cuda")
    dtype: str = Field("fp32", description=(
        "fp32; fp16/bf16 with --backend torch on cuda; bf16 with --backend torch or openvino on a CPU "
        "with native bf16 (half networks, float32 scheduler; docs/cpu.md)"))
    cuda_graphs: bool = Field(False, description="cuda: replay each stage's loop as one captured CUDA graph")
    kernels: bool = Field(False, description="cuda: fused Triton kernels (GroupNorm+SiLU, guidance step)")
    step_cache: int = Field(1, ge=1, le=8, description=(
        "a full decoder step every N steps, cheaper shallow steps between them that reuse its deep "
        "features (docs/step_cache.md); 1: off"), json_schema_extra=cli(metavar="N"))
    allow_pickle: bool = Field(False, description="allow pickle (.bin) weights, which can run code")

    def load_kwargs(self) -> dict:
        return self.model_dump(include=set(LoadOptions.model_fields))


class ReplicaOptions(LoadOptions):
    """One serving replica: `unclip serve` runs one, Ray Serve many (these are a Ray config's `args:`)."""

    served_model_name: str | None = Field(None, description=(
        "the model's name in /health/ready, in PNG metadata and in requests' `model` field  "
        "[default: the model folder's name, never its path]"), json_schema_extra=cli(show_default=False))
    api_key_sha256: tuple[str, ...] = Field((), description="SHA-256 digests of the accepted API keys",
                                            json_schema_extra=cli(hidden=True))
    api_key_file: Path | None = Field(None, description=(
        "a file of API keys, one per line (blank lines and # comments skipped); requests then need "
        "`Authorization: Bearer KEY`"), json_schema_extra=cli(metavar="FILE"))
    max_batch_images: int = Field(8, ge=1, description=(
        "images per batch (compatible requests are merged up to this)"))
    max_wait_ms: float | None = Field(None, ge=0, description=(
        "how long the oldest queued request waits for others to fill its batch  "
        "[default: 10; with --ray 50, as requests reach a replica through Ray's proxy spread out]"),
        json_schema_extra=cli(show_default=False))
    max_queue: int = Field(64, ge=1, description=(
        "requests admitted and waiting (an upload holds its place while it is read and decoded); "
        "beyond: 429 with Retry-After, before the body is read"))
    timeout_s: float = Field(300.0, gt=0, description=(
        "per-request deadline, from admission: past it the request leaves its batch and gets 504"))
    max_body_bytes: int = Field(65536, ge=256, description=(
        "largest JSON body (POST /v1/images/generations); larger: 413"))
    max_upload_bytes: int = Field(4 * 2**20, ge=1024, description=(
        "largest variation form (POST /v1/images/variations, the image included); OpenAI takes images "
        "under 4 MB; larger: 413"))
    max_image_pixels: int = Field(2048 * 2048, ge=1, description=(
        "largest uploaded image, width x height, read from its header before it is decoded; larger: 400"))
    max_images_per_request: int = Field(10, ge=1, le=256, description=(
        "n per request (OpenAI's dall-e-2 takes 1..10); larger: 400"))
    max_steps: int = Field(100, ge=2, le=1000, description=(
        "steps per stage a request may ask for (Karlo's defaults are 25 / 25 / 7); larger: 400"))
    max_guidance: float = Field(20.0, ge=1.0, description=(
        "guidance scale a request may ask for (useful scales are about 1 to 20); larger: 400"))
    receive_timeout_s: float = Field(30.0, gt=0, description=(
        "a request's headers, and then its body, must arrive within this; slower: 408 and the "
        "connection closed"))
    max_header_bytes: int = Field(16384, ge=1024, description=(
        "largest request line and headers; larger: 431 (400 while they are still arriving)"))
    limit_concurrency: int = Field(64, ge=1, description=(
        "HTTP requests in progress at once (health checks not counted); beyond: 503 with Retry-After"))
    decode_workers: int = Field(2, ge=1, le=64, description=(
        "threads that decode uploaded images (each admitted upload waits for one)"))
    unhealthy_after_failures: int = Field(3, ge=1, description=(
        "consecutive failed batches after which /health/ready answers 503 (until a batch succeeds)"))
    stall_s: float = Field(120.0, gt=0, description=(
        "/health/ready answers 503 when the engine has work but has finished no denoising step for "
        "this long"))
    torch_threads: int | None = Field(None, ge=1, description=(
        "torch threads of a Ray replica  [default: OMP_NUM_THREADS, which Ray sets to its CPUs]"),
        json_schema_extra=cli(hidden=True))

    def name(self) -> str:
        """The served model name: given, else the model folder's last part (never a whole path)."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model.rstrip("/\\")).name or "model"

    def key_digests(self) -> tuple[str, ...]:
        """Every accepted key's SHA-256: the given digests and the keys of api_key_file."""
        keys = read_key_file(self.api_key_file) if self.api_key_file is not None else []
        return tuple(dict.fromkeys([*self.api_key_sha256, *map(digest, keys)]))


class ServeOptions(ReplicaOptions):
    """`unclip serve`: a replica, plus the process around it (address, keys, connections, Ray)."""

    host: str = Field("127.0.0.1", description=(
        "address to listen on; anything but a loopback address needs an API key (or "
        "--allow-unauthenticated)"))
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    api_key: tuple[str, ...] = Field((), description=(
        f"an accepted API key (repeat for several; or ${API_KEY_ENV}); requests then need "
        "`Authorization: Bearer KEY`"), json_schema_extra=cli(envvar=API_KEY_ENV, metavar="KEY",
                                                              show_default=False))
    allow_unauthenticated: bool = Field(False, description=(
        "serve a non-loopback --host without an API key (behind a gateway that authenticates)"))
    metrics_port: int | None = Field(None, ge=1, le=65535, description=(
        "serve /metrics without a key on this port of --host instead (for a scraper); without it, "
        "/metrics on the main port needs a key when keys are set"), json_schema_extra=cli(show_default=False))
    keep_alive_s: float = Field(5.0, gt=0, description="an idle kept-alive connection is closed after this")
    drain_s: float = Field(30.0, ge=0, description=(
        "on SIGTERM, how long queued and running requests may finish before the server exits"))
    replica: str | None = Field(None, description=(
        "this server's name in headers, logs and metrics  [default: HOST-PID; with --ray, Ray's replica id]"),
        json_schema_extra=cli(show_default=False))
    ray: bool = Field(False, description=(
        "serve through Ray Serve on a local Ray instance: replicas behind one endpoint, each with its "
        "own engine (docs/ray.md); --max-queue is then the requests waiting for a replica"))
    replicas: int | None = Field(None, ge=1, description="with --ray: replicas  [default: 1]",
                                 json_schema_extra=cli(show_default=False))
    max_ongoing_requests: int | None = Field(None, ge=1, description=(
        "with --ray: requests one replica holds at once  [default: 2 x --max-batch-images]"),
        json_schema_extra=cli(show_default=False))
    allow_ray_unauthenticated: bool = Field(False, description=(
        "with --ray: start Ray without its token authentication (anyone reaching Ray's ports can run code)"))

    def replica_options(self, **override: Any) -> ReplicaOptions:
        """This server's replica part, with the keys as digests (what a Ray replica is given)."""
        fields = self.model_dump(include=set(ReplicaOptions.model_fields))
        fields.update(api_key_sha256=self.all_key_digests(), api_key_file=None, **override)
        return ReplicaOptions(**fields)

    def all_key_digests(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.key_digests(), *map(digest, self.api_key)]))

    def check(self) -> ServeOptions:
        """Combinations no single field can refuse; one line naming the fix."""
        if not self.all_key_digests() and not self.allow_unauthenticated and not is_loopback(self.host):
            raise UnclipError(f"--host {self.host} exposes the server to the network without an API key: "
                              f"give --api-key (or ${API_KEY_ENV}, or --api-key-file), or "
                              "--allow-unauthenticated if a gateway in front authenticates")
        if self.ray and self.replica is not None:
            raise UnclipError("--replica is Ray's replica id under --ray; leave it out")
        if self.ray and self.metrics_port is not None:
            raise UnclipError("--metrics-port is one process's port; under --ray each replica's metrics are "
                              "on /metrics (with a key) and Ray exports its own: leave it out")
        if not self.ray and (self.replicas is not None or self.max_ongoing_requests is not None
                             or self.allow_ray_unauthenticated):
            raise UnclipError("--replicas, --max-ongoing-requests and --allow-ray-unauthenticated are Ray "
                              "Serve settings; add --ray")
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise UnclipError(f"--metrics-port {self.metrics_port} is --port too; choose another port")
        return self


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_key_file(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UnclipError(f"--api-key-file {path}: cannot be read ({type(exc).__name__}); give a UTF-8 text "
                          "file with one key per line") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise UnclipError(f"--api-key-file {path} holds no key; put one key per line")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the command line, derived -------------------------------------------------------------------

def _click_type(annotation: Any, metadata: list) -> tuple[Any, bool]:
    """(click type, multiple) for a field's annotation and constraints."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is tuple:
        return str, True
    low = next((m.ge for m in metadata if isinstance(m, Ge)), None)
    low_open = next((m.gt for m in metadata if isinstance(m, Gt)), None)
    high = next((m.le for m in metadata if isinstance(m, Le)), None)
    start, open_start = (low, False) if low is not None else (low_open, low_open is not None)
    if annotation is int:
        return click.IntRange(start, high, min_open=open_start), False
    if annotation is float:
        return click.FloatRange(start, high, min_open=open_start), False
    if annotation is Path:
        return click.Path(path_type=Path), False
    return str, False


def click_options(options: type[BaseModel], *only: str, defaults: dict | None = None):
    """A decorator adding one click option per field of `options` (or of the fields named in `only`),
    with the field's default and help; `defaults` overrides a default for this command."""
    def decorate(f):
        names = only or tuple(options.model_fields)
        for name in reversed(names):
            field = options.model_fields[name]
            extra = (field.json_schema_extra or {}).get("cli", {})
            if extra.get("hidden"):
                continue
            flag = "--" + name.replace("_", "-")
            default = (defaults or {}).get(name, field.default)
            if field.annotation is bool:
                f = click.option(flag, is_flag=True, default=default, help=field.description)(f)
                continue
            kind, multiple = _click_type(field.annotation, field.metadata)
            f = click.option(flag, type=kind, multiple=multiple, default=default if not multiple else (),
                             envvar=extra.get("envvar"), metavar=extra.get("metavar"),
                             show_default=extra.get("show_default", default is not None and not multiple),
                             help=field.description)(f)
        return f
    return decorate


def from_cli(options: type[BaseModel], values: dict) -> Any:
    """The options from click's values (only this class's fields), checked by the class: one line
    naming the option on a bad value."""
    given = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()
             if k in options.model_fields}
    try:
        return options(**given)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
        raise UnclipError(f"{name}: {first['msg'].lower()}") from None


def env_keys() -> tuple[str, ...]:
    """$UNCLIP_API_KEY, which a Ray replica reads where no key is configured (one key)."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    return (key,) if key else ()
