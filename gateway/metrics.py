"""The gateway's Prometheus metrics, named like vLLM's where the meaning is the same (prefix `sfllm_gateway:`).

With several gateway processes, prometheus_client's multiprocess mode adds them up: each process
writes its values under PROMETHEUS_MULTIPROC_DIR and /metrics, whichever process answers, reads all.
"""

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "sfllm_gateway:"

# request latencies on CPU workers reach tens of seconds; on GPUs TTFT sits in the tens of milliseconds
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_BACKOFF_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class GatewayMetrics:
    """All gateway metrics, on their own registry so that several apps can live in one process (tests)."""

    content_type = CONTENT_TYPE_LATEST
    MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own switch, read when it is imported

    def __init__(self, multiprocess: bool = False) -> None:
        self.multiprocess = multiprocess
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.num_requests_running = Gauge(
            PREFIX + "num_requests_running",
            "Generation requests the gateway holds now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "From request arrival to the first generated token relayed",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Between consecutive streamed deltas of one completion",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "From request arrival to the last byte of the response",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated for clients", registry=r)
        self.retries = Counter(
            PREFIX + "request_retries",
            "Worker calls retried on another worker, by reason (worker_failed, worker_busy, worker_draining)",
            ["reason"],
            registry=r,
        )
        self.worker_in_flight = Gauge(
            PREFIX + "worker_requests_in_flight",
            "Generate calls open on each worker",
            ["worker"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.worker_healthy = Gauge(
            PREFIX + "worker_healthy",
            "1 while a worker is admitted to routing, else 0",
            ["worker"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.worker_ejections = Counter(
            PREFIX + "worker_ejections", "Workers taken out of routing, by reason", ["worker", "reason"], registry=r
        )
        self.routed = Counter(PREFIX + "routed_requests", "Worker calls by chosen worker", ["worker"], registry=r)
        # Circuit breakers and retries (gateway/resilience.py). Each gateway process has its own breakers.
        self.worker_circuit_state = Gauge(
            PREFIX + "worker_circuit_state",
            "Each worker's circuit breaker: 0 closed, 1 open, 2 half-open",
            ["worker"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.worker_circuit_transitions = Counter(
            PREFIX + "worker_circuit_transitions",
            "Circuit breaker state changes, by worker and the states left and entered",
            ["worker", "from_state", "to_state"],
            registry=r,
        )
        self.retries_refused = Counter(
            PREFIX + "retries_refused_by_budget",
            "Retries after a worker failure that the retry budget refused (the request failed with its error)",
            registry=r,
        )
        self.retry_budget_available = Gauge(
            PREFIX + "retry_budget_available",
            "Retries the retry budget would allow now (its ratio of the window's requests plus its floor, less the "
            "retries spent in the window); at 0 a failed attempt ends its request",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.worker_calls_evicted = Counter(
            PREFIX + "worker_calls_evicted",
            "Calls cancelled on a worker the health checks found silent, to be retried or migrated at once",
            ["worker"],
            registry=r,
        )
        self.worker_connections_lost = Counter(
            PREFIX + "worker_connections_lost",
            "Connections to a worker that stopped being ready (closed by the worker, reset, or by a keepalive "
            "ping gone unanswered)",
            ["worker"],
            registry=r,
        )
        self.requests_not_started = Counter(
            PREFIX + "requests_not_started_in_time",
            "Requests refused with 429 because no worker had started them (their first token) within "
            "--start-timeout-s of their arrival",
            registry=r,
        )
        self.retry_backoff = Histogram(
            PREFIX + "retry_backoff_seconds",
            "Waits before a retry on another worker after a failure",
            buckets=_BACKOFF_BUCKETS,
            registry=r,
        )

    def forget_worker(self, address: str) -> None:
        """Drop a removed worker's labelled series so dashboards stop showing it."""
        for gauge in (self.worker_in_flight, self.worker_healthy, self.worker_circuit_state):
            try:
                gauge.remove(address)
            except KeyError:
                pass

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    def close(self) -> None:
        """This process is leaving: drop its share of the live gauges."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())
