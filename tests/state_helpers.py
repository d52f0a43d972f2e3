"""A real redis-server per test (installed with apt-get when missing and possible, else the test skips)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from epp.stack.local import free_port
from epp.stack.redis import RedisProcess, server_binary


def start_redis(password: str | None = None) -> RedisProcess:
    binary = server_binary(install=True)
    if binary is None:
        pytest.skip("redis-server is not installed and could not be installed (apt-get install redis-server)")
    return RedisProcess(free_port(), password=password, binary=binary).start()


@pytest.fixture(name="redis_server")
def redis_server_fixture() -> Iterator[RedisProcess]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
