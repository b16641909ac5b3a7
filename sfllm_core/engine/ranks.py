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
import shutil
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
    """One step's sequences as the runner reads them, column by column: numpy arrays as bytes (a
    list per sequence took milliseconds to decode at batch 256)."""

    # int64 [B, 6]: num_computed_tokens, num_tokens, num_new_tokens, tokens fed from token_ids (fewer
    # than num_new_tokens in a verify step: the drafts make up the rest), drafts, pages
    counts: bytes
    prompt_logits: bytes  # bool [B]: needs_prompt_logits
    tokens: bytes  # int64: each sequence's fed tokens (PENDING_TOKEN where pending), then its drafts
    page_rows: bytes  # int32: each sequence's page_row[:pages], concatenated
    window_rows: bytes  # likewise for window_row, or empty
    pending_len: int  # length of the pending-token tensor broadcast before the step (0: none)
    pending_rows: bytes  # int64 [B]: each sequence's row in that tensor, or -1; empty when none


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

    __slots__ = ("start", "tokens")

    def __init__(self, start: int, tokens: list[int]) -> None:
        self.start, self.tokens = start, tokens

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.tokens[index.start - self.start : index.stop - self.start]
        return self.tokens[index - self.start]


class _ShadowSequence:
    """A follower's stand-in for a RequestSequence: the attributes ModelRunner reads, for one step."""

    __slots__ = (
        "num_computed_tokens",
        "num_tokens",
        "token_ids",
        "draft_ids",
        "needs_prompt_logits",
        "page_row",
        "window_row",
        "pages",
    )

    def __init__(self, start, num_tokens, fed, drafts, prompt_logits, page_row, window_row, num_pages) -> None:
        self.num_computed_tokens = start
        self.num_tokens = num_tokens
        self.token_ids = _TokenWindow(start, fed)
        self.draft_ids = drafts
        self.needs_prompt_logits = prompt_logits
        self.page_row = page_row
        self.window_row = window_row
        self.pages = page_row[:num_pages]


class Followers:
    """Rank 0's side: starts ranks 1..size-1, sends them each step, and watches them.

    Build it on a thread that lives as long as the engine: the ranks' PR_SET_PDEATHSIG fires when
    the thread that started them ends.
    """

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
        for rank, proc in enumerate(self._procs, start=1):
            watch = threading.Thread(target=self._wait_one, args=(rank, proc), name=f"sfllm-tp-{rank}", daemon=True)
            watch.start()

    def _wait_one(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if not self._closing:
            self._on_failure(f"tensor-parallel rank {rank} exited with code {code}")

    def send(self, batch: ScheduledBatch, pending_tokens: torch.Tensor | None, pending_rows: dict | None) -> None:
        """Hand the followers this step's batch (before rank 0 runs it); raises once a rank has died."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        msg = step_message(batch, pending_tokens, pending_rows)
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
        shutil.rmtree(self._dir, ignore_errors=True)  # the rendezvous file and the sockets


def step_message(batch: ScheduledBatch, pending_tokens: torch.Tensor | None, pending_rows: dict | None) -> StepBatch:
    """The StepBatch a follower rebuilds this step from (see shadow_batch)."""
    seqs, new = batch.seqs, batch.num_new_tokens
    counts = np.empty((len(seqs), 6), dtype=np.int64)
    counts[:, 0] = starts = [s.num_computed_tokens for s in seqs]
    counts[:, 1] = [s.num_tokens for s in seqs]
    counts[:, 2] = new
    counts[:, 4] = [len(s.draft_ids) for s in seqs]
    counts[:, 5] = pages = [len(s.pages) for s in seqs]
    tokens: list[int] = []
    for i, (s, p, n) in enumerate(zip(seqs, starts, new)):
        fed = s.token_ids[p : p + n]
        counts[i, 3] = len(fed)
        tokens += fed
        tokens += s.draft_ids
    windowed = bool(seqs) and seqs[0].window_row is not None
    return StepBatch(
        counts=counts.tobytes(),
        prompt_logits=np.array([s.needs_prompt_logits for s in seqs], dtype=np.bool_).tobytes(),
        tokens=np.array(tokens, dtype=np.int64).tobytes(),
        page_rows=np.concatenate([s.page_row[:n] for s, n in zip(seqs, pages)]).tobytes() if seqs else b"",
        window_rows=np.concatenate([s.window_row[:n] for s, n in zip(seqs, pages)]).tobytes() if windowed else b"",
        pending_len=0 if pending_tokens is None else len(pending_tokens),
        pending_rows=np.array([pending_rows.get(id(s), -1) for s in seqs], dtype=np.int64).tobytes()
        if pending_rows
        else b"",
    )


def broadcast_pending(tp: TensorParallel, pending_tokens: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Last step's sampled ids, on every rank's device (rank 0 has them; one broadcast on the stream)."""
    if length == 0:
        return None
    if pending_tokens is None:
        pending_tokens = torch.empty(length, dtype=torch.int64, device=tp.device)
    return tp.broadcast(pending_tokens)


def shadow_batch(msg: StepBatch, max_pages: int, scratch: int, window_scratch: int | None) -> tuple:
    """(ScheduledBatch of _ShadowSequences, pending_rows) for a follower's execute."""
    counts = np.frombuffer(msg.counts, dtype=np.int64).reshape(-1, 6)
    b = len(counts)
    starts, num_tokens, new, num_fed, num_drafts, num_pages = counts.T.tolist()
    prompt_logits = np.frombuffer(msg.prompt_logits, dtype=np.bool_).tolist()
    tokens = np.frombuffer(msg.tokens, dtype=np.int64).tolist()
    # Page rows as the pool keeps them: the used prefix, then the scratch page.
    rows = np.full((b, max_pages), scratch, dtype=np.int32)
    used = np.arange(max_pages) < counts[:, 5:6]
    rows[used] = np.frombuffer(msg.page_rows, dtype=np.int32)
    window = None
    if msg.window_rows:
        window = np.full((b, max_pages), window_scratch, dtype=np.int32)
        window[used] = np.frombuffer(msg.window_rows, dtype=np.int32)
    seqs, t = [], 0
    for i in range(b):
        fed, d = num_fed[i], num_drafts[i]
        seqs.append(
            _ShadowSequence(
                starts[i],
                num_tokens[i],
                tokens[t : t + fed],
                tokens[t + fed : t + fed + d],
                prompt_logits[i],
                rows[i],
                None if window is None else window[i],
                num_pages[i],
            )
        )
        t += fed + d
    pending_rows = None
    if msg.pending_rows:
        found = np.frombuffer(msg.pending_rows, dtype=np.int64).tolist()
        pending_rows = {id(s): r for s, r in zip(seqs, found) if r >= 0}
    return ScheduledBatch(seqs, new), pending_rows


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
