"""Prometheus metrics of a server, named like vLLM's with the `pjllm:` prefix, and a log line.

`ServerMetrics.record` takes each engine step's `IterationStats` (on the engine loop thread;
prometheus_client is thread-safe); gauges are read from the engine when `/metrics` is scraped.
Each server has its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pjllm.engine.async_engine import AsyncLLM, IterationStats

logger = logging.getLogger("pjllm")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class ServerMetrics:
    """The server's counters, gauges and histograms, labelled with `model_name`."""

    def __init__(self, engine: AsyncLLM, model_name: str):
        self.engine = engine
        self.registry = CollectorRegistry()
        label = {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pjllm:{name}", doc, ["model_name"], registry=self.registry).labels(**label)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"pjllm:{name}", doc, ["model_name"], registry=self.registry).labels(**label)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"pjllm:{name}", doc, ["model_name"], buckets=_LATENCY_BUCKETS,
                             registry=self.registry).labels(**label)

        self.running = gauge("num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting for a place in the batch.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Share of KV cache pages in use (0-1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.preemptions = counter("num_preemptions", "Sequences preempted for lack of KV pages.")
        self.prefix_cache_queries = counter("prefix_cache_queries",
                                            "Tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Tokens found in the prefix cache.")
        self._request_success = Counter("pjllm:request_success", "Finished requests, by finish reason.",
                                        ["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Between a request's tokens.")
        self.e2e_latency = histogram("e2e_request_latency_seconds", "Arrival to finish.")
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.")
        self._counts_seen = {"num_preemptions": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0}
        # For the periodic log line: totals since the last line.
        self._lock = threading.Lock()
        self._logged = (time.monotonic(), 0, 0)  # (time, prompt tokens, generation tokens)
        self._totals = [0, 0]

    def record(self, stats: IterationStats) -> None:
        """Counts one engine step (called on the engine loop thread)."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.generation_tokens)
        for seconds in stats.time_to_first_token:
            self.time_to_first_token.observe(seconds)
        for seconds in stats.inter_token_latency:
            self.inter_token_latency.observe(seconds)
        for reason, e2e, queued, _, _ in stats.finished:
            self._request_success.labels(model_name=self._model_name, finished_reason=reason).inc()
            self.e2e_latency.observe(e2e)
            self.queue_time.observe(queued)
        with self._lock:
            self._totals[0] += stats.prompt_tokens
            self._totals[1] += stats.generation_tokens

    def refresh_gauges(self) -> None:
        self.running.set(self.engine.num_running_requests())
        self.waiting.set(self.engine.num_waiting_requests())
        self.kv_cache_usage.set(self.engine.kv_cache_usage())
        # The core's totals advance the counters by what they gained since the last read.
        stats = self.engine.stats
        for name, metric in (("num_preemptions", self.preemptions),
                             ("prefix_cache_queries", self.prefix_cache_queries),
                             ("prefix_cache_hits", self.prefix_cache_hits)):
            total = getattr(stats, name)
            metric.inc(max(total - self._counts_seen[name], 0))
            self._counts_seen[name] = total

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric, gauges read now."""
        self.refresh_gauges()
        return generate_latest(self.registry)

    def log_line(self) -> str | None:
        """Throughput since the last line, running and waiting requests and KV use; None when
        idle since then (an idle server logs nothing)."""
        now = time.monotonic()
        with self._lock:
            prompt, generation = self._totals
        last_time, last_prompt, last_generation = self._logged
        self._logged = (now, prompt, generation)
        running, waiting = self.engine.num_running_requests(), self.engine.num_waiting_requests()
        if prompt == last_prompt and generation == last_generation and not running and not waiting:
            return None
        elapsed = max(now - last_time, 1e-9)
        return (f"prompt throughput {(prompt - last_prompt) / elapsed:.1f} tokens/s, generation "
                f"throughput {(generation - last_generation) / elapsed:.1f} tokens/s, running "
                f"{running} reqs, waiting {waiting} reqs, KV cache usage "
                f"{100 * self.engine.kv_cache_usage():.1f}%")
