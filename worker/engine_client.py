"""EngineClient: the gRPC front's side of the worker's engine and detokenizer processes.

It starts both (spawned, so that CUDA starts clean in the engine process), sends requests and
aborts to the engine, and routes what comes back, a batch at a time, to the Generate call that
owns each engine request. If either process dies, every call in flight gets an error and the
owner is told (the worker then reports NOT_SERVING and exits).
"""

import asyncio
import contextlib
import dataclasses
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from sfllm_core.models.loader import tokenizer_eos_token_ids
from sfllm_core.outputs import EngineLoad
from sfllm_core.sampling_params import SamplingParams
from worker.children import spawn
from worker.config import WorkerConfig
from worker.messages import (
    AbortRequests,
    AddEosTokens,
    AddRequest,
    Channels,
    DetokParams,
    DetokReady,
    EngineFailed,
    EngineInfo,
    EngineReady,
    LoadReport,
    Rejected,
    Shutdown,
    TextBatch,
    TextOutput,
    ToFront,
    TokenizerFile,
    decoder,
    encoder,
)

log = logging.getLogger("sfllm.worker")


class OutputSink(Protocol):
    """Where a Generate call takes its engine requests' results (index: which of its completions)."""

    def on_text(self, index: int, out: TextOutput) -> None: ...

    def on_rejected(self, index: int, rejected: Rejected) -> None: ...

    def on_failure(self, message: str) -> None: ...


class EngineStartError(RuntimeError):
    """The engine or detokenizer process could not start."""


class EngineClient:
    """Owns the two child processes and the sockets to them; every method runs on the front's event loop."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.info: EngineInfo | None = None
        self.load = EngineLoad(0, 0, 0, 0)
        self.failure: str | None = None
        self.on_failure: Callable[[str], None] | None = None
        self._sinks: dict[str, tuple[OutputSink, int]] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stopping = False
        self._encode = encoder().encode
        self._decode = decoder(ToFront).decode
        self._ready: asyncio.Future[EngineInfo] | None = None
        self._detok_ready: asyncio.Future[None] | None = None
        self._ctx: zmq.Context | None = None
        self.tokenizer_eos_token_ids: list[int] = []

    @property
    def num_in_flight(self) -> int:
        return len(self._sinks)

    def start_engine(self, model_path: str, served_name: str) -> None:
        """Bind the sockets and start the engine process (it builds the engine while the front loads the tokenizer)."""
        loop = asyncio.get_running_loop()
        self.channels = Channels.create()
        self._ctx = zmq.Context()
        self._to_engine = self._ctx.socket(zmq.PUSH)
        self._to_engine.setsockopt(zmq.SNDHWM, 0)
        self._to_engine.setsockopt(zmq.LINGER, 0)
        self._to_engine.bind(self.channels.engine)
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.RCVHWM, 0)
        self._inbox.bind(self.channels.front)
        loop.add_reader(self._inbox.getsockopt(zmq.FD), self._read)
        self._ready, self._detok_ready = loop.create_future(), loop.create_future()
        config, channels = dataclasses.asdict(self.config), dataclasses.asdict(self.channels)
        self._spawn("engine", "worker.engine_server", config=config, channels=channels,
                    model_path=model_path, served_name=served_name)  # fmt: skip

    def start_detokenizer(self, tokenizer: Any) -> None:
        """Send the engine the tokenizer's eos ids and the file it is saved in (constrained decoding reads it);
        start the detokenizer on that file."""
        self.tokenizer_eos_token_ids = tokenizer_eos_token_ids(tokenizer)
        self._to_engine.send(self._encode(AddEosTokens(self.tokenizer_eos_token_ids)))
        tokenizer_file = os.path.join(os.path.dirname(self.channels.front.removeprefix("ipc://")), "tokenizer.json")
        tokenizer.backend_tokenizer.save(tokenizer_file)
        self._to_engine.send(self._encode(TokenizerFile(tokenizer_file)))
        channels = dataclasses.asdict(self.channels)
        self._spawn("detokenizer", "worker.detokenizer_process", channels=channels,
                    log_level=self.config.log_level, tokenizer_file=tokenizer_file)  # fmt: skip

    def _spawn(self, name: str, module: str, **args: object) -> None:
        # Fresh interpreters (CUDA must start clean in the engine process), started from this, the
        # event loop's, thread: the children's parent-death signal follows the thread that forks them.
        proc = spawn(module, **args)
        self._procs[name] = proc
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._watch, args=(loop, name, proc), name=f"sfllm-watch-{name}", daemon=True).start()
        log.info("process started", extra={"fields": {"process": name, "pid": proc.pid}})

    async def ready(self) -> EngineInfo:
        """Wait until the engine is built and the detokenizer listens; raises EngineStartError."""
        assert self._ready is not None and self._detok_ready is not None
        try:
            info = await self._ready
            await self._detok_ready
        except EngineStartError:
            await self.stop()
            raise
        info.eos_token_ids = sorted(set(info.eos_token_ids) | set(self.tokenizer_eos_token_ids))
        self.info = info
        return info

    # -- requests ------------------------------------------------------------------------------

    def add(
        self, rid: str, prompt_ids: list[int], params: SamplingParams, detok: DetokParams, sink: OutputSink, index: int
    ) -> None:
        """Send one engine request; its results go to sink (on_text, or on_rejected once).

        detok.continuation, when set, is output generated before: the engine's sequence starts with it too.
        """
        if self.failure is not None:
            raise RuntimeError(self.failure)
        self._sinks[rid] = (sink, index)
        self._to_engine.send(self._encode(AddRequest(rid, prompt_ids, params, detok, detok.continuation)))

    def abort(self, rids: list[str]) -> None:
        """Stop engine requests; each still ends at its sink, with finish_reason "abort"."""
        if rids and self.failure is None and not self._stopping:
            self._to_engine.send(self._encode(AbortRequests(rids)))

    def cancel(self, rids: list[str]) -> None:
        """Stop engine requests whose call is gone: nothing more reaches their sinks."""
        for rid in rids:
            self._sinks.pop(rid, None)
        self.abort(rids)

    # -- what comes back -------------------------------------------------------------------------

    def _read(self) -> None:
        # The socket's descriptor is edge-triggered: read until nothing is left.
        inbox = self._inbox
        while inbox.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frame = inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._dispatch(self._decode(frame))

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, TextBatch):
            sinks = self._sinks
            aborts = []
            for out in msg.outputs:
                target = sinks.get(out.rid)
                if target is None:
                    continue  # its call is gone
                if out.finished:
                    del sinks[out.rid]
                    if out.abort_engine:
                        aborts.append(out.rid)
                target[0].on_text(target[1], out)
            if aborts:
                self._to_engine.send(self._encode(AbortRequests(aborts)))
        elif isinstance(msg, LoadReport):
            self.load = msg.load
        elif isinstance(msg, Rejected):
            target = self._sinks.pop(msg.rid, None)
            if target is not None:
                target[0].on_rejected(target[1], msg)
        elif isinstance(msg, EngineReady):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg.info)
        elif isinstance(msg, DetokReady):
            if self._detok_ready is not None and not self._detok_ready.done():
                self._detok_ready.set_result(None)
        elif isinstance(msg, EngineFailed):
            self._fail_start(f"the engine failed to start: {msg.error}")

    def _fail_start(self, message: str) -> None:
        for future in (self._ready, self._detok_ready):
            if future is not None and not future.done():
                future.set_exception(EngineStartError(message))

    def _watch(self, loop: asyncio.AbstractEventLoop, name: str, proc: "subprocess.Popen[bytes]") -> None:
        proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is left to tell
            loop.call_soon_threadsafe(self._on_exit, name)

    def _on_exit(self, name: str) -> None:
        proc = self._procs[name]
        if self._stopping:
            return
        message = f"the {name} process exited unexpectedly (exit code {proc.returncode})"
        log.error("process died", extra={"fields": {"process": name, "pid": proc.pid, "exitcode": proc.returncode}})
        if self.info is None or not self._detok_ready.done():  # type: ignore[union-attr]
            self._fail_start(message)
            return
        if self.failure is not None:
            return
        self.failure = message
        sinks = {id(sink): sink for sink, _ in self._sinks.values()}
        self._sinks.clear()
        for sink in sinks.values():
            sink.on_failure(message)
        if self.on_failure is not None:
            self.on_failure(message)

    # -- shutdown --------------------------------------------------------------------------------

    async def stop(self, timeout: float = 10.0) -> None:
        """Tell the engine to abort everything and exit, then end both processes and remove the sockets."""
        if self._ctx is None or self._stopping:
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        with contextlib.suppress(zmq.ZMQError):
            if self.failure is None:
                self._to_engine.send(self._encode(Shutdown()), zmq.NOBLOCK)
        engine = self._procs.get("engine")
        if engine is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(engine.wait, timeout)
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    await asyncio.to_thread(proc.wait, timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait)
        with contextlib.suppress(ValueError, OSError, zmq.ZMQError):
            loop.remove_reader(self._inbox.getsockopt(zmq.FD))
        self._inbox.close(linger=0)
        self._to_engine.close(linger=0)
        self._ctx.term()
        self._ctx = None
        with contextlib.suppress(OSError):
            self.channels.remove()

    @property
    def pids(self) -> dict[str, int | None]:
        """The child processes' ids by role (the engine's and the detokenizer's)."""
        return {name: proc.pid for name, proc in self._procs.items()} | {"front": os.getpid()}
