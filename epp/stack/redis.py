"""A real Redis (Debian's ``redis-server``; Valkey's ``valkey-server`` when present) on loopback, for the tests,
the replica benchmark and the demo: started on a given port, killed by PID, paused (SIGSTOP) to act slow."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from epp.stack import procs

BINARIES = ("valkey-server", "redis-server")


def server_binary(install: bool = False) -> str | None:
    """The server binary; with ``install`` (and root), ``apt-get install redis-server`` first when missing."""
    for name in BINARIES:
        if found := shutil.which(name):
            return found
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "install", "-y", "-qq", "redis-server"], ["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "redis-server"]):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(argv, env=env, capture_output=True, timeout=300, check=False)
            if found := shutil.which("redis-server"):
                return found
    return None


class RedisProcess:
    def __init__(self, port: int, password: str | None = None, host: str = "127.0.0.1",
                 binary: str | None = None) -> None:
        self.host, self.port, self.password = host, port, password
        self.binary = binary or server_binary() or "redis-server"
        self.dir = Path(tempfile.mkdtemp(prefix="epp-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisProcess:
        argv = [self.binary, "--bind", self.host, "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--protected-mode", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        self.log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = procs.spawn(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.tail()}")
            if self.ping():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"redis-server not answering after {timeout}s: {self.tail()}")

    def ping(self) -> bool:
        """A PING with the password when set: True once the server answers it."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a store that is slow, not down)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server must not keep its port
            procs.stop(self.proc, 10, signal.SIGKILL)

    def tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "redis.log").read_text(errors="replace")[-n:]
        return ""

    def stop(self) -> None:
        self.kill()
        with contextlib.suppress(AttributeError):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
