"""EngineServer: the worker's engine process. It owns the GPU and runs scheduler and model steps back to back.

It does no per-token text work: requests arrive from the front as token ids (AddRequest), and
each step's outputs leave as one StepBatch for the detokenizer. Load reports, refusals and the
start-up handshake go straight to the front. The process exits when told to (Shutdown), when its
parent dies, or when it cannot build the engine.

The queue-time bound (--max-queue-time-s) is kept here, where the queue is. A request still unadmitted that long
after it arrived is aborted and refused as queue_full (the front answers RESOURCE_EXHAUSTED with its retry hint, and
sends nothing else for it). And a new request that would wait longer is refused at once, at the door: when the
requests queued ahead of it, at the rate the queue has been admitting them, would take the bound, or when the oldest
of them has already waited half of it (a queue that admits nothing, or too little to measure a rate). A continuation
(a stream migrated from another worker, its client mid-stream) is never refused for waiting: a stall is better than
an error event there, and the door keeps the queue it joins short.
"""

import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

import zmq

from protos.sfllm.logs import configure_logging
from sfllm_core.errors import InvalidRequestError, QueueFullError
from worker.children import child_args, die_with_parent, settle_heap
from worker.config import WorkerConfig
from worker.messages import (
    AbortRequests,
    AddEosTokens,
    AddRequest,
    Channels,
    DetokParams,
    EngineFailed,
    EngineInfo,
    EngineReady,
    LoadReport,
    Rejected,
    Shutdown,
    StepBatch,
    ToEngine,
    TokenizerFile,
    decoder,
    encoder,
)

if TYPE_CHECKING:
    from sfllm_core.engine.request_sequence import RequestSequence

log = logging.getLogger("sfllm.engine")

SLOW_STEP_LOG_S = 0.5  # steps longer than this are logged (a full 8k-token prefill on an H200 takes ~0.1 s)
IDLE_SPIN_S = 0.5  # see _loop
LOAD_REPORT_INTERVAL_S = 0.02  # while busy, load reports go out at most this often (and always on idling)
QUEUE_CHECK_INTERVAL_S = 0.1  # how often the queue-time bound looks for requests admitted or past it


def main(argv: list[str] | None = None) -> None:
    """`python -m worker.engine_server ARGS`: the engine process, started by the worker's front."""
    args = child_args(argv)
    die_with_parent(args["parent_pid"])
    config, channels = WorkerConfig(**args["config"]), Channels(**args["channels"])
    configure_logging(config.log_level)
    EngineServer(config, args["model_path"], args["served_name"], channels, args["parent_pid"]).run()


class EngineServer:
    """Steps one InferenceEngine while it has work; otherwise waits on its inbox."""

    def __init__(
        self, config: WorkerConfig, model_path: str, served_name: str, channels: Channels, parent_pid: int
    ) -> None:
        self.config = config
        self.model_path = model_path
        self.served_name = served_name
        self.parent_pid = parent_pid
        self._ctx = zmq.Context()
        self.inbox = self._ctx.socket(zmq.PULL)
        self.inbox.connect(channels.engine)
        self.to_detok = self._ctx.socket(zmq.PUSH)
        self.to_detok.connect(channels.detokenizer)
        self.to_front = self._ctx.socket(zmq.PUSH)
        self.to_front.connect(channels.front)
        for sock in (self.inbox, self.to_detok, self.to_front):
            sock.setsockopt(zmq.LINGER, 2000)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        self._encode = encoder().encode
        self._decode = decoder(ToEngine).decode
        self._unannounced: dict[str, DetokParams] = {}
        self._aborting = False  # aborts were asked for: look for their ends in the next outputs
        self._last_load = None
        self._last_load_at = 0.0
        self._trace: list | None = None
        self._expired: set[str] = set()  # refused past the queue-time bound: their abort's output is not sent on
        self._queue_checked_at = 0.0
        # Submitted, not yet admitted (nor ended), oldest first; True for a continuation.
        self._unadmitted: dict[str, tuple[RequestSequence, bool]] = {}
        # The queue's service rate: per look that found requests queued at the look before, (when, seconds, how
        # many were admitted since); over the last bound's worth of such looks. An idle queue measures nothing.
        self._service: deque[tuple[float, float, int]] = deque()
        self._backlogged = False  # the last look found requests queued
        self._admitted_unlooked = 0  # admissions _prune_head forgot since the last look

    def run(self) -> None:
        try:
            from sfllm_core.engine.inference_engine import InferenceEngine  # heavy: torch and the model code

            engine_config = replace(
                self.config.engine_config(),
                model_path=self.model_path,
                served_model_name=self.served_name,
                load_tokenizer=False,  # the front tokenizes, and sends the tokenizer's eos ids (AddEosTokens)
            )
            self.engine = InferenceEngine(config=engine_config)
            self.engine.exit_on_rank_failure = True  # tensor parallel: a dead rank is a dead engine, for the front
        except Exception as exc:
            log.exception("the engine failed to start")
            self.to_front.send(self._encode(EngineFailed(f"{type(exc).__name__}: {exc}")))
            self._close()
            sys.exit(1)
        engine = self.engine
        info = EngineInfo(
            served_model_name=engine.model_name,
            model_type=str(getattr(engine.model_config, "model_type", "")),
            eos_token_ids=sorted(engine.eos_token_ids),
            limits=engine.limits,
            pid=os.getpid(),
        )
        settle_heap("engine")
        self.to_front.send(self._encode(EngineReady(info)))
        try:
            self._loop()
        finally:
            self._close()

    def _loop(self) -> None:
        engine = self.engine
        delay = self.config.debug_step_delay_s
        slow_step = SLOW_STEP_LOG_S if engine.device.type == "cuda" else float("inf")  # CPU prefills take seconds
        # --debug-step-trace: (start, step s, send s, outputs, running) per step, and (time, -1, 0, 0, 0)
        # per request arrival, written out at exit.
        trace = self._trace = [] if self.config.debug_step_trace else None
        # On a GPU the loop spins for a while after its last work before it blocks: a request that
        # arrives then finds the process on a core and running, not waking from a sleep.
        spin_s = IDLE_SPIN_S if engine.device.type == "cuda" else 0.0  # a CPU host has no core to spare
        last_work = 0.0
        while True:
            if not engine.has_work():
                spinning = time.monotonic() - last_work < spin_s
                # Block only while idle, and then for at most a second: a dead parent must be noticed.
                if not self.inbox.poll(0 if spinning else 1000):
                    if not spinning and os.getppid() != self.parent_pid:
                        return
                    continue
            last_work = time.monotonic()
            if not self._read_inbox():
                self._aborting = True
                self._send_outputs(engine.abort_all())
                return
            if self._unadmitted:
                self._check_queue()
            if engine.has_work():
                if delay:
                    time.sleep(delay)
                started = time.perf_counter()
                try:
                    outputs = engine.step()
                except Exception:  # step() ends a failed batch itself; this is a bug elsewhere in it
                    log.exception("engine step crashed")
                    outputs = []
                stepped = time.perf_counter()
                took = stepped - started
                if took > slow_step:  # a first-use kernel compile, say: it stalls every stream
                    log.warning("an engine step took %.0f ms (%d sequences out)", took * 1e3, len(outputs))
                self._send_outputs(outputs)
                if trace is not None:
                    running = len(engine.scheduler.running)
                    trace.append((started, took, time.perf_counter() - stepped, len(outputs), running))
            self._report_load()

    def _read_inbox(self) -> bool:
        """Apply every message waiting; False once told to shut down."""
        engine = self.engine
        while True:
            try:
                frame = self.inbox.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return True
            msg = self._decode(frame)
            if isinstance(msg, AddRequest):
                if self._trace is not None:  # an arrival: a row with a negative step time
                    self._trace.append((time.perf_counter(), -1.0, 0.0, 0, 0))
                bounded = self.config.max_queue_time_s > 0
                wait = self._expected_wait() if bounded and not msg.continuation else None
                if wait is not None:
                    message = f"the queue is too long: a request would wait {wait} in it; retry later"
                    self.to_front.send(self._encode(Rejected(msg.rid, "queue_full", message)))
                    continue
                try:
                    seq = engine.make_sequence(msg.rid, msg.prompt_ids, msg.params, msg.continuation)
                    engine.submit(seq)
                except InvalidRequestError as exc:
                    self.to_front.send(self._encode(Rejected(msg.rid, "invalid", exc.message, exc.param)))
                except QueueFullError as exc:
                    self.to_front.send(self._encode(Rejected(msg.rid, "queue_full", str(exc))))
                else:
                    self._unannounced[msg.rid] = msg.detok
                    if bounded:
                        self._unadmitted[msg.rid] = (seq, bool(msg.continuation))
            elif isinstance(msg, AbortRequests):
                for rid in msg.rids:
                    engine.abort(rid)
                self._aborting = True
            elif isinstance(msg, AddEosTokens):
                engine.add_eos_token_ids(msg.token_ids)
            elif isinstance(msg, TokenizerFile):
                engine.use_tokenizer_file(msg.path)
            elif isinstance(msg, Shutdown):
                return False

    def _expected_wait(self) -> str | None:
        """Why a new request would wait past the queue-time bound (None: it would not), by the requests queued
        ahead of it and the rate the queue has admitted requests at while it held some, or by how long the oldest
        has waited (a queue that admits too little to measure)."""
        self._check_queue()
        self._prune_head()  # the look may be up to QUEUE_CHECK_INTERVAL_S old: the oldest must be one still waiting
        if not self._unadmitted:
            return None
        bound = self.config.max_queue_time_s
        queued = len(self._unadmitted)  # a few behind the oldest may have been admitted since the last look
        oldest = time.monotonic() - next(iter(self._unadmitted.values()))[0].arrival_time
        if oldest >= bound / 2:
            return f"more than {bound:g} s (the oldest has waited {oldest:.1f} s)"
        seconds = sum(dt for _, dt, _ in self._service)
        admitted = sum(n for _, _, n in self._service)
        # None admitted in a second or more of backlog: the rate is below one per `seconds`, so the wait at least this
        wait = queued * seconds / max(admitted, 1)
        if seconds >= 1.0 and wait >= bound:
            return f"about {wait:.0f} s or more ({queued} ahead, {admitted / seconds:.2f} admitted a second)"
        return None

    def _prune_head(self) -> None:
        """Forget the oldest requests that were admitted or ended since the last look (the next look counts them)."""
        while self._unadmitted:
            rid, (seq, _) = next(iter(self._unadmitted.items()))
            if not (seq.admitted or seq.is_finished):
                return
            self._admitted_unlooked += seq.admitted and seq.arrival_time < self._queue_checked_at
            del self._unadmitted[rid]

    def _check_queue(self) -> None:
        """Note the requests admitted since the last look (the service rate), forget those that ended, and refuse
        the ones past the queue-time bound; at most every QUEUE_CHECK_INTERVAL_S."""
        now = time.monotonic()
        since = now - self._queue_checked_at
        if since < QUEUE_CHECK_INTERVAL_S:
            return
        self._queue_checked_at = now
        bound = self.config.max_queue_time_s
        looked_before = now - since
        # of those that were waiting at the last look: the queue's service, not an arrival let straight in
        admitted, self._admitted_unlooked = self._admitted_unlooked, 0
        for rid, (seq, continuation) in list(self._unadmitted.items()):
            if seq.admitted:
                admitted += seq.arrival_time < looked_before
            elif seq.is_finished:
                pass
            elif not continuation and now - seq.arrival_time >= bound:
                self.engine.abort(rid)
                self._expired.add(rid)
                self._unannounced.pop(rid, None)
                message = f"not admitted within {bound:g} s (--max-queue-time-s); retry later"
                self.to_front.send(self._encode(Rejected(rid, "queue_full", message)))
            else:
                continue
            del self._unadmitted[rid]
        if self._backlogged:
            self._service.append((now, since, admitted))
        while self._service and self._service[0][0] < now - bound:
            self._service.popleft()
        self._backlogged = bool(self._unadmitted)

    def _send_outputs(self, outputs: list) -> None:
        if self._expired and outputs:  # the front was told they were refused: their aborts are not news
            ended = {out.request_id for out in outputs} & self._expired
            if ended:
                self._expired -= ended
                outputs = [out for out in outputs if out.request_id not in ended]
        if not outputs:
            return
        if self._aborting:
            self._aborting = False
            for out in outputs:
                if out.finish_reason == "abort":  # how far it got: a prefill cut short shows here
                    fields = {"request_id": out.request_id, "prompt_tokens": out.num_prompt_tokens}
                    fields["computed_tokens"] = out.num_computed_tokens
                    log.info("aborted", extra={"fields": fields})
        announce = []
        if self._unannounced:
            for out in outputs:
                params = self._unannounced.pop(out.request_id, None)
                if params is not None:
                    announce.append((out.request_id, params))
        self.to_detok.send(self._encode(StepBatch(announce, outputs)))

    def _report_load(self) -> None:
        engine = self.engine
        load = engine.get_load()
        if load == self._last_load:
            return
        now = time.monotonic()
        if now - self._last_load_at < LOAD_REPORT_INTERVAL_S and engine.has_work():
            return
        self._last_load, self._last_load_at = load, now
        self.to_front.send(self._encode(LoadReport(load)))

    def _close(self) -> None:
        if self._trace:
            with open(self.config.debug_step_trace, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in self._trace)
        for sock in (self.inbox, self.to_detok, self.to_front):
            sock.close()
        self._ctx.term()


if __name__ == "__main__":
    main()
