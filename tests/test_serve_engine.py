"""The serving engine in process: batching, no head-of-line blocking, queue limit, cancellation,
deadlines, failures confined to their batch, drain. The tiny preset runs for real underneath;
`Gated` only holds a batch at its start so that tests can fill the queue deterministically."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.conftest import FAST_STEPS
from unclip.errors import GenerationError, UnclipError
from unclip.serve.engine import DeadlineExceeded, Engine, QueueFull, RequestCancelled, ShuttingDown

WAIT = 60  # seconds a test waits for a result before failing (never reached when things work)


class Gated:
    """A real pipeline whose batches wait for `gate` before running; counts batches."""

    def __init__(self, pipeline, poison: str | None = None):
        self._pipeline, self.poison = pipeline, poison
        self.gate, self.batches, self.entered = threading.Event(), [], threading.Semaphore(0)
        self.gate.set()

    def __getattr__(self, name):  # settings, limits, dims: the real pipeline's
        return getattr(self._pipeline, name)

    def generate_requests(self, requests, **kw):
        self.batches.append([r.prompts[0] for r in requests])
        self.entered.release()
        self.gate.wait(WAIT)
        if self.poison and any(self.poison in r.prompts for r in requests):
            raise GenerationError("the decoder stage produced non-finite values (test)")
        return self._pipeline.generate_requests(requests, **kw)


@pytest.fixture
def gated(tiny_pipeline):
    return Gated(tiny_pipeline, poison="poison")


def engine_for(pipeline, **kw) -> Engine:
    return Engine(pipeline, **{"max_batch_images": 4, "max_wait_ms": 0, "max_queue": 8, **kw})


def hold(gated: Gated, engine: Engine):
    """Occupy the scheduler with one running batch; returns its job."""
    gated.gate.clear()
    job = engine.submit("blocker", **FAST_STEPS)
    assert gated.entered.acquire(timeout=WAIT)
    return job


def test_compatible_requests_share_a_batch_and_an_incompatible_one_waits_its_turn(gated):
    engine = engine_for(gated)
    blocker = hold(gated, engine)
    a = engine.submit("a", n=2, **FAST_STEPS)
    b = engine.submit("b", **dict(FAST_STEPS, decoder_steps=5))  # incompatible, between a and c
    c = engine.submit("c", n=2, **FAST_STEPS)
    gated.gate.set()
    results = [job.future.result(WAIT) for job in (blocker, a, b, c)]
    assert gated.batches == [["blocker"], ["a", "c"], ["b"]]
    assert [r.batch_images for r in results] == [1, 4, 1, 4]
    assert [tuple(r.images.shape) for r in results] == [(1, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32),
                                                        (2, 3, 32, 32)]
    engine.shutdown(0)


def test_full_queue_refuses_at_once_with_a_retry_hint(gated):
    engine = engine_for(gated, max_queue=2)
    hold(gated, engine)
    queued = [engine.submit(p, **FAST_STEPS) for p in ("x", "y")]
    with pytest.raises(QueueFull) as err:
        engine.submit("z", **FAST_STEPS)
    assert err.value.retry_after_s >= 1 and "queue is full" in str(err.value)
    gated.gate.set()
    assert all(job.future.result(WAIT).images.shape[0] == 1 for job in queued)
    engine.shutdown(0)


def test_bad_input_is_refused_before_queueing(gated):
    engine = engine_for(gated)
    for kwargs, param in [(dict(n=0), "num_images"), (dict(seed=2**64), "seed"), (dict(seed=1.5), "seed"),
                          (dict(decoder_steps=1), "decoder_steps"), (dict(timeout_s=-1), "timeout")]:
        with pytest.raises(UnclipError) as err:
            engine.submit("a", **kwargs)
        assert "\n" not in str(err.value)
        if param in ("seed", "timeout"):
            assert err.value.param == param
    assert engine.queue_depth == 0
    engine.shutdown(0)


def test_cancelled_while_queued_never_runs(gated):
    engine = engine_for(gated)
    hold(gated, engine)
    job = engine.submit("gone", **FAST_STEPS)
    job.cancel()
    gated.gate.set()
    with pytest.raises(RequestCancelled):
        job.future.result(WAIT)
    engine.shutdown(5)
    assert ["gone"] not in gated.batches


class PausedAtDecoder:
    """A real pipeline that pauses after the decoder's first step until `resume` is set."""

    def __init__(self, pipeline):
        self._pipeline, self.paused, self.resume = pipeline, threading.Event(), threading.Event()

    def __getattr__(self, name):  # settings, limits, dims: the real pipeline's
        return getattr(self._pipeline, name)

    def generate_requests(self, requests, on_step=None, **kw):
        def hooked(stage, step, rows):
            on_step(stage, step, rows)
            if stage == "decoder" and step == 0:
                self.paused.set()
                self.resume.wait(WAIT)

        return self._pipeline.generate_requests(requests, on_step=hooked, **kw)


def test_cancelled_while_running_leaves_its_batch_at_the_next_step(tiny_pipeline):
    paused = PausedAtDecoder(tiny_pipeline)
    engine = Engine(paused, max_batch_images=4, max_wait_ms=2000, max_queue=8)
    settings = dict(prior_steps=3, decoder_steps=6, super_res_steps=2)
    stay = engine.submit("stay", n=1, **settings)
    leave = engine.submit("leave", n=3, **settings)  # 4 images: the batch starts now
    assert paused.paused.wait(WAIT)
    leave.cancel()  # between decoder steps 0 and 1
    paused.resume.set()
    assert stay.future.result(WAIT).images.shape[0] == 1
    with pytest.raises(RequestCancelled):
        leave.future.result(WAIT)
    decoder = [rows for _, stage, _, rows, _ in engine.steps if stage == "decoder"]
    assert decoder == [8] + [2] * 5  # guided: [uncond; cond] of 4 images, then of the 1 left
    assert [rows for _, stage, _, rows, _ in engine.steps if stage == "super_res"] == [1, 1]
    text = engine.metrics.exposition().decode()
    assert 'unclip_cancellations_total{reason="cancelled",where="running"} 1.0' in text
    engine.shutdown(0)


def test_deadline_passed_in_the_queue(gated):
    engine = engine_for(gated)
    hold(gated, engine)
    job = engine.submit("late", timeout_s=0.05, **FAST_STEPS)
    threading.Event().wait(0.2)
    gated.gate.set()
    with pytest.raises(DeadlineExceeded):
        job.future.result(WAIT)
    engine.shutdown(0)
    assert 'reason="deadline"' in engine.metrics.exposition().decode()


def test_async_deadline_answers_in_time_and_cancel_propagates(gated):
    engine = engine_for(gated)
    hold(gated, engine)

    async def scenario():
        with pytest.raises(DeadlineExceeded):
            await engine.generate("late", timeout_s=0.05, **FAST_STEPS)  # answered while still queued
        task = asyncio.ensure_future(engine.generate("dropped", **FAST_STEPS))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    gated.gate.set()
    engine.shutdown(10)
    assert gated.batches == [["blocker"]]  # neither the expired nor the cancelled request ran


def test_a_failing_batch_fails_only_its_requests(gated):
    engine = engine_for(gated)
    hold(gated, engine)
    bad = engine.submit("poison", **FAST_STEPS)
    other = engine.submit("fine", **dict(FAST_STEPS, decoder_steps=5))  # another batch
    gated.gate.set()
    with pytest.raises(GenerationError, match="non-finite"):
        bad.future.result(WAIT)
    assert other.future.result(WAIT).images.shape[0] == 1
    assert engine.submit("after", **FAST_STEPS).future.result(WAIT).images.shape[0] == 1
    engine.shutdown(0)


def test_shutdown_drains_then_refuses(gated):
    engine = engine_for(gated)
    first = hold(gated, engine)
    queued = [engine.submit(p, **FAST_STEPS) for p in ("q1", "q2")]
    threading.Timer(0.2, gated.gate.set).start()
    engine.shutdown(drain_s=WAIT)
    assert all(job.future.result(0).images.shape[0] == 1 for job in [first, *queued])
    with pytest.raises(ShuttingDown):
        engine.submit("late", **FAST_STEPS)


def test_engine_images_equal_generate(demo_pipeline):
    """Same prompt, seed, n and settings: the engine's images are generate's (one batch of 3)."""
    settings = dict(prior_steps=5, decoder_steps=5, super_res_steps=3)
    engine = Engine(demo_pipeline, max_batch_images=8, max_wait_ms=500)
    asked = [("a red circle on a blue background", 1, 11), ("a green square", 2, 12)]
    jobs = [engine.submit(p, n=n, seed=seed, **settings) for p, n, seed in asked]
    for job, (p, n, seed) in zip(jobs, asked, strict=True):
        got = job.future.result(WAIT)
        assert got.batch_images == 3 and got.seed == seed
        alone = demo_pipeline.generate(p, seed=seed, num_images=n, output_type="pt", **settings)
        assert float((got.images - alone).abs().max()) <= 1 / 255  # see tests/test_batching.py
    engine.shutdown(0)


def test_memory_freed_by_batches_goes_back_to_the_system(demo_pipeline):
    """Batches of every size from 1 to 8 images, one after another: the engine hands glibc's freed
    heap back after each (malloc_trim), so the process does not keep a fragmented high-water mark.
    Measured on the demo: +106 MB of RSS over such a round without the trim, +5 MB with it (the
    soak: docs/serving.md, "Memory"); the bar, 40 MB, is well between the two."""
    import psutil

    from unclip.serve import engine as engine_module

    assert engine_module._malloc_trim is not None  # glibc: this machine and CI
    process = psutil.Process()
    engine = Engine(demo_pipeline, max_batch_images=8, max_wait_ms=0)
    def settled_rss() -> int:  # after the trim that follows the last batch (its result comes first)
        done = time.monotonic()
        for _ in range(600):
            if engine._released_at >= done:
                break
            time.sleep(0.05)
        return process.memory_info().rss

    try:
        engine.warmup(prior_steps=5, decoder_steps=5, super_res_steps=3)
        before = settled_rss()
        for n in range(1, 9):
            engine.submit("a red circle on a blue background", n=n, seed=n, prior_steps=5, decoder_steps=5,
                          super_res_steps=3).future.result(timeout=300)
        grown = (settled_rss() - before) / 2**20
    finally:
        engine.shutdown(0)
    assert grown < 40, f"RSS grew {grown:.1f} MB over one round of batch sizes"
