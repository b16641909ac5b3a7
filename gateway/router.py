"""Which worker serves a request: worker handles, the routing policies, and the Router that applies one.

Every policy sees the same candidates (healthy workers serving the requested model, not already
tried for this request, whose circuit breakers allow a call and whose queues are not full) and
returns one of them. Load numbers combine what this gateway knows instantly (its own in-flight
calls) with what workers report through GetLoad (everyone's requests, a poll interval late).
"""

import hashlib
import itertools
import math
import random
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.resilience import CircuitBreaker

# How long one RESOURCE_EXHAUSTED keeps requests off a worker; refusals in a row double it up to the worker's hint.
BUSY_HOLD_S = 0.1


class NoWorkerAvailable(Exception):
    """No healthy worker can take the request (HTTP 503)."""


class AllWorkersBusy(Exception):
    """Every candidate worker's queue is full (HTTP 429); `retry_after_s` is when the first may have room, in whole
    seconds for a Retry-After header, and `wait_s` the same exactly."""

    def __init__(self, message: str, retry_after_s: int = 1, wait_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.wait_s = wait_s


class UnknownModel(Exception):
    """No worker serves the requested model (HTTP 404)."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


@dataclass
class WorkerLoad:
    """A worker's own report (GetLoad): counts over every client, not just this gateway."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0


@dataclass(eq=False)
class WorkerHandle:
    """One worker as the router sees it; the pool updates health, model and load in place."""

    address: str
    healthy: bool = False
    model: str | None = None
    max_context_length: int | None = None
    info: Any = None  # its last GetModelInfoResponse: the model's limits, path and type
    in_flight: int = 0  # Generate calls this gateway has open on the worker
    load: WorkerLoad = field(default_factory=WorkerLoad)
    busy_until: float = 0.0  # time.monotonic() before which the worker is taken to have a full queue
    busy_since: float = 0.0  # when the last refusal came: only news from after it clears the mark
    busy_streak: int = 0  # refusals since the worker last showed room; each doubles the hold
    failed_checks: int = 0  # consecutive failed health checks
    admitted_at: float = 0.0  # time.monotonic() of its last admission to routing (a restarted worker's return)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)  # fed by the requests' outcomes
    client: Any = None  # the pool's connection (channel and stubs); the router never touches it
    # The calls open on the worker (gateway/generation.py's attempts, each with evict(reason) and
    # last_message_at): what the pool cancels when it finds the worker silent.
    open_calls: set[Any] = field(default_factory=set)

    def score(self) -> int:
        """Outstanding sequences: the larger of our own count (fresh) and the worker's report (complete but late)."""
        return max(self.in_flight, self.load.num_running + self.load.num_waiting)

    def queue_full(self, now: float | None = None) -> bool:
        """True while the hold of the worker's last RESOURCE_EXHAUSTED answer lasts (see `mark_busy`)."""
        return (time.monotonic() if now is None else now) < self.busy_until

    def mark_busy(self, retry_after_s: float, now: float | None = None) -> None:
        """The worker refused a call with a full queue. The hold is proportionate: BUSY_HOLD_S for one refusal,
        doubling with each refusal in a row up to the worker's own retry hint. A queue full for one step
        (a burst of arrivals) then costs the worker a tenth of a second of traffic, not the whole hint."""
        now = time.monotonic() if now is None else now
        self.busy_streak += 1
        hold = min(retry_after_s, BUSY_HOLD_S * 2.0 ** min(self.busy_streak - 1, 30))
        self.busy_since = now
        self.busy_until = max(self.busy_until, now + hold)

    def has_room(self, since: float) -> None:
        """The worker showed room (it admitted a call, or reported an empty queue) by news that began at `since`:
        a refusal that came before then no longer holds it back, and the next refusal starts the streak anew."""
        if since >= self.busy_since:
            self.busy_until = 0.0
            self.busy_streak = 0


@dataclass
class RouteKey:
    """What a policy may know about a request: the model and a canonical text of its prompt."""

    model: str
    prompt_text: str = ""


class Policy(ABC):
    """Chooses one worker among candidates (never empty)."""

    name: str = ""

    @abstractmethod
    def choose(self, candidates: list[WorkerHandle], key: RouteKey) -> WorkerHandle: ...


def _least_loaded(workers: Iterable[WorkerHandle], rng: random.Random) -> WorkerHandle:
    # random tie-break: with idle workers a fixed order would send every sequential request to the first one
    return min(workers, key=lambda w: (w.score(), w.load.kv_cache_usage, rng.random()))


class RoundRobinPolicy(Policy):
    """Each candidate in turn, in address order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: list[WorkerHandle], key: RouteKey) -> WorkerHandle:
        ordered = sorted(candidates, key=lambda w: w.address)
        return ordered[next(self._counter) % len(ordered)]


class LeastLoadPolicy(Policy):
    """The candidate with the fewest outstanding sequences, then the lowest KV cache usage."""

    name = "least_load"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: list[WorkerHandle], key: RouteKey) -> WorkerHandle:
        return _least_loaded(candidates, self._rng)


class PowerOfTwoPolicy(Policy):
    """The less loaded of two random candidates: near least-load balance without herding on stale numbers."""

    name = "power_of_two"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: list[WorkerHandle], key: RouteKey) -> WorkerHandle:
        if len(candidates) <= 2:
            return _least_loaded(candidates, self._rng)
        return _least_loaded(self._rng.sample(candidates, 2), self._rng)


def _digest(data: bytes) -> bytes:
    # blake2b, not hash(): every gateway replica must compute the same keys
    return hashlib.blake2b(data, digest_size=8).digest()


class PrefixPolicy(Policy):
    """Prompt-prefix affinity with a load bound, so requests sharing a prefix meet their cached KV pages.

    The prompt text is cut into fixed-size character chunks and each chunk boundary gets a chained
    hash (the hash of everything before it). A bounded LRU table remembers which workers last served
    each boundary. A request goes to the least loaded worker holding its longest remembered prefix; a new prefix
    goes to the rendezvous-hash winner of its first chunk, which every gateway replica agrees on
    without sharing state. Affinity yields when the preferred worker would carry more than
    `load_factor` times the mean load (consistent hashing with bounded loads): the request then goes
    to the next worker in the rendezvous order, and the table learns that the prefix lives there too.
    """

    name = "prefix"

    def __init__(
        self, chunk_chars: int = 64, max_chars: int = 4096, load_factor: float = 1.5, table_size: int = 100_000
    ) -> None:
        self.chunk_chars = chunk_chars
        self.max_chars = max_chars
        self.load_factor = load_factor
        self.table_size = table_size
        self.holders_per_prefix = 4  # workers remembered per prefix: after a spill, several hold its pages
        self._table: OrderedDict[bytes, list[str]] = OrderedDict()

    def prefix_hashes(self, text: str) -> list[bytes]:
        """Chained hashes at each full chunk boundary (at least one, for a text shorter than a chunk)."""
        data = text[: self.max_chars]
        hashes: list[bytes] = []
        h = b""
        for start in range(0, max(len(data), 1), self.chunk_chars):
            chunk = data[start : start + self.chunk_chars]
            if len(chunk) < self.chunk_chars and hashes:
                break  # a partial tail is not a shareable prefix
            h = _digest(h + chunk.encode("utf-8", "surrogatepass"))
            hashes.append(h)
        return hashes

    def choose(self, candidates: list[WorkerHandle], key: RouteKey) -> WorkerHandle:
        hashes = self.prefix_hashes(key.prompt_text)
        total = sum(w.score() for w in candidates) + 1  # + this request
        bound = math.ceil(self.load_factor * total / len(candidates))
        by_address = {w.address: w for w in candidates}

        chosen: WorkerHandle | None = None
        for h in reversed(hashes):
            holders = [by_address[a] for a in self._table.get(h, ()) if a in by_address]
            eligible = [w for w in holders if w.score() + 1 <= bound]
            if eligible:
                chosen = min(eligible, key=WorkerHandle.score)
                break
        if chosen is None:
            ranked = sorted(candidates, key=lambda w: _digest(hashes[0] + w.address.encode()), reverse=True)
            chosen = next((w for w in ranked if w.score() + 1 <= bound), None) or min(ranked, key=WorkerHandle.score)
        self._remember(hashes, chosen.address)
        return chosen

    def _remember(self, hashes: list[bytes], address: str) -> None:
        for h in hashes:
            holders = self._table.pop(h, [])
            if address in holders:
                holders.remove(address)
            holders.append(address)  # most recent last
            self._table[h] = holders[-self.holders_per_prefix :]
        while len(self._table) > self.table_size:
            self._table.popitem(last=False)


def make_policy(
    name: str, *, chunk_chars: int = 64, max_chars: int = 4096, load_factor: float = 1.5, seed: int | None = None
) -> Policy:
    """The policy called `name` (one of config.POLICIES)."""
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "least_load":
        return LeastLoadPolicy(seed)
    if name == "power_of_two":
        return PowerOfTwoPolicy(seed)
    if name == "prefix":
        return PrefixPolicy(chunk_chars, max_chars, load_factor)
    raise ValueError(f"unknown routing policy {name!r}")


class Router:
    """The registry of workers and the one entry point for routing: `pick`."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.workers: dict[str, WorkerHandle] = {}

    def add(self, worker: WorkerHandle) -> None:
        self.workers[worker.address] = worker

    def remove(self, address: str) -> WorkerHandle | None:
        return self.workers.pop(address, None)

    def healthy_workers(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.healthy]

    def models(self) -> dict[str, int | None]:
        """Models served by healthy workers -> their context length."""
        return {w.model: w.max_context_length for w in self.healthy_workers() if w.model is not None}

    def model_info(self, model: str) -> Any:
        """The GetModelInfoResponse of a worker serving `model` (healthy ones first), or None if none answered."""
        workers = sorted(self.workers.values(), key=lambda w: not w.healthy)
        return next((w.info for w in workers if w.model == model and w.info is not None), None)

    def check_model(self, model: str) -> None:
        """Raise UnknownModel if no worker, healthy or not, is known to serve `model`.

        Workers that never answered GetModelInfo serve an unknown model; while every worker is in
        that state the request is not refused as 404 (it will get 503 instead).
        """
        known = {w.model for w in self.workers.values() if w.model is not None}
        if known and model not in known:
            raise UnknownModel(model)

    def pick(self, key: RouteKey, exclude: Iterable[str] = (), ignore_holds: bool = False) -> WorkerHandle:
        """The worker for this request, skipping `exclude` (addresses already tried).

        Raises UnknownModel, NoWorkerAvailable (nothing healthy left, or every breaker open) or
        AllWorkersBusy (all queues full). A half-open breaker allows only its trials at a time. With
        `ignore_holds`, a worker held back for refusing calls with a full queue is a candidate still (a continuation:
        workers refuse new requests for their wait, never a continuation).
        """
        self.check_model(key.model)
        excluded = set(exclude)
        healthy = [w for w in self.workers.values() if w.healthy and w.model == key.model and w.address not in excluded]
        if not healthy:
            raise NoWorkerAvailable(f"no healthy worker serves {key.model!r}")
        allowed = [w for w in healthy if w.breaker.allows()]
        if not allowed:
            raise NoWorkerAvailable(f"every healthy worker serving {key.model!r} has its circuit breaker open")
        now = time.monotonic()
        candidates = allowed if ignore_holds else [w for w in allowed if not w.queue_full(now)]
        if not candidates:
            wait = min(w.busy_until for w in allowed) - now
            message = f"every worker serving {key.model!r} has a full queue"
            raise AllWorkersBusy(message, max(1, math.ceil(wait)), max(0.0, wait))
        return self.policy.choose(candidates, key)
