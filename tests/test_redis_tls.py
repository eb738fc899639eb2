"""Redis over TLS (rediss://): a CA file, an optional client certificate, against local
redis-servers started with --tls-port and certificates this module makes with `openssl`.

The servers have no plaintext port (--port 0), so a turn that succeeds went over TLS. The
normal Redis (6379) is never touched: `store_env` is overridden below."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import redis

from server.config import ConfigError, Settings

from .harness import FakeUpstream, Server, free_port, server_env

REDIS_SERVER = "/usr/bin/redis-server"


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["/usr/bin/openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: Path) -> Path:
    """Two unrelated CAs ("ca", "other"); a server certificate for 127.0.0.1/localhost and a
    client certificate, both signed by "ca"."""
    for ca in ("ca", "other"):
        openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=test {ca}",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")
        openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", *ext, "-out", f"{name}.crt")
    return d


class TlsRedis:
    """redis-server on a TLS-only loopback port, certificates from `d`; `auth_clients`: no|yes."""

    def __init__(self, d: Path, auth_clients: str):
        self.d, self.port = d, free_port()
        self.url = f"rediss://127.0.0.1:{self.port}/0"
        self.log = d / f"redis-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", "server.crt",
                 "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", auth_clients,
                 "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--dir", str(d)],
                cwd=d, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:  # ready when it answers over TLS (with the client certificate: either mode)
            try:
                with self.client() as c:
                    c.ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start:\n{self.log.read_text()}") from None
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        d = self.d
        return redis.Redis.from_url(self.url, ssl_ca_certs=str(d / "ca.crt"), ssl_certfile=str(d / "client.crt"),
                                    ssl_keyfile=str(d / "client.key"), socket_timeout=5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("redis-tls"))


@pytest.fixture(scope="module")
def tls_redis(certs: Path) -> Iterator[TlsRedis]:
    """Server certificate checked by clients; client certificates not asked for."""
    server = TlsRedis(certs, "no")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_redis(certs: Path) -> Iterator[TlsRedis]:
    """Mutual TLS: a client without a certificate signed by the CA is refused."""
    server = TlsRedis(certs, "yes")
    yield server
    server.stop()


@pytest.fixture
def store_env() -> dict[str, str]:
    """No default Redis: each test names its TLS Redis (and conftest's fixture would ping 6379)."""
    return {}


def tls_env(r: TlsRedis, ca: str = "ca.crt", client_cert: bool = False) -> dict[str, str]:
    env = {"REDIS_URL": r.url, "REDIS_TLS_CA_FILE": str(r.d / ca)}
    if client_cert:
        env.update(REDIS_TLS_CERT_FILE=str(r.d / "client.crt"), REDIS_TLS_KEY_FILE=str(r.d / "client.key"))
    return env


def failed_start(upstream: FakeUpstream, workers: int, env: dict[str, str]) -> tuple[int | None, str]:
    """Start a server that must not become ready: (its exit code, its log)."""
    server = Server(server_env(upstream, None, WEB_CONCURRENCY=workers, **env), name="redis-tls-refused")
    try:
        with pytest.raises(RuntimeError, match="exited early"):
            server.start(timeout=30)
    finally:
        code = server.stop()
    return code, server.log()


async def test_rediss_with_a_ca_file_two_workers(start_server: Callable[..., Server], upstream: FakeUpstream,
                                                 tls_redis: TlsRedis) -> None:
    """The whole store (scripts, the command channel, the cancel subscription) runs over TLS:
    turns on one session from two workers, history read back, keys in the TLS Redis."""
    server = start_server(workers=2, redis=False, **tls_env(tls_redis))
    upstream.script({"text": "Hello Ada."}, {"text": "Your name is Ada."}, {"text": "Bye Ada."})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "Hi, I am Ada."})
        assert r.status_code == 200, r.text
        sid = r.json()["session_id"]
        for text, answer in (("What is my name?", "Your name is Ada."), ("Bye!", "Bye Ada.")):
            r = await client.post("/agent", json={"message": text, "session_id": sid})
            assert r.status_code == 200, r.text
            assert r.json()["text"] == answer
        view = (await client.get(f"/sessions/{sid}")).json()
    assert view["turns"] == 3 and len(view["messages"]) == 6
    with tls_redis.client() as c:
        assert c.exists(f"agent:{{{sid}}}:meta") and c.exists(f"agent:{{{sid}}}:msgs")
        assert int(c.hget(f"agent:{{{sid}}}:meta", "turns") or 0) == 3


async def test_mutual_tls_with_a_client_certificate(start_server: Callable[..., Server], upstream: FakeUpstream,
                                                    mtls_redis: TlsRedis) -> None:
    server = start_server(redis=False, **tls_env(mtls_redis, client_cert=True))
    upstream.script({"text": "mutual"})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "hi"})
    assert r.status_code == 200 and r.json()["text"] == "mutual", r.text
    with mtls_redis.client() as c:
        assert c.exists(f"agent:{{{r.json()['session_id']}}}:meta")


def test_mutual_tls_without_a_client_certificate_fails_startup(upstream: FakeUpstream, mtls_redis: TlsRedis) -> None:
    """Redis refuses the connection; the server must stop at startup (the cancel subscription
    connects first), not serve turns that would all fail."""
    code, log = failed_start(upstream, 1, tls_env(mtls_redis))
    assert code == 3, log  # uvicorn's STARTUP_FAILURE
    assert "Application startup failed" in log and "redis.exceptions.ConnectionError" in log, log


def test_wrong_ca_refuses_the_server_certificate(upstream: FakeUpstream, tls_redis: TlsRedis) -> None:
    """A CA that did not sign Redis's certificate: verification fails at startup, no turn runs."""
    code, log = failed_start(upstream, 1, tls_env(tls_redis, ca="other.crt"))
    assert code == 3, log
    assert "CERTIFICATE_VERIFY_FAILED" in log, log


def test_wrong_ca_with_two_workers_exits_non_zero(upstream: FakeUpstream, tls_redis: TlsRedis) -> None:
    """uvicorn's own multi-worker supervisor exits 0 when its workers cannot start: a restart
    policy (systemd on-failure, Docker) would take that for success. Ours exits 3."""
    code, log = failed_start(upstream, 2, tls_env(tls_redis, ca="other.crt"))
    assert "CERTIFICATE_VERIFY_FAILED" in log, log
    assert code == 3, log
    assert "cannot use Redis at rediss://127.0.0.1:" in log and "check REDIS_URL and REDIS_TLS_*" in log


@pytest.mark.parametrize("env, message", [
    ({"REDIS_URL": "redis://127.0.0.1:6379/0", "REDIS_TLS_CA_FILE": "{d}/ca.crt"},
     "REDIS_TLS_CA_FILE: needs a rediss:// REDIS_URL"),
    ({"REDIS_URL": "rediss://127.0.0.1:1/0", "REDIS_TLS_CERT_FILE": "{d}/client.crt"},
     "REDIS_TLS_CERT_FILE: a client certificate needs REDIS_TLS_KEY_FILE"),
    ({"REDIS_URL": "rediss://127.0.0.1:1/0", "REDIS_TLS_KEY_FILE": "{d}/client.key"}, "REDIS_TLS_KEY_FILE"),
    ({"REDIS_URL": "rediss://127.0.0.1:1/0", "REDIS_TLS_CA_FILE": "{d}/missing.crt"},
     "REDIS_TLS_CA_FILE: cannot read"),
    ({"REDIS_TLS_CA_FILE": "{d}/ca.crt"}, "REDIS_TLS_CA_FILE: needs REDIS_URL"),
    ({"REDIS_URL": "rediss://127.0.0.1:1/0", "REDIS_TLS_CA_FILE": "{d}/ca.key"},
     "REDIS_TLS_CA_FILE: not a CA certificate file"),
    ({"REDIS_URL": "rediss://127.0.0.1:1/0", "REDIS_TLS_CERT_FILE": "{d}/client.crt", "REDIS_TLS_KEY_FILE": "{d}/ca.key"},
     "REDIS_TLS_CERT_FILE: not a certificate matching REDIS_TLS_KEY_FILE"),
    ({"REDIS_URL": "rediss://127.0.0.1:1/0", "REDIS_TLS_CA_FILE": "{d}"}, "REDIS_TLS_CA_FILE: cannot read"),
])
def test_tls_config_errors_name_the_variable(certs: Path, env: dict[str, str], message: str) -> None:
    """Settings that cannot work stop the deploy with the variable's name (no Redis involved)."""
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({k: v.format(d=certs) for k, v in env.items()})
