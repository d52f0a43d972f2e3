"""KV-event ingestion: one ZMQ SUB per endpoint (or one bound SUB in llm-d's centralized mode), on one thread.

Per endpoint, frames are applied in the sequence order vLLM's publisher numbers them in (its replay socket
resends from a number; ``vllm/distributed/kv_events.py`` in vLLM):

* ``seq == last + 1``: apply. The first frame of a stream is applied whatever its number (a publisher that
  ran before EPP subscribed); with a replay endpoint, EPP first asks for everything buffered from 0.
* ``seq > last + 1`` (a gap): with a replay endpoint, ask vLLM's ROUTER for ``last + 1`` onwards and hold
  live frames until the replay ends (``[.., 0xFF*8, ..]``) or times out; without one, apply and count the gap.
* ``seq <= last``: a duplicate or a frame going backwards -- dropped and counted; several in a row mean the
  publisher restarted (its numbering starts again at 0): the endpoint's blocks are cleared and the new stream
  taken from there. ``seq == 0`` after a stream means the same at once.
* A restart the scraper saw in the server's metrics (``restarted``) that the stream did not show (the new
  publisher's first frame EPP got was numbered past the old stream's last: a short-lived process, or a late
  reconnect) means the same: without it the old process's blocks would stay indexed beside the new one's.
* After ZMQ reconnects (a socket monitor sees it), missed frames are replayed when possible.

Malformed frames and events are dropped and counted by reason (``stats.dropped``); a frame rate above
``max_frames_per_second`` per endpoint is dropped as a flood: the gap it leaves is replayed when the rate window
ends (bounded by the publisher's buffer), or counted at the next frame without a replay endpoint. ZMQ reconnects
by itself, backing off from 100 ms to ``reconnect_max`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from epp_plugins.scorers.precise.events import BadEvent, Event, decode_batch, parse_topic

log = logging.getLogger(__name__)

END_SEQ = (1 << 64) - 1
RESTART_AFTER_BACKWARDS = 3  # frames in a row numbered at or below the last applied: the publisher restarted
REPLAY_IDLE = 2.0  # s without a replay frame: the replay failed
REPLAY_COOLDOWN = 30.0  # s after a failed replay before the next attempt on that endpoint
MAX_HELD = 10000  # live frames held during a replay

Apply = Callable[[str, list[Event]], None]  # (endpoint name, events)


@dataclass
class IngestStats:
    frames: Counter[str] = field(default_factory=Counter)  # endpoint -> frames applied
    events: Counter[str] = field(default_factory=Counter)  # endpoint -> events applied
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> frames or events dropped
    gaps: Counter[str] = field(default_factory=Counter)  # endpoint -> sequence gaps seen
    replays: Counter[str] = field(default_factory=Counter)  # endpoint -> replays requested
    replay_failures: Counter[str] = field(default_factory=Counter)
    restarts: Counter[str] = field(default_factory=Counter)  # endpoint -> publisher restarts detected
    connects: Counter[str] = field(default_factory=Counter)  # endpoint -> ZMQ (re)connections
    last_frame: dict[str, float] = field(default_factory=dict)  # endpoint -> monotonic time of the last frame


@dataclass
class _Stream:
    name: str
    address: str
    replay_address: str | None
    sub: Any = None
    monitor: Any = None
    dealer: Any = None
    last: int = -1
    backwards: int = 0
    replaying: bool = False
    replay_seen: float = 0.0
    cooldown_until: float = 0.0
    held: deque[tuple[int, bytes]] = field(default_factory=deque)
    window: float = 0.0
    window_frames: int = 0
    flooded: bool = False  # frames were dropped in the current rate window
    connected_once: bool = False
    reset_at: float = 0.0  # monotonic time the stream was last taken as a new publisher's


class EventIngestor:
    """Owns the ZMQ sockets, all used on its one thread; ``add``/``remove`` may be called from any thread."""

    def __init__(self, apply: Apply, clear: Callable[[str], None], *, bind: str | None = None,
                 resolve_pod: Callable[[str], str | None] | None = None, topic_filter: str = "",
                 max_frames_per_second: int = 100_000, reconnect_max: float = 5.0, engine: str = "vllm") -> None:
        self._apply = apply
        self._clear = clear
        self._bind = bind
        self.engine = engine  # the events' schema (events.decode_batch)
        self._resolve = resolve_pod or (lambda pod: None)
        self._topic = topic_filter.encode()
        self.max_rate = max_frames_per_second
        self._reconnect_max_ms = int(reconnect_max * 1000)
        self.stats = IngestStats()
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._central: dict[str, _Stream] = {}  # centralized mode: endpoint name -> sequence state
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._poller_ref: tuple[zmq.Poller, dict[Any, tuple[str, _Stream]] | None] = (zmq.Poller(), None)
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the thread, waiting at most ``timeout`` s (it polls every 50 ms); True when it has ended. Its
        sockets are closed by the thread itself (ZMQ sockets are not thread-safe); a thread that does not end in
        time is left to close them and the context when it does. Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("kv events: the ingestion thread did not stop within %.1fs", timeout)
            return False
        if not self._ctx.closed:
            self._ctx.destroy(linger=0)
        return True

    def add(self, name: str, address: str, replay_address: str | None = None) -> None:
        self._commands.put(("add", (name, address, replay_address)))

    def remove(self, name: str) -> None:
        self._commands.put(("remove", name))

    def restarted(self, name: str, last_seen: float) -> None:
        """The endpoint's server restarted after ``last_seen`` (monotonic), as its metrics showed."""
        self._commands.put(("restarted", (name, last_seen)))

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        central = None
        try:
            if self._bind:
                central = self._socket(zmq.SUB)
                central.bind(self._bind)
                central.setsockopt(zmq.SUBSCRIBE, self._topic)
                poller.register(central, zmq.POLLIN)
            self._loop(poller, central)
        except Exception:
            log.exception("kv events: the ingestion thread failed; precise prefix matches fall back")
        finally:
            for st in list(self._streams.values()):
                self._close(st, poller)
            if central is not None:
                central.close(linger=0)
            if self._stop.is_set() and not self._ctx.closed:
                self._ctx.destroy(linger=0)  # stop() gave up waiting: the context is this thread's to end

    def _loop(self, poller: zmq.Poller, central: Any) -> None:
        owner: dict[Any, tuple[str, _Stream]] = {}
        self._poller_ref = (poller, owner)
        while not self._stop.is_set():
            self._commands_into(poller, owner)
            try:
                ready = dict(poller.poll(50))
            except zmq.ZMQError:
                if self._stop.is_set():
                    break
                raise
            now = time.monotonic()
            for sock in ready:
                if sock is central:
                    self._drain_central(central, now)
                    continue
                what, st = owner.get(sock, ("", None))
                if st is None:
                    continue
                if what == "sub":
                    self._drain_sub(st, now)
                elif what == "replay":
                    self._drain_replay(st, now)
                elif what == "monitor":
                    self._drain_monitor(st)
            for st in list(self._streams.values()):
                if st.replaying and now - st.replay_seen > REPLAY_IDLE:
                    self.stats.replay_failures[st.name] += 1
                    st.cooldown_until = now + REPLAY_COOLDOWN
                    self._end_replay(st, now)
                elif st.flooded and now - st.window >= 1.0:
                    # The window that dropped frames is over: fetch them back now rather than at the next frame,
                    # which may never come (a quiet publisher) or fall in another flood.
                    st.flooded = False
                    self._replay(st, st.last + 1, now)

    def _socket(self, kind: int) -> Any:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, self._reconnect_max_ms)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.RCVHWM, 100_000)
        return sock

    def _commands_into(self, poller: zmq.Poller, owner: dict[Any, tuple[str, _Stream]]) -> None:
        while True:
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd == "add":
                name, address, replay = arg
                old = self._streams.get(name)
                if old is not None:
                    if (old.address, old.replay_address) == (address, replay):
                        continue
                    self._close(old, poller, owner)
                st = _Stream(name, address, replay)
                try:
                    st.sub = self._socket(zmq.SUB)
                    st.monitor = st.sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
                    st.sub.setsockopt(zmq.SUBSCRIBE, self._topic)
                    st.sub.connect(address)
                except zmq.ZMQError as e:
                    log.warning("kv events: cannot subscribe to %s for %s: %s", address, name, e)
                    self.stats.dropped["connect-error"] += 1
                    self._close(st, poller, owner)
                    continue
                self._streams[name] = st
                poller.register(st.sub, zmq.POLLIN)
                poller.register(st.monitor, zmq.POLLIN)
                owner[st.sub] = ("sub", st)
                owner[st.monitor] = ("monitor", st)
            elif cmd == "restarted":
                name, last_seen = arg
                st = self._streams.get(name) or self._central.get(name)
                if st is not None and st.reset_at < last_seen:  # else the stream showed this restart itself
                    now = time.monotonic()
                    self._restart(st, now)
                    if not st.replaying:
                        self._replay(st, 0, now)  # what the new publisher sent before this
            elif cmd == "remove":
                st = self._streams.pop(arg, None)
                if st is not None:
                    self._close(st, poller, owner)
                self._central.pop(arg, None)
                self._clear(arg)
                self.stats.last_frame.pop(arg, None)

    def _close(self, st: _Stream, poller: zmq.Poller, owner: dict[Any, tuple[str, _Stream]] | None = None) -> None:
        for sock in (st.sub, st.monitor, st.dealer):
            if sock is None:
                continue
            with contextlib.suppress(KeyError):
                poller.unregister(sock)
            if owner is not None:
                owner.pop(sock, None)
            if sock is st.sub:
                with contextlib.suppress(zmq.ZMQError):
                    sock.disable_monitor()
            sock.close(linger=0)
        st.sub = st.monitor = st.dealer = None

    # -- live frames -------------------------------------------------------------------------------

    def _drain_sub(self, st: _Stream, now: float) -> None:
        for _ in range(1000):  # bounded: other endpoints get their turn
            try:
                frames = st.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            seq = self._seq(frames)
            if seq is None:
                continue
            if now - st.window >= 1.0:
                st.window, st.window_frames = now, 0
            st.window_frames += 1
            if st.window_frames > self.max_rate:
                self.stats.dropped["flood"] += 1
                st.flooded = True
                continue
            self._live(st, seq, frames[2], now)

    def _drain_central(self, sock: Any, now: float) -> None:
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            seq = self._seq(frames)
            if seq is None:
                continue
            pod = parse_topic(frames[0])
            name = self._resolve(pod[0]) if pod else None
            if name is None:
                self.stats.dropped["unknown-pod"] += 1
                continue
            st = self._central.get(name)
            if st is None:
                st = self._central[name] = _Stream(name, "", None)
            self._live(st, seq, frames[2], now)

    def _seq(self, frames: list[bytes]) -> int | None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.stats.dropped["bad-frame"] += 1
            return None
        return int.from_bytes(frames[1], "big")

    def _live(self, st: _Stream, seq: int, payload: bytes, now: float) -> None:
        if st.replaying:
            if len(st.held) >= MAX_HELD:
                self.stats.dropped["flood"] += 1
            else:
                st.held.append((seq, payload))
            return
        if st.last >= 0 and seq <= st.last:
            if seq == 0 or st.backwards + 1 >= RESTART_AFTER_BACKWARDS:
                self._restart(st, now)
                if seq > 0 and self._replay(st, 0, now):
                    st.held.append((seq, payload))
                    return
            else:
                st.backwards += 1
                self.stats.dropped["backwards"] += 1
                return
        st.backwards = 0
        if st.last >= 0 and seq > st.last + 1:
            self.stats.gaps[st.name] += 1
            if self._replay(st, st.last + 1, now):
                st.held.append((seq, payload))
                return
        self._deliver(st, seq, payload, now)

    def _restart(self, st: _Stream, now: float) -> None:
        """The publisher started again: what EPP indexed for it is gone with it; its next frame starts a stream."""
        self.stats.restarts[st.name] += 1
        self._clear(st.name)
        st.last, st.backwards, st.reset_at = -1, 0, now

    def _deliver(self, st: _Stream, seq: int, payload: bytes, now: float) -> None:
        st.last = seq
        self.stats.last_frame[st.name] = now
        try:
            events, rejects = decode_batch(payload, self.engine)
        except BadEvent as e:
            self.stats.dropped[e.reason] += 1
            return
        for r in rejects:
            self.stats.dropped[r.reason] += 1
        self.stats.frames[st.name] += 1
        if events:
            self.stats.events[st.name] += len(events)
            try:
                self._apply(st.name, events)
            except Exception:  # an index bug must not stop ingestion for every endpoint
                log.exception("kv events: applying a batch from %s failed", st.name)
                self.stats.dropped["apply-error"] += 1

    # -- replay --------------------------------------------------------------------------------------

    def _replay(self, st: _Stream, start: int, now: float) -> bool:
        if not st.replay_address or now < st.cooldown_until or st.sub is None:
            return False
        if st.dealer is None:
            st.dealer = self._socket(zmq.DEALER)
            st.dealer.connect(st.replay_address)
            poller, owner = self._poller_ref
            poller.register(st.dealer, zmq.POLLIN)
            if owner is not None:
                owner[st.dealer] = ("replay", st)
        st.dealer.send_multipart([b"", struct.pack(">Q", start)])
        st.replaying = True
        st.replay_seen = now
        self.stats.replays[st.name] += 1
        return True

    def _drain_replay(self, st: _Stream, now: float) -> None:
        while st.dealer is not None:
            try:
                frames = st.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames and frames[0] == b"":
                frames = frames[1:]
            if len(frames) == 3:
                frames = frames[1:]  # [topic, seq, payload] (llm-d's replayer)
            if len(frames) != 2 or len(frames[0]) != 8:
                self.stats.dropped["bad-frame"] += 1
                continue
            if not st.replaying:
                continue  # a late answer to a replay that timed out
            st.replay_seen = now
            seq = int.from_bytes(frames[0], "big")
            if seq == END_SEQ or not frames[1]:
                self._end_replay(st, now)
                continue
            if seq <= st.last:
                continue
            if st.last >= 0 and seq > st.last + 1:
                self.stats.gaps[st.name] += 1  # the publisher's buffer no longer has them
            self._deliver(st, seq, frames[1], now)

    def _end_replay(self, st: _Stream, now: float) -> None:
        st.replaying = False
        self.stats.last_frame[st.name] = now  # in sync with the publisher (an idle one publishes nothing)
        held, st.held = st.held, deque()
        for seq, payload in held:
            if seq <= st.last:
                continue
            if st.last >= 0 and seq > st.last + 1:
                self.stats.gaps[st.name] += 1  # not replayable any more: take the stream from here
            self._deliver(st, seq, payload, now)

    def _drain_monitor(self, st: _Stream) -> None:
        while st.monitor is not None:
            try:
                msg = recv_monitor_message(st.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg["event"] == zmq.EVENT_CONNECTED:
                self.stats.connects[st.name] += 1
                now = time.monotonic()
                # Joining (or re-joining) a stream: what was published meanwhile can be replayed.
                if st.replay_address and not st.replaying:
                    self._replay(st, st.last + 1, now)
                elif not st.replay_address:
                    self.stats.last_frame.setdefault(st.name, now)
                st.connected_once = True
