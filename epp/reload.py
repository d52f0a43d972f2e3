"""Live reload of the ``EndpointPickerConfig`` file (``--config-file``).

``FileWatcher`` polls a file's identity (inode, mtime, size: an in-place edit and an atomic
rename, including Kubernetes' ConfigMap symlink swap, all change it) and hands the new text to a
callback. ``ConfigReloader`` builds the new configuration from it *off to the side*; only a
configuration that loads completely replaces the one in force (``Director.set_config``, a single
reference swap on the event loop, so a request is scheduled wholly by the old or the new one and no
stream is dropped). An invalid file is refused with one error line naming the problem, the old
configuration stays, and ``epp_config_reloads_total{result="failure"}`` counts it. SIGHUP checks at
once.

Plugin state (e.g. the prefix-cache index) starts empty in the new configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from epp.tasks import stop_task

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class FileWatcher:
    """Calls ``on_change(text)`` when the file at ``path`` changed since the last check.

    ``check()`` is cheap when nothing changed (one ``stat``). A file that cannot be read is
    reported once per change of the error, and the watcher keeps polling.
    """

    def __init__(self, path: str | os.PathLike[str], on_change: Callable[..., Any],
                 interval: float = DEFAULT_INTERVAL, name: str = "file",
                 prepare: Callable[[str], Any] | None = None) -> None:
        self.path = Path(path)
        self.on_change = on_change
        # The periodic watch runs ``prepare(text)`` on a worker thread and calls ``on_change(text, prepared)``:
        # heavy parsing stays off the event loop. ``check()`` (SIGHUP, tests) calls ``on_change(text)``.
        self.prepare = prepare
        self.interval = interval
        self.name = name
        self._stamp: tuple[int, int, int] | None = None
        self._error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def prime(self) -> None:
        """Take the file's current identity as already seen (it was loaded at start-up)."""
        with contextlib.suppress(OSError):
            self._stamp = self._identity()

    def _identity(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read_if_changed(self) -> str | None:
        try:
            stamp = self._identity()
            if stamp == self._stamp:
                return None
            text = self.path.read_text()
        except OSError as e:
            error = f"{type(e).__name__}: {e.strerror or e}"
            if error != self._error:
                log.error("%s %s cannot be read, keeping what was loaded: %s", self.name, self.path, error)
                self._error = error
            return None
        self._error = None
        self._stamp = stamp
        return text

    def check(self) -> bool:
        """Read the file if it changed and pass its text on; True when the callback ran."""
        text = self._read_if_changed()
        if text is None:
            return False
        self.on_change(text)
        return True

    async def check_async(self) -> bool:
        """``check``, with ``prepare`` run on a worker thread."""
        text = self._read_if_changed()
        if text is None:
            return False
        if self.prepare is None:
            self.on_change(text)
        else:
            try:
                prepared = await asyncio.to_thread(self.prepare, text)
            except Exception as e:  # the callback reports it, as when it fails itself
                prepared = e
            self.on_change(text, prepared)
        return True

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name=f"watch {self.path}")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_async()
            except Exception:  # the callback's bug must not end the watch
                log.exception("%s %s: reload failed", self.name, self.path)

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None


class ConfigReloader:
    """Keeps the director's scheduling configuration equal to ``--config-file``.

    ``load`` is ``epp.scheduling.config.load_config`` (text -> PickerConfig, raising on any error);
    ``apply`` installs a loaded configuration (the server's: instrument it, then ``set_config``).
    """

    def __init__(self, path: str | os.PathLike[str], load: Callable[..., Any], apply: Callable[[Any], None],
                 metrics: Any = None, interval: float = DEFAULT_INTERVAL,
                 parse: Callable[[str], Any] | None = None) -> None:
        self.load = load  # load(text) or, with ``parse``, load(text, doc=parse(text))
        self.apply = apply
        self.metrics = metrics
        self.watcher = FileWatcher(path, self._changed, interval, name="config file", prepare=parse)
        self.generation = 1  # configurations applied, the start-up one included
        self.digest = ""
        self.last_error: str | None = None

    @property
    def path(self) -> Path:
        return self.watcher.path

    def started_with(self, text: str | None) -> None:
        """The server loaded ``text`` from the file at start-up. If the file has changed since (or the
        text is unknown), the first check loads it again."""
        self.watcher.prime()  # identity first, then content: a change in between is seen by the next check
        if text is None:
            self.watcher._stamp = None
            return
        self.digest = _digest(text)
        try:
            if _digest(self.path.read_text()) != self.digest:
                self.watcher._stamp = None
        except OSError:
            self.watcher._stamp = None

    _UNPARSED = object()

    def _changed(self, text: str, doc: Any = _UNPARSED) -> None:
        digest = _digest(text)
        if digest == self.digest:
            return  # touched, or rewritten with the same content
        try:
            if isinstance(doc, Exception):
                raise doc
            config = self.load(text) if doc is self._UNPARSED else self.load(text, doc=doc)
        except Exception as e:
            self.last_error = str(e)
            self.digest = digest  # do not retry the same broken text every second
            log.error("config file %s rejected, keeping the configuration in force (generation %d): %s",
                      self.path, self.generation, e)
            if self.metrics is not None:
                self.metrics.config_reloads.labels("failure").inc()
            return
        self.apply(config)
        self.digest = digest
        self.generation += 1
        self.last_error = None
        if self.metrics is not None:
            self.metrics.config_reloads.labels("success").inc()
            self.metrics.config_loaded.set_to_current_time()
        profiles = getattr(getattr(config, "scheduler", None), "profiles", {})
        log.info("config file %s reloaded (generation %d, sha256 %s): profiles %s, plugins %s", self.path,
                 self.generation, digest, sorted(profiles), sorted(getattr(config, "plugins", {})))

    def check(self) -> bool:
        return self.watcher.check()

    async def start(self) -> None:
        await self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()

    def describe(self) -> dict[str, Any]:
        return {"file": str(self.path), "generation": self.generation, "sha256": self.digest,
                "last_error": self.last_error}
