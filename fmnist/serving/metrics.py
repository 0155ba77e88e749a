"""The server's Prometheus metrics (prometheus-client), served at /monitoring/prometheus/metrics, the
path TF Serving's monitoring config uses.

TF Serving's own names where it has one, with its labels and units (microseconds):

    :tensorflow:serving:request_count{model_name, status}           requests answered, by canonical code
    :tensorflow:serving:request_latency{model_name, API, entrypoint}  wall time of a request, us
    :tensorflow:serving:runtime_latency{model_name, API, runtime}     wall time of the model call, us
    :tensorflow:serving:batching_session:processed_batch_size{model_name}  images per model call

and this server's own, under `fashion_mnist_`: the version each label serves, model loads and
switches, refusals by reason, predicted classes and top-class confidence by label, the shadow
comparison's agreement, the bytes of request bodies held in memory, and the evidence windows dropped.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from fmnist.data.dataset import CLASS_NAMES

PATH = "/monitoring/prometheus/metrics"
REQUEST_COUNT = ":tensorflow:serving:request_count"
# Microseconds, as TF Serving's: 100 us to 10 s.
LATENCY_BUCKETS_US = (100, 250, 500, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 1e7)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ExactCounters(Collector):
    """Counters named exactly as TF Serving names them. prometheus-client's own Counter always adds
    `_total` (OpenMetrics' rule); TF Serving's counters have no suffix, and dashboards query them by name."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.counts: dict[tuple[str, ...], float] = {}

    def inc(self, *values: str) -> None:
        self.counts[values] = self.counts.get(values, 0) + 1

    def collect(self):
        metric = Metric(self.name, self.documentation, "counter")
        for values, count in sorted(self.counts.items()):
            metric.add_sample(self.name, dict(zip(self.labels, values, strict=True)), count)
        yield metric


class ServingMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.request_count = ExactCounters(
            REQUEST_COUNT, "The number of requests, by model and canonical status code.", ("model_name", "status")
        )
        self.registry.register(self.request_count)
        histogram = self._histogram
        self.request_latency = histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) of a request.",
            ("model_name", "API", "entrypoint"),
            LATENCY_BUCKETS_US,
        )
        self.runtime_latency = histogram(
            ":tensorflow:serving:runtime_latency",
            "Distribution of wall time (in microseconds) of the model call.",
            ("model_name", "API", "runtime"),
            LATENCY_BUCKETS_US,
        )
        self.batch_size = histogram(
            ":tensorflow:serving:batching_session:processed_batch_size",
            "Images in each model call (requests that arrive together are joined).",
            ("model_name",),
            BATCH_BUCKETS,
        )
        self.served_version = Gauge(
            "fashion_mnist_served_version", "The registry version number each label serves.", ("label",), **self._r
        )
        self.model_loads = Counter(
            "fashion_mnist_model_loads", "Models loaded and verified, or refused, by outcome.", ("outcome",), **self._r
        )
        self.switches = Counter(
            "fashion_mnist_model_switches", "Times a label began serving another version.", ("label",), **self._r
        )
        self.refusals = Counter("fashion_mnist_refusals", "Requests refused, by reason.", ("reason",), **self._r)
        self.predicted = Counter(
            "fashion_mnist_predicted_class", "Images answered, by label and top class.", ("label", "class"), **self._r
        )
        self.confidence = histogram(
            "fashion_mnist_top_confidence", "The top class's probability, by label.", ("label",), CONFIDENCE_BUCKETS
        )
        self.shadow = Counter(
            "fashion_mnist_shadow_comparisons",
            "Stable images also sent to the canary, by whether the top classes agreed.",
            ("agreed",),
            **self._r,
        )
        self.feedback_captured = Counter(
            "fashion_mnist_feedback_captured",
            "Images kept for review (serve --capture-rate/--capture-below).",
            **self._r,
        )
        self.feedback_dropped = Counter(
            "fashion_mnist_feedback_dropped",
            "Images chosen for capture but not kept: queue_full, folder_full, write_failed.",
            ("reason",),
            **self._r,
        )
        self.evidence_dropped = Counter(
            "fashion_mnist_evidence_dropped",
            "Evidence windows not written (serve --evidence-window-s): write_failed (the store failed for too long), "
            "stopped (not written as the server stopped), conflict, too_many_keys.",
            ("reason",),
            **self._r,
        )
        self._children: dict[str, tuple[list, Histogram]] = {}
        self.body_bytes = Gauge(
            "fashion_mnist_body_bytes_in_flight", "Bytes of request bodies held by the server now.", **self._r
        )

    @property
    def _r(self) -> dict:
        return {"registry": self.registry}

    def _histogram(self, name: str, documentation: str, labels: tuple[str, ...], buckets) -> Histogram:
        return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

    def answered(self, status: str, api: str, entrypoint: str, seconds: float) -> None:
        self.request_count.inc(self.model_name, status)
        self.request_latency.labels(self.model_name, api, entrypoint).observe(seconds * 1e6)

    def model_call(self, images: int, seconds: float) -> None:
        self.batch_size.labels(self.model_name).observe(images)
        self.runtime_latency.labels(self.model_name, "predict", "Keras").observe(seconds * 1e6)

    def predictions(self, label: str, probabilities: np.ndarray) -> None:
        """Each image's top class and its probability, under the label that answered it."""
        children = self._children.get(label)
        if children is None:  # the labeled series, looked up once (each lookup takes a lock)
            classes = [self.predicted.labels(label, name) for name in CLASS_NAMES]
            children = self._children[label] = (classes, self.confidence.labels(label))
        classes, confidence = children
        for index, value in zip(probabilities.argmax(axis=1).tolist(), probabilities.max(axis=1).tolist(), strict=True):
            classes[index].inc()
            confidence.observe(value)

    def page(self) -> bytes:
        text = generate_latest(self.registry)
        for name in (REQUEST_COUNT,):  # see ExactCounters: the header lines keep TF Serving's name too
            text = text.replace(f"# HELP {name}_total ".encode(), f"# HELP {name} ".encode())
            text = text.replace(f"# TYPE {name}_total ".encode(), f"# TYPE {name} ".encode())
        return text
