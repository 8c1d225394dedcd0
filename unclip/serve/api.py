"""The HTTP routes, defined once: OpenAI's images endpoints (generations, variations), health, metrics.

Both front ends mount `router` (`unclip serve` under uvicorn, the Ray Serve deployment); a
route finds its engine and settings in `request.app.state.unclip` (a `ServeState`). The
routes only translate: JSON (generations) or a multipart form with an image file (variations)
in, `Engine.generate` / `Engine.vary`, PNGs out, and every error as OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}` with a 4xx for anything the client can fix —
never a traceback in a body.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from dataclasses import dataclass, field
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from unclip.errors import GenerationError, UnclipError
from unclip.serve.engine import DeadlineExceeded, Engine, QueueFull, RequestCancelled, ShuttingDown
from unclip.serve.envelope import ApiError, envelope

router = APIRouter()

GENERATIONS = "/v1/images/generations"
VARIATIONS = "/v1/images/variations"
TUNABLE = ("prior_steps", "decoder_steps", "super_res_steps", "prior_guidance", "decoder_guidance",
           "use_prior")


@dataclass
class ServeState:
    """What the routes need besides the request; one per app (per replica)."""

    engine: Engine
    model: str  # the name requests may give as `model`, and that PNGs record
    image_size: int  # the side of the images the model makes
    replica: str  # this process's identity: a response header and a metric label
    timeout_s: float | None = None  # per-request deadline
    max_body_bytes: int = 65536
    max_upload_bytes: int = 4 * 2**20  # a variation's whole form; OpenAI takes images under 4 MB
    ready: bool = False  # after the model is loaded and warmed up
    info: dict = field(default_factory=dict)

    @property
    def size(self) -> str:
        return f"{self.image_size}x{self.image_size}"


class _ImageFields(BaseModel):
    """The fields both image routes take: OpenAI's (dall-e-2) and unclip's settings of the stages
    that run from an image embedding on, with the same names and meaning as unclip.Pipeline."""

    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None
    seed: int | None = None
    decoder_steps: int | None = None
    super_res_steps: int | None = None
    decoder_guidance: float | None = None


class ImageGenerationRequest(_ImageFields):
    """OpenAI's `POST /v1/images/generations` body, plus unclip's sampler settings. Types are
    strict: "3" is not 3; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    prior_steps: int | None = None
    prior_guidance: float | None = None
    use_prior: bool | None = None


class ImageVariationForm(_ImageFields):
    """OpenAI's `POST /v1/images/variations` form fields besides the `image` file. Form values
    arrive as text: "3" is read as 3, "3.5" as n is refused; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


def engine_error(exc: UnclipError, state: ServeState) -> ApiError:
    """The engine's errors as HTTP statuses: the client's mistake 400, busy 429, draining 503,
    too slow 504, a failed generation 500."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, ShuttingDown):
        return ApiError(503, str(exc), type="server_error", code="shutting_down",
                        headers={"Retry-After": "1"})
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, str(exc), type="timeout_error", code="deadline_exceeded")
    if isinstance(exc, RequestCancelled):  # nobody is listening; the status is for the log
        return ApiError(499, str(exc), type="invalid_request_error", code="client_closed_request")
    if isinstance(exc, GenerationError):
        return ApiError(500, str(exc), type="server_error", code="generation_failed")
    param = {"num_images": "n", "prompts": "prompt"}.get(exc.param, exc.param)
    return ApiError(400, str(exc), param=param, code="invalid_value")


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The body, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"the request body is larger than {limit} bytes; send {what}",
                         code="body_too_large")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, refusing more than `limit` bytes before reading them all."""
    body = await read_body(request, limit, "a shorter prompt")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    return data


async def read_variation_form(request: Request, limit: int) -> tuple[dict[str, str], bytes]:
    """(text fields, the image file's bytes) of a multipart/form-data body of at most `limit` bytes."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request as Body

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "send multipart/form-data with the image as a file field `image` (as OpenAI's "
                       "images/variations takes it)", code="invalid_content_type")
    body = await read_body(request, limit, f"a smaller image (the whole form at most {limit} bytes)")

    async def replay():  # the body read above, to Starlette's form parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Body(request.scope, replay).form(max_files=1, max_fields=16, max_part_size=limit)
    except Exception as exc:  # noqa: BLE001 - the multipart parser's errors are the client's malformed body
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise ApiError(400, f"the multipart form cannot be read ({str(detail)[:120]})",
                       code="invalid_form") from None
    fields, image = {}, None
    for key, value in form.multi_items():
        if key in fields or (key == "image" and image is not None):
            raise ApiError(400, f"field {key!r} is given twice; send it once", param=key,
                           code="invalid_value")
        if key == "image":
            if not isinstance(value, UploadFile):
                raise ApiError(400, "image must be a file (a PNG), not a text field", param="image",
                               code="invalid_type")
            image = await value.read()
        elif isinstance(value, UploadFile):
            raise ApiError(400, f"{key} must be a text field, not a file", param=key, code="invalid_type")
        else:
            fields[key] = value
    if image is None:
        raise ApiError(400, "image is required: a PNG file in the form field `image`", param="image",
                       code="missing_parameter")
    return fields, image


def parse_request(data: dict, state: ServeState, schema: type[BaseModel] = ImageGenerationRequest):
    try:
        body = schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            allowed = (["image"] if schema is ImageVariationForm else []) + list(schema.model_fields)
            message = f"unknown field {param!r}; allowed: {', '.join(allowed)}"
            raise ApiError(400, message, param=param, code="unknown_parameter") from None
        if first["type"] == "missing":
            raise ApiError(400, f"{param} is required", param=param, code="missing_parameter") from None
        got = repr(first.get("input"))
        message = f"{param}: {first['msg'].lower()}, got {got[:80]}"
        raise ApiError(400, message, param=param, code="invalid_type") from None
    if body.size is not None and body.size != state.size:
        raise ApiError(400, f"size {body.size!r} is not made by this model; it makes {state.size} images "
                       f"(use size {state.size!r} or leave it out)", param="size", code="invalid_value")
    if body.response_format == "url":
        raise ApiError(400, "response_format 'url' is not served: this server returns images inline; "
                       "use response_format 'b64_json'", param="response_format", code="invalid_value")
    return body


def png_base64(image, metadata: dict[str, str]) -> str:
    """One [3, H, W] float image in [0, 1] as a base64 PNG, rounded as the CLI rounds."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(GENERATIONS)
async def generations(request: Request) -> Response:
    state: ServeState = request.app.state.unclip

    async def start():
        body = parse_request(await read_json(request, state.max_body_bytes), state)
        settings = {k: getattr(body, k) for k in TUNABLE if getattr(body, k) is not None}
        return body, state.engine.generate(body.prompt, n=body.n, seed=body.seed, timeout_s=state.timeout_s,
                                           **settings)

    return await serve_images(request, state, start, lambda body, s: {
        "prompt": body.prompt, "steps": f"prior {s.prior_steps}, decoder {s.decoder_steps}, super-res "
        f"{s.super_res_steps}", "guidance": f"prior {s.prior_guidance}, decoder {s.decoder_guidance}",
        "prior": "yes" if s.use_prior else "no"})


@router.post(VARIATIONS)
async def variations(request: Request) -> Response:
    """OpenAI's image variations: a multipart form with the image file, n, size, response_format."""
    state: ServeState = request.app.state.unclip

    async def start():
        fields, image = await read_variation_form(request, state.max_upload_bytes)
        body = parse_request(fields, state, ImageVariationForm)
        settings = {k: getattr(body, k) for k in ("decoder_steps", "super_res_steps", "decoder_guidance")
                    if getattr(body, k) is not None}
        return body, state.engine.vary(image, n=body.n, seed=body.seed, timeout_s=state.timeout_s, **settings)

    return await serve_images(request, state, start, lambda body, s: {
        "mode": "variation", "steps": f"decoder {s.decoder_steps}, super-res {s.super_res_steps}",
        "guidance": f"decoder {s.decoder_guidance}"})


async def serve_images(request: Request, state: ServeState, start, describe) -> Response:
    """The part every images route shares: `start()` reads the request and returns (body, the engine's
    coroutine); the job runs until done or the client leaves; PNGs come back with `describe(body,
    settings)` and the run's seed and model as PNG text."""
    try:
        if not state.engine.accepting:
            raise ApiError(503, "the server is shutting down and takes no new requests; retry on another "
                           "replica", type="server_error", code="shutting_down", headers={"Retry-After": "1"})
        body, coroutine = await start()
        job = asyncio.ensure_future(coroutine)
        left = asyncio.ensure_future(until_disconnected(request))
        await asyncio.wait({job, left}, return_when=asyncio.FIRST_COMPLETED)
        if not job.done():  # the client left: cancel, so that its rows stop costing compute
            job.cancel()
            request.state.log = {"status_note": "client disconnected"}
            raise ApiError(499, "the client closed the connection", code="client_closed_request")
        left.cancel()
        try:
            result = job.result()
        except UnclipError as exc:
            raise engine_error(exc, state) from None
    except ApiError as error:
        request.state.log = {**getattr(request.state, "log", {}), "error": error.code}
        return envelope(error)
    meta = {**describe(body, result.settings), "seed": str(result.seed), "model": state.model,
            "software": "unclip"}
    from starlette.concurrency import run_in_threadpool

    images = await run_in_threadpool(
        lambda: [png_base64(image, {**meta, "image_index": str(k)}) for k, image in enumerate(result.images)])
    request.state.log = {"n": body.n, "seed": result.seed, "queue_s": round(result.queue_s, 4),
                         "compute_s": round(result.compute_s, 4), "batch_images": result.batch_images}
    headers = {"X-Unclip-Queue-Seconds": f"{result.queue_s:.4f}",
               "X-Unclip-Compute-Seconds": f"{result.compute_s:.4f}",
               "X-Unclip-Batch-Images": str(result.batch_images)}
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b} for b in images],
                         "seed": result.seed}, headers=headers)


@router.get("/health/live")
async def live() -> JSONResponse:
    return JSONResponse({"status": "live"})


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    state: ServeState = request.app.state.unclip
    if state.ready and state.engine.accepting:
        return JSONResponse({"status": "ready", "model": state.model, "replica": state.replica})
    status = "draining" if state.ready else "loading"
    return envelope(ApiError(503, f"not ready: {status}", type="server_error", code=status,
                             headers={"Retry-After": "1"}))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.unclip.engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
