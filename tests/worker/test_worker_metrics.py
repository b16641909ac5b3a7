"""The /metrics endpoint: vLLM's metric names with the sfllm: prefix, moving as requests run."""

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from worker.client import WorkerClient

PROMPT = "hello world, this is"
NAMES = [
    "sfllm:num_requests_running",
    "sfllm:num_requests_waiting",
    "sfllm:kv_cache_usage_perc",
    "sfllm:time_to_first_token_seconds",
    "sfllm:inter_token_latency_seconds",
    "sfllm:e2e_request_latency_seconds",
    "sfllm:prompt_tokens_total",
    "sfllm:generation_tokens_total",
    "sfllm:request_success_total",
]


# What Prometheus 2.x sends: OpenMetrics first.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def scrape(worker, accept: str | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels without model_name): value}."""
    url = f"http://127.0.0.1:{worker.server.metrics_port}/metrics"
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            samples[(s.name, labels)] = s.value
    return samples


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_prometheus_scrape_keeps_the_sfllm_names(worker):
    # Asked for OpenMetrics, prometheus_client would rename the samples sfllm_*; dashboards query sfllm:*.
    with WorkerClient(worker.target, timeout=30) as client:
        client.generate(PROMPT, max_tokens=2, temperature=0, ignore_eos=True)
    names = {name for name, _ in scrape(worker, accept=PROMETHEUS_ACCEPT)}
    assert "sfllm:generation_tokens_total" in names
    assert not any(name.startswith("sfllm_") for name in names)


def test_metric_names_are_exposed_and_counters_move(worker):
    with WorkerClient(worker.target, timeout=30) as client:
        client.generate(PROMPT, max_tokens=2, temperature=0, ignore_eos=True)  # every labelled series exists now
        before = scrape(worker)
        names = {name for name, _ in before}
        for name in NAMES:
            assert name in names or name + "_count" in names, name
        result = client.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True)
        after = scrape(worker)

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert moved("sfllm:prompt_tokens_total") == result.num_prompt_tokens
    assert moved("sfllm:generation_tokens_total") == 5
    assert moved("sfllm:request_success_total", finished_reason="length") == 1
    assert moved("sfllm:time_to_first_token_seconds_count") == 1
    assert moved("sfllm:e2e_request_latency_seconds_count") == 1
    assert moved("sfllm:inter_token_latency_seconds_count") == 4
    # Structure, not speed: a request's end-to-end time spans its first token and every gap after it.
    spanned = moved("sfllm:time_to_first_token_seconds_sum") + moved("sfllm:inter_token_latency_seconds_sum")
    assert moved("sfllm:e2e_request_latency_seconds_sum") >= spanned - 1e-9


def test_load_gauges_follow_running_requests(make_worker):
    worker = make_worker(pace=0.02)
    with WorkerClient(worker.target, timeout=30) as client:
        idle = scrape(worker)
        assert _value(idle, "sfllm:num_requests_running") == 0 and _value(idle, "sfllm:kv_cache_usage_perc") == 0
        stream = client.stream(PROMPT, max_tokens=400, temperature=0, ignore_eos=True, request_id="gauged")
        next(stream)
        # The engine's load report can reach the front a moment after the first token does.
        deadline = time.monotonic() + 10
        while _value(busy := scrape(worker), "sfllm:num_requests_running") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert _value(busy, "sfllm:kv_cache_usage_perc") > 0
        stream.close()  # cancel: counted as an abort
        deadline = time.monotonic() + 10
        while _value(scrape(worker), "sfllm:num_requests_running") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        done = scrape(worker)
        assert _value(done, "sfllm:kv_cache_usage_perc") == 0
        assert _value(done, "sfllm:request_success_total", finished_reason="abort") == 1


def test_speculative_decoding_counters_count_drafts_and_accepted_tokens(make_worker):
    worker = make_worker(
        speculative_algorithm="ngram", num_speculative_tokens=4, ngram_max=3, ngram_min=1, speculative_adaptive=False
    )
    before = scrape(worker)
    assert _value(before, "sfllm:spec_decode_num_draft_tokens_total") == 0
    prompt = [299, 96, 353, 177, 67, 24, 268, 79, 271]
    with WorkerClient(worker.target, timeout=60) as client:  # greedy random weights fall into loops: drafts land
        completion = client.generate(token_ids=prompt, max_tokens=200, temperature=0, ignore_eos=True)
    deadline = time.monotonic() + 10  # the counters ride the engine's load reports, which follow the stream
    while True:
        after = scrape(worker)
        drafted = _value(after, "sfllm:spec_decode_num_draft_tokens_total")
        accepted = _value(after, "sfllm:spec_decode_num_accepted_tokens_total")
        if accepted > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert 0 < accepted <= drafted, (accepted, drafted)
    # One draft per sequence and verify step, of at most 4 tokens: the mean acceptance length is
    # 1 + accepted / drafts, between 1 and 5.
    drafts = _value(after, "sfllm:spec_decode_num_drafts_total")
    assert drafts <= drafted <= 4 * drafts and 1 < 1 + accepted / drafts <= 5
    # The one request's usage counts the same accepted drafts.
    assert completion.choices[0].usage.accepted_draft_tokens == accepted
