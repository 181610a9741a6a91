"""Metrics: the one home for what matrix_hpc exports to Prometheus.

Everything goes through Ray's metrics API (``ray.util.metrics``): Ray ships
each process's values to its node's metrics agent, which serves them on the
node's Prometheus endpoint (names get Ray's ``ray_`` prefix, e.g.
``matrix_tasks_completed_total`` is scraped as
``ray_matrix_tasks_completed_total``). No second metrics system, no
listener of ours. docs/monitoring.md lists every metric.

Each metric is declared once below and created lazily, in the process that
first records it, and only when that process is connected to Ray: outside
Ray (unit tests, the bare benchmarks) a record is one attribute check.
Recording costs about 5 us in Ray, so hot paths add up counts per batch and
record once (:meth:`Metric.inc` with the batch's count), or declare their
metrics ``batched``: kept in the process and sent to Ray at most once per
``PUBLISH_S`` (and at :func:`flush_batched`, which a worker calls before it
stops). The LLM client's are (six records per call otherwise).

Labels are bounded: the run id, the workflow, a role, an endpoint/replica,
a status or error type; never a task id. ``run_id`` and ``workflow`` come
from :func:`set_run` (called where a run's processes start) so call sites
pass only what varies.

Lives at the package root (imports nothing of matrix_hpc) so that every
layer, the store included, can use it.
"""

from __future__ import annotations

import bisect
import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

#: Latency buckets in seconds: a sandbox exec or a cached LLM turn (ms) to a long generation (minutes).
LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Per-commit sizes (rows or bytes): powers of 4 from 1 to ~1e9.
SIZE_BUCKETS = tuple(float(4 ** k) for k in range(16))

BASE_TAGS = ("run_id", "workflow")
#: ``MATRIX_HPC_METRICS=off`` in the environment of ``matrix-hpc run``: record nothing (benchmarks compare with it).
SWITCH_ENV = "MATRIX_HPC_METRICS"
_base: dict[str, str] = {"run_id": "", "workflow": ""}
PUBLISH_S = 1.0  # batched metrics go to Ray at most this often per process
_next_publish = 0.0


def set_run(run_id: str, workflow: str) -> None:
    """The labels every metric of this process carries (one run per process)."""
    _base.update(run_id=run_id, workflow=workflow)
    for m in _ALL:
        m.tag_cache.clear()


def ray_connected() -> bool:
    """True in a process connected to Ray (driver, actor, task); never imports Ray."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


class Metric:
    """A Ray Counter / Gauge / Histogram created on first use in a Ray process.

    ``kind``: ``counter`` (``inc``), ``gauge`` (``set``), ``histogram`` (``observe``).
    """

    def __init__(self, kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (),
                 boundaries: tuple[float, ...] = (), batched: bool = False) -> None:
        self.kind, self.name, self.description = kind, name, description
        self.batched = batched and kind != "histogram"  # a histogram batches as BatchedHistogram
        self._pending: dict[tuple[str, ...], float] = {}  # batched: label values -> increase (counter) or value
        self.tag_keys = BASE_TAGS + tag_keys
        self.boundaries = boundaries
        self._impl: Any = None  # Any: a ray.util.metrics object; None until first use; False outside Ray
        self.tag_cache: dict[tuple[str, ...], dict[str, str]] = {}
        _ALL.append(self)

    def inc(self, value: float = 1.0, *tags: str) -> None:
        """Counter: add ``value`` (a batch's count) for the label values ``tags`` (in ``tag_keys`` order)."""
        impl = self._impl if self._impl is not None else self._create()
        if impl and value > 0:
            if self.batched:
                self._pending[tags] = self._pending.get(tags, 0.0) + value
                _maybe_publish()
            else:
                self._record(impl.inc, value, tags)

    def set(self, value: float, *tags: str) -> None:
        """Gauge: the current value."""
        impl = self._impl if self._impl is not None else self._create()
        if impl:
            if self.batched:
                self._pending[tags] = value
                _maybe_publish()
            else:
                self._record(impl.set, value, tags)

    def flush(self) -> None:
        """Batched: send what this process kept since the last flush."""
        pending, self._pending = self._pending, {}
        if pending and self._impl:
            method = self._impl.inc if self.kind == "counter" else self._impl.set
            for tags, value in pending.items():
                self._record(method, value, tags)

    def observe(self, value: float, *tags: str) -> None:
        """Histogram: one observation."""
        impl = self._impl if self._impl is not None else self._create()
        if impl:
            self._record(impl.observe, value, tags)

    def _record(self, method: Any, value: float, tags: tuple[str, ...]) -> None:
        try:
            method(value, self._tags(tags))
        except Exception as e:  # a metric must never fail the task, step or commit that records it
            log.warning("metric %s: recording failed (%s: %s); not recording it in this process any more",
                        self.name, type(e).__name__, e)
            self._impl = False

    def _tags(self, values: tuple[str, ...]) -> dict[str, str]:
        tags = self.tag_cache.get(values)
        if tags is None:  # one dict per label combination, built once (the set is bounded)
            tags = self.tag_cache[values] = {**_base, **dict(zip(self.tag_keys[len(BASE_TAGS):], values, strict=True))}
        return tags

    def _create(self) -> Any:
        if os.environ.get(SWITCH_ENV) == "off":
            self._impl = False  # for good: Ray's processes inherit the switch from the driver's environment
            return False
        if not ray_connected():
            return False  # not cached: the process may connect to Ray later
        try:
            self._impl = self._new_ray_metric()
        except Exception as e:  # as above: no metric rather than a failed step
            log.warning("metric %s: Ray refused it (%s: %s); not recording it", self.name, type(e).__name__, e)
            self._impl = False
        return self._impl

    def _new_ray_metric(self) -> Any:
        from ray.util import metrics as rm

        if self.kind == "counter":
            return rm.Counter(self.name, self.description, tag_keys=self.tag_keys)
        if self.kind == "gauge":
            return rm.Gauge(self.name, self.description, tag_keys=self.tag_keys)
        return rm.Histogram(self.name, self.description, boundaries=list(self.boundaries), tag_keys=self.tag_keys)


_ALL: list[Metric] = []
_HISTOGRAMS: list[BatchedHistogram] = []


def flush_batched() -> None:
    """Send every batched metric's values of this process to Ray now."""
    global _next_publish
    _next_publish = time.monotonic() + PUBLISH_S
    for m in _ALL:
        if m.batched:
            m.flush()
    for h in _HISTOGRAMS:
        h.flush()


def _maybe_publish() -> None:
    if time.monotonic() >= _next_publish:
        flush_batched()


class BatchedHistogram:
    """A histogram for paths too hot for one Ray call per observation (a
    worker's steps: tens of thousands a second on one core).

    Observations land in this process's cumulative bucket counts (a bisect
    and two additions); at most once per ``publish_s`` (and at :meth:`flush`)
    the counts go to Ray as gauges named the way Prometheus names a
    histogram's series: ``NAME_bucket{le=...}``, ``NAME_sum``, ``NAME_count``,
    cumulative per process. ``rate()``, ``histogram_quantile()`` and sums over
    processes read them as they read a native histogram (a restarted process
    starts again from 0, which ``rate()`` takes as a counter reset).
    """

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...], boundaries: tuple[float, ...],
                 publish_s: float = 1.0) -> None:
        self.name, self.boundaries, self.publish_s = name, boundaries, publish_s
        self._les = [repr(float(b)) for b in boundaries] + ["+Inf"]
        self._bucket = Metric("gauge", f"{name}_bucket", f"{description} (cumulative bucket counts)",
                              (*tag_keys, "le"))
        self._sum = Metric("gauge", f"{name}_sum", f"{description} (sum of observations)", tag_keys)
        self._count = Metric("gauge", f"{name}_count", f"{description} (observations)", tag_keys)
        self._counts: dict[tuple[str, ...], list[int]] = {}  # label values -> per-bucket (not cumulative) counts
        self._sums: dict[tuple[str, ...], float] = {}
        self._next_publish = 0.0
        _HISTOGRAMS.append(self)

    def observe(self, value: float, *tags: str) -> None:
        counts = self._counts.get(tags)
        if counts is None:
            counts = self._counts[tags] = [0] * (len(self.boundaries) + 1)
            self._sums[tags] = 0.0
        counts[bisect.bisect_left(self.boundaries, value)] += 1
        self._sums[tags] += value
        now = time.monotonic()
        if now >= self._next_publish:
            self._next_publish = now + self.publish_s
            self.flush()

    def flush(self) -> None:
        """Send the cumulative counts to Ray (also called when the owner stops)."""
        for tags, counts in self._counts.items():
            cumulative = 0
            for le, n in zip(self._les, counts, strict=True):
                cumulative += n
                self._bucket.set(cumulative, *tags, le)
            self._count.set(cumulative, *tags)
            self._sum.set(self._sums[tags], *tags)

# -- the driver: admission ------------------------------------------------------
TASKS_ADMITTED = Metric("counter", "matrix_tasks_admitted_total",
                        "Tasks admitted (verify rounds admit missing ids again)")
TASKS_COMPLETED = Metric("counter", "matrix_tasks_completed_total",
                         "Rows committed to the output, by status (ok / filtered / failed)", ("status",))
TASKS_READMITTED = Metric("counter", "matrix_tasks_readmitted_total",
                          "Tasks dispatched again (lost send, lost worker or sink, timeout, verify round)")
TASKS_IN_FLIGHT = Metric("gauge", "matrix_tasks_in_flight", "Admitted tasks whose row is not committed yet")
INPUT_ROWS_READ = Metric("counter", "matrix_input_rows_read_total", "Input rows read (skipped on resume included)")

# -- the workers: steps ------------------------------------------------------------
STEP_LATENCY_S = BatchedHistogram("matrix_step_latency_seconds", "One role's step, retries included", ("role",),
                                  LATENCY_BUCKETS_S)
STEP_ERRORS = Metric("counter", "matrix_step_errors_total", "Failed step attempts, by exception type",
                     ("role", "error_type"))

# -- the LLM client (per endpoint = service, and replica = its URL) ------------------------
LLM_LATENCY_S = BatchedHistogram("matrix_llm_request_latency_seconds",
                                 "One LLM request until its answer (retries included)", ("endpoint", "replica"),
                                 LATENCY_BUCKETS_S)
# Time to first token: the client does not stream; vLLM's own vllm:time_to_first_token_seconds has it.
LLM_PROMPT_TOKENS = Metric("counter", "matrix_llm_prompt_tokens_total", "Prompt tokens, as the server counted them",
                           ("endpoint", "replica"), batched=True)
LLM_COMPLETION_TOKENS = Metric("counter", "matrix_llm_completion_tokens_total", "Completion tokens",
                               ("endpoint", "replica"), batched=True)
LLM_REQUESTS = Metric("counter", "matrix_llm_requests_total", "LLM requests by outcome (ok / error / rejected)",
                      ("endpoint", "replica", "outcome"), batched=True)
LLM_RETRIES = Metric("counter", "matrix_llm_retries_total", "LLM requests sent again after a failure",
                     ("endpoint",), batched=True)
LLM_OUTSTANDING = Metric("gauge", "matrix_llm_outstanding_requests", "Requests in flight from this process",
                         ("endpoint", "replica"), batched=True)

# -- sandboxes ---------------------------------------------------------------------
SANDBOX_LEASES = Metric("counter", "matrix_sandbox_leases_total", "Sandboxes leased to tasks", ("pool",))
SANDBOX_LEASED = Metric("gauge", "matrix_sandbox_leased", "Sandboxes leased now (per pool process)", ("pool",))
SANDBOX_START_S = Metric("histogram", "matrix_sandbox_start_seconds", "Sandbox start to ready", ("pool",),
                         LATENCY_BUCKETS_S)
SANDBOX_CALL_S = Metric("histogram", "matrix_sandbox_call_seconds",
                        "One call into a leased sandbox, by method (exec, server_request, put_file, ...)",
                        ("pool", "method"), LATENCY_BUCKETS_S)

# -- the sinks -----------------------------------------------------------------------
SINK_COMMIT_S = Metric("histogram", "matrix_sink_commit_seconds", "One commit (write, fsync, rename)", (),
                       LATENCY_BUCKETS_S)
SINK_COMMIT_ROWS = Metric("histogram", "matrix_sink_commit_rows", "Rows per commit", (), SIZE_BUCKETS)
SINK_COMMIT_BYTES = Metric("histogram", "matrix_sink_commit_bytes", "Bytes per commit (files published)", (),
                           SIZE_BUCKETS)
SINK_ROWS = Metric("counter", "matrix_sink_rows_total", "Rows committed by the sinks")
SINK_COMMIT_FAILURES = Metric("counter", "matrix_sink_commit_failures_total", "Failed commit attempts")


class Deltas:
    """Publishes counts that their owner keeps as plain cumulative ints (the
    cheap way on a hot path) as counter increments: one Ray call per label
    set per publish, whatever the rate."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}

    def publish(self, metric: Metric, total: float, *tags: str) -> None:
        key = (metric.name, tags)
        delta = total - self._last.get(key, 0.0)
        if delta > 0:
            metric.inc(delta, *tags)
            self._last[key] = total
