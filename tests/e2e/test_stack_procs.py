"""The rig stops every process it started however it is stopped (epp.stack.procs): the demo on SIGTERM, a
LocalStack user that never exits its ``with`` on SIGHUP and Ctrl-C, and either on SIGKILL (PR_SET_PDEATHSIG).
Each rig runs in a subprocess on loopback; its children are found in /proc and cleaned up by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 60.0  # s for the rig to bring its stack up (the demo also runs its tour first)
GONE_TIMEOUT = 20.0  # s for every child to be gone after the rig was signalled

# A LocalStack user holding its stack outside any ``with``: nothing but the rig's own hooks stops the children.
BARE_USER = """
import time
from epp.stack.local import LocalStack
stack = LocalStack(pods=1).start()
print("stack up", flush=True)
time.sleep(300)
"""


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) from /proc/<pid>/stat; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``."""
    parents: dict[int, int] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None and st[0] != "Z":
            parents[int(entry.name)], starts[int(entry.name)] = st[1], st[2]
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = starts[pid]
                frontier.append(pid)
    return found


def _alive(pid: int, start: int) -> bool:
    """Still running, and still the process we saw (not a reused pid); a zombie counts as gone."""
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[2] == start


def _run_rig(argv: list[str], sig: signal.Signals, tmp_path: Path) -> None:
    log = tmp_path / "rig.log"
    with open(log, "wb") as out:
        # SIGHUP as a terminal leaves it: a run under nohup would pass its SIG_IGN on, and the rig rightly
        # leaves an ignored signal alone
        rig = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    children: dict[int, int] = {}
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while "stack up" not in log.read_text(errors="replace"):
            assert rig.poll() is None, f"rig exited early:\n{log.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, f"rig not up:\n{log.read_text(errors='replace')[-3000:]}"
            time.sleep(0.1)
        children = _descendants(rig.pid)
        # simulator, EPP and Envoy at least
        assert len(children) >= 3, children
        rig.send_signal(sig)
        rig.wait(GONE_TIMEOUT)
        deadline = time.monotonic() + GONE_TIMEOUT
        while (left := [pid for pid, start in children.items() if _alive(pid, start)]) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"still running after {sig.name} to the rig: {left}"
    finally:
        for pid, start in children.items():
            if _alive(pid, start):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if rig.poll() is None:
            rig.kill()
            rig.wait(10)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_demo_sigterm_stops_every_child(tmp_path: Path) -> None:
    """The issue's case: SIGTERM to ``python -m epp.stack.demo --keep`` left Envoy, EPP and the simulator."""
    _run_rig([sys.executable, "-m", "epp.stack.demo", "--keep", "--pods", "1"], signal.SIGTERM, tmp_path)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_localstack_user_stops_every_child(sig: signal.Signals, tmp_path: Path) -> None:
    """SIGHUP: the rig's handler; SIGINT: KeyboardInterrupt, then atexit; SIGKILL: the kernel (PDEATHSIG)."""
    _run_rig([sys.executable, "-c", BARE_USER], sig, tmp_path)
