"""The HTTP routes, defined once: OpenAI's images endpoints (generations, variations), health, metrics.

Both front ends mount `router` (`unclip serve` under uvicorn, the Ray Serve deployment); a
route finds its engine and settings in `request.app.state.unclip` (a `ServeState`). The
routes only translate: JSON (generations) or a multipart form with an image file (variations)
in, `Engine.generate` / `Engine.vary`, PNGs out, and every error as OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}` with a 4xx for anything the client can fix —
never a traceback in a body, and never the server's internals in a 5xx (a request id instead, the
details in the server's log).

Every images request takes its place in the engine's queue (or a 429) before its body is read, and
its body must arrive within `receive_timeout_s` (else 408 and the connection closed).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from unclip.engine.batch import MAX_PARTIAL_IMAGES
from unclip.errors import GenerationError, UnclipError
from unclip.serve.engine import Admission, DeadlineExceeded, Engine, QueueFull, RequestCancelled, ShuttingDown
from unclip.serve.envelope import ApiError, envelope

router = APIRouter()
log = logging.getLogger("unclip.serve")

GENERATIONS = "/v1/images/generations"
VARIATIONS = "/v1/images/variations"
# noise_level, scheduler: Stable unCLIP models' (a Karlo model refuses them: 400 naming the field)
TUNABLE = ("prior_steps", "decoder_steps", "super_res_steps", "prior_guidance", "decoder_guidance",
           "use_prior", "noise_level", "scheduler")
IMAGE_TUNABLE = ("decoder_steps", "super_res_steps", "decoder_guidance", "noise_level",
                 "scheduler")  # image-conditioned: no prior


@dataclass
class ServeState:
    """What the routes need besides the request; one per app (per replica)."""

    engine: Engine
    model: str  # the served model name: requests may give it as `model`; health and PNGs show it
    image_size: int  # the side of the images the model makes
    replica: str  # this process's identity: a response header and a metric label
    timeout_s: float | None = None  # per-request deadline
    max_body_bytes: int = 65536
    max_upload_bytes: int = 4 * 2**20  # a variation's whole form; OpenAI takes images under 4 MB
    key_digests: tuple[str, ...] = ()  # SHA-256 of the accepted API keys; none: no key needed
    receive_timeout_s: float = 30.0  # a request's body must arrive within this (408)
    limit_concurrency: int = 64  # HTTP requests in progress (health checks not counted; 503)
    max_header_bytes: int = 16384  # a request's line and headers (431)
    ready: bool = False  # after the model is loaded and warmed up
    info: dict = field(default_factory=dict)

    @classmethod
    def from_options(cls, engine: Engine, options, image_size: int, replica: str) -> ServeState:
        """The state of a replica configured by unclip.options.ReplicaOptions."""
        from unclip.options import digest, env_keys

        return cls(engine, model=options.name(), image_size=image_size, replica=replica,
                   timeout_s=options.timeout_s, max_body_bytes=options.max_body_bytes,
                   max_upload_bytes=options.max_upload_bytes,
                   key_digests=tuple(dict.fromkeys([*options.key_digests(), *map(digest, env_keys())])),
                   receive_timeout_s=options.receive_timeout_s, limit_concurrency=options.limit_concurrency,
                   max_header_bytes=options.max_header_bytes)

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
    noise_level: int | None = None  # Stable unCLIP: noise added to the image embedding (0 .. 999)
    scheduler: str | None = None  # Stable unCLIP: pndm, ddim or dpm++ (default: the checkpoint's)
    stream: bool = False  # Server-Sent Events: partial images, then the images (OpenAI's image streaming)
    partial_images: int | None = None  # 0-3 previews per image, with stream


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


def engine_error(exc: UnclipError, state: ServeState, request_id: str = "") -> ApiError:
    """The engine's errors as HTTP statuses: the client's mistake 400, busy 429, draining 503,
    too slow 504, a failed generation 500 (its details logged under the request id, not sent)."""
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
        log.error("request %s: %s", request_id, exc)
        return ApiError(500, f"the images could not be generated (request id {request_id}; the details are "
                        "in the server's log); retry, and report the id if it persists", type="server_error",
                        code="generation_failed")
    param = {"num_images": "n", "prompts": "prompt"}.get(exc.param, exc.param)
    return ApiError(400, str(exc), param=param, code="invalid_value")


async def read_body(request: Request, limit: int, what: str, timeout_s: float | None = None) -> bytes:
    """The body, refusing more than `limit` bytes before reading them all, and a body that has not
    arrived within `timeout_s` (408; the connection is closed, as the rest of the body is unread)."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"the request body is larger than {limit} bytes; send {what}",
                         code="body_too_large", headers={"Connection": "close"})
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s ({size} bytes came); "
                       "send it at once", code="receive_timeout", headers={"Connection": "close"}) from None
    return b"".join(chunks)


JSON_TYPE = "application/json"


def check_json_type(request: Request) -> None:
    """JSON routes take only application/json: a web page cannot send it to a local server without
    the browser's CORS preflight, which this server does not answer."""
    given = request.headers.get("content-type", "")
    if given.split(";")[0].strip().lower() != JSON_TYPE:
        raise ApiError(415, f"send the body as {JSON_TYPE} (Content-Type: {JSON_TYPE}), got "
                       f"{given[:60]!r}", code="invalid_content_type")


async def read_json(request: Request, limit: int, timeout_s: float | None = None) -> dict:
    """The body as a JSON object, refusing more than `limit` bytes before reading them all."""
    body = await read_body(request, limit, "a shorter prompt", timeout_s)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply to read; send a flat JSON object",
                       code="invalid_json") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts (4300)
        raise ApiError(400, f"the request body cannot be read as JSON ({str(exc)[:100]}); send a JSON "
                       "object of ordinary values", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    return data


async def read_form(request: Request, limit: int, timeout_s: float | None = None, *,
                    files: tuple[str, ...] = ("image",), max_files: int = 1,
                    what: str = "the image as a file field `image` (as OpenAI's images/variations takes it)"
                    ) -> tuple[dict[str, str], dict[str, bytes]]:
    """(text fields, file fields' bytes) of a multipart/form-data body of at most `limit` bytes; only
    the fields named in `files` may be files, and only when given as files."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request as Body

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, f"send multipart/form-data with {what}", code="invalid_content_type")
    body = await read_body(request, limit, f"a smaller image (the whole form at most {limit} bytes)",
                           timeout_s)

    async def replay():  # the body read above, to Starlette's form parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Body(request.scope, replay).form(max_files=max_files, max_fields=16, max_part_size=limit)
    except Exception as exc:  # noqa: BLE001 - the multipart parser's errors are the client's malformed body
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise ApiError(400, f"the multipart form cannot be read ({str(detail)[:120]})",
                       code="invalid_form") from None
    fields, uploads = {}, {}
    for key, value in form.multi_items():
        if key in fields or key in uploads:
            raise ApiError(400, f"field {key!r} is given twice; send it once", param=key,
                           code="invalid_value")
        if isinstance(value, UploadFile):
            if key not in files:
                raise ApiError(400, f"{key} must be a text field, not a file", param=key, code="invalid_type")
            uploads[key] = await value.read()
        else:
            fields[key] = value
    return fields, uploads


async def read_variation_form(request: Request, limit: int, timeout_s: float | None = None
                              ) -> tuple[dict[str, str], bytes]:
    """(text fields, the image file's bytes) of a variation's multipart/form-data body."""
    fields, uploads = await read_form(request, limit, timeout_s)
    if "image" in fields:
        raise ApiError(400, "image must be a file (a PNG), not a text field", param="image",
                       code="invalid_type")
    if "image" not in uploads:
        raise ApiError(400, "image is required: a PNG file in the form field `image`", param="image",
                       code="missing_parameter")
    return fields, uploads["image"]


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
    if body.partial_images is not None and not body.stream:
        raise ApiError(400, "partial_images is for streaming: send stream true with it, or leave it out",
                       param="partial_images", code="invalid_value")
    if body.response_format == "url":
        raise ApiError(400, "response_format 'url' is not served: this server returns images inline; "
                       "use response_format 'b64_json'", param="response_format", code="invalid_value")
    return body


def png_base64(image, metadata: dict[str, str], compress_level: int = 6) -> str:
    """One [3, H, W] float image in [0, 1] as a base64 PNG, rounded as the CLI rounds; a preview is
    compressed less (level 1: a fifth of the time for a little more size)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(GENERATIONS)
async def generations(request: Request) -> Response:
    state: ServeState = request.app.state.unclip

    async def start(admission: Admission):
        check_json_type(request)
        body = parse_request(await read_json(request, state.max_body_bytes, state.receive_timeout_s), state)
        settings = {k: getattr(body, k) for k in TUNABLE if getattr(body, k) is not None}
        return body, functools.partial(state.engine.generate, body.prompt, n=body.n, seed=body.seed,
                                       timeout_s=state.timeout_s, admission=admission, **settings)

    return await serve_images(request, state, start, lambda body, s: {"prompt": body.prompt, **(
        stable_description(s, prior=True) if hasattr(s, "noise_level") else {
            "steps": f"prior {s.prior_steps}, decoder {s.decoder_steps}, super-res {s.super_res_steps}",
            "guidance": f"prior {s.prior_guidance}, decoder {s.decoder_guidance}",
            "prior": "yes" if s.use_prior else "no"})})


@router.post(VARIATIONS)
async def variations(request: Request) -> Response:
    """OpenAI's image variations: a multipart form with the image file, n, size, response_format."""
    state: ServeState = request.app.state.unclip

    async def start(admission: Admission):
        fields, image = await read_variation_form(request, state.max_upload_bytes, state.receive_timeout_s)
        body = parse_request(fields, state, ImageVariationForm)
        settings = {k: getattr(body, k) for k in IMAGE_TUNABLE if getattr(body, k) is not None}
        return body, functools.partial(state.engine.vary, image, n=body.n, seed=body.seed,
                                       timeout_s=state.timeout_s, admission=admission, **settings)

    return await serve_images(request, state, start, lambda body, s: {"mode": "variation", **(
        stable_description(s, prior=False) if hasattr(s, "noise_level") else {
            "steps": f"decoder {s.decoder_steps}, super-res {s.super_res_steps}",
            "guidance": f"decoder {s.decoder_guidance}"})})


def stable_description(s, prior: bool) -> dict[str, str]:
    """A Stable unCLIP request's PNG text (as `unclip generate` writes it)."""
    from unclip.cli_options import stable_metadata

    meta = stable_metadata(vars(s), 0, "")
    return {k: meta[k] if prior or k not in ("steps", "guidance") else meta[k].split(", ")[-1]
            for k in ("steps", "guidance", "noise_level", "scheduler")}


async def serve_images(request: Request, state: ServeState, start, describe) -> Response:
    """The part every images route shares: a place in the queue first (or 429), then `start(admission)`
    reads the request and returns (body, a function making the engine's coroutine); the job runs until
    done or the client leaves; PNGs come back with `describe(body, settings)` and the run's seed and
    model as PNG text: in one JSON response, or streamed (`stream_images`)."""
    admission = None
    request_id = getattr(request.state, "request_id", "")
    try:
        if not state.engine.accepting:
            raise ApiError(503, "the server is shutting down and takes no new requests; retry on another "
                           "replica", type="server_error", code="shutting_down", headers={"Retry-After": "1"})
        try:
            admission = state.engine.admit()
            body, call = await start(admission)
        except UnclipError as exc:
            raise engine_error(exc, state, request_id) from None
        if body.stream:
            return await stream_images(request, state, body, call, describe)
        job = asyncio.ensure_future(call())
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
            raise engine_error(exc, state, request_id) from None
    except ApiError as error:
        request.state.log = {**getattr(request.state, "log", {}), "error": error.code}
        return envelope(error)
    finally:
        if admission is not None:
            admission.release()  # a no-op once the request was queued with it
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


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def image_event(kind: str, b64: str, state: ServeState, **extra) -> str:
    """OpenAI's image_generation.partial_image / .completed event; unclip adds image_index (which of
    the request's images; OpenAI's streaming makes one) and, when completed, the seed."""
    data = {"type": f"image_generation.{kind}", "b64_json": b64, "created_at": int(time.time()),
            "size": state.size, "quality": "auto", "background": "opaque", "output_format": "png", **extra}
    return sse(data["type"], data)


async def stream_images(request: Request, state: ServeState, body, call, describe) -> Response:
    """`stream: true`: Server-Sent Events, each preview as it comes (`partial_image`, for each image of
    the request), then each image (`completed`). A request refused before it is queued gets the
    ordinary 4xx; a failure after the stream began is an `error` event with the envelope. A client that
    leaves cancels the job: its rows leave the batch at the next step."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import StreamingResponse

    request_id = getattr(request.state, "request_id", "")
    loop = asyncio.get_running_loop()
    previews: asyncio.Queue = asyncio.Queue()
    submitted = asyncio.Event()
    k = body.partial_images or 0

    def on_partial(index: int, images) -> None:  # on the scheduler thread
        loop.call_soon_threadsafe(previews.put_nowait, (index, images))

    job = asyncio.ensure_future(call(partial_images=k, on_partial=on_partial if k else None,
                                     on_submit=lambda _: submitted.set()))
    queued = asyncio.ensure_future(submitted.wait())
    left = asyncio.ensure_future(until_disconnected(request))
    await asyncio.wait({job, queued, left}, return_when=asyncio.FIRST_COMPLETED)
    queued.cancel()
    if left.done() and not job.done():
        job.cancel()
        raise ApiError(499, "the client closed the connection", code="client_closed_request")
    if job.done() and not submitted.is_set():  # refused before it was queued: an ordinary error response
        left.cancel()
        try:
            job.result()
        except UnclipError as exc:
            raise engine_error(exc, state, request_id) from None
    meta = {"model": state.model, "software": "unclip"}

    async def partial_events(index: int, images) -> str:
        tags = {**meta, "partial_image_index": str(index)}
        encoded = await run_in_threadpool(lambda: [png_base64(x, tags, compress_level=1) for x in images])
        return "".join(image_event("partial_image", b64, state, partial_image_index=index, image_index=i)
                       for i, b64 in enumerate(encoded))

    async def events():
        try:
            while True:
                get = asyncio.ensure_future(previews.get())
                await asyncio.wait({get, job, left}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield await partial_events(*get.result())
                    continue
                get.cancel()
                if not job.done():  # the client left
                    return
                break
            while not previews.empty():  # previews handed over before the images were done
                yield await partial_events(*previews.get_nowait())
            try:
                result = job.result()
            except UnclipError as exc:
                error = engine_error(exc, state, request_id)
                yield sse("error", {"error": {"message": str(error), "type": error.type, "param": error.param,
                                              "code": error.code}})
                return
            described = {**describe(body, result.settings), "seed": str(result.seed), **meta}
            encoded = await run_in_threadpool(lambda: [png_base64(image, {**described, "image_index": str(i)})
                                                       for i, image in enumerate(result.images)])
            yield "".join(image_event("completed", b64, state, image_index=i, seed=result.seed)
                          for i, b64 in enumerate(encoded))
        finally:
            if not job.done():  # the client left, or the server stops: the rows leave at the next step
                job.cancel()
            left.cancel()

    request.state.log = {"n": body.n, "stream": True, "partial_images": k}
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class InterpolationForm(BaseModel):
    """`POST /v1/unclip/interpolations` form fields besides the endpoints `a` and `b` (each a prompt
    as a text field or an image as a file field). Not streamed: `stream` and `partial_images` are
    unknown fields here."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    frames: int = 5
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: int | None = None
    prior_steps: int | None = None
    prior_guidance: float | None = None
    decoder_steps: int | None = None
    super_res_steps: int | None = None
    decoder_guidance: float | None = None

    @property
    def n(self) -> int:
        return self.frames

    stream = property(lambda self: False)
    partial_images = property(lambda self: None)


INTERPOLATIONS = "/v1/unclip/interpolations"


@router.post(INTERPOLATIONS)
async def interpolations(request: Request) -> Response:
    """unclip's own route (OpenAI has none): `frames` images from a to b, their image embeddings
    spherically interpolated and the decoder's noise the same in every frame; a multipart form whose
    fields `a` and `b` are each a prompt (text) or an image (file). Not streamed."""
    state: ServeState = request.app.state.unclip

    async def start(admission: Admission):
        fields, files = await read_form(request, state.max_upload_bytes, state.receive_timeout_s,
                                        files=("a", "b"), max_files=2,
                                        what="the fields a and b, each a prompt (text) or an image (file)")
        ends = {}
        for name in ("a", "b"):
            if (name in fields) == (name in files):
                raise ApiError(400, f"{name} is required, once: a prompt (text field) or an image (file "
                               "field)", param=name, code="missing_parameter")
            ends[name] = fields.pop(name) if name in fields else files[name]
        body = parse_request(fields, state, InterpolationForm)
        settings = {k: getattr(body, k) for k in TUNABLE  # an interpolation has no Stable unCLIP fields
                    if k != "use_prior" and getattr(body, k, None) is not None}
        return body, functools.partial(state.engine.interpolate, ends["a"], ends["b"], body.frames,
                                       seed=body.seed, timeout_s=state.timeout_s, admission=admission,
                                       **settings)

    return await serve_images(request, state, start, lambda body, s: {
        "mode": "interpolation", "steps": f"decoder {s.decoder_steps}, super-res {s.super_res_steps}",
        "guidance": f"decoder {s.decoder_guidance}"})


@router.get("/v1/unclip/info")
async def info(request: Request) -> JSONResponse:
    """What this server's model makes and takes: its size, the settings a request gets when it leaves
    them out (text and image-conditioned), the server's limits, which routes it serves (the
    playground reads this)."""
    state: ServeState = request.app.state.unclip
    pipe = state.engine.pipeline
    if pipe is None:
        raise_loading()
    names = TUNABLE
    limits = pipe.limits
    family = getattr(pipe, "family", "karlo")
    stable = family == "stable-unclip"
    return JSONResponse({
        "model": state.model, "size": state.size, "has_prior": pipe.has_prior, "family": family,
        # which forms the playground offers: a Stable unCLIP model makes images from text or from
        # images (its layout), and has no interpolation
        "generations": pipe.has_prior if stable else True,
        "variations": pipe.image_preprocess is not None, "interpolations": not stable,
        "noise_levels": pipe.noising.num_train_timesteps if stable else None,
        "defaults": {k: getattr(pipe.defaults, k) for k in names if hasattr(pipe.defaults, k)},
        "image_defaults": {k: getattr(pipe.image_defaults, k) for k in IMAGE_TUNABLE
                           if hasattr(pipe.image_defaults, k)},  # each family has its own settings
        "limits": {"max_images": limits.max_images, "max_steps": limits.max_steps,
                   "max_guidance": limits.max_guidance, "max_prompt_chars": limits.max_prompt_chars,
                   "max_partial_images": MAX_PARTIAL_IMAGES, "max_upload_bytes": state.max_upload_bytes}})


def raise_loading() -> None:
    raise ApiError(503, "the model is still loading; retry in a moment", type="server_error", code="loading",
                   headers={"Retry-After": "1"})


@router.get("/v1/unclip/status")
async def status(request: Request) -> JSONResponse:
    """The queue now and the latency of recent requests (the last 5 minutes, at most 256)."""
    state: ServeState = request.app.state.unclip
    engine = state.engine
    since = time.monotonic() - 300
    recent = sorted(s for end, s in list(engine.latencies) if end >= since)

    def quantile(q: float) -> float | None:
        return round(recent[min(len(recent) - 1, int(q * len(recent)))], 3) if recent else None

    return JSONResponse({"model": state.model, "ready": state.ready and engine.health() is None,
                         "queue_depth": engine.queue_depth, "in_flight": engine.in_flight,
                         "recent": {"requests": len(recent), "p50_s": quantile(0.5), "p90_s": quantile(0.9)}})


PLAYGROUND = {"/": ("index.html", "text/html; charset=utf-8"),
              "/playground/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/playground/style.css": ("style.css", "text/css; charset=utf-8")}
# the page runs only its own script and style, sends requests only to this server, shows data: images
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
                "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
                "Referrer-Policy": "no-referrer"}


@router.get("/")
@router.get("/playground/app.js")
@router.get("/playground/style.css")
async def playground(request: Request) -> Response:
    """The playground: a page shipped in the package (no build step, nothing fetched from elsewhere).
    It needs no key to load; it asks for the server's key, if any, and sends it with its requests."""
    from importlib.resources import files

    name, media_type = PLAYGROUND[request.url.path]
    content = (files("unclip.serve") / "playground" / name).read_bytes()
    return Response(content, media_type=media_type, headers=PAGE_HEADERS)


@router.get("/health/live")
async def live() -> JSONResponse:
    return JSONResponse({"status": "live"})


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    """200 only when this replica can serve: loaded, warmed up, not draining, and its engine healthy
    (batches succeed, steps progress); a failing engine is probed in the background to recover."""
    state: ServeState = request.app.state.unclip
    problem = state.engine.health() if state.ready else None
    if state.ready and state.engine.accepting and problem is None:
        return JSONResponse({"status": "ready", "model": state.model, "replica": state.replica})
    if problem == "failing":
        state.engine.probe()
    status = problem or ("draining" if state.ready else "loading")
    detail = {"failing": f"the last {state.engine.unhealthy_after_failures} batches failed",
              "stalled": f"no denoising step for over {state.engine.stall_s:g} s while requests wait",
              "stopped": "the engine's scheduler has stopped"}.get(status, status)
    return envelope(ApiError(503, f"not ready: {detail}", type="server_error", code=status,
                             headers={"Retry-After": "1"}))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.unclip.engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
