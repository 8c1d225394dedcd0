"""The serving engine's Prometheus metrics: names in base units, `_total` on counters.

One `Metrics` per engine, in its own registry (several engines in one process, as in tests,
do not collide). `labels` are constant labels on every series (a Ray Serve replica's identity).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from 50 ms to 10 min: a CPU image takes seconds, a GPU batch a fraction of one.
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
IMAGES = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, labels: dict[str, str] | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.labels = dict(labels or {})
        const = tuple(self.labels)

        def make(kind, name, doc, extra=(), **kw):
            return kind(name, doc, (*const, *extra), registry=self.registry, **kw)

        self.requests = make(Counter, "unclip_requests", "Requests finished by the engine, by outcome",
                             ("status",))
        self.request_seconds = make(Histogram, "unclip_request_duration_seconds",
                                    "Submit to result, per request", buckets=SECONDS)
        self.queue_seconds = make(Histogram, "unclip_queue_duration_seconds",
                                  "Submit to the start of its batch, per request", buckets=SECONDS)
        self.compute_seconds = make(Histogram, "unclip_compute_duration_seconds",
                                    "Start of its batch to result, per request", buckets=SECONDS)
        self.batch_images = make(Histogram, "unclip_batch_images", "Images per batch at its start",
                                 buckets=IMAGES)
        self.queue_depth = make(Gauge, "unclip_queue_depth", "Requests waiting for a batch")
        self.in_flight = make(Gauge, "unclip_in_flight_requests", "Requests in the running batch")
        self.images = make(Counter, "unclip_images", "Images generated")
        self.uploads_decoded = make(Counter, "unclip_uploads_decoded",
                                    "Uploaded images decoded (each after its request was admitted)")
        self.cancellations = make(Counter, "unclip_cancellations",
                                  "Requests dropped before finishing, by reason (queued or running)",
                                  ("reason", "where"))
        self.step_rows = make(Counter, "unclip_denoising_rows",
                              "Network rows computed by denoising steps, by stage", ("stage",))
        self.steps = make(Counter, "unclip_denoising_steps", "Denoising steps run, by stage", ("stage",))
        # the HTTP front ends' view (route: a known path or "other")
        self.http_requests = make(Counter, "unclip_http_requests", "HTTP requests by route and status code",
                                  ("route", "code"))
        self.http_seconds = make(Histogram, "unclip_http_request_duration_seconds",
                                 "HTTP request handling time, by route", ("route",), buckets=SECONDS)

    def __call__(self, metric, **labels):
        """The series of `metric` with the constant labels and these."""
        return metric.labels(**self.labels, **labels) if (self.labels or labels) else metric

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
