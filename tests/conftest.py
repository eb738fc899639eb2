"""Shared fixtures: a real Redis (and a real Redis Cluster), the fake upstream process, and
server processes.

A test that takes `store_env` (directly or through `start_server`) runs against the single
Redis; `@BOTH_STORES` runs it once against the single Redis and once against a three-master
Redis Cluster that the test run starts on loopback ports (and stops)."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Union

import pytest
import redis

from .harness import FakeUpstream, Server, server_env
from .real_clients import node_runner, open_browser

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BOTH_STORES = pytest.mark.parametrize("store_env", ["redis", "cluster"], indirect=True)


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError as exc:  # not a skip: the integration tests need it
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); run the suite with scripts/test")
    return REDIS_URL


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """Three masters, no replicas, for the whole run (tests/redis_cluster.py)."""
    from .redis_cluster import RedisCluster

    with RedisCluster(masters=3).start() as cluster:
        yield cluster


@pytest.fixture
def store_env(request: pytest.FixtureRequest, redis_url: str) -> dict[str, str]:
    """The Redis settings of a test's servers: the single Redis, or the cluster (`BOTH_STORES`)."""
    if getattr(request, "param", "redis") == "cluster":
        return {"REDIS_URL": request.getfixturevalue("redis_cluster").url, "REDIS_CLUSTER": "true"}
    return {"REDIS_URL": redis_url}


@pytest.fixture
def store_client(store_env: dict[str, str]) -> Iterator[Union[redis.Redis, redis.RedisCluster]]:
    """A client of the test's Redis (or cluster), to look at keys."""
    url = store_env["REDIS_URL"]
    client = redis.RedisCluster.from_url(url) if store_env.get("REDIS_CLUSTER") else redis.Redis.from_url(url)
    yield client
    client.close()


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
def start_server(upstream: FakeUpstream, store_env: dict[str, str]) -> Iterator[Callable[..., Server]]:
    """start_server(workers=1, redis=True, name=..., module="server", wait=True, **env) -> a running
    Server (`module`: what `python -m` runs; `wait=False`: started, call its wait_ready());
    stopped after the test."""
    servers: list[Server] = []

    def start(workers: int = 1, redis: bool = True, name: str = "server", module: str = "server",
              wait: bool = True, **env: Any) -> Server:
        stored = {**store_env, **env} if redis else env
        server = Server(server_env(upstream, None, WEB_CONCURRENCY=workers, **stored), name=name, module=module)
        servers.append(server.start(wait=wait))
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


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's, installed with apt-get when missing) for the chat page tests."""
    yield from open_browser()


@pytest.fixture(scope="session")
def node_client() -> Any:
    """run(scenario) -> the result of tests/node/chat.mjs, the real `ai` client (see its header)."""
    return node_runner()
