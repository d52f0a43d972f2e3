"""``--workers``' connection placement (epp.workers) in-process: the supervisor hands each accepted connection to the
least loaded worker over a Unix socket, and a worker serves what it is handed and publishes its load. The whole,
through a real Envoy, is tests/e2e/test_workers.py."""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from epp.config import WORKER_MAX_CONCURRENT_STREAMS, Config
from epp.extproc import h2grpc
from epp.extproc.servicer import HEALTH_CHECK
from epp.workers import SLOT, YOUNG, Supervisor, WorkerLink, connection_load

HOST = "127.0.0.1"


def test_a_connection_weighs_its_streams_up_to_the_limit_and_the_whole_limit_while_young():
    assert connection_load(3, YOUNG + 1, 4) == 3
    assert connection_load(9, YOUNG + 1, 4) == 4  # over the limit before the client had it: briefly
    assert connection_load(0, YOUNG + 1, 4) == 0  # idle: Envoy keeps connections it no longer needs
    assert connection_load(1, 0.1, 4) == 4  # new: Envoy opened it because the others were full
    assert connection_load(1, 0.1, 4, {HEALTH_CHECK}) == 1  # Envoy's health checker's own connection
    assert connection_load(1, 0.1, 0) == 1 and connection_load(7, YOUNG + 1, 0) == 7  # no limit


def test_the_workers_default_limits_and_the_flags():
    assert Config(workers=2).extproc_connection_limits == (WORKER_MAX_CONCURRENT_STREAMS, 300.0)
    assert Config(worker_index=0).extproc_connection_limits == (WORKER_MAX_CONCURRENT_STREAMS, 300.0)
    assert Config().extproc_connection_limits == (0, 0.0)  # one process: as GIE, no limit, no age
    assert Config(workers=2, grpc_max_concurrent_streams=0, grpc_max_connection_age=0).extproc_connection_limits \
        == (0, 0.0)
    assert Config(grpc_max_concurrent_streams=16, grpc_max_connection_age=60).extproc_connection_limits == (16, 60.0)
    with pytest.raises(ValueError, match="max-concurrent-streams"):
        Config(static_endpoints="a:1", grpc_max_concurrent_streams=-2).validate()


class Links:
    """A supervisor of three workers whose processes are replaced by the far ends of their Unix sockets."""

    def __init__(self) -> None:
        self.sup = Supervisor(Config(workers=3, static_endpoints="a:1"), [])
        self.far: list[socket.socket] = []
        for w in self.sup.workers:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            w.link, w.ready = ours, True
            self.far.append(theirs)

    def publish(self, index: int, received: int, load: int, streams: int = 0) -> None:
        SLOT.pack_into(self.sup.load, index * SLOT.size, received, load, streams)

    def hand(self) -> int:
        """Hand a connection; which worker received it (its descriptor crossed the socket)."""
        a, b = socket.socketpair()
        with a, b:
            w = self.sup.hand(a, [w for w in self.sup.workers if w.link is not None])
        assert w is not None
        msg, fds, _, _ = socket.recv_fds(self.far[w.index], 16, 4)
        assert msg == b"c" and len(fds) == 1
        socket.socket(fileno=fds[0]).close()
        return w.index

    def close(self) -> None:
        for s in self.far:
            s.close()
        for w in self.sup.workers:
            self.sup._unlink(w)


@pytest.fixture
def links() -> Iterator[Links]:
    lk = Links()
    try:
        yield lk
    finally:
        lk.close()


def test_each_connection_goes_to_the_least_loaded_worker(links):
    links.publish(0, 0, 8)
    links.publish(1, 0, 2)
    links.publish(2, 0, 5)
    assert links.hand() == 1
    # handed, not yet taken: counted as a full connection (4 streams) at once, so the next goes elsewhere
    assert links.hand() == 2
    links.publish(1, 1, 3)  # worker 1 took it: its own count from now on
    links.publish(2, 1, 5)
    assert links.hand() == 1


def test_ties_go_round_and_fewer_streams_win_first(links):
    assert sorted(links.hand() for _ in range(3)) == [0, 1, 2]  # equal loads: each in turn (handed counts)
    for i in range(3):
        links.publish(i, 1, 4, streams=9 - i)
    assert links.hand() == 2


def test_a_worker_not_ready_or_gone_is_passed_over(links):
    links.publish(0, 0, 0)
    links.publish(1, 0, 4)
    links.publish(2, 0, 8)
    links.sup.workers[0].ready = False  # least loaded, but not ready: last resort
    assert links.hand() == 1
    links.publish(1, 1, 0)
    links.far[1].close()  # worker 1 died: handing to it fails, the next in order takes the connection
    assert links.hand() == 2
    assert [w.handed_total for w in links.sup.workers] == [0, 1, 1]


class Worker:
    """A worker's server and its link on an event loop in a thread; the test plays the supervisor."""

    def __init__(self, max_streams: int) -> None:
        self.server = h2grpc.Server({HEALTH_CHECK: lambda call: _Unused()}, max_concurrent_streams=max_streams)
        self.supervisor_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.file = tempfile.TemporaryFile()  # noqa: SIM115  # closed in stop
        self.file.truncate(SLOT.size * 2)
        self.load = mmap.mmap(self.file.fileno(), 0)
        self.link = WorkerLink(self.server, 1, worker_end.detach(), os.dup(self.file.fileno()))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.loop.call_soon_threadsafe(self.link.start)

    def slot(self) -> tuple[int, int, int]:
        return SLOT.unpack_from(self.load, SLOT.size)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.supervisor_end.close()
        self.load.close()
        self.file.close()


class _Unused:
    def message(self, data: bytes) -> None: ...
    def half_close(self) -> None: ...
    def cancel(self) -> None: ...


def _wait(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_worker_serves_the_connections_it_is_handed_and_publishes_its_load():
    worker = Worker(max_streams=4)
    listener = socket.create_server((HOST, 0))
    try:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        accepted, _ = listener.accept()
        with accepted:  # the supervisor's copy closes once handed
            socket.send_fds(worker.supervisor_end, [b"c"], [accepted.fileno()])
        with client:
            client.sendall(h2grpc.PREFACE + h2grpc._frame(h2grpc.SETTINGS, 0, 0) +
                           h2grpc._frame(h2grpc.PING, 0, 0, b"12345678"))
            data = b""
            while (h2grpc.PING, h2grpc.ACK) not in [(f[0], f[1]) for f in _frames(data)]:
                chunk = client.recv(65536)
                assert chunk
                data += chunk
            settings = next(f for f in _frames(data) if f[0] == h2grpc.SETTINGS and not f[1])
            assert (0x3).to_bytes(2, "big") + (4).to_bytes(4, "big") in settings[3]  # the limit is advertised
            _wait(lambda: worker.slot() == (1, 4, 0))  # taken; new, so it weighs the whole limit
        _wait(lambda: worker.slot() == (1, 0, 0))  # closed by the client: nothing left
    finally:
        listener.close()
        worker.stop()


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while len(data) - pos >= 9:
        n = int.from_bytes(data[pos:pos + 3], "big")
        out.append((data[pos + 3], data[pos + 4], int.from_bytes(data[pos + 5:pos + 9], "big"),
                    data[pos + 9:pos + 9 + n]))
        pos += 9 + n
    return out
