"""Worker discovery: addresses from host:port entries and DNS names, re-resolved into the router."""

import asyncio

import pytest

from gateway import workers as workers_module
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.router import Router, make_policy
from gateway.workers import WorkerPool, resolve


def test_resolve_literals_and_names() -> None:
    assert asyncio.run(resolve("10.1.2.3:50051")) == ["10.1.2.3:50051"]
    assert asyncio.run(resolve("[::1]:7")) == ["[::1]:7"]
    # localhost has an IPv4 and an IPv6 address: one server, so one worker
    assert asyncio.run(resolve("localhost:7")) == ["127.0.0.1:7"]


def test_the_pool_follows_dns_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A headless service's address set grows, shrinks, and survives a failed lookup."""
    answers: list[list[str] | OSError] = [
        ["10.0.0.1:50051", "10.0.0.2:50051"],
        ["10.0.0.2:50051", "10.0.0.3:50051"],
        OSError("temporary failure in name resolution"),
    ]

    async def fake_resolve(entry: str) -> list[str]:
        assert entry == "workers.sfllm.svc:50051"
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    monkeypatch.setattr(workers_module, "resolve", fake_resolve)

    async def scenario() -> list[set[str]]:
        router = Router(make_policy("round_robin"))
        pool = WorkerPool(GatewayConfig(workers=["workers.sfllm.svc:50051"]), router, GatewayMetrics())
        seen = []
        for _ in range(3):
            await pool.resolve_all()
            seen.append(set(router.workers))
        await pool.stop()
        return seen

    assert asyncio.run(scenario()) == [
        {"10.0.0.1:50051", "10.0.0.2:50051"},
        {"10.0.0.2:50051", "10.0.0.3:50051"},
        {"10.0.0.2:50051", "10.0.0.3:50051"},  # a failed lookup keeps the last known set
    ]
