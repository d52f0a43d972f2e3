"""EPP's monotonic clock. Live it is ``time.monotonic``; ``epp replay`` (epp/replay.py) runs the scheduler and
plugins in virtual time by installing another source for the duration of a replay. Code on the request path
reads time through ``monotonic()`` so that a replay sees the time its simulated pods see."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_source: Callable[[], float] = time.monotonic


def monotonic() -> float:
    return _source()


@contextmanager
def use(source: Callable[[], float]) -> Iterator[None]:
    """Read time from ``source`` (e.g. a virtual event loop's ``time``) inside the block."""
    global _source
    previous, _source = _source, source
    try:
        yield
    finally:
        _source = previous
