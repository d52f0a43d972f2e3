"""The rig's child processes (simulator, EPP, Envoy, Redis): ended with the rig however the rig ends.

* ``spawn`` starts each child in a session of its own (a terminal's Ctrl-C reaches the rig, which stops its
  children in order) and, from the main thread, with ``PR_SET_PDEATHSIG`` (``epp.lifetime``), so even SIGKILL
  to the rig ends them. The kernel sends that signal when the *thread* that forked exits, so a child spawned
  from another thread (``asyncio.to_thread``) does without it rather than die with that thread.
* SIGTERM and SIGHUP, unless the program handles them itself, first stop every child still running, then end
  the rig by the same signal as before; ``atexit`` stops them on a normal exit or an uncaught exception
  (Ctrl-C's ``KeyboardInterrupt`` included).
* A child is stopped by its process group: SIGTERM, then SIGKILL after a bound.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from epp.lifetime import die_with_parent

STOP_TIMEOUT = 10.0  # s a child gets to exit after SIGTERM before SIGKILL
_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # what ends a process by default; SIGINT raises KeyboardInterrupt

# pid -> (the pid that spawned it, the child). Keyed by spawner: a fork of the rig (multiprocessing, epp
# replay's jobs) inherits this table and its handlers, and must not stop the rig's children.
_live: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
_hooked: set[str] = set()


def spawn(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **popen)`` for a child the rig owns until ``stop``."""
    parent = os.getpid()
    main = threading.current_thread() is threading.main_thread()
    _hook(main)
    proc = subprocess.Popen(list(argv), start_new_session=True,
                            preexec_fn=(lambda: die_with_parent(parent)) if main else None, **popen)
    _live[proc.pid] = (parent, proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT,
         sig: int = signal.SIGTERM) -> int | None:
    """``sig`` to the child's process group, SIGKILL if it still runs after ``timeout``; then forgotten."""
    if _signal_group(proc, sig):
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    _live.pop(proc.pid, None)
    return proc.returncode


def stop_all(timeout: float = STOP_TIMEOUT) -> None:
    """Stop every child this process spawned and has not stopped, all at once, within ``timeout``."""
    mine = [proc for parent, proc in list(_live.values()) if parent == os.getpid()]
    running = [proc for proc in mine if _signal_group(proc, signal.SIGTERM)]
    deadline = time.monotonic() + timeout
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))  # with a timeout: never blocks on Popen's lock
    for proc in running:
        if _signal_group(proc, signal.SIGKILL):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    for proc in mine:
        _live.pop(proc.pid, None)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> bool:
    """Signal the child's group while the child is unreaped (its pid, hence its group id, cannot be reused);
    False when it had already exited."""
    if proc.poll() is not None:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
        if sig != signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGCONT)  # a paused child (RedisProcess.pause) acts on it only once resumed
    return True


def _hook(main: bool) -> None:
    if "atexit" not in _hooked:
        _hooked.add("atexit")
        atexit.register(stop_all)
    if main and "signals" not in _hooked:  # signal.signal works only in the main thread
        _hooked.add("signals")
        for sig in _SIGNALS:
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _on_signal)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the rig at once (children keep PDEATHSIG)
    stop_all()
    os.kill(os.getpid(), signum)  # ended by the signal, as without this handler
