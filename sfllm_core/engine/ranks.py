"""Tensor parallelism's processes: rank 0 is the engine, ranks 1..N-1 mirror its model steps.

Rank 0 (the InferenceEngine that was asked for tensor_parallel_size N) spawns the other ranks,
forms the process group with them (distributed/parallel_state.py) and runs everything a step
needs on the host: scheduler, memory pool bookkeeping, sampler. Each rank builds the same engine
around its slice of the model and its slice of the KV pool, agreeing on the page count at start.

Before every forward pass, `ModelRunner.execute` on rank 0 sends the followers the step's batch as
a `StepBatch`: per sequence just what the runner reads (the tokens fed, positions, page rows,
drafts). A follower rebuilds it as `_ShadowSequence`s and calls its own `execute` with it, so
each rank takes the same path (decode graph, prefill graph, verify graph, eager) and issues the
same collectives in the same order. Tokens sampled on rank 0's GPU and fed back without reaching
the host (overlapped decode steps) go to the followers by one NCCL broadcast, on the stream, before
the step.

The batch travels over ZeroMQ (one PUSH socket per follower, ipc); a follower that dies takes the
engine down (on CUDA the collectives would wait for it forever), and followers die with rank 0
(PR_SET_PDEATHSIG, and a parent check while idle).
"""

import atexit
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import msgspec
import numpy as np
import torch
import zmq

from sfllm_core.distributed.parallel_state import TensorParallel, init_tensor_parallel
from sfllm_core.engine.scheduler import ScheduledBatch

logger = logging.getLogger("sfllm.ranks")

FOLLOWER_STOP_S = 10.0  # how long close() waits for a follower to exit before killing it


class StepBatch(msgspec.Struct, array_like=True, tag=True):
    """One step's sequences as the runner reads them; page rows are their used prefixes, concatenated."""

    keys: list[int]  # id() of each sequence on rank 0 (pending_rows refers to them)
    starts: list[int]  # num_computed_tokens
    num_tokens: list[int]
    num_new_tokens: list[int]
    tokens: list[list[int]]  # token_ids[start : start + num_new_tokens] (PENDING_TOKEN where pending)
    drafts: list[list[int]]
    needs_prompt_logits: list[bool]
    num_pages: list[int]
    page_rows: bytes  # int32, each sequence's page_row[:num_pages]
    window_rows: bytes  # likewise for window_row, or empty
    pending_len: int  # length of the pending-token tensor broadcast before the step (0: none)
    pending_rows: list[int]  # per sequence, its row in that tensor, or -1


class Stop(msgspec.Struct, array_like=True, tag=True):
    """The engine shuts down: followers leave the group and exit."""


@dataclass
class RankSetup:
    """What a rank needs to join its group: its rank, the group's size and where it meets."""

    rank: int
    size: int
    init_file: str
    channel: str  # ipc address rank 0 sends this rank's steps on


class _TokenWindow:
    """The part of token_ids a step feeds, indexed by position in the sequence as token_ids is."""

    def __init__(self, start: int, tokens: list[int]) -> None:
        self.start, self.tokens = start, tokens

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.tokens[index.start - self.start : index.stop - self.start]
        return self.tokens[index - self.start]


class _ShadowSequence:
    """A follower's stand-in for a RequestSequence: the attributes ModelRunner reads, for one step."""

    def __init__(self, msg: StepBatch, i: int, page_row, window_row) -> None:
        self.num_computed_tokens = msg.starts[i]
        self.num_tokens = msg.num_tokens[i]
        self.token_ids = _TokenWindow(msg.starts[i], msg.tokens[i])
        self.draft_ids = msg.drafts[i]
        self.needs_prompt_logits = msg.needs_prompt_logits[i]
        self.page_row = page_row
        self.window_row = window_row
        self.pages = page_row[: msg.num_pages[i]]


class Followers:
    """Rank 0's side: starts ranks 1..size-1, sends them each step, and watches them."""

    def __init__(self, size: int, spawn_args: dict, on_failure: Callable[[str], None]) -> None:
        self.size = size
        self._dir = tempfile.mkdtemp(prefix="sfllm-tp-")
        self.init_file = os.path.join(self._dir, "rendezvous")
        self._ctx = zmq.Context()
        self._sockets = []
        self._procs: list[subprocess.Popen] = []
        self._closing = False
        self.failure: str | None = None  # set when a rank died: no step can run any more
        self._encode = msgspec.msgpack.Encoder().encode
        for rank in range(1, size):
            channel = f"ipc://{self._dir}/rank{rank}"
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.bind(channel)
            self._sockets.append(sock)
            setup = RankSetup(rank, size, self.init_file, channel)
            payload = json.dumps({**spawn_args, "setup": asdict(setup), "parent_pid": os.getpid()})
            self._procs.append(
                subprocess.Popen([sys.executable, "-m", "sfllm_core.engine.ranks", payload], stdin=subprocess.DEVNULL)
            )
        atexit.register(self.close)
        self._on_failure = on_failure
        threading.Thread(target=self._watch, name="sfllm-tp-watch", daemon=True).start()

    def _watch(self) -> None:
        for rank, proc in enumerate(self._procs, start=1):
            threading.Thread(target=self._wait_one, args=(rank, proc), daemon=True).start()

    def _wait_one(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if not self._closing:
            self._on_failure(f"tensor-parallel rank {rank} exited with code {code}")

    def send(self, batch: ScheduledBatch, pending_tokens: torch.Tensor | None, pending_rows: dict | None) -> None:
        """Hand the followers this step's batch (before rank 0 runs it); raises once a rank has died."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        seqs = batch.seqs
        starts = [s.num_computed_tokens for s in seqs]
        pages = [len(s.pages) for s in seqs]
        windowed = bool(seqs) and seqs[0].window_row is not None
        msg = StepBatch(
            keys=[id(s) for s in seqs],
            starts=starts,
            num_tokens=[s.num_tokens for s in seqs],
            num_new_tokens=list(batch.num_new_tokens),
            tokens=[s.token_ids[p : p + n] for s, p, n in zip(seqs, starts, batch.num_new_tokens)],
            drafts=[list(s.draft_ids) for s in seqs],
            needs_prompt_logits=[s.needs_prompt_logits for s in seqs],
            num_pages=pages,
            page_rows=b"".join(s.page_row[:n].tobytes() for s, n in zip(seqs, pages)),
            window_rows=b"".join(s.window_row[:n].tobytes() for s, n in zip(seqs, pages)) if windowed else b"",
            pending_len=0 if pending_tokens is None else len(pending_tokens),
            pending_rows=[pending_rows.get(id(s), -1) for s in seqs] if pending_rows else [],
        )
        frame = self._encode(msg)
        for rank, sock in enumerate(self._sockets, start=1):
            try:
                # Never blocks while the rank is connected (no high-water mark); it connected before joining.
                sock.send(frame, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                raise RuntimeError(f"tensor-parallel rank {rank} is not connected (it died)") from None

    def close(self) -> None:
        """Stop the followers (kill those that do not leave in time); idempotent."""
        if self._closing:
            return
        self._closing = True
        frame = self._encode(Stop())
        for sock in self._sockets:
            try:
                sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:  # that rank is gone: nothing is connected to take it
                pass
        for proc in self._procs:
            try:
                proc.wait(FOLLOWER_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sock in self._sockets:
            sock.close(0)
        self._ctx.term()


def broadcast_pending(tp: TensorParallel, pending_tokens: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Last step's sampled ids, on every rank's device (rank 0 has them; one broadcast on the stream)."""
    if length == 0:
        return None
    if pending_tokens is None:
        pending_tokens = torch.empty(length, dtype=torch.int64, device=tp.device)
    return tp.broadcast(pending_tokens)


def shadow_batch(msg: StepBatch, max_pages: int, scratch: int, window_scratch: int | None) -> tuple:
    """(ScheduledBatch of _ShadowSequences, pending_rows) for a follower's execute."""
    b = len(msg.keys)
    rows = np.full((b, max_pages), scratch, dtype=np.int32)
    flat = np.frombuffer(msg.page_rows, dtype=np.int32)
    window = None
    if msg.window_rows:
        window = np.full((b, max_pages), window_scratch, dtype=np.int32)
        window_flat = np.frombuffer(msg.window_rows, dtype=np.int32)
    offset = 0
    for i, n in enumerate(msg.num_pages):
        rows[i, :n] = flat[offset : offset + n]
        if window is not None:
            window[i, :n] = window_flat[offset : offset + n]
        offset += n
    seqs = [_ShadowSequence(msg, i, rows[i], None if window is None else window[i]) for i in range(b)]
    pending_rows = {id(s): r for s, r in zip(seqs, msg.pending_rows) if r >= 0} if msg.pending_rows else None
    return ScheduledBatch(seqs, list(msg.num_new_tokens)), pending_rows


def join_group(setup: RankSetup, device: torch.device) -> TensorParallel:
    """This rank's TensorParallel, once every rank has joined."""
    return init_tensor_parallel(setup.rank, setup.size, device, setup.init_file)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent:
        os._exit(1)


def follower_main(argv: list[str] | None = None) -> None:
    """`python -m sfllm_core.engine.ranks JSON`: build this rank's engine, then run the steps rank 0 sends."""
    args = json.loads((sys.argv[1:] if argv is None else argv)[0])
    parent = args["parent_pid"]
    _die_with_parent(parent)
    setup = RankSetup(**args["setup"])
    logging.basicConfig(
        level=args.get("log_level", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s %(name)s [rank {setup.rank}] %(message)s",
    )
    from sfllm_core.config import EngineConfig
    from sfllm_core.engine.inference_engine import InferenceEngine

    hf_config = None
    if args.get("hf_config") is not None:
        import transformers

        values = dict(args["hf_config"])
        hf_config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.setsockopt(zmq.RCVHWM, 0)
    inbox.connect(setup.channel)
    engine = InferenceEngine(config=EngineConfig(**args["config"]), hf_config=hf_config, rank_setup=setup)
    runner, pool = engine.runner, engine.pool
    decode = msgspec.msgpack.Decoder(StepBatch | Stop).decode
    window_scratch = pool.window_scratch_page if pool.window is not None else None
    try:
        while True:
            if not inbox.poll(1000):
                if os.getppid() != parent:
                    return
                continue
            msg = decode(inbox.recv(copy=True))
            if isinstance(msg, Stop):
                return
            batch, pending_rows = shadow_batch(msg, pool.max_pages_per_seq, pool.scratch_page, window_scratch)
            pending = broadcast_pending(engine.tp, None, msg.pending_len)
            runner.execute(batch, pending, pending_rows)
    finally:
        engine.close_tensor_parallel()
        inbox.close(0)
        ctx.term()


if __name__ == "__main__":
    follower_main()
