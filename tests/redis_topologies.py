"""A local Redis Cluster (3 masters) and a Redis Sentinel, started by the
tests themselves with the ``redis-server`` and ``redis-cli`` binaries
(Debian's redis package, which ``make services`` installs), in a temporary
directory, on loopback ports, and stopped at the end of the session.

Fixtures: ``redis_cluster_url`` (``redis://127.0.0.1:7101``) and
``redis_sentinel`` (a dict with ``sentinels``, ``service_name``).  When the
binaries are missing or a topology does not come up, the test fails under
``CI=true`` and is skipped elsewhere, as for the other servers.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from servers import unavailable

CLUSTER_PORTS = (7101, 7102, 7103)
SENTINEL_MASTER_PORT = 6395
SENTINEL_PORT = 26395
ACL_PORT = 6396


def _unavailable(what: str) -> None:
    unavailable(f"{what}; needs redis-server and redis-cli on PATH (make services installs them)")


def _cli(port: int, *args: str, timeout: float = 10) -> str:
    proc = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.stdout + proc.stderr


def _wait(check: Any, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def _start(args: list[str]) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def _start_redis(port: int, workdir: Path, *more: str) -> None:
    """A private, non-persistent redis-server on ``port``, daemonized."""
    _start(
        [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "yes",
            "--dir", str(workdir), "--logfile", str(workdir / f"{port}.log"), *more,
        ]
    )


def _stop(port: int) -> None:
    try:
        _cli(port, "shutdown", "nosave", timeout=5)
    except Exception:
        pass


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        _unavailable("redis-server/redis-cli not found")
    workdir = Path(tempfile.mkdtemp(prefix="ormcache-cluster-"))
    for port in CLUSTER_PORTS:
        _stop(port)  # a leftover of an interrupted run
    try:
        for port in CLUSTER_PORTS:
            _start_redis(
                port, workdir,
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
            )
        if not _wait(lambda: all("PONG" in _cli(p, "ping") for p in CLUSTER_PORTS)):
            _unavailable("the cluster's redis-server processes did not answer")
        _cli(
            CLUSTER_PORTS[0], "--cluster", "create",
            *[f"127.0.0.1:{p}" for p in CLUSTER_PORTS],
            "--cluster-replicas", "0", "--cluster-yes", timeout=30,
        )
        if not _wait(lambda: all("cluster_state:ok" in _cli(p, "cluster", "info") for p in CLUSTER_PORTS)):
            _unavailable("the local Redis Cluster did not reach cluster_state:ok")
        yield f"redis://127.0.0.1:{CLUSTER_PORTS[0]}"
    finally:
        for port in CLUSTER_PORTS:
            _stop(port)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[dict[str, Any]]:
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        _unavailable("redis-server/redis-cli not found")
    workdir = Path(tempfile.mkdtemp(prefix="ormcache-sentinel-"))
    _stop(SENTINEL_MASTER_PORT)
    _stop(SENTINEL_PORT)
    try:
        _start_redis(SENTINEL_MASTER_PORT, workdir)
        conf = workdir / "sentinel.conf"
        conf.write_text(
            f"port {SENTINEL_PORT}\nbind 127.0.0.1\ndaemonize yes\n"
            f"dir {workdir}\nlogfile {workdir / 'sentinel.log'}\n"
            f"sentinel monitor ormcache 127.0.0.1 {SENTINEL_MASTER_PORT} 1\n"
        )
        _start(["redis-server", str(conf), "--sentinel"])
        ok = _wait(
            lambda: str(SENTINEL_MASTER_PORT)
            in _cli(SENTINEL_PORT, "sentinel", "get-master-addr-by-name", "ormcache")
        )
        if not ok:
            _unavailable("the local Redis Sentinel did not report its master")
        yield {"sentinels": [["127.0.0.1", SENTINEL_PORT]], "service_name": "ormcache"}
    finally:
        _stop(SENTINEL_PORT)
        _stop(SENTINEL_MASTER_PORT)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_no_publish_url() -> Iterator[str]:
    """A private Redis whose user ``app`` may use every key and command
    but no pub/sub channel (Redis 7's default for a new ACL user)."""
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        _unavailable("redis-server/redis-cli not found")
    workdir = Path(tempfile.mkdtemp(prefix="ormcache-acl-"))
    _stop(ACL_PORT)
    try:
        _start_redis(ACL_PORT, workdir)
        if not _wait(lambda: "PONG" in _cli(ACL_PORT, "ping")):
            _unavailable("the private redis-server did not answer")
        _cli(ACL_PORT, "ACL", "SETUSER", "app", "on", ">secret", "~*", "+@all", "resetchannels")
        yield f"redis://app:secret@127.0.0.1:{ACL_PORT}/0"
    finally:
        _stop(ACL_PORT)
        shutil.rmtree(workdir, ignore_errors=True)
