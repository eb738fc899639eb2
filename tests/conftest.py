"""Shared fixtures: a real Redis, the fake upstream process, and server processes."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import pytest
import redis

from .harness import FakeUpstream, Server, server_env

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError as exc:  # not a skip: the integration tests need it
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); run the suite with scripts/test")
    return REDIS_URL


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture
def upstream(fake: FakeUpstream) -> FakeUpstream:
    """The shared fake, with an empty script queue and request log for this test."""
    fake.reset()
    return fake


@pytest.fixture
def start_server(upstream: FakeUpstream, redis_url: str) -> Iterator[Callable[..., Server]]:
    """start_server(workers=1, redis=True, name=..., module="server", **env) -> a running Server
    (`module`: what `python -m` runs); stopped after the test."""
    servers: list[Server] = []

    def start(workers: int = 1, redis: bool = True, name: str = "server", module: str = "server",
              **env: Any) -> Server:
        server = Server(server_env(upstream, redis_url if redis else None, WEB_CONCURRENCY=workers, **env),
                        name=name, module=module)
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def shared_server(fake: FakeUpstream, redis_url: str) -> Iterator[Server]:
    """One Redis-backed server for a whole module of tests that don't restart it."""
    server = Server(server_env(fake, redis_url), name="shared").start()
    yield server
    server.stop()
