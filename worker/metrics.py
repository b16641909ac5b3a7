"""WorkerMetrics: the worker's Prometheus metrics, named like vLLM's with the sfllm: prefix."""

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sfllm_core.outputs import EngineLoad

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _LoadCollector(Collector):
    """Reads the engine's load once per scrape, so the three gauges come from one snapshot."""

    def __init__(self) -> None:
        self.model_name = ""
        self.get_load: Callable[[], EngineLoad] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.get_load is None:  # still loading: nothing to report yet
            return
        load = self.get_load()
        gauges = (
            ("sfllm:num_requests_running", "Number of requests in model execution batches.", load.num_running),
            ("sfllm:num_requests_waiting", "Number of requests waiting to be processed.", load.num_waiting),
            ("sfllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", load.kv_cache_usage),
        )
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        counters = (  # the engine counts these itself; vLLM's names (spec_decode_*_total)
            ("sfllm:spec_decode_num_drafts", "Number of spec decoding drafts.", load.num_drafts),
            ("sfllm:spec_decode_num_draft_tokens", "Number of draft tokens verified.", load.num_draft_tokens),
            (
                "sfllm:spec_decode_num_accepted_tokens",
                "Number of accepted draft tokens.",
                load.num_accepted_draft_tokens,
            ),
        )
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self.model_name], value)
            yield counter


class _TextFormatHandler(BaseHTTPRequestHandler):
    """Answers every GET with the Prometheus text format, whatever the scraper's Accept header asks for.

    prometheus_client's OpenMetrics output (which Prometheus 2.x asks for first) writes the samples of
    sfllm:* metrics with underscores (sfllm_generation_tokens_total), so dashboards would find nothing.
    """

    registry: CollectorRegistry

    def do_GET(self) -> None:
        body = generate_latest(self.registry)
        try:
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the scraper gave up (its timeout): nothing to report
            pass

    def log_message(self, format: str, *args: object) -> None:  # one line per scrape is noise
        pass


class WorkerMetrics:
    """One registry per worker (tests run several in one process), served on its own HTTP port."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._load = _LoadCollector()
        self.registry.register(self._load)
        labels = ["model_name"]
        r = self.registry
        self.time_to_first_token = Histogram(
            "sfllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "sfllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "sfllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("sfllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter(
            "sfllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        )
        self.request_success = Counter(
            "sfllm:request_success", "Count of finished requests.", labels + ["finished_reason"], registry=r
        )
        self._model_name = ""
        self._httpd = None

    def bind_engine(self, model_name: str, get_load: Callable[[], EngineLoad]) -> None:
        """Start reporting the engine's load gauges, labelled with the served model name."""
        self._model_name = model_name
        self._load.model_name = model_name
        self._load.get_load = get_load

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP in a background thread; return the bound port."""
        handler = type("MetricsHandler", (_TextFormatHandler,), {"registry": self.registry})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True).start()
        return self._httpd.server_port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def observe_first_token(self, seconds: float) -> None:
        self.time_to_first_token.labels(self._model_name).observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.inter_token_latency.labels(self._model_name).observe(seconds)

    def observe_finished(self, finish_reason: str, seconds: float, prompt_tokens: int, generation_tokens: int) -> None:
        """Record one finished engine request (one completion of a Generate call)."""
        self.e2e_request_latency.labels(self._model_name).observe(seconds)
        self.prompt_tokens.labels(self._model_name).inc(prompt_tokens)
        self.generation_tokens.labels(self._model_name).inc(generation_tokens)
        self.request_success.labels(self._model_name, finish_reason).inc()
