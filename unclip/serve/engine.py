"""The serving engine: a bounded queue, one scheduler thread, batches of compatible requests.

Services embed this (sync or asyncio); the HTTP app and the Ray Serve deployment are thin front
ends over it. The engine owns everything about requests in flight:

* **Queue and admission**: bounded (`max_queue`); a full queue refuses at once (`QueueFull`,
  with a retry hint), never blocks the caller. A front end takes a place (`admit()`) before it
  reads or decodes anything (an upload holds its place while it is read and decoded), so a flood
  against a full queue costs a refusal each, not a decode each. Uploads are decoded on a small
  bounded pool (`decode_workers` threads).
* **Batching**: the scheduler takes the oldest request and every queued request compatible with
  it (same steps, guidance, prior, and the same kind, text or variation: `Request.batch_key`), in
  arrival order, up to
  `max_batch_images` images, waiting at most `max_wait_ms` after the oldest arrived for more.
  The oldest request always goes next, so an incompatible request is never passed over for long,
  and never holds up compatible ones behind it (they go with the batch of their own kind).
* **Seed-exact**: each request has its own generator (Pipeline.generate_requests), so its images
  are the same whether it ran alone or merged.
* **Cancellation and deadlines**: a request whose caller left (`Job.cancel()`, or the asyncio
  task awaiting `generate` cancelled) or whose deadline passed is dropped from the queue, or, if
  running, leaves its batch before the next denoising step.
* **Drain**: `shutdown(drain_s)` refuses new requests and lets queued and running ones finish
  for up to `drain_s` seconds, then cancels the rest.
* **Health**: `health()` names what is wrong, for readiness: `unhealthy_after_failures` batches in
  a row failed (until one succeeds: `probe()` runs one), or the engine has work and has finished no
  denoising step for `stall_s` seconds, or its scheduler thread is gone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from unclip.engine.batch import PartialCallback, Request, check_partial_images
from unclip.engine.image_conditioned import preprocess
from unclip.engine.pipeline import Pipeline
from unclip.engine.settings import check_prompts, check_seed
from unclip.errors import GenerationError, UnclipError
from unclip.serve.metrics import Metrics

log = logging.getLogger("unclip.serve")


RELEASE_EVERY_S = 10.0


def _glibc_malloc_trim():
    """glibc's malloc_trim (Linux), or None where the C library has none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _glibc_malloc_trim()


class QueueFull(UnclipError):
    """The queue is at `max_queue`: try again after `retry_after_s` (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(UnclipError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


class DeadlineExceeded(UnclipError):
    """The request's deadline passed before its images were done (HTTP 504)."""


class RequestCancelled(UnclipError):
    """The caller cancelled the request (its client left); nobody reads this result."""


@dataclass
class Result:
    images: torch.Tensor  # [n, 3, H, W] float32 in [0, 1], CPU
    seed: int
    settings: object  # GenerationSettings used
    queue_s: float
    compute_s: float
    batch_images: int  # images in the batch it ran in


@dataclass
class Job:
    """A submitted request: `future` resolves to a Result or raises one of this module's errors."""

    id: str
    request: Request
    seed: int
    submitted: float
    deadline: float | None
    future: Future = field(default_factory=Future)
    started: float | None = None
    cancelled_at: float | None = None  # monotonic time of cancel()

    def cancel(self) -> None:
        """The caller left: drop it from the queue, or from its batch at the next step."""
        if self.cancelled_at is None:
            self.cancelled_at = time.monotonic()

    @property
    def _cancelled(self) -> bool:
        return self.cancelled_at is not None

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (time.monotonic() if now is None else now) > self.deadline

    def should_stop(self) -> bool:
        return self._cancelled or self.expired()

    @property
    def images(self) -> int:
        return self.request.rows


class WholeCall:
    """A job that is one pipeline call of its own (an interpolation), in the queue like a request: it
    never batches (its key is itself) and it is run whole by the scheduler thread."""

    def __init__(self, call: Callable, generator: torch.Generator, rows: int, settings):
        self.call, self.generator, self.rows, self.settings = call, generator, rows, settings
        self.cancelled = None
        self.batch_key = self

    def run(self) -> torch.Tensor:
        return self.call(generator=self.generator)


def load_endpoint(pipeline: Pipeline, image, name: str):
    """An uploaded endpoint of an interpolation, decoded within the pixel limit and checked against
    the model (it needs an image encoder): a PIL image, as Pipeline.interpolate takes it."""
    from unclip.engine.image_input import load_image

    try:
        loaded = load_image(image, pipeline.limits.max_image_pixels, name)
    except UnclipError as exc:
        raise UnclipError(str(exc), param=name) from None
    preprocess(pipeline, [loaded], "interpolate between images")
    return loaded


def output_size(pipeline) -> int:
    """The side of the images a model makes (Karlo: super-resolution's; Stable unCLIP: the VAE's)."""
    return getattr(pipeline, "output_size", None) or pipeline.dims.super_res_size


class Admission:
    """A place in the engine's queue, taken before a request's body is read or decoded; it becomes
    the request's queue entry when submitted with it, or is given back by `release()` (idempotent)."""

    def __init__(self, engine: Engine):
        self._engine, self.held = engine, True

    def release(self) -> None:
        with self._engine._cond:
            if self.held:
                self.held = False
                self._engine._admitted -= 1
                self._engine._cond.notify_all()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Engine:
    """Queue, batching, cancellation and metrics around one loaded Pipeline."""

    def __init__(self, pipeline: Pipeline | Callable[[], Pipeline], *, max_batch_images: int = 8,
                 max_wait_ms: float = 10.0, max_queue: int = 64, metrics: Metrics | None = None,
                 decode_workers: int = 2, unhealthy_after_failures: int = 3, stall_s: float = 120.0):
        """`pipeline`: a loaded Pipeline, or a function that loads one, which the engine then calls on
        its scheduler thread (`wait_loaded()` waits for it). On a CPU, prefer the function: torch's
        OpenMP threads spin only for the first thread that computes, and a model loaded on one
        thread and run on another ran 2-2.4x slower (docs/serving.md, "CPU threads")."""
        if max_batch_images < 1 or max_queue < 1 or max_wait_ms < 0 or decode_workers < 1:
            raise UnclipError("max_batch_images, max_queue and decode_workers must be >= 1 and "
                              "max_wait_ms >= 0")
        self._loader = pipeline if callable(pipeline) else None
        self.pipeline = None if self._loader else pipeline
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        if self._loader is None:
            self._loaded.set()
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics if metrics is not None else Metrics()
        self.steps: deque = deque(maxlen=4096)  # (monotonic time, stage, step, rows, job ids): recent steps
        self.dropped: deque = deque(maxlen=1024)  # (job id, cancelled_at, reason, where): recent drops
        self.latencies: deque = deque(maxlen=256)  # (monotonic end, seconds from submit): recent successes
        self._queue: list[Job] = []
        self._admitted = 0  # places taken by admit() and not yet queued or given back
        self._running: list[Job] = []
        self._decode_pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="unclip-decode")
        self.unhealthy_after_failures, self.stall_s = unhealthy_after_failures, stall_s
        self._failures = 0  # batches failed in a row
        self._progress_at = time.monotonic()  # the last step, batch end or idle wait of the scheduler
        self._probe: Future | None = None
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._batch_seconds = 0.0  # moving average of a batch's duration, for Retry-After
        self._released_at = 0.0  # the last time freed memory went back to the system
        self._thread = threading.Thread(target=self._loop, name="unclip-scheduler", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> Pipeline:
        """The pipeline, once loaded; re-raises the loader's error (an UnclipError for a bad model)."""
        if not self._loaded.wait(timeout):
            raise UnclipError(f"the model did not load within {timeout} s")
        if self._load_error is not None:
            raise self._load_error
        return self.pipeline

    # -- submitting -----------------------------------------------------------------------------

    def admit(self) -> Admission:
        """Take a place in the queue before reading or decoding a request (QueueFull, ShuttingDown);
        pass it to submit/submit_variation as `admission`, or release it."""
        self._check_loaded()
        with self._cond:
            self._check_room(counting_admitted=True)
            self._admitted += 1
        return Admission(self)

    def submit(self, prompt: str | list[str], *, n: int = 1, seed: int | None = None,
               timeout_s: float | None = None, admission: Admission | None = None, partial_images: int = 0,
               on_partial: PartialCallback | None = None, **settings) -> Job:
        """Queue a request (`n` images per prompt; settings and streaming as Pipeline.generate:
        `on_partial` is called on the scheduler thread, so it should only hand the preview on). Bad
        input raises UnclipError here; a full queue QueueFull; a draining engine ShuttingDown. With
        `admission`, the request takes that place (no new QueueFull)."""
        self._check_loaded()
        limits = self.pipeline.limits  # the same limits as Pipeline.generate (engine.settings.Limits)
        prompts = check_prompts(prompt, limits)
        s = self.pipeline.settings(num_images=n, **settings)
        self.pipeline.check_prior(s)
        limits.check_images(len(prompts), s.num_images)
        check_partial_images(partial_images, on_partial)
        seed = self._check(seed, timeout_s)
        return self._enqueue(lambda generator: Request(prompts, s, generator, partial_images=partial_images,
                                                       on_partial=on_partial), seed, timeout_s, admission)

    def submit_variation(self, image, *, n: int = 1, seed: int | None = None, timeout_s: float | None = None,
                         admission: Admission | None = None, partial_images: int = 0,
                         on_partial: PartialCallback | None = None, **settings) -> Job:
        """Queue `n` variations of one image (encoded bytes, a path or a PIL image; settings and
        streaming as Pipeline.vary). The image is decoded and preprocessed here, in the caller's thread
        (`vary`: on the decode pool); the image encoder runs in the batch. Variations batch with
        variations only. Without `admission`, a full queue is refused before the image is decoded."""
        self._check_loaded()
        s = self.pipeline.image_settings(num_images=n, **settings)
        self.pipeline.limits.check_images(1, s.num_images)
        check_partial_images(partial_images, on_partial)
        seed = self._check(seed, timeout_s)
        with self._cond:
            self._check_room(counting_admitted=admission is None)
        self.metrics(self.metrics.uploads_decoded).inc()
        pixels = preprocess(self.pipeline, [image], "a variation")
        return self._enqueue(lambda generator: Request([""], s, generator, pixel_values=pixels,
                                                       partial_images=partial_images, on_partial=on_partial),
                             seed, timeout_s, admission)

    def _check_loaded(self) -> None:
        if not self._loaded.is_set():
            raise ShuttingDown("the model is still loading; retry in a moment")

    @staticmethod
    def _check(seed: int | None, timeout_s: float | None) -> int:
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise UnclipError(f"timeout must be a positive number of seconds, got {timeout_s!r}",
                              param="timeout")
        return secrets.randbelow(2**63) if seed is None else check_seed(seed)

    def _check_room(self, counting_admitted: bool) -> None:
        """Under the lock: ShuttingDown or QueueFull where a new request has no place."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another "
                               "replica")
        if len(self._queue) + (self._admitted if counting_admitted else 0) >= self.max_queue:
            self.metrics(self.metrics.requests, status="rejected").inc()
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later",
                            retry_after_s=self._retry_after())

    def _enqueue(self, request_for, seed: int, timeout_s: float | None, admission: Admission | None = None
                 ) -> Job:
        now = time.monotonic()
        job = Job(uuid.uuid4().hex, request_for(torch.Generator("cpu").manual_seed(seed)), seed, now,
                  None if timeout_s is None else now + timeout_s)
        job.request.cancelled = job.should_stop
        with self._cond:
            if admission is not None and admission.held:  # its place becomes the job's
                if not self._accepting:
                    raise ShuttingDown("the server is shutting down and takes no new requests; retry on "
                                       "another replica")
                admission.held = False
                self._admitted -= 1
            else:
                self._check_room(counting_admitted=True)
            self._queue.append(job)
            self.metrics(self.metrics.queue_depth).set(len(self._queue))
            self._cond.notify_all()
        return job

    def submit_interpolation(self, a, b, frames: int = 5, *, seed: int | None = None,
                             timeout_s: float | None = None, admission: Admission | None = None,
                             **settings) -> Job:
        """Queue an interpolation (Pipeline.interpolate: a and b prompts or images, `frames` images). It
        runs alone, as one batch of its own, and leaves only between batches when cancelled: its
        endpoints are encoded first (the prior for a prompt), then its frames decoded together."""
        from unclip.engine.image_conditioned import check_count

        self._check_loaded()
        pipe = self.pipeline
        s = pipe.image_settings(**settings)
        if s.num_images != 1:
            raise UnclipError("an interpolation makes one image per frame; leave n out", param="num_images")
        check_count(pipe.limits, frames, "frames", 2, "from a to b, both included")
        for x in (a, b):
            if isinstance(x, str):
                check_prompts(x, pipe.limits)
                pipe.check_prior(s)
        seed = self._check(seed, timeout_s)
        with self._cond:
            self._check_room(counting_admitted=admission is None)
        # what the scheduler thread runs must not fail on the client's input: images are read here
        ends = [x if isinstance(x, str) else load_endpoint(pipe, x, name) for name, x in (("a", a), ("b", b))]
        call = functools.partial(pipe.interpolate, *ends, frames, output_type="pt", **settings)
        return self._enqueue(lambda generator: WholeCall(call, generator, frames, s), seed, timeout_s,
                             admission)

    async def interpolate(self, a, b, frames: int = 5, *, on_submit=None, **kwargs) -> Result:
        """`submit_interpolation` for asyncio (images decoded on the decode pool)."""
        job = await asyncio.get_running_loop().run_in_executor(
            self._decode_pool, functools.partial(self.submit_interpolation, a, b, frames, **kwargs))
        return await self._wait(job, on_submit)

    async def generate(self, prompt: str | list[str], *, on_submit=None, **kwargs) -> Result:
        """`submit` for asyncio: if the awaiting task is cancelled (its client disconnected), the
        request is cancelled too and its rows stop costing compute. `on_submit(job)` sees the job."""
        return await self._wait(self.submit(prompt, **kwargs), on_submit)

    async def vary(self, image, *, on_submit=None, **kwargs) -> Result:
        """`submit_variation` for asyncio, decoding the image in a worker thread (not the event loop)."""
        submitted = asyncio.get_running_loop().run_in_executor(
            self._decode_pool, functools.partial(self.submit_variation, image, **kwargs))
        try:
            job = await asyncio.shield(submitted)
        except asyncio.CancelledError:  # the caller left while the image was decoded: cancel once queued
            submitted.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().cancel())
            raise
        return await self._wait(job, on_submit)

    async def _wait(self, job: Job, on_submit) -> Result:
        if on_submit is not None:
            on_submit(job)
        timeout = None if job.deadline is None else max(0.0, job.deadline - time.monotonic())
        result = asyncio.wrap_future(job.future)
        # read its outcome even when nobody awaits it any more (the caller left, the deadline passed),
        # so that asyncio does not log "exception was never retrieved" for a client's departure
        result.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:  # shield: a timeout must not cancel the future, which the scheduler still resolves
            return await asyncio.wait_for(asyncio.shield(result), timeout)
        except asyncio.TimeoutError:  # the scheduler drops it (queued or at the next step) as expired
            raise DeadlineExceeded("the request's deadline passed before its images were done; allow a "
                                   "longer timeout or retry when the server is less busy") from None
        except asyncio.CancelledError:
            job.cancel()
            raise

    def _retry_after(self) -> int:
        """Whole seconds until the queue has room, from the recent batch duration (HTTP Retry-After)."""
        waiting = len(self._queue) + self._admitted
        batches_ahead = math.ceil(waiting / self.max_batch_images) + (1 if self._running else 0)
        return max(1, math.ceil(self._batch_seconds * batches_ahead))

    # -- state ----------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def health(self) -> str | None:
        """None if healthy, else why not: "failing" (batches in a row failed), "stalled" (work, and no
        step for stall_s), "stopped" (the scheduler thread is gone)."""
        if not self._thread.is_alive():
            return "stopped"
        if self._failures >= self.unhealthy_after_failures:
            return "failing"
        busy = bool(self._queue or self._running)
        if busy and time.monotonic() - self._progress_at > self.stall_s:
            return "stalled"
        return None

    def probe(self) -> None:
        """While failing, run one warm-up request in the background (at most one at a time): its
        success ends the failing state even when no client sends requests to an unready replica."""
        with self._cond:
            if self._probe is not None and not self._probe.done():
                return
            self._probe = Future()
        probe = self._probe

        def run() -> None:
            try:
                self.warmup()
            except Exception:  # noqa: BLE001 - its failure is counted like any batch's
                pass
            finally:
                probe.set_result(None)

        threading.Thread(target=run, name="unclip-probe", daemon=True).start()

    def warmup(self, **settings) -> Result:
        """One request through the whole path (allocations, kernel choices, CUDA graphs), so that
        the first user request does not pay for it. Blocks."""
        if not self.pipeline.has_prior:  # a variation-only model: warm up with a variation of a grey image
            from PIL import Image

            grey = Image.new("RGB", (output_size(self.pipeline),) * 2, (128, 128, 128))
            return self.submit_variation(grey, seed=0, **settings).future.result()
        return self.submit("warm-up", seed=0, **settings).future.result()

    def shutdown(self, drain_s: float = 30.0) -> None:
        """Refuse new requests, let queued and running ones finish for up to `drain_s`, cancel the
        rest, stop the scheduler."""
        with self._cond:
            self._accepting = False
            end = time.monotonic() + drain_s
            while (self._queue or self._running) and time.monotonic() < end:
                self._cond.wait(timeout=max(0.0, end - time.monotonic()))
            self._stopping = True
            for job in self._queue + self._running:
                job.cancel()
            self._cond.notify_all()
        self._thread.join(timeout=60)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    # -- the scheduler thread -------------------------------------------------------------------

    def _loop(self) -> None:
        if self._loader is not None:  # torch's first computing thread: this one (see __init__)
            try:
                self.pipeline = self._loader()
            except BaseException as exc:  # noqa: BLE001 - handed to wait_loaded's caller
                self._load_error, self._accepting = exc, False
                return
            finally:
                self._loaded.set()
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    return
            self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        """Under the lock: the next batch, after waiting for requests (None: stop)."""
        while True:
            self._drop_departed()
            if self._stopping and not self._queue:
                return None
            if not self._queue:
                self._progress_at = time.monotonic()
                self._cond.wait(timeout=max(1.0, self.stall_s / 4))  # wakes to mark itself alive
                continue
            head = self._queue[0]
            batch = self._compatible(head)
            fill_by = head.submitted + self.max_wait_s
            wait = fill_by - time.monotonic()
            if sum(j.images for j in batch) >= self.max_batch_images or wait <= 0 or self._stopping:
                for job in batch:
                    self._queue.remove(job)
                self._running = batch
                self.metrics(self.metrics.queue_depth).set(len(self._queue))
                return batch
            self._cond.wait(timeout=wait)

    def _compatible(self, head: Job) -> list[Job]:
        """The head and the queued requests that can share its batch, in arrival order, up to
        max_batch_images (the head alone may exceed it)."""
        key, batch, images = head.request.batch_key, [head], head.images
        for job in self._queue[1:]:
            if job.request.batch_key == key and images + job.images <= self.max_batch_images:
                batch.append(job)
                images += job.images
        return batch

    def _drop_departed(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._queue if j.should_stop()]:
            self._queue.remove(job)
            self._finish_dropped(job, "queued", now)
        self.metrics(self.metrics.queue_depth).set(len(self._queue))

    def _finish_dropped(self, job: Job, where: str, now: float) -> None:
        if job.expired(now) and not job._cancelled:
            reason, error = "deadline", DeadlineExceeded(
                "the request's deadline passed before its images were done; allow a longer timeout or "
                "retry when the server is less busy")
        elif self._stopping:
            reason, error = "shutdown", ShuttingDown("the server shut down before this request finished; "
                                                     "retry")
        else:
            reason, error = "cancelled", RequestCancelled("the request was cancelled by its caller")
        self.dropped.append((job.id, job.cancelled_at, reason, where))
        self.metrics(self.metrics.cancellations, reason=reason, where=where).inc()
        self.metrics(self.metrics.requests, status=reason).inc()
        self.metrics(self.metrics.request_seconds).observe(now - job.submitted)
        if not job.future.done():
            job.future.set_exception(error)

    def _run(self, batch: list[Job]) -> None:
        start = time.monotonic()
        images = sum(j.images for j in batch)
        for job in batch:
            job.started = start
            self.metrics(self.metrics.queue_seconds).observe(start - job.submitted)
        self.metrics(self.metrics.batch_images).observe(images)
        self.metrics(self.metrics.in_flight).set(len(batch))
        ids = [j.id for j in batch]

        self._progress_at = start

        def on_step(stage: str, step: int, rows: int) -> None:
            self._progress_at = time.monotonic()
            self.steps.append((time.monotonic(), stage, step, rows, ids))
            self.metrics(self.metrics.steps, stage=stage).inc()
            self.metrics(self.metrics.step_rows, stage=stage).inc(rows)

        try:
            if isinstance(batch[0].request, WholeCall):  # an interpolation: alone, start to end
                outputs = [None if batch[0].should_stop() else batch[0].request.run()]
            else:
                outputs = self.pipeline.generate_requests([j.request for j in batch], on_step=on_step)
            error = None
        except UnclipError as exc:  # GenerationError (non-finite output) or a bad model file
            outputs, error = [None] * len(batch), exc
        except Exception as exc:  # noqa: BLE001 - one batch failing must not stop the engine
            log.exception("batch of %d requests failed", len(batch))
            first_line = (str(exc).splitlines() or [""])[0][:200]
            outputs, error = [None] * len(batch), GenerationError(
                f"generation failed inside the engine ({type(exc).__name__}: {first_line})")
        end = time.monotonic()
        self._progress_at = end
        self._failures = 0 if error is None else self._failures + 1
        recent = end - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * recent if self._batch_seconds else recent
        for job, out in zip(batch, outputs, strict=True):
            self.metrics(self.metrics.compute_seconds).observe(end - start)
            if error is not None:
                self.metrics(self.metrics.requests, status="error").inc()
                self.metrics(self.metrics.request_seconds).observe(end - job.submitted)
                job.future.set_exception(error)
            elif out is None:
                self._finish_dropped(job, "running", end)
            else:
                self.metrics(self.metrics.requests, status="ok").inc()
                self.metrics(self.metrics.images).inc(out.shape[0])
                self.metrics(self.metrics.request_seconds).observe(end - job.submitted)
                self.latencies.append((end, end - job.submitted))
                job.future.set_result(Result(out, job.seed, job.request.settings, start - job.submitted,
                                             end - start, images))
        with self._cond:
            self._running = []
            self.metrics(self.metrics.in_flight).set(0)
            self._cond.notify_all()
        self._release_memory()

    def _release_memory(self) -> None:
        """Give the memory a batch freed back to the system: glibc keeps freed blocks for reuse, and
        batches of varying sizes leave its heap ever more fragmented, so RSS creeps up while the live
        set stays the same (measured in docs/serving.md, "Memory"). When the queue is empty, and at
        most every RELEASE_EVERY_S under load, since a trim itself takes milliseconds."""
        now = time.monotonic()
        if _malloc_trim is None or (self._queue and now - self._released_at < RELEASE_EVERY_S):
            return
        _malloc_trim(0)
        self._released_at = time.monotonic()

