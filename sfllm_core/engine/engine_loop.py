"""EngineLoop: an InferenceEngine stepping on a background thread, streaming results to asyncio callers.

This is the in-process way to serve (tests, benchmarks, embedding). The worker runs its engine
in a process of its own instead (worker/engine_server.py), so that per-token text and gRPC
work never shares an interpreter lock with the steps.
"""

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from sfllm_core.outputs import StepOutput
from sfllm_core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sfllm_core.engine.inference_engine import InferenceEngine

logger = logging.getLogger("sfllm.engine")


class EngineLoop:
    """Runs `engine.step()` on one thread while there is work and hands each output to its stream's loop."""

    def __init__(self, engine: "InferenceEngine") -> None:
        self.engine = engine
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[StepOutput]]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None

    async def stream(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[StepOutput]:
        """Yield a request's StepOutputs as they are produced; closing the generator aborts it.

        Validation errors are raised before the first yield.
        """
        engine = self.engine
        request_id = request_id or uuid.uuid4().hex
        seq = engine.make_sequence(request_id, prompt, params)
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._listeners[request_id] = (asyncio.get_running_loop(), queue)
        try:
            engine.submit(seq)
        except Exception:
            self._listeners.pop(request_id, None)
            raise
        self._start()
        finished = False
        try:
            while True:
                out = await queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._listeners.pop(request_id, None)
            if not finished:
                engine.abort(request_id)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="sfllm-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            if not engine.wait_for_work(timeout=1.0):
                continue
            if self._stopping:
                return
            try:
                outputs = engine.step()
            except Exception:  # the loop must outlive any bug in one step
                logger.exception("engine step crashed")
                outputs = []
            self._deliver(outputs)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            listener = self._listeners.get(out.request_id)
            if listener is not None:
                loop, queue = listener
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, out)
                except RuntimeError:  # the caller's loop has closed
                    self.engine.abort(out.request_id)

    def shutdown(self) -> None:
        """Stop the thread; requests still in flight end with finish_reason "abort"."""
        with self._lock:
            self._stopping = True
        self.engine.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._deliver(self.engine.abort_all())
