"""What the worker's child processes share: how they are started, and dying with the front that started them.

Kept free of heavy imports: the detokenizer process starts with this, tokenizers and msgspec only.
"""

import ctypes
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time

GC_PAUSE_LOG_S = 0.05  # collections longer than this are logged: they stall every stream the process serves


def spawn(module: str, **args: object) -> "subprocess.Popen[bytes]":
    """`python -m module ARGS`, ARGS one JSON object (and parent_pid); call it from a thread outliving the child."""
    args = {**args, "parent_pid": os.getpid()}
    return subprocess.Popen([sys.executable, "-m", module, json.dumps(args)], stdin=subprocess.DEVNULL)


def child_args(argv: list[str] | None = None) -> dict:
    """The JSON object a child was started with."""
    return json.loads((sys.argv[1:] if argv is None else argv)[0])


def die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when its parent dies (kill -9 included).

    The signal follows the thread that forked the child, hence `spawn`'s caveat. Loops also poll
    getppid while idle, which covers systems without prctl.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def settle_heap(process: str) -> None:
    """Call once start-up is done: move what start-up built out of the collector's reach, and log long pauses.

    A full collection walks every tracked object; after importing torch, transformers or grpc that
    is millions of them, which the heap's growth under the first heavy load makes the collector
    visit at once, stalling the process for up to a second. Frozen objects are never visited again.
    """
    gc.collect()
    gc.freeze()
    if any(getattr(cb, "settle_heap", False) for cb in gc.callbacks):
        return  # one watcher per process (tests start several servers in one)
    log = logging.getLogger(f"worker.{process}")
    started = [0.0]

    def watch(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        if took > GC_PAUSE_LOG_S:
            log.warning(
                "garbage collection paused the %s process for %.0f ms (generation %d, %d collected)",
                process,
                took * 1e3,
                info["generation"],
                info["collected"],
            )

    watch.settle_heap = True  # type: ignore[attr-defined]
    gc.callbacks.append(watch)
