"""What the worker's child processes share: how they are started, and dying with the front that started them.

Kept free of heavy imports: the detokenizer process starts with this, tokenizers and msgspec only.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys


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
