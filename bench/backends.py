"""The cache backends the benchmark compares, and the servers behind them.

Addresses come from ``ORMCACHE_BENCH_REDIS_URL`` / ``ORMCACHE_BENCH_MEMCACHED``,
else the test suite's ``ORMCACHE_TEST_REDIS_URL`` / ``ORMCACHE_TEST_MEMCACHED``,
else ``redis://127.0.0.1:6379/0`` and ``127.0.0.1:11211``.  A server that
does not answer is skipped (its rows say SKIP and why); ``make services``
or ``bash scripts/services.sh`` starts them.

Every run uses its own key namespace, and every entry it writes expires
(Redis TTL, memcached expiry) after two hours, so runs never read each
other's entries and nothing is flushed.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

#: redis_l1: Redis behind a relaxed L1 (tokens over pub/sub, no round trip
#: on an L1 hit); it has the targets of Redis
BACKENDS = ("memory", "redis", "memcached", "redis_l1")

#: seconds before the servers drop what a run wrote
SERVER_TTL = 7200


def redis_url() -> str:
    return (
        os.environ.get("ORMCACHE_BENCH_REDIS_URL")
        or os.environ.get("ORMCACHE_TEST_REDIS_URL")
        or "redis://127.0.0.1:6379/0"
    )


def memcached_address() -> str:
    return (
        os.environ.get("ORMCACHE_BENCH_MEMCACHED")
        or os.environ.get("ORMCACHE_TEST_MEMCACHED")
        or "127.0.0.1:11211"
    )


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    return host.strip("[]"), int(port)


def memcached_command(command: bytes, address: str | None = None, timeout: float = 2.0) -> bytes:
    """Send one text-protocol command, return the reply up to its end marker."""
    host, port = _host_port(address or memcached_address(), 11211)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(command)
        reply = b""
        while not (
            reply.endswith(b"END\r\n")
            or reply.startswith(b"VERSION ")
            and reply.endswith(b"\r\n")
            or reply.endswith(b"ERROR\r\n")
        ):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def memcached_value_size(key: str) -> int | None:
    """Bytes memcached holds for ``key`` (the value's length as stored)."""
    host, port = _host_port(memcached_address(), 11211)
    with socket.create_connection((host, port), timeout=2.0) as sock:
        sock.sendall(b"get " + key.encode() + b"\r\n")
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            reply += chunk
        header = reply.split(b"\r\n", 1)[0]
        if not header.startswith(b"VALUE "):
            return None
        size = int(header.split()[3])
        expected = len(header) + 2 + size + 2 + len(b"END\r\n")
        while len(reply) < expected:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return size


def probe(name: str) -> tuple[bool, str]:
    """(available, address or the reason it is not)."""
    if name == "memory":
        return True, "in process"
    try:
        if name in ("redis", "redis_l1"):
            import redis

            client = redis.Redis.from_url(redis_url(), socket_timeout=1, socket_connect_timeout=1)
            try:
                client.ping()
            finally:
                client.close()
            return True, redis_url()
        if name == "memcached":
            import pylibmc  # noqa: F401  (the driver the region uses)

            reply = memcached_command(b"version\r\n")
            if not reply.startswith(b"VERSION "):
                raise ConnectionError(f"unexpected reply {reply!r}")
            return True, memcached_address()
    except Exception as err:  # noqa: BLE001 - any failure means "skip it"
        return False, f"{name} not available: {type(err).__name__}: {err} (run `make services`)"
    return False, f"unknown backend {name!r}"


def server_versions(available: dict[str, bool]) -> dict[str, str]:
    versions: dict[str, str] = {}
    if available.get("redis"):
        try:
            import redis

            client = redis.Redis.from_url(redis_url(), socket_timeout=1)
            versions["redis-server"] = str(client.info("server").get("redis_version"))
            client.close()
        except Exception as err:  # noqa: BLE001
            versions["redis-server"] = f"? ({err})"
    if available.get("memcached"):
        try:
            reply = memcached_command(b"version\r\n")
            versions["memcached"] = reply.decode().split()[1]
        except Exception as err:  # noqa: BLE001
            versions["memcached"] = f"? ({err})"
    return versions


def new_namespace(tag: str = "") -> str:
    """A key namespace no other run uses (at most 32 printable characters)."""
    return f"bench{tag}-{uuid.uuid4().hex[:12]}"[:32]


#: The benchmark's Redis and memcached regions wait 0.25 s for their server,
#: not the default 3 ms: on a 2-core machine running the database, both
#: servers and the benchmark at once, a server goes silent for 3 ms often
#: enough to turn measured hits into misses (and libmemcached then disables
#: the server for seconds).  What a query pays while a server hangs, with the
#: default, is python -m bench.degraded's to measure.
BACKEND_TIMEOUT = 0.25


def region_settings(name: str) -> dict[str, Any]:
    """Settings of an ormcache region on backend ``name``."""
    if name == "memory":
        return {"backend": "memory", "expiration_time": 3600}
    if name == "redis":
        return {
            "backend": "redis",
            "expiration_time": 3600,
            "backend_timeout": BACKEND_TIMEOUT,
            "arguments": {"url": redis_url(), "redis_expiration_time": SERVER_TTL},
        }
    if name == "redis_l1":
        return {
            **region_settings("redis"),
            "l1": {"max_entries": 100_000, "mode": "relaxed"},
        }
    if name == "memcached":
        return {
            "backend": "memcached",
            "expiration_time": 3600,
            "backend_timeout": BACKEND_TIMEOUT,
            "arguments": {"url": [memcached_address()], "memcached_expire_time": SERVER_TTL},
        }
    raise ValueError(name)


def make_cache(backends: list[str], tag: str = "") -> Any:
    """An OrmCache with one region per backend, named after the backend."""
    from ormcache import OrmCache

    return OrmCache.from_settings(
        {
            "namespace": new_namespace(tag),
            "regions": {name: region_settings(name) for name in backends},
        }
    )
