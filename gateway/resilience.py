"""Failure handling beyond health checks: per-worker circuit breakers, retry backoff, a retry budget.

Health checks (gateway/workers.py) answer "is the worker up?": a worker that stops answering them,
says NOT_SERVING, or refuses a request's connection is ejected from routing until a check passes
again. A circuit breaker answers "do the requests sent to it succeed?": a worker that passes every
health check yet fails request after request (its engine errors, or it crashes on each request and
comes back) is kept out of routing by its breaker, and only trial requests close the breaker again.
The two are independent: the router picks a worker only if it is healthy and its breaker allows;
re-admission by a health check leaves the breaker as it is, and an open breaker ejects nothing.

The retry budget bounds the retries of a whole gateway process. Without it, when every worker fails
each request costs max_attempts calls, and retries multiply the load of an outage.
"""

import enum
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class BreakerState(enum.IntEnum):
    """A breaker's state; the values are those of the worker_circuit_state gauge."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Ticket:
    """One call's claim on its worker's breaker, settled once: later settlements do nothing."""

    __slots__ = ("epoch", "settled")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.settled = False


@dataclass(frozen=True)
class BreakerSettings:
    """When a breaker opens, and how it closes again (defaults as SGLang's router)."""

    failure_threshold: int = 5  # consecutive failures that open a closed breaker
    success_threshold: int = 2  # trial successes that close a half-open breaker; also its trials at a time
    open_timeout_s: float = 30.0  # an open breaker refuses this long, then lets trials through


class CircuitBreaker:
    """One worker's breaker: closed, open after `failure_threshold` consecutive failures, half-open
    `open_timeout_s` later, then closed after `success_threshold` successful trials or open again on a failure.

    Each call sent to the worker takes a ticket (`acquire`) and settles it with `succeeded`, `failed`
    or `release` (no verdict: the client's error, a full queue, a drain, a cancelled call). The
    outcome of a call that began before the breaker last changed state is ignored: a slow call sent
    while the breaker was closed says nothing about a recovery.
    """

    def __init__(
        self,
        settings: BreakerSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.settings = settings or BreakerSettings()
        self.on_transition = on_transition
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._epoch = 0  # bumped at every transition; tickets of older epochs have no say
        self._failures = 0  # consecutive, while closed
        self._successes = 0  # of trials, while half-open
        self._trials = 0  # trial calls in flight, while half-open
        self._opened_at = 0.0

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose timeout has passed turns half-open here)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.settings.open_timeout_s:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allows(self) -> bool:
        """Whether the router may send the worker a call now."""
        state = self.state
        if state is BreakerState.HALF_OPEN:
            return self._trials < self.settings.success_threshold
        return state is BreakerState.CLOSED

    def acquire(self) -> Ticket:
        """A call is being sent: its ticket for the outcome (while half-open, it takes a trial's place)."""
        if self.state is BreakerState.HALF_OPEN:
            self._trials += 1
        return Ticket(self._epoch)

    def _settle(self, ticket: Ticket) -> bool:
        """Whether this settlement counts: the ticket's first, in the state it was taken in."""
        if ticket.settled:
            return False
        ticket.settled = True
        return ticket.epoch == self._epoch

    def succeeded(self, ticket: Ticket) -> None:
        if not self._settle(ticket):
            return
        if self._state is BreakerState.CLOSED:
            self._failures = 0
        elif self._state is BreakerState.HALF_OPEN:
            self._trials -= 1
            self._successes += 1
            if self._successes >= self.settings.success_threshold:
                self._move(BreakerState.CLOSED)

    def failed(self, ticket: Ticket) -> None:
        if not self._settle(ticket):
            return
        if self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.settings.failure_threshold:
                self._move(BreakerState.OPEN)
        elif self._state is BreakerState.HALF_OPEN:
            self._move(BreakerState.OPEN)

    def release(self, ticket: Ticket) -> None:
        """The call ended with no verdict on the worker (after `succeeded` or `failed`: nothing happens)."""
        if self._settle(ticket) and self._state is BreakerState.HALF_OPEN:
            self._trials -= 1

    def readmitted(self) -> None:
        """The health checker saw the worker serving again after ejecting it (a restart, say): an open
        breaker need not wait out its timeout, it goes half-open and lets its trials decide."""
        if self.state is BreakerState.OPEN:
            self._move(BreakerState.HALF_OPEN)

    def _move(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        self._failures = self._successes = self._trials = 0
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        if self.on_transition is not None:
            self.on_transition(old, new)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: retry n waits a uniform time in [0, min(cap, base * 2^(n-1))].

    Full jitter spreads out the retries of calls that failed together (a worker's death fails all of
    its calls at once), which a fixed or merely scaled delay would send back in one burst.
    """

    base_s: float = 0.05
    cap_s: float = 2.0

    def delay_s(self, retry: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(retry - 1, 62))
        return (rng or random).uniform(0.0, ceiling)


class RetryBudget:
    """Retries allowed over the last `window_s`: `ratio` of the requests begun in it plus `min_per_s` a second.

    As Finagle's and tower's budgets (Envoy's counts concurrent requests instead): at a low request
    rate the floor lets every request retry; at a high one, retries stay within `ratio` of the
    traffic, so a failing fleet sees at most that much more load, not max_attempts times as much.
    """

    _BUCKETS = 10  # the window slides in steps of a tenth

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 1.0,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._clock = clock
        self._bucket_s = window_s / self._BUCKETS
        self._buckets: deque[list[int]] = deque()  # [bucket index, requests, retries], oldest first

    def record_request(self) -> None:
        """A request's first attempt: it adds `ratio` of a retry to the budget."""
        self._current()[1] += 1

    def try_retry(self) -> bool:
        """Spend one retry if the budget has one; False (nothing spent) if it is exhausted."""
        if self.available() < 1:
            return False
        self._current()[2] += 1
        return True

    def available(self) -> float:
        """The retries the budget allows now: its allowance over the window less the retries spent in it."""
        self._current()
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        return max(0.0, self.ratio * requests + self.min_per_s * self.window_s - retries)

    def _current(self) -> list[int]:
        index = math.floor(self._clock() / self._bucket_s)
        while self._buckets and self._buckets[0][0] <= index - self._BUCKETS:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append([index, 0, 0])
        return self._buckets[-1]
