"""The routing policies and the Router, on real worker handles (no network)."""

import collections
import time

import pytest

from gateway.router import (
    AllWorkersBusy,
    LeastLoadPolicy,
    NoWorkerAvailable,
    PowerOfTwoPolicy,
    PrefixPolicy,
    RoundRobinPolicy,
    RouteKey,
    Router,
    UnknownModel,
    WorkerHandle,
    make_policy,
)

MODEL = "tiny"


def workers(count: int, model: str = MODEL) -> list[WorkerHandle]:
    return [WorkerHandle(address=f"10.0.0.{i}:50051", healthy=True, model=model) for i in range(count)]


def router_with(policy_name: str, handles: list[WorkerHandle]) -> Router:
    router = Router(make_policy(policy_name, seed=0))
    for handle in handles:
        router.add(handle)
    return router


def key(text: str = "hello") -> RouteKey:
    return RouteKey(MODEL, text)


def test_round_robin_spreads_evenly() -> None:
    router = router_with("round_robin", workers(2))
    counts = collections.Counter(router.pick(key()).address for _ in range(20))
    assert sorted(counts.values()) == [10, 10]


def test_round_robin_skips_unhealthy_and_excluded_workers() -> None:
    handles = workers(3)
    handles[1].healthy = False
    router = router_with("round_robin", handles)
    picked = {router.pick(key()).address for _ in range(10)}
    assert picked == {handles[0].address, handles[2].address}
    assert router.pick(key(), exclude=[handles[0].address]).address == handles[2].address


def test_least_load_prefers_the_idle_worker_by_reported_or_local_load() -> None:
    handles = workers(2)
    handles[0].load.num_running = 5  # busy with someone else's requests
    policy = LeastLoadPolicy(seed=0)
    assert all(policy.choose(handles, key()) is handles[1] for _ in range(10))
    handles[0].load.num_running = 0
    handles[1].in_flight = 3  # our own requests, not yet in any report
    assert all(policy.choose(handles, key()) is handles[0] for _ in range(10))


def test_least_load_breaks_ties_randomly() -> None:
    handles = workers(2)
    policy = LeastLoadPolicy(seed=1)
    counts = collections.Counter(policy.choose(handles, key()).address for _ in range(200))
    assert min(counts.values()) > 50


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    handles = workers(3)
    handles[2].load.num_waiting = 100
    policy = PowerOfTwoPolicy(seed=0)
    counts = collections.Counter(policy.choose(handles, key()).address for _ in range(300))
    assert counts[handles[2].address] == 0
    assert counts[handles[0].address] > 50 and counts[handles[1].address] > 50


def test_prefix_sends_a_shared_prefix_to_one_worker() -> None:
    handles = workers(4)
    policy = PrefixPolicy(chunk_chars=64)
    system = "You are a meticulous assistant. " * 20
    chosen = {policy.choose(handles, key(system + f"question {i}?")).address for i in range(30)}
    assert len(chosen) == 1


def test_prefix_spreads_unrelated_prompts() -> None:
    handles = workers(4)
    policy = PrefixPolicy(chunk_chars=16)
    chosen = collections.Counter(policy.choose(handles, key(f"prompt number {i} " * 4)).address for i in range(200))
    assert len(chosen) == 4


def test_prefix_follows_the_longest_remembered_prefix() -> None:
    handles = workers(2)
    policy = PrefixPolicy(chunk_chars=8, load_factor=1.0)
    base = "a" * 8
    first = policy.choose(handles, key(base + "b" * 16))
    # make the affine worker too busy for a newcomer: the longer prefix moves to the other worker
    first.in_flight = 10
    moved = policy.choose(handles, key(base + "c" * 16))
    assert moved is not first
    first.in_flight = 0
    # with the load gone, a request sharing the moved (longer) prefix follows it, not the first-chunk owner
    assert policy.choose(handles, key(base + "c" * 16 + "tail")) is moved
    assert policy.choose(handles, key(base + "b" * 16 + "tail")) is first


def test_prefix_affinity_yields_to_the_load_bound() -> None:
    handles = workers(2)
    policy = PrefixPolicy(chunk_chars=8, load_factor=1.5)
    prompt = "shared prefix " * 10
    owner = policy.choose(handles, key(prompt))
    routed = []
    for _ in range(20):  # concurrent: every routed request stays in flight
        worker = policy.choose(handles, key(prompt))
        worker.in_flight += 1
        routed.append(worker)
    # the owner takes requests until it would exceed 1.5x the mean load (3 of the first 4), then they spill
    assert routed[:3] == [owner] * 3 and routed[3] is not owner
    assert max(w.in_flight for w in handles) <= 15  # ceil(1.5 * 20 / 2)


def test_prefix_hashes_are_stable_and_chained() -> None:
    policy = PrefixPolicy(chunk_chars=4)
    a = policy.prefix_hashes("abcdefgh")
    b = policy.prefix_hashes("abcdefgX")
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    assert policy.prefix_hashes("ab") == PrefixPolicy(chunk_chars=4).prefix_hashes("ab")  # not hash()-randomized


def test_router_errors() -> None:
    handles = workers(2)
    router = router_with("round_robin", handles)
    with pytest.raises(UnknownModel):
        router.pick(RouteKey("other-model", "x"))
    for handle in handles:
        handle.busy_until = time.monotonic() + 3
    with pytest.raises(AllWorkersBusy) as busy:
        router.pick(key())
    assert busy.value.retry_after_s >= 1
    for handle in handles:
        handle.busy_until = 0.0
        handle.healthy = False
    with pytest.raises(NoWorkerAvailable):
        router.pick(key())  # the model is known, its workers are down: 503, not 404
    assert router.models() == {}


def test_a_continuation_may_go_to_a_worker_held_back_for_refusing_new_requests() -> None:
    """Workers refuse new requests for their queue's wait, never a continuation: the busy hold their refusals set
    keeps new requests off them, not a migrated stream."""
    handles = workers(2)
    router = router_with("round_robin", handles)
    handles[0].mark_busy(5.0)
    handles[0].mark_busy(5.0)
    assert {router.pick(key()).address for _ in range(4)} == {handles[1].address}
    handles[1].mark_busy(5.0)
    with pytest.raises(AllWorkersBusy):
        router.pick(key())
    assert {router.pick(key(), ignore_holds=True).address for _ in range(4)} == {h.address for h in handles}
    handles[0].healthy = False  # health and breakers still rule
    assert {router.pick(key(), ignore_holds=True).address for _ in range(4)} == {handles[1].address}


def test_router_serves_each_model_from_its_own_workers() -> None:
    router = router_with("least_load", workers(1, "a") + [WorkerHandle("10.0.1.1:1", healthy=True, model="b")])
    assert router.pick(RouteKey("b", "x")).address == "10.0.1.1:1"
    assert set(router.models()) == {"a", "b"}


def test_make_policy_names() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobinPolicy)
    assert isinstance(make_policy("prefix"), PrefixPolicy)
    with pytest.raises(ValueError):
        make_policy("random")
