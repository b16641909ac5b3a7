"""bench/serve.py end to end on a real stack at a tiny scale: the stack's own figures, written as JSON and a PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gateway_harness import API_KEY, REPO, worker_behind_gateway
from PIL import Image

sys.path.insert(0, str(REPO / "bench"))
import serve  # noqa: E402


@pytest.fixture(scope="module")
def stack(qwen3_path: Path, tmp_path_factory: pytest.TempPathFactory):
    with worker_behind_gateway(qwen3_path, tmp_path_factory.mktemp("bench-worker"), "bench") as both:
        yield both


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    plot = tmp_path / "result.png"
    command = [sys.executable, str(REPO / "bench" / "serve.py"), *args, "--json", str(out), "--plot", str(plot)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Output token throughput" in done.stdout
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 400
    return json.loads(out.read_text())


@pytest.mark.parametrize("backend", ["openai", "openai-chat", "grpc"])
def test_fixed_concurrency_counts_every_token(stack, tmp_path, backend):
    proc, gateway = stack
    target = ["--target", proc.target] if backend == "grpc" else ["--base-url", gateway.url + "/v1"]
    result = _run(
        tmp_path,
        "--backend", backend, *target, "--api-key", API_KEY,
        "--num-prompts", "12", "--input-len", "8:24", "--output-len", "5:9", "--id-range", "300",
        "--max-concurrency", "4", "--processes", "2", "--no-progress",
    )  # fmt: skip
    summary = result["summary"]
    expected = serve.random_requests(12, (8, 24), (5, 9), "ids", id_range=300)
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["total_output_tokens"] == sum(r.output_len for r in expected)  # usage, counted by the server
    if backend != "openai-chat":  # chat prompts are the ids as words, templated: longer than the ids
        assert summary["total_input_tokens"] == sum(r.prompt_len for r in expected)
    assert summary["output_throughput"] == pytest.approx(summary["total_output_tokens"] / summary["duration_s"])
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = summary[name]
        assert 0 < s["median"] <= s["p99"] and s["mean"] > 0
    assert summary["ttft_ms"]["median"] <= summary["e2e_ms"]["median"]
    assert [r["output_tokens"] for r in result["requests"]].count(0) == 0


def test_poisson_arrivals_and_text_prompts(stack, tmp_path):
    _, gateway = stack
    result = _run(
        tmp_path,
        "--base-url", gateway.url + "/v1", "--api-key", API_KEY, "--prompt-format", "text",
        "--num-prompts", "10", "--input-len", "6", "--output-len", "4", "--request-rate", "20", "--no-progress",
    )  # fmt: skip
    starts = sorted(r["start"] for r in result["requests"])
    assert result["summary"]["completed"] == 10 and result["summary"]["total_output_tokens"] == 40
    assert starts[-1] > 0.05  # spread out in time, not all at once


def test_sharegpt_prompts(stack, tmp_path):
    _, gateway = stack
    data = [
        {"conversations": [{"from": "human", "value": f"tell me about the number {i} please"},
                           {"from": "gpt", "value": "it is a number that comes after the one before it"}]}
        for i in range(6)
    ] + [{"conversations": [{"from": "human", "value": "too short"}]}]  # fmt: skip
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    result = _run(
        tmp_path,
        "--base-url", gateway.url + "/v1", "--api-key", API_KEY, "--dataset", "sharegpt",
        "--dataset-path", str(path), "--sharegpt-output-len", "5", "--num-prompts", "6", "--no-progress",
    )  # fmt: skip
    assert result["summary"]["completed"] == 6 and result["summary"]["total_output_tokens"] == 30


def test_shared_prefixes_are_served_from_the_prefix_cache(stack, tmp_path):
    _, gateway = stack
    expected = serve.random_requests(12, (4, 8), (3, 3), "ids", id_range=300, shared_prefixes=2, prefix_len=48)
    heads = {tuple(r.prompt[:48]) for r in expected}
    assert len(heads) == 2 and all(r.prompt_len == len(r.prompt) for r in expected)
    result = _run(
        tmp_path,
        "--base-url", gateway.url + "/v1", "--api-key", API_KEY, "--num-prompts", "12", "--input-len", "4:8",
        "--output-len", "3", "--id-range", "300", "--shared-prefixes", "2", "--prefix-len", "48",
        "--max-concurrency", "1", "--no-progress",
    )  # fmt: skip
    summary = result["summary"]
    assert summary["total_input_tokens"] == sum(r.prompt_len for r in expected)
    # One at a time: all but each prefix's first request find its whole pages (48 tokens: 3 of 16) cached.
    assert summary["prefix_cache_hit_rate"] == pytest.approx(10 * 48 / summary["total_input_tokens"])
