"""A child process that ends with its parent, however the parent ends (SIGKILL included).

Linux's ``prctl(PR_SET_PDEATHSIG)`` has the kernel signal the child when its parent exits; elsewhere (or
without a libc to call) this is a no-op. Used by ``--workers`` (each worker, about its supervisor) and by the
local rig (``epp.stack.procs``: Envoy, EPP, the simulator, Redis, about the test or demo that started them).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    with contextlib.suppress(OSError, AttributeError, ImportError):
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    return None


# Resolved at import, in the parent: a child between fork and exec (``preexec_fn``) then only calls it, and
# loads no library while another of the parent's threads may have held the loader's lock at fork.
_PRCTL = _libc_prctl()


def die_with_parent(parent: int | None = None) -> None:
    """SIGTERM this process when its parent dies.

    ``parent``: the pid that forked us, read before the fork (as a ``preexec_fn`` can): if it died before the
    prctl took effect the signal would never come, so we exit at once instead.
    """
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        os._exit(1)
