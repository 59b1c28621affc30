"""Ties a worker process to the server that started it (Linux), set up by the worker itself after exec.

The server used to do this in a preexec_fn, but running Python (and loading libc) between fork and exec in a
multi-threaded server (gRPC, torch threads) can crash the child: measured here as segfaults of fresh workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PARENT_ENV = "DEML_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel for `sig` when the parent exits; exit now if it already has. No-op when not asked for."""
    expected = os.environ.get(PARENT_ENV)
    if not expected:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    # The parent may have died before prctl ran: then this process was re-parented already.
    if str(os.getppid()) != expected:
        os._exit(0)
