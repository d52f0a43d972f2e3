"""Counts the generated cases each fuzz test ran (printed by ``tests/fuzz/conftest.py``)."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter[str] = Counter()


def count(name: str, n: int = 1) -> None:
    COUNTS[name] += n
