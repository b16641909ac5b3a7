"""Running generations on workers: one Generate call per prompt, retried on another worker while invisible.

Failure semantics (what the client sees):
- A call that fails before anything of it reached the client (worker dead, draining, queue full,
  engine error) is re-sent to another worker; the client never knows. Non-streamed requests
  reach the client only at the end, so for them any failure short of the end is invisible.
- A streamed call that fails after some of its output reached the client (worker dead, connection
  lost, FINISH_REASON_ABORT from a drain, an engine error) is migrated: each of its unfinished
  completions is re-sent to another worker as its own n=1 call, the prompt as token ids (PromptInfo
  returns them) plus, as `continuation`, the tokens the client was shown. The new worker goes on as
  if it had generated those itself (max_tokens, penalties, stop strings and a seed's noise count
  them), so the client sees one stream and usage covers the whole completion. Tokens the client was
  not shown (their text held back: a stop string's start, part of a character) are left out and
  generated again. A completion moves at most `max_migrations` times; past that, or when no worker
  is left, the stream ends with an OpenAI error event. A migration that finds every worker's queue
  full waits for room, up to _MIGRATION_ROOM_WAIT_S (the client's stream stalls), before it ends so.
- A call on a worker that went silent (frozen, cut off by a partition) does not wait as long as the
  silence. The channel's HTTP/2 keepalive (gateway/workers.py) closes a connection whose pings go
  unanswered, which fails its calls with UNAVAILABLE; and a health-check ejection evicts the worker's
  calls that have received nothing for a health timeout. Either way the call is retried or migrated as
  above. An eviction is no verdict on the worker's breaker: the health checks judged it already.
- A cancelled run (client gone) cancels its gRPC calls, which makes the worker abort and free the
  sequences, and also sends Abort for good measure.
- A Generate request over the worker's message-size limit is the client's fault (413); it is
  never retried and never marks the worker busy.
- A request that no worker has accepted (its first token computed) within `start_timeout_s` of the
  run's start gets 429 with Retry-After, whatever held it: full queues, retries, a slow prefill.
  Workers bound their own queues in time too (--max-queue-time-s); this bounds the whole wait. A
  worker's refusal that comes after its call waited a while (the queue-time bound, not its door) is
  answered 429 at once rather than sent to wait in another queue.

Events are handed on in batches (`batches()`): everything that arrived since the consumer last
looked, so a slow consumer gets larger batches instead of a longer queue.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from gateway import errors
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics
from gateway.router import AllWorkersBusy, NoWorkerAvailable, RouteKey, Router, UnknownModel, WorkerHandle
from gateway.workers import WorkerPool
from protos.sfllm.v1 import worker_pb2 as pb
from protos.sfllm.v1.wire import DRAINED_ERROR, DRAINING_KEY, ERROR_PARAM_KEY, FINISH_REASON_NAMES, RETRY_AFTER_KEY

log = logging.getLogger("sfllm.gateway")

# The ends a client may see; an aborted or failed completion is the worker's failure, retried or reported.
_FINISH_REASONS = {code: name for code, name in FINISH_REASON_NAMES.items() if name in ("stop", "length")}
_QUEUE_SIZE = 64  # events buffered per run; beyond it gRPC flow control slows the worker down


@dataclass
class PromptJob:
    """One prompt's n completions: one Generate call, filling choices first_choice .. first_choice + n - 1."""

    request: pb.GenerateRequest
    route_key: RouteKey
    first_choice: int
    n: int
    prompt_param: str = "prompt"  # the field a context-length error names


@dataclass
class Delta:
    """New text (and its tokens' logprobs) of one choice."""

    choice: int
    text: str
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the tokens since the last event, text held back or not


@dataclass
class Finish:
    """The end of one choice."""

    choice: int
    finish_reason: str
    completion_tokens: int
    cached_prompt_tokens: int
    matched: str | int | None = None  # the stop string or stop token id that ended a "stop" choice
    token_ids: list[int] = field(default_factory=list)  # tokens no Delta carried (their text never came)


@dataclass
class _Leg:
    """What one Generate call asks for: its request, the choices its indices 0, 1, ... fill, and how
    many times those choices have moved to another worker before it (0: the job's own call)."""

    request: pb.GenerateRequest
    choices: list[int]
    migrations: int = 0
    exclude: frozenset[str] = frozenset()  # workers that failed these choices already


@dataclass
class _Done:
    prompt_index: int


@dataclass
class _Failed:
    error: APIError


@dataclass
class RunStats:
    """What the request log line and the metrics need to know about a run."""

    workers: list[str] = field(default_factory=list)
    retries: int = 0
    migrations: int = 0  # completions moved to another worker mid-stream
    first_token_at: float | None = None


class _Attempt:
    """One Generate call on one worker and whether any of it reached the client."""

    def __init__(self, worker: WorkerHandle, request_id: str) -> None:
        self.worker = worker
        self.request_id = request_id
        self.call: grpc.aio.UnaryStreamCall | None = None
        self.emitted = False
        self.started_at = time.monotonic()
        self.last_message_at = self.started_at  # when the worker last sent anything on this call
        self.evicted: str | None = None  # why the pool cancelled the call, if it did

    def evict(self, reason: str) -> None:
        """Cancel the call because its worker went silent; the call's reader then fails over (see `_call`)."""
        if self.evicted is None and self.call is not None and not self.call.done():
            self.evicted = reason
            self.call.cancel()


class GenerationRun:
    """The Generate calls of one HTTP request, their events merged into one stream.

    `start()` returns once every prompt has been accepted by a worker (or raises the APIError that
    becomes the HTTP status); `events()` then yields Delta and Finish events until every choice has
    finished. With `buffered`, a call's events are held until the call completes, so a failure at
    any point can be retried invisibly. `close()` cancels whatever is still running.
    """

    def __init__(
        self,
        request_id: str,
        jobs: list[PromptJob],
        router: Router,
        pool: WorkerPool,
        metrics: GatewayMetrics,
        max_attempts: int,
        buffered: bool,
        max_migrations: int = 0,
        start_timeout_s: float = 0.0,
    ) -> None:
        self.request_id = request_id
        self.start_timeout_s = start_timeout_s  # 0: start() waits as long as the workers take
        self.jobs = jobs
        self.router = router
        self.pool = pool
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.buffered = buffered
        self.max_migrations = 0 if buffered else max_migrations  # a buffered call is retried whole instead
        self.stats = RunStats()
        self.num_prompt_tokens = [0] * len(jobs)
        self.prompts: list[pb.PromptInfo | None] = [None] * len(jobs)
        # What a migration re-sends: each prompt's token ids, and per choice the token ids the client was shown.
        self._prompt_ids: list[list[int] | None] = [
            list(job.request.token_ids.ids) if job.request.WhichOneof("input") == "token_ids" else None for job in jobs
        ]
        self._shown: dict[int, list[int]] = {}
        self._finished: set[int] = set()
        self._queue: asyncio.Queue[Delta | Finish | _Done | _Failed] = asyncio.Queue(_QUEUE_SIZE)
        self._accepted = [asyncio.get_running_loop().create_future() for _ in jobs]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Send every prompt to a worker and wait until each is accepted; raises APIError otherwise: 429 when they
        are not all accepted within `start_timeout_s` (their calls are cancelled, so the workers drop them)."""
        self._tasks = [asyncio.create_task(self._run_job(i, job)) for i, job in enumerate(self.jobs)]
        try:
            async with asyncio.timeout(self.start_timeout_s or None):
                pending: set[asyncio.Future[int]] = set(self._accepted)
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for future in done:
                        future.result()  # raises the job's APIError
        except TimeoutError:
            await self.close()
            self.metrics.requests_not_started.inc()
            message = f"no worker started the request within {self.start_timeout_s:g} s; retry later"
            raise errors.overloaded(message) from None
        except BaseException:
            await self.close()
            raise

    async def batches(self) -> AsyncIterator[list[Delta | Finish]]:
        """Every choice's deltas and finish, in arrival order, as many as have arrived at each look.

        Raises APIError if a call fails visibly (after handing on what came before the failure).
        """
        queue = self._queue
        remaining = len(self.jobs)
        while remaining:
            arrived = [await queue.get()]
            while not queue.empty():
                arrived.append(queue.get_nowait())
            batch: list[Delta | Finish] = []
            failure: APIError | None = None
            for event in arrived:
                if isinstance(event, _Done):
                    remaining -= 1
                elif isinstance(event, _Failed):
                    failure = event.error
                    break
                else:
                    batch.append(event)
            if batch:
                if self.stats.first_token_at is None and any(isinstance(e, Delta) for e in batch):
                    self.stats.first_token_at = time.monotonic()
                yield batch
            if failure is not None:
                await self.close()
                raise failure

    async def events(self) -> AsyncIterator[Delta | Finish]:
        """The same events one at a time."""
        async for batch in self.batches():
            for event in batch:
                yield event

    def cancel(self) -> None:
        """Cancel every call still running (idempotent, never blocks); cancelled calls are aborted on their workers."""
        for task in self._tasks:
            task.cancel()

    async def close(self) -> None:
        """Cancel every call still running and wait until they have ended."""
        self.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- one prompt ------------------------------------------------------------------------------

    async def _run_job(self, index: int, job: PromptJob) -> None:
        accepted = self._accepted[index]
        try:
            try:
                self.pool.retry_budget.record_request()  # each prompt's first attempt adds to the retry budget
                self.metrics.retry_budget_available.set(self.pool.retry_budget.available())
                await self._attempts(index, job, accepted)
                await self._queue.put(_Done(index))
            except (APIError, asyncio.CancelledError):
                raise
            except Exception as exc:  # a gateway bug must still end the request with an error, not hang it
                log.exception("generation failed", extra={"fields": {"request_id": self.request_id}})
                raise errors.internal_error(f"the gateway failed: {type(exc).__name__}") from exc
        except APIError as exc:
            if not accepted.done():
                accepted.set_exception(exc)
            else:
                await self._queue.put(_Failed(exc))
        finally:
            if not accepted.done():
                accepted.cancel()

    async def _attempts(
        self, index: int, job: PromptJob, accepted: asyncio.Future[int], leg: _Leg | None = None
    ) -> None:
        """Try workers until the call completes; if it fails after the client saw part of it, migrate."""
        if leg is None:
            leg = self._first_leg(job)
        tried: set[str] = set(leg.exclude)
        # Workers this request left (drained, silent, or the failure it migrates from), and when: one admitted again
        # since (a rolling restart's return) may be tried again rather than the request fail for want of workers.
        left_at = dict.fromkeys(leg.exclude, time.monotonic())
        failures = 0
        busy = 0
        last_failure = ""
        retrying = False  # the last attempt failed: the next needs the retry budget's leave, and waits a backoff
        # A stream already under way that finds every queue full waits for room (within a bound) rather than end.
        wait_for_room_until = time.monotonic() + _MIGRATION_ROOM_WAIT_S if leg.migrations else 0.0
        while True:
            try:
                worker = self.router.pick(job.route_key, exclude=tried, ignore_holds=bool(leg.migrations))
            except UnknownModel as exc:
                raise errors.model_not_found(exc.model) from None
            except AllWorkersBusy as exc:
                if time.monotonic() + exc.wait_s < wait_for_room_until:
                    await asyncio.sleep(max(exc.wait_s, 0.01))
                    continue
                raise errors.overloaded(str(exc), exc.retry_after_s) from None
            except NoWorkerAvailable as exc:
                workers = self.router.workers
                back = {a for a, t in left_at.items() if (w := workers.get(a)) and w.healthy and w.admitted_at > t}
                if back:  # admitted again since this request left it (a rolling restart): it may be tried again
                    tried -= back
                    for address in back:
                        del left_at[address]
                    continue
                if busy and not failures and time.monotonic() < wait_for_room_until:
                    tried = set(leg.exclude)  # every one left refused with a full queue: try them again once they may
                    await asyncio.sleep(_ROOM_POLL_S)  # have room (a continuation ignores the busy holds)
                    continue
                if busy and not failures:
                    raise errors.overloaded("every worker's queue is full; retry later") from None
                message = f"{exc}" + (f" (last worker failure: {last_failure})" if last_failure else "")
                raise errors.no_healthy_worker(message) from None
            if retrying:  # once there is a worker to retry on: no budget is spent on a request with none left
                retrying = False
                allowed = self.pool.retry_budget.try_retry()  # retries must not multiply the load of an outage
                self.metrics.retry_budget_available.set(self.pool.retry_budget.available())
                if not allowed:
                    self.metrics.retries_refused.inc()
                    raise errors.no_healthy_worker(f"retry budget exhausted; last failure: {last_failure}")
                backoff_s = self.pool.backoff.delay_s(failures)
                self.metrics.retries.labels("worker_failed").inc()
                self.metrics.retry_backoff.observe(backoff_s)
                await asyncio.sleep(backoff_s)
            tried.add(worker.address)
            tag = f"-c{leg.choices[0]}m{leg.migrations}" if leg.migrations else ""
            attempt = _Attempt(worker, f"{self.request_id}-{index}{tag}-{len(tried)}")
            if len(tried) > len(leg.exclude) + 1:
                self.stats.retries += 1
            self.stats.workers.append(worker.address)
            ticket = worker.breaker.acquire()
            failure: str | None = None  # what the worker did wrong, if anything
            try:
                await self._call(index, attempt, job, leg, accepted)
                worker.breaker.succeeded(ticket)
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
                    if leg.migrations:  # the client's request was fine on the first worker: this one differs
                        raise _cut_short(f"{code.name}: {exc.details()}") from None
                    raise _invalid_argument(exc, job.prompt_param) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _metadata(exc, RETRY_AFTER_KEY) is None:
                    # Not the worker's queue (that one always sends its retry hint): a message over gRPC's size limit.
                    raise errors.request_too_large(f"the worker refused the request: {exc.details()}") from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    worker.mark_busy(_retry_after_s(exc))
                    busy += 1
                    if not leg.migrations and time.monotonic() - attempt.started_at >= _QUEUED_REFUSAL_S:
                        # refused after waiting in the worker's queue (its --max-queue-time-s), not at its door:
                        # another queue would likely hold it as long, so the client hears now
                        raise errors.overloaded(f"the request waited in a full queue: {exc.details()}") from None
                    self.metrics.retries.labels("worker_busy").inc()
                    continue
                draining = _metadata(exc, DRAINING_KEY) is not None
                failure = _DRAINING if draining else f"{code.name}: {exc.details()}"
            except _EngineFailure as exc:
                failure = str(exc)
            finally:
                # A failure counts against the worker's breaker; the client's error or departure, a full
                # queue, a drain or an eviction (the health checks' verdict, not the call's) is no verdict on it.
                if failure is None or _no_verdict(failure):
                    worker.breaker.release(ticket)
                else:
                    worker.breaker.failed(ticket)
            # the worker died, is draining, went silent, or its engine failed this request
            drained = failure in _DRAINED
            left = _no_verdict(failure)  # drained or evicted: it failed nothing, the next worker goes at once
            if drained:  # out of routing now, not when its health check next says NOT_SERVING
                self.pool.eject(worker, "draining")
            elif not left and _ejects(failure):
                self.pool.eject(worker, failure.split(":", 1)[0].lower())
            last_failure = f"{worker.address} {failure}"
            failures += 0 if left else 1
            if attempt.emitted:
                # Only the worker that just failed is left out: one this stream left earlier may be back
                # (a rolling restart); ejection and breakers keep the dead ones out.
                await self._migrate(index, job, leg, accepted, frozenset({worker.address}), failure)
                return
            if failures >= self.max_attempts:
                raise errors.no_healthy_worker(f"gave up after {failures} failed attempts; last: {last_failure}")
            if left:  # sent elsewhere at once, as a full queue is: the worker failed nothing
                left_at[worker.address] = time.monotonic()
                self.metrics.retries.labels("worker_draining" if drained else "worker_silent").inc()
                continue
            retrying = True
            log.warning(
                "retrying on another worker",
                extra={"fields": {"request_id": self.request_id, "worker": worker.address, "failure": failure}},
            )

    async def _call(
        self, index: int, attempt: _Attempt, job: PromptJob, leg: _Leg, accepted: asyncio.Future[int]
    ) -> None:
        """One Generate call, relaying its events; raises AioRpcError or _EngineFailure on failure."""
        worker = attempt.worker
        request = pb.GenerateRequest()
        request.CopyFrom(leg.request)
        request.request_id = attempt.request_id
        worker.in_flight += 1
        self.metrics.worker_in_flight.labels(worker.address).set(worker.in_flight)
        self.metrics.routed.labels(worker.address).inc()
        held: list[Delta | Finish] = []
        held_ids: dict[int, list[int]] = {}  # per choice: token ids of deltas with nothing to show
        finished = 0
        call = worker.client.worker.Generate(request)
        attempt.call = call
        worker.open_calls.add(attempt)
        try:
            async for response in call:
                attempt.last_message_at = time.monotonic()
                choice = leg.choices[response.index]
                if response.HasField("prompt"):  # the first message of a completion: it was admitted and prefilled
                    worker.has_room(attempt.started_at)  # it admitted this call: a refusal before it holds no more
                    if not accepted.done():
                        self.prompts[index] = response.prompt  # its text and logprobs, when asked for (echo)
                        self.num_prompt_tokens[index] = response.prompt.num_prompt_tokens
                        if response.prompt.prompt_token_ids:
                            self._prompt_ids[index] = list(response.prompt.prompt_token_ids)
                        accepted.set_result(response.prompt.num_prompt_tokens)
                kind = response.WhichOneof("event")
                if kind is None:
                    continue
                if kind == "delta":
                    delta = response.delta
                    if not delta.text and not delta.logprobs:
                        held_ids.setdefault(choice, []).extend(delta.token_ids)
                        continue  # tokens held back by the detokenizer: nothing to show yet
                    token_ids = held_ids.pop(choice, []) + list(delta.token_ids)
                    event: Delta | Finish = Delta(choice, delta.text, list(delta.logprobs), token_ids)
                else:
                    done = response.finished
                    matched = done.WhichOneof("matched_stop")
                    if done.finish_reason not in _FINISH_REASONS:
                        reason = pb.FinishReason.Name(done.finish_reason)
                        raise _EngineFailure(f"{reason}: {done.error}" if done.error else reason)
                    event = Finish(
                        choice,
                        _FINISH_REASONS[done.finish_reason],
                        done.usage.completion_tokens,
                        done.usage.cached_prompt_tokens,
                        getattr(done, matched) if matched else None,
                        held_ids.pop(choice, []),
                    )
                    finished += 1
                if self.buffered:
                    held.append(event)
                else:
                    attempt.emitted = True
                    await self._queue.put(event)
                    if isinstance(event, Delta):
                        self._shown.setdefault(choice, []).extend(event.token_ids)
                    else:
                        self._finished.add(choice)
            if finished < len(leg.choices):
                raise _EngineFailure(
                    f"UNAVAILABLE: the stream ended after {finished} of {len(leg.choices)} completions"
                )
            for event in held:
                await self._queue.put(event)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if attempt.evicted is not None and task is not None and not task.cancelling():
                # the pool cancelled the call (its worker went silent), not our caller: fail over
                raise _EngineFailure(f"{_SILENT}: {attempt.evicted}") from None
            raise
        finally:
            worker.open_calls.discard(attempt)
            worker.in_flight -= 1
            self.metrics.worker_in_flight.labels(worker.address).set(worker.in_flight)
            if not call.done() or attempt.evicted is not None:
                # the client left, a sibling call failed, or the worker went silent: stop the worker's work
                call.cancel()
                self.pool.abort_in_background(worker, [attempt.request_id])

    # -- migration -------------------------------------------------------------------------------

    def _first_leg(self, job: PromptJob) -> _Leg:
        """The job's own call: all its choices; a streamed one asks for the prompt's token ids, to migrate with."""
        request = job.request
        if self.max_migrations and request.WhichOneof("input") != "token_ids":
            request = pb.GenerateRequest()
            request.CopyFrom(job.request)
            request.return_prompt_token_ids = True
        return _Leg(request, list(range(job.first_choice, job.first_choice + job.n)))

    async def _migrate(
        self,
        index: int,
        job: PromptJob,
        leg: _Leg,
        accepted: asyncio.Future[int],
        exclude: frozenset[str],
        failure: str,
    ) -> None:
        """Go on with a call's unfinished choices elsewhere, each as its own call continuing what the client saw."""
        prompt_ids = self._prompt_ids[index]
        if leg.migrations >= self.max_migrations or prompt_ids is None:
            raise _cut_short(failure)
        legs = []
        for choice in leg.choices:
            if choice in self._finished:
                continue
            shown = self._shown.get(choice, [])
            request = pb.GenerateRequest(sampling=job.request.sampling)
            request.token_ids.ids.extend(prompt_ids)
            request.continuation.ids.extend(shown)
            sampling = request.sampling
            if sampling.HasField("max_tokens") and len(shown) >= sampling.max_tokens:
                # Every token reached the client, only the end did not.
                await self._queue.put(Finish(choice, "length", len(shown), 0))
                self._finished.add(choice)
                continue
            if sampling.HasField("seed"):
                sampling.seed += choice - job.first_choice  # completion i of an n > 1 call samples with seed + i
            sampling.n = 1
            legs.append(_Leg(request, [choice], leg.migrations + 1, exclude))
        self.stats.migrations += len(legs)
        self.metrics.retries.labels("migrated").inc(len(legs))
        log.warning(
            "migrating mid-stream",
            extra={"fields": {"request_id": self.request_id, "failure": failure, "choices": [g.choices for g in legs]}},
        )
        attempts = [asyncio.ensure_future(self._attempts(index, job, accepted, g)) for g in legs]
        try:
            await asyncio.gather(*attempts)
        finally:  # one that failed for good ends the request: stop its siblings
            for task in attempts:
                task.cancel()
            await asyncio.gather(*attempts, return_exceptions=True)


def _cut_short(failure: str) -> APIError:
    """The error event of a stream that failed mid-way and could not be continued."""
    return APIError(
        502,
        f"the worker serving this request failed mid-stream ({failure}); the output is incomplete",
        "server_error",
        None,
        "worker_failed",
    )


class _EngineFailure(Exception):
    """A call that ended without finishing: an engine error, an abort we did not ask for, a cut stream."""


# A draining worker's refusal, and a drain's abort of a call: the worker is leaving, not failing.
_DRAINING = "UNAVAILABLE: the worker is draining"
_DRAINED = (_DRAINING, f"FINISH_REASON_ABORT: {DRAINED_ERROR}")
# How long a migrated stream waits for a worker with room (the client's stream stalls) before it ends with an error.
_MIGRATION_ROOM_WAIT_S = 10.0
_ROOM_POLL_S = 0.1  # how often it asks again meanwhile
# A RESOURCE_EXHAUSTED that came this long after its call began was a wait in the queue, not a refusal at its door.
_QUEUED_REFUSAL_S = 1.0
# A call the pool cancelled because its worker went silent (WorkerPool.evict_silent_calls).
_SILENT = "UNAVAILABLE: evicted from a silent worker"


def _no_verdict(failure: str) -> bool:
    """A failure that says the worker left (drained) or was judged by its health checks (evicted), not that it
    failed this call: no breaker count, no backoff, and not one of max_attempts."""
    return failure in _DRAINED or failure.startswith(_SILENT)


def _ejects(failure: str) -> bool:
    """Whether a failure says the worker itself is unusable (rather than this one request failing)."""
    return not failure.startswith(("FINISH_REASON_ERROR", "FINISH_REASON_ABORT"))


def _metadata(exc: grpc.aio.AioRpcError, key: str) -> str | None:
    for k, v in exc.trailing_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


def _retry_after_s(exc: grpc.aio.AioRpcError) -> float:
    with contextlib.suppress(TypeError, ValueError):
        return max(float(_metadata(exc, RETRY_AFTER_KEY)) / 1000.0, 0.05)  # type: ignore[arg-type]
    return 1.0


def _invalid_argument(exc: grpc.aio.AioRpcError, prompt_param: str) -> APIError:
    message = exc.details() or "invalid request"
    if "maximum context length" in message:
        error = errors.context_length_exceeded(message)
        error.param = prompt_param
        return error
    return errors.bad_request(message, _metadata(exc, ERROR_PARAM_KEY))
