"""Each routing policy over the two real workers, observed through the gateway's own metrics."""

import threading
import time
from collections.abc import Iterator

import pytest
from gateway_harness import GatewayServer, WorkerProcess, gateway_config

from worker.client import WorkerClient

SYSTEM = "You are the support assistant of a lighthouse company. Answer briefly and politely. " * 6


def delta(gateway: GatewayServer, before: dict[str, float]) -> dict[str, float]:
    after = gateway.routed()
    return {worker: after.get(worker, 0) - before.get(worker, 0) for worker in after}


@pytest.fixture
def policy_gateway(request: pytest.FixtureRequest, workers: list[WorkerProcess]) -> Iterator[GatewayServer]:
    server = GatewayServer(gateway_config([w.target for w in workers], policy=request.param)).start()
    server.wait_healthy(2)
    yield server
    server.stop()


def test_round_robin_spreads_twenty_requests_ten_and_ten(gateway: GatewayServer, model_name: str) -> None:
    client = gateway.client()
    before = gateway.routed()
    for i in range(20):
        client.completions.create(model=model_name, prompt=f"request {i}", max_tokens=2)
    assert sorted(delta(gateway, before).values()) == [10, 10]


@pytest.mark.parametrize("policy_gateway", ["prefix"], indirect=True)
def test_prefix_sends_a_shared_long_prefix_to_one_worker(policy_gateway: GatewayServer, model_name: str) -> None:
    client = policy_gateway.client()
    before = policy_gateway.routed()
    for i in range(8):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: when?"}]
        client.chat.completions.create(model=model_name, messages=messages, max_tokens=2)
    counts = sorted(delta(policy_gateway, before).values())
    assert counts == [0, 8]
    # unrelated prompts still use both workers
    before = policy_gateway.routed()
    for i in range(16):
        client.completions.create(model=model_name, prompt=f"{i} unrelated prompt number {i} " * 8, max_tokens=2)
    assert min(delta(policy_gateway, before).values()) > 0


@pytest.mark.parametrize("policy_gateway", ["least_load"], indirect=True)
def test_least_load_avoids_a_busy_worker(
    policy_gateway: GatewayServer, workers: list[WorkerProcess], model_name: str
) -> None:
    busy, idle = workers
    stop = threading.Event()

    def keep_busy() -> None:  # another client, straight to the worker, so the gateway only sees it via GetLoad
        with WorkerClient(busy.target, timeout=60) as direct:
            context = direct.model_info().max_context_length
            while not stop.is_set():
                for _ in direct.stream("busy " * 4, max_tokens=context // 2, ignore_eos=True, n=8):
                    if stop.is_set():
                        break

    threads = [threading.Thread(target=keep_busy, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        while policy_gateway.app.state.router.workers[busy.target].load.num_running < 8:
            assert time.monotonic() < deadline, "the busy worker never reported its load"
            time.sleep(0.02)
        client = policy_gateway.client()
        before = policy_gateway.routed()
        for i in range(8):
            client.completions.create(model=model_name, prompt=f"light {i}", max_tokens=2)
        assert delta(policy_gateway, before) == {busy.target: 0, idle.target: 8}
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


@pytest.mark.parametrize("policy_gateway", ["power_of_two"], indirect=True)
def test_power_of_two_serves_from_both_workers(
    policy_gateway: GatewayServer, workers: list[WorkerProcess], model_name: str
) -> None:
    # Over two workers the policy takes the less loaded one, a coin flip between equals. Sequential requests
    # leave both idle (or the last one looking busy, which sends the next elsewhere), so once both report
    # idle each request lands on the worker every earlier one went to with probability at most 1/2:
    # all 24 on one worker has probability at most 2 * 2**-24 < 1.2e-7.
    router = policy_gateway.app.state.router
    deadline = time.monotonic() + 20
    while any(router.workers[w.target].score() or router.workers[w.target].load.kv_cache_usage for w in workers):
        assert time.monotonic() < deadline, "the workers never reported themselves idle"
        time.sleep(0.05)
    client = policy_gateway.client()
    before = policy_gateway.routed()
    for i in range(24):
        client.completions.create(model=model_name, prompt=f"p2c {i}", max_tokens=2)
    counts = delta(policy_gateway, before)
    assert sum(counts.values()) == 24
    assert min(counts.values()) > 0, counts
