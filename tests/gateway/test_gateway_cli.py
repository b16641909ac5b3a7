"""The `sfllm-gateway` command as a process: serves, logs one JSON line per request without prompts, stops."""

import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from gateway_harness import REPO, WorkerProcess, free_port


def test_cli_serves_logs_and_stops(workers: list[WorkerProcess], model_name: str) -> None:
    port = free_port()
    workers_flag = ",".join(f"localhost:{w.port}" for w in workers)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--workers", workers_flag, "--port", str(port), "--host", "127.0.0.1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"SFLLM_API_KEY": "cli-key", "PATH": "/usr/bin:/bin"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0)
        secret = "the secret prompt text"
        reply = client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": secret}], max_tokens=3
        )
        assert reply.choices[0].message.content is not None
        with pytest.raises(openai.NotFoundError) as missing:
            client.completions.create(model="missing", prompt=secret, max_tokens=3)
        assert missing.value.status_code == 404
        assert missing.value.code == "model_not_found" and missing.value.param == "model"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    requests = [line for line in lines if line["msg"] == "request"]
    assert [(r["endpoint"], r["status"]) for r in requests] == [("chat", 200), ("completions", 404)]
    assert requests[0]["completion_tokens"] >= 1 and requests[1]["error"] == "model_not_found"
    assert secret not in output
    assert {line["worker"] for line in lines if line["msg"] == "worker admitted"} == {w.target for w in workers}


def test_the_gateway_loads_no_model() -> None:
    code = (
        "import sys, gateway.app; print(sorted(m for m in ('torch', 'transformers', 'sfllm_core') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
