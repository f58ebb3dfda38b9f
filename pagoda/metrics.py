"""Prometheus metrics of a pagoda server (names mirror vLLM's, prefix ``pagoda:``).

Three sources feed one registry:
- the engine's cumulative state (running/waiting, KV usage, token counters), read at scrape time
  by ``EngineStatsCollector`` so the numbers can never drift from the engine's own;
- per-request timings (TTFT, inter-token latency, ...) observed by ``RequestTracker`` as the
  server consumes a request's outputs;
- HTTP counts and latencies observed by the server's middleware.
The contract (names, labels) is written down in helpers' METRICS.md and README.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger("pagoda.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_TIME_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                        40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ENCODER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def token_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: token-count histograms scale with the model."""
    out, mantissas, exp = [], (1, 2, 5), 1
    while True:
        for m in mantissas:
            v = m * exp
            if v > max_value:
                return out
            out.append(v)
        exp *= 10


class EngineStatsCollector:
    """Reads ``engine.get_stats()`` at scrape time and reports it as gauges and counters."""

    def __init__(self, engine: Any, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def describe(self):
        return []  # dynamic; keeps registration from calling collect() early

    def collect(self):
        try:
            s = self.engine.get_stats()
        except Exception:  # a dying engine must not break /metrics
            logger.exception("engine.get_stats() failed")
            return
        G, C = GaugeMetricFamily, CounterMetricFamily
        for family, name, doc, value in (
                (G, "num_requests_running", "Requests in the running batch.", s.num_running),
                (G, "num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
                (G, "kv_cache_usage_perc", "KV-cache blocks in use / total (0..1).", s.kv_cache_usage),
                (C, "num_preemptions", "Requests preempted (recomputed later).", s.num_preemptions),
                (C, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                 s.prefix_cache_queries),
                (C, "prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
                (C, "prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total),
                (C, "generation_tokens", "Tokens generated.", s.generation_tokens_total),
                *self._image_stats(s)):
            metric = family("pagoda:" + name, doc, labels=["model_name"])
            metric.add_metric([self.model_name], float(value))
            yield metric

    def _image_stats(self, s):
        if not getattr(self.engine.model_config, "is_multimodal", False):
            return ()
        C = CounterMetricFamily
        return ((C, "images_processed", "Images in requests the engine took in.", s.mm_images_total),
                (C, "images_encoded", "Images the vision encoder ran on.", s.images_encoded_total),
                (C, "encoder_cache_queries", "Images looked up in the encoder cache.",
                 s.encoder_cache_queries),
                (C, "encoder_cache_hits", "Images whose embeddings the encoder cache held (no "
                 "encoder run).", s.encoder_cache_hits))


class ServerMetrics:
    """The registry served on /metrics and the instruments the server observes into."""

    def __init__(self, engine: Any, model_name: str, max_model_len: int):
        disable_created_metrics()  # no *_created series: vLLM's dashboards don't expect them
        self.model_name = model_name
        # the registry /metrics renders; with several API server processes (--api-server-count)
        # prometheus_client's multiprocess mode sums every process's instruments into it, and the
        # instruments themselves live in a registry of their own
        self.registry = CollectorRegistry(auto_describe=True)
        multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if multiproc:
            from prometheus_client import multiprocess
            multiprocess.MultiProcessCollector(self.registry)
            r = CollectorRegistry(auto_describe=True)
        else:
            r = self.registry
            ProcessCollector(registry=r)
        self.registry.register(EngineStatsCollector(engine, model_name))
        try:  # GPU gauges (NVML); absent module or no GPU -> nothing
            from pagoda.gpu_monitor import GPUCollector
            self.registry.register(GPUCollector())
        except ImportError:
            pass

        m = ["model_name"]
        self.request_success = Counter("pagoda:request_success", "Finished requests by finish reason.",
                                       m + ["finished_reason"], registry=r)
        self.ttft = Histogram("pagoda:time_to_first_token_seconds", "Time to first token.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("pagoda:inter_token_latency_seconds", "Time between output tokens.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pagoda:e2e_request_latency_seconds", "Arrival to finish.", m,
                             buckets=REQUEST_TIME_BUCKETS, registry=r)
        self.queue_time = Histogram("pagoda:request_queue_time_seconds", "Arrival to first scheduled.",
                                    m, buckets=REQUEST_TIME_BUCKETS, registry=r)
        tokens = token_buckets(max(max_model_len, 1))
        self.prompt_len = Histogram("pagoda:request_prompt_tokens", "Prompt length in tokens.", m,
                                    buckets=tokens, registry=r)
        self.gen_len = Histogram("pagoda:request_generation_tokens", "Output length in tokens.", m,
                                 buckets=tokens, registry=r)
        self.iteration_tokens = Histogram("pagoda:iteration_tokens_total", "Tokens per engine step.",
                                          m, buckets=token_buckets(1 << 16), registry=r)
        self.encoder_time = Histogram("pagoda:vision_encoder_time_seconds",
                                      "Time of one vision-encoder run (a step's new images).", m,
                                      buckets=ENCODER_BUCKETS, registry=r)
        self.http_requests = Counter("pagoda:http_requests", "HTTP requests by route and status.",
                                     ["method", "route", "status"], registry=r)
        self.http_latency = Histogram("pagoda:http_request_duration_seconds",
                                      "HTTP request latency (whole response, streams included).",
                                      ["method", "route"], buckets=HTTP_BUCKETS, registry=r)
        self._m = [model_name]
        self.itl_child = self.itl.labels(model_name)  # observed per streamed token: no label lookup

    def on_engine_step(self, step: Any) -> None:
        """Step listener (engine.messages.SchedulerStats of each engine step)."""
        n = step.step_prompt_tokens + step.step_generation_tokens
        if n:
            self.iteration_tokens.labels(*self._m).observe(n)
        for seconds in step.step_encoder_seconds:
            self.encoder_time.labels(*self._m).observe(seconds)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_latency.labels(method, route).observe(seconds)

    def track(self) -> "RequestTracker":
        return RequestTracker(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Follows one request's outputs; observes latencies and lengths once it ends.

    Inter-token latency is taken from the engine's token timestamps, spread evenly over the tokens
    an output carries (several can arrive together when the consumer lags a step behind).
    """

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self._last_token_time: Optional[float] = None
        self._last_count = 0
        self._done = False

    def on_output(self, out: Any) -> None:
        m = out.metrics
        if m is None or m.last_token_time is None:
            return
        count = max((len(o.token_ids) for o in out.outputs), default=0)
        new = count - self._last_count
        if self._last_token_time is not None and new > 0:
            gap = (m.last_token_time - self._last_token_time) / new
            h = self.metrics.itl_child
            for _ in range(new):
                h.observe(max(gap, 0.0))
        if new > 0:
            self._last_token_time, self._last_count = m.last_token_time, count
        if out.finished:
            self.finish(out)

    def finish(self, out: Any, reason: Optional[str] = None) -> None:
        """Record a finished (or, with reason='abort', an abandoned) request exactly once."""
        if self._done:
            return
        self._done = True
        mm = self.metrics
        label = mm.model_name
        samples = out.outputs if isinstance(getattr(out, "outputs", None), list) else []
        if reason is not None or out is None:
            reasons = [reason or "abort"]
        elif samples:
            reasons = [o.finish_reason or "abort" for o in samples]
        else:  # a pooling request: it ends when its vector is ready
            reasons = ["stop"]
        for r in reasons:
            mm.request_success.labels(label, r).inc()
        m = getattr(out, "metrics", None)
        if m is None:
            return
        end = m.finished_time or time.time()
        if m.first_token_time is not None:
            mm.ttft.labels(label).observe(max(m.first_token_time - m.arrival_time, 0.0))
        if m.first_scheduled_time is not None:
            mm.queue_time.labels(label).observe(max(m.first_scheduled_time - m.arrival_time, 0.0))
        mm.e2e.labels(label).observe(max(end - m.arrival_time, 0.0))
        mm.prompt_len.labels(label).observe(len(out.prompt_token_ids or ()))
        for o in samples:
            mm.gen_len.labels(label).observe(len(o.token_ids))


class StatsLogger:
    """Builds the periodic one-line stats log from two snapshots of the engine's counters."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._prev = None
        self._prev_t = time.monotonic()
        self._last_line: Optional[str] = None

    def line(self) -> Optional[str]:
        """The line to log now, or None when nothing happened since the last one (idle)."""
        s = self.engine.get_stats()
        now = time.monotonic()
        dt = max(now - self._prev_t, 1e-9)
        p = self._prev
        prompt = (s.prompt_tokens_total - p.prompt_tokens_total) / dt if p else 0.0
        gen = (s.generation_tokens_total - p.generation_tokens_total) / dt if p else 0.0
        queries = s.prefix_cache_queries - (p.prefix_cache_queries if p else 0)
        hits = s.prefix_cache_hits - (p.prefix_cache_hits if p else 0)
        self._prev, self._prev_t = s, now
        hit_rate = 100.0 * hits / queries if queries else 0.0
        line = (f"Avg prompt throughput: {prompt:.1f} tokens/s, Avg generation throughput: {gen:.1f} "
                f"tokens/s, Running: {s.num_running} reqs, Waiting: {s.num_waiting} reqs, "
                f"KV cache usage: {100 * s.kv_cache_usage:.1f}%, Prefix cache hit rate: {hit_rate:.1f}%")
        active = prompt or gen or s.num_running or s.num_waiting
        if not active and line == self._last_line:
            return None
        self._last_line = line
        return line
