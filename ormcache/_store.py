"""Backend access for ormcache: one round trip per read, ``add``, and a
circuit breaker.

Everything goes through dogpile's region (its serialization, key format and
backends) except ``add`` (store only if absent), which dogpile does not
offer: it is done here with the backend's own client for the backends that
can (memory, memory_pickle, dbm, Redis family, pylibmc and other
memcached clients), and reported as unsupported for the rest.

A backend that fails :attr:`Store.failure_threshold` times in a row is left
alone (the *circuit is open*) for :attr:`Store.retry_after` seconds,
doubling up to 30 s while it keeps failing; then one call probes it.  While
it is open every read goes to the database at no cost.  Version tokens that
could not be written meanwhile (invalidations) are remembered and written
afresh as soon as the backend answers again, so that no entry stored before
the outage is served after it.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import _socket
from dogpile.cache.api import NO_VALUE
from dogpile.cache.backends.memcached import MemcachedLock  # (no driver: that is imported on use)
from dogpile.cache.region import CacheRegion
from dogpile.util import NameRegistry

from . import _compat
from .invalidation import MAX_PENDING, MERGE_LUA, merge_token
from .settings import DEFAULT_REPLY_POLL

log = logging.getLogger("ormcache")

#: errors that say a value is too big, not that the backend is unwell
_TOO_BIG = frozenset({"TooBig", "ValueTooLarge", "MemcacheServerError"})

_retrying: set[Store] = set()
_retry_lock = threading.Lock()
#: every Store, for what a forked child must reset
_all_stores: weakref.WeakSet[Store] = weakref.WeakSet()


@atexit.register
def _last_try() -> None:
    """At exit, a last attempt at invalidations still lost, on connections
    of this thread made anew (libmemcached refuses every command of a
    client for a second after one failed, also once the server answers)."""
    for store in list(_retrying):
        if store._token_writer is not None:
            store._token_writer.reconnect_this_thread()
        store.flush_lost()

#: dogpile's pylibmc clients (one per thread and backend), weakly: they
#: live as long as their thread and backend do
_thread_clients: weakref.WeakSet[Any] = weakref.WeakSet()
#: those clients, held across a fork (see _before_fork)
_fork_kept: list[Any] = []


def _thread_client(client: Any) -> None:
    try:
        _thread_clients.add(client)
    except TypeError:  # (a client type without weak references)
        pass


def _before_fork() -> None:
    """A forked child drops the thread-local values of the threads it does
    not have, dogpile's pylibmc clients of the parent's other threads among
    them, and freeing a client sends "quit" on the socket the parent's
    thread still uses: they are held across the fork (and in the child,
    for good: :data:`_inherited`)."""
    global _fork_kept
    for _ in range(5):
        try:
            _fork_kept = list(_thread_clients)
            return
        except RuntimeError:  # another thread made a client meanwhile
            continue


def _after_fork_in_parent() -> None:
    global _fork_kept
    _fork_kept = []


def out_of_memory(err: BaseException) -> bool:
    """Whether a backend refused a write for want of memory (a full Redis
    with ``noeviction``, a full memcached with ``-M``): not an outage."""
    text = str(err)
    return (
        type(err).__name__ == "OutOfMemoryError"
        or text.startswith("OOM")
        or "out of memory" in text.lower()
    )


#: the process this module's state is for: moved in a forked child, by the
#: fork hooks or, without them, by the first call that notices (see
#: _check_fork)
_owner_pid = os.getpid()


def _check_fork() -> None:
    """Called when a Store sees another pid than its own: forked without
    Python's fork hooks (a C library's ``fork()``, as uWSGI's default), the
    child hooks of every module run now, once: the stores' clients and
    locks, the relaxed L1s' subscriptions (else their tokens, which no
    thread updates in the child, would be trusted for good) and the
    statistics publisher."""
    if _owner_pid == os.getpid():
        return
    from . import _pubsub, stats

    _after_fork_in_child()
    _pubsub._after_fork_in_child()
    stats._after_fork_in_child()


def _after_fork_in_child() -> None:
    """A forked child inherits the parent's locks as they were, maybe held
    by a thread it does not have (a replay waiting on a dead backend), and
    no retry thread: fresh locks, and the lost keys are retried anew."""
    global _retry_lock, _readers_lock, _fork_kept, _owner_pid
    _owner_pid = os.getpid()
    _inherited.extend(_fork_kept)
    _fork_kept = []
    _thread_clients.clear()
    _retry_lock = threading.Lock()
    _readers_lock = threading.Lock()
    _retrying.clear()
    for reader in list(_readers):
        reader.forget()  # (first: the parent's sockets must never be used here)
    for store in list(_all_stores):
        try:
            store._after_fork()
        except Exception:  # (one store's trouble must not leave the others the parent's)
            log.warning("cache region %r: resetting after fork failed", store.name, exc_info=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )

__all__ = ["Store"]


#: what a version key holding something ormcache never writes (an int a
#: memcached client stored, say) reads as: a pending token whose time cannot
#: be read, so taken as past, and replaced by the next miss
_NOT_A_TOKEN = "p"


class Store:
    """The ormcache view of one dogpile region."""

    __slots__ = (
        "region",
        "name",
        "in_process",
        "_serialized",
        "l1",
        "stale_while_revalidate",
        "publish_channel",
        "subscriber",
        "_add",
        "_set_unlocking",
        "_lock_adding",
        "_one_redis",
        "_lua",
        "_mget",
        "_last_warning",
        "last_error",
        "_failures",
        "_open_until",
        "_retry",
        "_lost",
        "_lost_all",
        "_lost_writers",
        "_lost_fallback",
        "_lost_releases",
        "_releases_lock",
        "_token_writer",
        "_pid",
        "_fresh_token",
        "failure_threshold",
        "retry_after",
        "max_retry_after",
        "max_lost_retry_after",
        "max_lost",
        "_local_locks",
        "_replaying",
        "_replayed",
        "_merging",
        "__weakref__",
    )

    def __init__(
        self,
        name: str,
        region: CacheRegion,
        lost_fallback: str | None = None,
        fresh_token: Any = None,
    ) -> None:
        self.name = name
        self.region = region
        #: consecutive failures that open the circuit
        self.failure_threshold = 3
        #: seconds the circuit stays open, doubling up to ``max_retry_after``
        self.retry_after = 1.0
        self.max_retry_after = 30.0
        #: lost invalidations are retried at least this often (seconds)
        self.max_lost_retry_after = 1.0
        #: beyond this many lost version keys, everything is invalidated instead
        self.max_lost = 10_000
        self._failures = 0
        self._open_until = 0.0
        self._retry = self.retry_after
        self._lost: set[str] = set()
        #: writers whose fresh tokens were lost, by key (see _remember_lost)
        self._lost_writers: dict[str, set[str]] = {}
        self._lost_all = False
        #: distributed locks whose release failed: (deadline, release)
        self._lost_releases: list[tuple[float, Callable[[], Any]]] = []
        self._releases_lock = threading.Lock()
        #: the key to move when too many were lost (everything)
        self._lost_fallback = lost_fallback
        self._fresh_token = fresh_token
        #: values are kept as Python objects in this process (dogpile's
        #: memory backend): what is stored must never be mutated
        self.in_process = (
            type(region.backend).__module__ == "dogpile.cache.backends.memory"
            and region.serializer is None
        )
        #: the backend stores bytes (dogpile serializes for it)
        self._serialized = region.serializer is not None
        #: an in-process first tier of entries (see :meth:`use_l1`)
        self.l1: L1 | None = None
        #: serve expired entries while another caller refreshes them
        self.stale_while_revalidate = False
        #: the pub/sub channel version tokens are announced on (Redis)
        self.publish_channel: str | None = None
        #: follows that channel for an L1 in relaxed mode
        self.subscriber: Any = None
        self._add = _adder(region)
        #: a Redis region on one server: several commands go in one pipeline
        self._one_redis = _single_redis(region)
        #: a Redis region: its server merges version tokens (MERGE_LUA),
        #: until it refuses scripts
        self._lua = _redis_module(region)
        #: MGET without redis-py's client layer (see :class:`_RedisReader`)
        self._mget = _RedisReader.for_region(region)
        #: writes version tokens with a longer timeout (see use_write_timeout)
        self._token_writer: Any = None
        #: the process the backend's clients belong to (see _forked)
        self._pid = os.getpid()
        self._set_unlocking = _set_unlocker(region, self._mget)
        self._lock_adding = _lock_adder(region, self._mget)
        self._last_warning = 0.0
        #: the backend's last error (the ``__cause__`` of a BackendError)
        self.last_error: BaseException | None = None
        #: in-process locks in front of a backend's distributed lock
        self._local_locks = NameRegistry(_local_lock)
        #: held while lost invalidations are being written (by the retry
        #: thread or flush_lost), so that "none left" is never said of
        #: keys in flight
        self._replaying = threading.Lock()
        #: moves each time lost invalidations were written
        self._replayed = 0
        #: held while version keys are read, merged and written (backends
        #: that do not merge them: see _write_tokens)
        self._merging = threading.Lock()
        _all_stores.add(self)
        backend = region.backend
        if type(backend).__module__ == "dogpile.cache.backends.memcached" and not getattr(
            backend, "_ormcache_tracked", False
        ):
            if type(backend).__name__ == "PylibmcBackend" and getattr(
                region, "_user_defined_serializer", None
            ):
                # a signed region writes bytes only: never let pylibmc
                # unpickle what someone else wrote (unsigned regions store
                # values pylibmc pickles itself)
                _compat.refuse_pickled_values(backend)
            _compat.on_client_created(backend, _thread_client)
            backend._ormcache_tracked = True

    @property
    def shared(self) -> bool:
        """Whether other processes can read what the backend holds (not
        dogpile's memory nor null backend)."""
        module = type(self.region.backend).__module__
        return module not in ("dogpile.cache.backends.memory", "dogpile.cache.backends.null")

    @property
    def supports_add(self) -> bool:
        return self._add is not None

    @property
    def adds_with_lock(self) -> bool:
        """Whether :meth:`acquire_adding` creates tokens in the lock's
        round trip (else it only takes the lock)."""
        return self._lock_adding is not None

    @property
    def available(self) -> bool:
        """False while the circuit is open.  Queries never probe a backend
        whose circuit is open: a background thread does (see
        :meth:`_probe_loop`), so no query waits on a dead server."""
        return not self._open_until

    def _after_fork(self) -> None:
        """In a forked child (see :func:`_after_fork_in_child`)."""
        self._forked()
        self._replaying = threading.Lock()
        self._merging = threading.Lock()
        self._releases_lock = threading.Lock()
        self._lost_releases = []  # the parent's locks: the parent releases them
        # the keys' locks, maybe held by the parent's threads filling them
        self._local_locks = NameRegistry(_local_lock)
        _compat.forget_region_locks(self.region)
        if self.l1 is not None:
            self.l1.after_fork()
        if self._token_writer is not None:
            self._token_writer.after_fork()
        if self._lost or self._lost_all:
            self._start_retrying()
        if self._open_until:
            self._start_probing()  # the parent's probe thread is not here

    def _forked(self) -> None:
        """In a forked child (from the fork hook, or noticed by a changed
        pid when the process was forked without Python's hooks): dogpile's
        pylibmc clients, one per thread, are the parent's, on the parent's
        sockets, and two processes reading on one socket get each other's
        replies.  The child makes its own; the inherited ones are kept,
        never freed (freeing one sends "quit" on the parent's socket)."""
        self._pid = os.getpid()
        backend = self.region.backend
        if type(backend).__module__ == "dogpile.cache.backends.memcached":
            clients = backend.__dict__.pop("_clients", None)  # dogpile's memoized pool
            if clients is not None:
                _inherited.append(clients)

    def get_many(self, keys: Sequence[str]) -> list[Any] | None:
        """An entry and its version tokens in one backend call: the entry's
        payload (``keys[0]``, a value dogpile's region wrote) then the
        tokens (``keys[1:]``, raw strings), ``NO_VALUE`` where absent;
        ``None`` when the backend failed or the circuit is open."""
        if self._pid != os.getpid():
            _check_fork()  # (resets every store: this one's pid is then ours)
            if self._pid != os.getpid():
                self._forked()
        if self._open_until and not self.available:
            return None
        try:
            if self._lost or self._lost_all or self._replaying.locked():
                # invalidations this process could not write yet, or is
                # writing (the retry thread's job: a read neither writes
                # nor waits): nothing read can be trusted before they are
                return None
            replayed = self._replayed
            values = self._read(keys)
            if (self._failures and self._recovered()) or self._replayed != replayed:
                # tokens lost during the outage were just moved (here, or
                # by another thread meanwhile): what was read before may be
                # an entry they invalidate
                values = self._read(keys)
        except Exception as err:
            self.failed("read", err)
            return None
        return values

    def announce_on(self, channel: str) -> None:
        """Publish every version token written on ``channel`` (Redis)."""
        self.publish_channel = channel

    def follow(self, channel: str) -> None:
        """Validate L1 hits against tokens received on ``channel``."""
        from ._pubsub import Subscriber

        backend = self.region.backend
        # (an L1 entry depends on a handful of version keys, many shared)
        limit = max(10_000, 8 * self.l1.max_entries) if self.l1 is not None else 100_000
        self.subscriber = Subscriber(lambda: backend.writer_client, channel, limit)

    def use_write_timeout(self, seconds: float) -> None:
        """Write version tokens (invalidations) with connections of their
        own that wait up to ``seconds`` for the server, while it is taken
        to be up: a read that times out is a miss, but an invalidation
        that times out leaves other processes serving the entries it was
        to invalidate until it is written again.  (libmemcached, besides,
        refuses every command of a client for ``retry_timeout`` after one
        of its commands timed out: its reads would take its invalidations
        down with them.)  Plain Redis and pylibmc regions; the others
        write through their client."""
        self._token_writer = _TokenWriter.for_region(self.region, seconds, self._mget)

    def poll_for(self, seconds: float) -> None:
        """Poll for Redis replies for at most ``seconds`` (0: never), on
        the connections reads keep and on the token writer's."""
        for reader in (self._mget, getattr(self._token_writer, "_redis", None)):
            if reader is not None:
                reader.spin = seconds

    def use_l1(self, max_entries: int | None, max_bytes: int | None = None) -> None:
        """Keep up to ``max_entries`` entries (and about ``max_bytes`` bytes
        of results) in process memory as well.  A hit found there still
        reads its version tokens from the backend (in one call, as always)
        and is served only if they are current, so it is exactly as
        consistent as the backend; it only saves moving and decoding the
        entry."""
        self.l1 = L1(max_entries, max_bytes) if max_entries else None

    def _read(self, keys: Sequence[str]) -> list[Any]:
        l1 = self.l1
        subscriber = self.subscriber
        if l1 is not None and subscriber is not None:
            if subscriber.current():
                entry = l1.get(keys[0], NO_VALUE)
                if entry is not NO_VALUE:
                    local = subscriber.tokens
                    tokens = [local.get(k) for k in keys[1:]]
                    if None not in tokens and entry[1] == tuple(tokens):
                        return [entry, *tokens]
            generation = subscriber.generation
            values = self._read_backend(keys)
            subscriber.remember(generation, list(keys[1:]), values[1:])
            if values[0] is not NO_VALUE:
                l1[keys[0]] = values[0]
            return values
        if l1 is not None:
            entry = l1.get(keys[0], NO_VALUE)
            if entry is not NO_VALUE:
                tokens = self._read_tokens(keys[1:])
                # entry[1] holds the tokens it was stored under (core's
                # layout): if they are not current, the backend may hold a
                # newer entry than this process's copy
                if isinstance(entry, tuple) and len(entry) > 1 and entry[1] == tuple(tokens):
                    return [entry, *tokens]
            values = self._read_backend(keys)
            if values[0] is not NO_VALUE:
                l1[keys[0]] = values[0]
            return values
        return self._read_backend(keys)

    def _fetch(self, keys: Sequence[str]) -> list[Any]:
        """Raw values of ``keys`` in one backend call (bytes for
        serializing backends), ``None`` or ``NO_VALUE`` where absent."""
        region = self.region
        mangler = region.key_mangler
        if mangler is not None:
            keys = [mangler(k) for k in keys]
        if self._serialized:
            if self._mget is not None:
                values = self._mget(keys)
                if values is not None:
                    return values
            return list(region.backend.get_serialized_multi(keys))
        return list(region.backend.get_multi(keys))

    @staticmethod
    def _token(raw: Any) -> Any:
        if raw is None or raw is NO_VALUE:
            return NO_VALUE
        if type(raw) is str:
            return raw
        return raw.decode("ascii", "replace") if isinstance(raw, bytes) else _NOT_A_TOKEN

    def _read_tokens(self, keys: Sequence[str]) -> list[Any]:
        return [self._token(t) for t in self._fetch(keys)]

    def _read_backend(self, keys: Sequence[str]) -> list[Any]:
        raw = self._fetch(keys)
        head = raw[0]
        if self._serialized:
            try:
                entry = self.region._parse_serialized_from_backend(head)
            except Exception as err:
                # corrupt or truncated (its metadata, or an unsigned pickle):
                # a miss, refilled; not a failure of the backend, which answered
                self._undecodable(err)
                entry = NO_VALUE
        else:
            entry = NO_VALUE if head is None else head
        payload = getattr(entry, "payload", NO_VALUE)
        values = [NO_VALUE if entry is NO_VALUE else payload]
        if self._serialized:
            values.extend(
                [
                    t.decode("ascii", "replace") if type(t) is bytes else self._token(t)
                    for t in raw[1:]
                ]
            )
        else:
            values.extend([t if type(t) is str else self._token(t) for t in raw[1:]])
        return values

    def _undecodable(self, err: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10.0:
            self._last_warning = now
            log.warning(
                "cache region %r: an entry could not be decoded, a miss: %s: %s",
                self.name,
                type(err).__name__,
                err,
                extra=_fields(self.name, "undecodable"),
            )

    def get_values(self, keys: Sequence[str]) -> list[Any] | None:
        """Payloads of values dogpile's region wrote (``set``)."""
        if self._open_until and not self.available:
            return None
        try:
            return self.region.get_multi(keys, ignore_expiration=True)  # type: ignore[no-any-return]
        except Exception as err:
            self.failed("read", err)
            return None

    def _write_or_drop(self, mapping: Mapping[str, str], writer: str | None = None) -> None:
        """:meth:`_write_tokens`; when the backend refuses for want of memory
        (a full Redis with ``noeviction``, a full memcached with ``-M``),
        which it does for writes but not for deletes: delete the version
        keys instead.  A missing token validates nothing, so the
        invalidation holds; the tokens are made again by the next fill."""
        try:
            self._write_tokens(mapping, writer)
        except Exception as err:
            if not out_of_memory(err):
                raise
            self.region.delete_multi(list(mapping))  # (raises if this fails too)
            if self.subscriber is not None:
                self.subscriber.drop(list(mapping))
            if self.publish_channel is not None:
                from ._pubsub import publish

                try:  # (PUBLISH allocates nothing a full server refuses)
                    publish(self.region.backend.writer_client, self.publish_channel, dict(mapping))
                except Exception:
                    pass
            now = time.monotonic()
            if now - self._last_warning >= 10.0:
                self._last_warning = now
                log.warning(
                    "cache region %r: the backend is out of memory; version keys deleted "
                    "instead of written: %s",
                    self.name,
                    err,
                    extra=_fields(self.name, "out_of_memory"),
                )

    def _write_tokens(self, mapping: Mapping[str, str], writer: str | None = None) -> None:
        """Write version tokens as :func:`~.invalidation.merge_token` says:
        a pending token joins the writers pending on its key, a fresh one
        (``writer`` finishing, or an invalidation) leaves another writer's
        pending entry in place.  A Redis server merges each key itself, in
        a script; elsewhere the keys are read, merged and written under a
        lock of this process, which makes it atomic for the in-process
        memory backend, and for backends other processes share leaves a
        window of one round trip in which two processes' writes to one key
        can still replace each other (docs/consistency.md, "Limits")."""
        if self._lua:
            try:
                self._put_tokens(mapping, writer)
                return
            except Exception as err:
                if not _no_lua(err):
                    raise
                self._lua = False
                log.warning(
                    "cache region %r: the Redis server runs no scripts (%s: %s); version "
                    "tokens are merged by reading and writing them, and concurrent "
                    "writers of one table may replace each other's pending tokens",
                    self.name,
                    type(err).__name__,
                    err,
                    extra=_fields(self.name, "no_scripts", error=type(err).__name__),
                )
        with self._merging:
            current = self._read_to_merge(list(mapping))
            now = time.time()
            merged = {}
            contended = {}
            token_writer = self._token_writer
            cas = token_writer is not None and token_writer.can_cas
            for (key, token), value in zip(mapping.items(), current):
                new = merge_token(value, token, writer, now)
                if new is None:
                    continue
                if cas and isinstance(value, str) and value[:1] == "p":
                    # writers are pending there: merged with compare-and-set,
                    # else a writer finishing meanwhile would be written
                    # back by this merge, and keep the table uncached
                    contended[key] = token
                else:
                    merged[key] = new
            if merged:
                self._put_tokens(merged)
            if contended:
                self._cas_tokens(contended, writer)

    def _cas_tokens(self, mapping: Mapping[str, str], writer: str | None) -> None:
        """Merge ``mapping`` into keys other writers are pending on, each
        with memcached's ``gets``/``cas``: a merge whose key changed since
        it was read is read and merged again."""
        mangler = self.region.key_mangler
        token_writer = self._token_writer
        assert token_writer is not None
        for key, token in mapping.items():
            token_writer.cas_merge(mangler(key) if mangler is not None else key, token, writer, self._token)

    def _read_to_merge(self, keys: list[str]) -> list[Any]:
        """Version tokens read before a write merges with them: on the
        connections that write them (with their longer timeout) where
        there are such."""
        token_writer = self._token_writer
        if token_writer is not None:
            mangler = self.region.key_mangler
            raw = token_writer.read([mangler(k) for k in keys] if mangler is not None else keys)
            if raw is not None:
                return [self._token(value) for value in raw]
        return self._read_tokens(keys)

    def _put_tokens(self, mapping: Mapping[str, str], writer: str | None = None) -> None:
        """Version tokens go to the backend as they are: raw strings (bytes
        for serializing backends), not dogpile's pickled ``CachedValue``, so
        that reading them costs no deserialization.  On Redis (``_lua``),
        the server merges them (``writer``: see :meth:`_write_tokens`)."""
        region = self.region
        lua = self._lua
        # (announced and known in this process by ormcache's own names: a
        # relaxed L1 looks its tokens up by those)
        tokens = dict(mapping)
        mangler = region.key_mangler
        if mangler is not None:
            mapping = {mangler(k): v for k, v in mapping.items()}
        channel = self.publish_channel
        published = False
        if self._serialized:
            payload = {k: v.encode("ascii") for k, v in mapping.items()}
            token_writer = self._token_writer
            done = None
            if token_writer is not None:
                # (also while the circuit is open: the reads that opened it
                # may have left the region's client refusing every command
                # for a while, as libmemcached does, while the server
                # answers; a hung server costs one write timeout, after
                # which invalidations wait for the retry thread: _set_many)
                from ._pubsub import message

                done = token_writer(
                    payload, channel, message(tokens) if channel is not None else None, lua, writer
                )
            if done is not None:
                # written (and announced, or the announcement's error)
                published = channel is not None
                if isinstance(done, Exception):
                    self._cannot_publish(done)
            elif channel is not None and self._one_redis:
                # the tokens and their announcement in one round trip
                from ._pubsub import message

                backend = region.backend
                pipe = backend.writer_client.pipeline(transaction=False)  # type: ignore[attr-defined]
                _queue(pipe, _token_commands(_redis_ttl(backend), payload, lua, writer))
                pipe.publish(channel, message(tokens))
                *stored, announced = pipe.execute(raise_on_error=False)
                for result in stored:
                    if isinstance(result, Exception):
                        raise result
                published = True
                if isinstance(announced, Exception):
                    self._cannot_publish(announced)
            elif lua:
                # (a cluster, or a region whose backend is not plain Redis's)
                pipe = region.backend.writer_client.pipeline(transaction=False)  # type: ignore[attr-defined]
                _queue(pipe, _token_commands(_redis_ttl(region.backend), payload, lua, writer, per_key=True))
                _raise_first(pipe.execute(raise_on_error=False))
            else:
                region.backend.set_serialized_multi(payload)
        else:
            token_writer = self._token_writer
            if token_writer is None or token_writer(mapping, None, None) is None:
                region.backend.set_multi(mapping)
        if self.subscriber is not None:
            # this process's own writes count at once, not when their
            # message comes back: its next reads of them go to the backend
            # (not the tokens themselves: another process's newer ones may
            # have arrived since they were written)
            self.subscriber.drop(list(tokens))
        if channel is not None and not published:
            from ._pubsub import publish

            try:
                publish(region.backend.writer_client, channel, tokens)
            except Exception as err:
                # the tokens are written: only the announcement is missing
                self._cannot_publish(err)

    def _cannot_publish(self, err: Exception) -> None:
        """PUBLISH failed where the tokens were written (a Redis user
        without channel permissions, a renamed command): stop announcing
        from this region, once, rather than count the invalidation as lost."""
        refused = type(err).__name__ == "NoPermissionError" or str(err).lower().startswith(
            ("unknown command", "err unknown command")
        )
        if refused:  # NOPERM, a renamed or disabled command; not a busy server
            self.publish_channel = None
            log.warning(
                "cache region %r: cannot publish invalidations (%s: %s); relaxed L1s "
                "in other processes will not hear of this process's writes: give "
                "its Redis user PUBLISH on the channels '<namespace>:inv:*'",
                self.name,
                type(err).__name__,
                err,
                extra=_fields(self.name, "publish_failed", error=type(err).__name__),
            )
            return
        raise err

    def set_token(self, key: str, token: str) -> bool:
        """Write one version token (see :meth:`set_many`)."""
        return self.set_many({key: token})

    def set(self, key: str, value: Any, unlock: Any = None, l1: bool = True) -> bool:
        """Store ``value``.  ``unlock``: a lock of :meth:`mutex`, held, whose
        distributed part is released in the same round trip when the
        backend can (Redis); its holder still calls ``release()``.  ``l1``:
        keep it in the region's L1 too (not what no query reads)."""
        if self.l1 is not None and l1:
            self.l1[key] = value
        if self._open_until and not self.available:
            return False
        try:
            if (
                unlock is not None
                and self._set_unlocking is not None
                and type(unlock) is _TwoLevelLock
                and not unlock.remote_released
            ):
                self._set_unlocking(key, value, unlock)
            else:
                self.region.set(key, value)
            if self._failures:
                self._recovered()
        except Exception as err:
            if type(err).__name__ in _TOO_BIG:
                # the backend is fine; this value is not for it
                log.info(
                    "cache region %r: value too big for the backend, not cached",
                    self.name,
                    extra=_fields(self.name, "too_big"),
                )
                return False
            # a result not stored (a full memcached, say) is not an outage:
            # reads and invalidations decide whether the backend is down
            self.failed("write", err, count=False)
            return False
        return True

    def set_many(self, mapping: Mapping[str, Any], versions: bool = True, writer: str | None = None) -> bool:
        """Write ``mapping`` (see :meth:`_set_many`); True when written."""
        if self._pid != os.getpid():
            _check_fork()  # (resets every store: this one's pid is then ours)
            if self._pid != os.getpid():
                self._forked()
        return self._set_many(mapping, versions, writer)

    def _set_many(self, mapping: Mapping[str, Any], versions: bool = True, writer: str | None = None) -> bool:
        """Write ``mapping``.  Version tokens (``versions``: invalidations,
        merged as :meth:`_write_tokens` says, ``writer`` the one whose
        tokens they are) are tried even while the circuit is open, since
        other processes may reach the backend; those that cannot be written
        are remembered and retried in the background until they are.  While
        the circuit is open and some are waiting for the retry thread (the
        backend failed three times, invalidations among them), new ones
        join them without a try of their own: on a hung server each try
        would cost a commit the write timeout (0.25 s), several times per
        commit, and the retry thread writes them all within a second of the
        backend answering."""
        queued = versions and self._open_until and (self._lost or self._lost_all or self._replaying.locked())
        if not queued and (versions or not self._open_until):
            try:
                if versions:
                    self._write_or_drop(mapping, writer)
                else:
                    self.region.set_multi(mapping)
                if self._failures:
                    self._recovered()
            except Exception as err:
                self.failed("write", err)
            else:
                return True
        if versions:
            self._remember_lost(mapping, writer)
            self._start_retrying()
        return False

    def _probe_loop(self) -> None:
        """While the circuit is open: wait, then try one read; close the
        circuit (and write the lost invalidations) once it answers."""
        probe = [f"{self._lost_fallback or 'ormcache'}:probe"]
        while self._open_until:
            time.sleep(max(self._retry, 0.01))
            try:
                self._fetch(probe)
            except Exception:
                self._retry = min(self._retry * 2, self.max_retry_after)
                self._open_until = time.monotonic() + self._retry
                continue
            try:
                self._recovered()
            except Exception as err:
                self._failures = 0
                self.failed("write", err)
            return

    def _start_probing(self) -> None:
        threading.Thread(
            target=self._probe_loop, name=f"ormcache-probe-{self.name}", daemon=True
        ).start()

    def _start_retrying(self) -> None:
        with _retry_lock:
            if self in _retrying:
                return
            _retrying.add(self)
        thread = threading.Thread(
            target=self._retry_loop, name=f"ormcache-retry-{self.name}", daemon=True
        )
        thread.start()

    def _retry_loop(self) -> None:
        delay = max(self.retry_after, 0.05)
        # lost invalidations are retried at least every max_lost_retry_after
        # seconds (the circuit's probe backs off further): until one is
        # written, other processes that reach the backend serve what it
        # invalidates
        limit = max(self.retry_after, self.max_lost_retry_after)
        try:
            # (keys in flight in another thread's replay come back on failure)
            while self._lost or self._lost_all or self._lost_releases or self._replaying.locked():
                time.sleep(delay)
                try:
                    self._replay_lost()
                except Exception as err:
                    self.failed("write", err)
                    delay = min(delay * 2, limit)
                else:
                    self._failures = 0
                    self._open_until = 0.0
        finally:
            with _retry_lock:
                _retrying.discard(self)

    def flush_lost(self) -> bool:
        """Try once to write the invalidations lost so far; True when none
        is left."""
        try:
            self._replay_lost()
        except Exception as err:
            self.failed("write", err)
        return not (self._lost or self._lost_all)

    def _remember_lost(self, keys: Any, writer: str | None = None) -> None:
        """``keys`` were not written; ``writer``: whose pending tokens they
        settle (written again as that writer's, else a settled key would
        keep its pending entry until it expires)."""
        if self._lost_all:
            return
        self._lost.update(keys)
        if writer is not None:
            for key in keys:
                writers = self._lost_writers.setdefault(key, set())
                if len(writers) < MAX_LOST_WRITERS:
                    writers.add(writer)
                # (beyond that, the others' pending entries are left to
                # expire: their tables uncached for up to PENDING_TTL)
        if len(self._lost) > self.max_lost and self._lost_fallback is not None:
            self._lost.clear()
            self._lost_writers.clear()
            self._lost_all = True

    def _recovered(self) -> bool:
        """The backend answered after failures: close the circuit and write
        the lost invalidations.  True if there were any (they were written,
        or the failure to write them was raised)."""
        was_open = self._open_until
        self._failures = 0
        self._open_until = 0.0
        self._retry = self.retry_after
        if was_open:
            log.warning(
                "cache region %r: backend answers again",
                self.name,
                extra=_fields(self.name, "recovered"),
            )
        return self._replay_lost()

    def lose_release(self, release: Callable[[], Any], deadline: float | None) -> None:
        """A distributed lock whose release failed (the backend did not
        answer): ``release`` is tried again with the lost invalidations,
        until ``deadline`` (``time.monotonic()``: when the lock expires by
        itself; None: never), so that callers waiting for the key do not
        wait for that."""
        with self._releases_lock:
            self._lost_releases.append((deadline if deadline is not None else float("inf"), release))
        self._start_retrying()

    def _release_lost(self) -> None:
        with self._releases_lock:
            pending, self._lost_releases = self._lost_releases, []
        now = time.monotonic()
        for i, (deadline, release) in enumerate(pending):
            if now >= deadline:
                continue  # expired by itself, and may be someone else's now
            try:
                release()
            except Exception as err:
                if not _backend_failure(err):
                    continue  # gone already, or a server without Lua: nothing to retry
                with self._releases_lock:
                    self._lost_releases.extend(pending[i:])
                raise

    def _replay_lost(self) -> bool:
        """Write the invalidations and release the locks lost so far; True
        if there were invalidations (readers must read again)."""
        if not (self._lost or self._lost_all or self._lost_releases or self._replaying.locked()):
            return False  # nothing lost, nothing in flight: no lock to wait on
        with self._replaying:
            wrote = self._write_lost()
            if self._lost_releases:
                self._release_lost()  # (after the invalidations, which matter more)
            return wrote

    def _write_lost(self) -> bool:
        if not (self._lost or self._lost_all) or self._fresh_token is None:
            return False
        lost, lost_all, writers = self._lost, self._lost_all, self._lost_writers
        self._lost, self._lost_all, self._lost_writers = set(), False, {}
        keys = list(lost)
        if lost_all and self._lost_fallback is not None:
            keys = [self._lost_fallback]
        by_writer: dict[str | None, list[str]] = {}
        for key in keys:
            for writer in writers.get(key) or (None,):
                by_writer.setdefault(writer, []).append(key)
        done: set[str | None] = set()
        try:
            for writer, written in by_writer.items():
                # a token of its own for each write: the writes take time,
                # and a commit's fresh token written meanwhile must never
                # be replaced by one that entries were stored under before
                # that commit (an older token written again validates them)
                self._write_or_drop(dict.fromkeys(written, self._fresh_token()), writer)
                done.add(writer)
        except BaseException:
            for writer, written in by_writer.items():
                if writer not in done:
                    self._remember_lost(written, writer)
            raise
        self._replayed += 1
        log.warning(
            "cache region %r: wrote %d invalidation(s) lost during the outage",
            self.name,
            len(keys),
            extra=_fields(self.name, "lost_invalidations_written", count=len(keys)),
        )
        return True

    def add(self, key: str, value: Any) -> bool | None:
        """Store ``value`` unless ``key`` holds one: True if stored, False if
        not, None if unsupported or the backend failed."""
        if self._add is None or (self._open_until and not self.available):
            return None
        try:
            return self._add(key, value)  # type: ignore[no-any-return]
        except Exception as err:
            self.failed("write", err, count=not out_of_memory(err))
            return None

    def acquire_adding(self, mutex: Any, tokens: Mapping[str, str]) -> tuple[bool, dict[str, bool | None] | None]:
        """``mutex.acquire(False)``, and :meth:`add` of ``tokens`` (version
        keys a miss found absent), in one round trip when the backend can
        (Redis).  Returns whether the lock was taken, and what each add
        returned (None: not attempted, the caller adds them itself)."""
        # (also without tokens: the lock is then taken under an owner token
        # of ormcache's own, which a failed attempt can release later)
        if self._lock_adding is not None and type(mutex) is _TwoLevelLock:
            if not mutex.local.acquire(False):
                return False, None
            try:
                acquired, added = self._lock_adding(mutex.remote, tokens, self.lose_release)
            except BaseException:
                mutex.local.release()
                raise
            if acquired:
                mutex.taken_at = time.monotonic()
            else:
                mutex.local.release()
            return acquired, added
        return bool(mutex.acquire(False)), None

    def mutex(self, key: str) -> Any:
        """dogpile's mutex for ``key``: the backend's distributed lock when
        the region has one (e.g. Redis with ``distributed_lock``), else an
        in-process lock; None while the circuit is open."""
        if self._open_until and not self.available:
            return None
        try:
            mutex = self.region._mutex(key)
        except Exception as err:
            self.failed("lock", err)
            return None
        if type(mutex) is CacheRegion._LockWrapper:  # (isinstance: an ABC that takes any lock)
            return mutex
        if type(mutex) is MemcachedLock:
            mutex = _OwnedMemcachedLock(mutex, self.lose_release)
        # a distributed lock: threads of this process queue on a local lock
        # first, so that only one of them polls the backend
        return _TwoLevelLock(self._local_locks.get(key), mutex, self)

    def _lock_unsupported(self, mutex: Any, err: Exception) -> None:
        """The server cannot release dogpile's Redis lock (redis-py runs a
        Lua script; fakeredis without ``lupa`` has none): drop the lock held
        and use in-process locks from now on, rather than leave every
        waiter for this key waiting until the lock expires."""
        backend = self.region.backend
        was = backend.distributed_lock
        backend.distributed_lock = False
        # (the keys' Redis locks made so far: in-process ones from now on)
        _compat.forget_region_locks(self.region)
        try:
            backend.writer_client.delete(mutex.mutex.name)
        except Exception:
            pass
        if not was:
            return  # (said once: a lock made before is released after)
        log.warning(
            "cache region %r: the backend cannot release a distributed lock (%s); "
            "using in-process locks",
            self.name,
            err,
            extra=_fields(self.name, "lock_unsupported", error=type(err).__name__),
        )

    def delete(self, key: str) -> bool:
        if self.l1 is not None:
            self.l1.pop(key, None)
        if self._open_until and not self.available:
            return False
        try:
            self.region.delete(key)
            if self._failures:
                self._recovered()
        except Exception as err:
            self.failed("write", err)
            return False
        return True

    def failed(self, what: str, err: BaseException, count: bool = True) -> None:
        """Count a failure, open the circuit at the threshold, and log, at
        most one warning per region every 10 s."""
        self.last_error = err
        if count:
            self._failures += 1
        fields = _fields(
            self.name,
            "backend_failed",
            operation=what,
            error=type(err).__name__,
            circuit_open=self._failures >= self.failure_threshold,
        )
        now = time.monotonic()
        if count and self._failures >= self.failure_threshold and not self._open_until:
            self._retry = self.retry_after
            self._open_until = now + self._retry
            self._start_probing()
        if now - self._last_warning >= 10.0:
            self._last_warning = now
            log.warning(
                "cache region %r: backend %s failed, using the database: %s: %s",
                self.name,
                what,
                type(err).__name__,
                err,
                extra=fields,
            )
        else:
            log.debug("cache region %r: backend %s failed: %r", self.name, what, err, extra=fields)


class L1:
    """A least-recently-used map bounded by entries and by bytes (the size
    of an entry is the size of its encoded rows, or an estimate of its
    decoded rows' once :meth:`replace` kept them decoded)."""

    def __init__(self, max_entries: int, max_bytes: int | None = None) -> None:
        from collections import OrderedDict

        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(value: Any) -> int:
        try:
            rows = value[3]
        except (TypeError, IndexError, KeyError):
            return 64
        return len(rows) + 64 if isinstance(rows, (bytes, bytearray)) else 1024

    def after_fork(self) -> None:
        """In a forked child: the parent's lock may have been held."""
        self._lock = threading.Lock()

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return default
            self._data.move_to_end(key)
            return item[0]

    def __setitem__(self, key: str, value: Any) -> None:
        size = self._size(value)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._data[key] = (value, size)
            self.bytes += size
            self._evict()

    def _evict(self) -> None:
        while len(self._data) > self.max_entries or (
            self.max_bytes is not None and self.bytes > self.max_bytes and self._data
        ):
            _, (_, dropped) = self._data.popitem(last=False)
            self.bytes -= dropped

    def replace(self, key: str, old: Any, new: Any, size: int) -> None:
        """Hold ``new`` for ``key`` in place of ``old`` (the same entry,
        decoded), counted at ``size`` bytes; nothing if ``key`` holds
        something else by now."""
        with self._lock:
            item = self._data.get(key)
            if item is not None and item[0] is old:
                self._data[key] = (new, size)
                self.bytes += size - item[1]
                self._evict()

    def pop(self, key: str, default: Any = None) -> Any:
        with self._lock:
            item = self._data.pop(key, None)
            if item is None:
                return default
            self.bytes -= item[1]
            return item[0]

    def __len__(self) -> int:
        return len(self._data)


def _fields(region: str, event: str, **more: Any) -> dict[str, Any]:
    """Structured fields of a log record, under ``record.ormcache``, for
    JSON formatters and log pipelines::

        {"region": "shared", "event": "backend_failed", "operation": "read",
         "error": "ConnectionError", "circuit_open": True}
    """
    return {"ormcache": {"region": region, "event": event, **more}}


def _backend_value(region: CacheRegion, value: str) -> Any:
    """A version token as :meth:`Store._write_tokens` stores it."""
    if region.serializer:
        return value.encode("ascii")
    return value


#: modules of the Redis (and Valkey) backends of dogpile and ormcache
_REDIS_MODULES = frozenset({"dogpile.cache.backends.redis", "dogpile.cache.backends.valkey", "ormcache.backends"})


def _adder(region: CacheRegion) -> Any:
    if region.key_mangler is not None:
        return None
    backend = region.backend
    module = type(backend).__module__
    cls = type(backend).__name__

    if module == "dogpile.cache.backends.memory":
        cache = backend._cache  # type: ignore[attr-defined]

        def add_memory(key: str, value: Any) -> bool:
            stored = _backend_value(region, value)
            return cache.setdefault(key, stored) is stored

        return add_memory

    if module in _REDIS_MODULES:

        def add_redis(key: str, value: Any) -> bool:
            ttl = getattr(backend, "redis_expiration_time", 0) or getattr(
                backend, "valkey_expiration_time", 0
            )
            client = backend.writer_client  # type: ignore[attr-defined]
            return bool(
                client.set(key, _backend_value(region, value), nx=True, ex=ttl or None)
            )

        return add_redis

    if module == "dogpile.cache.backends.file" and cls == "DBMBackend":

        def add_dbm(key: str, value: Any) -> bool:
            stored = _backend_value(region, value)
            with backend._dbm_file(True) as dbm_obj:  # type: ignore[attr-defined]
                if key in dbm_obj:
                    return False
                dbm_obj[key] = stored
                return True

        return add_dbm

    if module == "dogpile.cache.backends.memcached" and cls in (
        "PylibmcBackend",
        "MemcachedBackend",
        "PyMemcacheBackend",
    ):

        def add_memcached(key: str, value: Any) -> bool:
            client = backend.client  # type: ignore[attr-defined]
            args = backend.set_arguments  # type: ignore[attr-defined]
            return bool(client.add(key, _backend_value(region, value), **args))

        return add_memcached

    return None


def _single_redis(region: CacheRegion) -> bool:
    """A Redis region on one server (plain or Sentinel, not Cluster: there
    a lock's key may live on another node), its backend not proxied."""
    backend = region.backend
    module = type(backend).__module__
    cls = type(backend).__name__
    return region.serializer is not None and (
        (module == "dogpile.cache.backends.redis" and cls in ("RedisBackend", "RedisSentinelBackend"))
        or (module == "ormcache.backends" and cls == "RedisSentinelBackend")
    )


class _RedisReader:
    """``MGET`` for a plain Redis region's reads (entry and version tokens,
    the one round trip of every hit), sent on connections it keeps rather
    than through ``Redis.mget``.

    redis-py's client layer costs about 45 us per command here (the
    pool's lock and its ``can_read`` poll of the socket, the retry wrapper,
    the observability hooks): more than the round trip itself, and the
    largest part of a Redis hit after the session.  The connections are
    the pool's own, borrowed and kept (so the pool counts them against
    ``max_connections``, ``disconnect()`` closes them, and a maintenance
    notification reaches them), at most :attr:`limit` of them (a quarter
    of the pool's ``max_connections``, 8 at most): a read that finds none
    free goes through the client, as every command but these reads always
    does.  One reader per pool, whatever the number of regions and caches
    on it, collected with the pool; :meth:`close` gives its idle
    connections back.  A forked child
    borrows its own, even one forked without Python's fork hooks (uWSGI).

    Only for clients that try each command once (``backend_timeout``,
    the default, sees to that) and whose credentials do not rotate: the
    others read through the client.

    A read polls its socket for the reply for up to :data:`REPLY_SPIN`
    seconds before it sleeps in the kernel (:meth:`_wait`).
    """

    __slots__ = (
        "_pool",
        "_free",
        "_lock",
        "_count",
        "_pid",
        "limit",
        "_command_name",
        "_closed_error",
        "_reply_error",
        "_pack",
        "_spin_polls",
        "_spin_misses",
        "_spin_pause",
        "_spin_backoff",
        "_can_poll",
        "spin",
        "__weakref__",
    )

    def __init__(self, pool: Any, limit: int) -> None:
        from redis.exceptions import ConnectionError, ResponseError

        #: weakly: the pool keeps its reader
        self._pool = weakref.ref(pool)
        self._free: list[Any] = []
        self._lock = threading.Lock()
        #: connections borrowed from the pool and not given back
        self._count = 0
        self._pid = os.getpid()
        self.limit = limit
        #: redis-py before 5.3 wants a command name for get_connection()
        self._command_name = _needs_command_name(pool)
        self._closed_error = ConnectionError
        self._reply_error = ResponseError
        self._pack = _packer(pool.connection_kwargs)
        #: polls in this window, and those that ran out; reads left before
        #: polling again, and how many after the next window that does not pay
        self._spin_polls = 0
        self._spin_misses = 0
        self._spin_pause = 0
        self._spin_backoff = SPIN_PAUSE
        #: poll() exists here and the pool's sockets are the OS's own (not
        #: fakeredis', nor gevent's, whose hub a busy loop would hold up)
        self._can_poll = _poll is not None
        #: seconds to poll for a reply (the region setting ``reply_poll``:
        #: regions on one pool share a reader, and the last set wins)
        self.spin = REPLY_SPIN

    @classmethod
    def for_region(cls, region: CacheRegion) -> _RedisReader | None:
        """The reader of the pool of dogpile's plain ``redis`` backend on a
        redis-py ``Redis`` client with an ordinary ``ConnectionPool`` whose
        connections do not retry; None for the others (Sentinel and Cluster
        route commands themselves; a ``BlockingConnectionPool`` waits for a
        free connection, a client-side cache or a single-connection client
        must see every command, rotating credentials are renewed only on
        connections that go back to the pool)."""
        backend = region.backend
        if (
            region.serializer is None
            or type(backend).__module__ != "dogpile.cache.backends.redis"
            or type(backend).__name__ != "RedisBackend"
        ):
            return None
        from redis import ConnectionPool, Redis

        client = getattr(backend, "reader_client", None)
        pool = getattr(client, "connection_pool", None)
        if (
            type(client) is not Redis
            or client.connection is not None
            or type(pool) is not ConnectionPool
            or getattr(pool, "cache", None) is not None
            or _retries(pool.connection_kwargs.get("retry")) != 0
            or _rotating(pool.connection_kwargs.get("credential_provider"))
        ):
            return None
        with _readers_lock:
            # kept on the pool: it lives as long as the pool does, and a
            # pool its caches dropped is collected with its reader
            reader: _RedisReader | None = getattr(pool, "_ormcache_reader", None)
            if reader is None:
                limit = min(8, int(pool.max_connections) // 4)
                if limit <= 0:
                    return None
                reader = cls(pool, limit)
                setattr(pool, "_ormcache_reader", reader)
                _readers.add(reader)
        return reader

    def forget(self) -> None:
        """In a forked child: the parent's connections are not this
        process's (redis-py's pool starts afresh in the child too)."""
        self._free = []
        self._lock = threading.Lock()
        self._count = 0
        self._pid = os.getpid()

    def __call__(self, keys: Sequence[str]) -> list[Any] | None:
        """The values of ``keys``; None when no connection is free and
        none may be borrowed (read through the client)."""
        if not keys:
            return []
        return self._run(self._mget, keys)

    def pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any] | None:
        """The replies to ``commands``, sent in one round trip, a
        ``ResponseError`` in place of each error reply (as a pipeline's
        ``execute(raise_on_error=False)`` gives them, without its response
        callbacks: raw replies); None when no connection is free (send
        them through the client).  A connection closed while it waited is
        reconnected and the commands sent again, so they must be safe to
        send twice."""
        return self._run(self._pipeline, commands)

    def _run(self, send: Callable[[Any, Any], list[Any]], arg: Any) -> list[Any] | None:
        if self._pid != os.getpid():
            self.forget()  # forked without the hooks of os.register_at_fork
        free = self._free
        try:
            conn = free.pop()
        except IndexError:
            conn = self._borrow()
            if conn is None:
                return None
        try:
            try:
                return send(conn, arg)
            except self._closed_error:
                # closed while it waited (the server's idle ``timeout``, a
                # restart, ``pool.disconnect()``): once more, reconnecting,
                # as the pool checks its connections before lending them.
                # A timeout is not retried.
                return send(conn, arg)
        finally:
            free.append(conn)

    def _borrow(self) -> Any:
        with self._lock:
            if self._count >= self.limit:
                return None
            self._count += 1
        try:
            pool = self._pool()
            if pool is None:
                raise RuntimeError("the Redis connection pool is gone")
            if self._command_name:
                return pool.get_connection("MGET")
            return pool.get_connection()
        except BaseException:
            with self._lock:
                self._count -= 1
            raise

    def _mget(self, conn: Any, keys: Sequence[str]) -> list[Any]:
        packed = None
        if self._pack is not None:
            try:
                if "".join(keys).isascii():  # (a key_mangler may make others)
                    packed = [self._pack(("MGET", *keys))]
            except TypeError:
                pass  # not str: the connection's own encoder packs it
        try:
            # connects if needed; a socket error closes the connection
            if packed is not None:
                conn.send_packed_command(packed)
            else:
                conn.send_command("MGET", *keys)
            self._wait(conn)
            values = conn.read_response()
        except self._reply_error:
            raise  # the whole reply was read: the connection is fine
        except BaseException:
            conn.disconnect()  # a reply may be pending: never read it as ours
            raise
        self._after(conn)
        return values  # type: ignore[no-any-return]

    def _pipeline(self, conn: Any, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        replies: list[Any] = []
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            self._wait(conn)
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except self._reply_error as err:
                    replies.append(err)  # read whole: the next reply follows
        except BaseException:
            conn.disconnect()  # replies may be pending: never read them as ours
            raise
        self._after(conn)
        return replies

    def _wait(self, conn: Any) -> None:
        """Poll the socket until the reply arrives, for up to :attr:`spin`
        seconds (:data:`REPLY_SPIN` by default), before ``read_response`` sleeps in
        ``recv``.  On these virtual machines a process that sleeps for a
        reply from a local server wakes up 40-80 us after it came (its CPU
        halts while idle, and halting costs an exit to the hypervisor): a
        Redis hit took 290-305 us sleeping and 225-250 us polling.  The poll
        costs at most that much CPU a command, and gives the CPU away
        between two polls (``sched_yield``: other threads and processes
        that want it run first; in a process of many threads a poll that
        kept the GIL cost 12% of the hits a second), and stops where it
        does not pay: when more than half the replies of a window of
        :data:`SPIN_WINDOW` polls came later (a remote server, or one that
        shares a busy machine), the next :data:`SPIN_PAUSE` commands sleep
        at once, twice as many after each such window in a row."""
        pause = self._spin_pause
        if pause or not self._can_poll or not self.spin:
            if pause > 0:
                self._spin_pause = pause - 1
            return
        sock = getattr(conn, "_sock", None)
        if sock is None:
            return
        if not isinstance(sock, _socket.socket):
            self._can_poll = False
            return
        poller = _poll()  # type: ignore[misc]
        try:
            poller.register(sock, select.POLLIN)
        except ValueError:
            return  # closed meanwhile (fileno() -1): read_response says so
        deadline = time.perf_counter() + self.spin
        while not poller.poll(0):
            _yield()
            if time.perf_counter() > deadline:
                self._spin_misses += 1
                break
        self._spin_polls += 1
        if self._spin_polls >= SPIN_WINDOW:
            if self._spin_misses * 2 > self._spin_polls:
                self._spin_pause = self._spin_backoff
                self._spin_backoff = min(self._spin_backoff * 2, SPIN_PAUSE_MAX)
            else:
                self._spin_backoff = SPIN_PAUSE
            self._spin_polls = self._spin_misses = 0

    @staticmethod
    def _after(conn: Any) -> None:
        should_reconnect = getattr(conn, "should_reconnect", None)  # redis-py 7+
        if should_reconnect is not None and should_reconnect():
            conn.disconnect()  # a maintenance notification said so

    def close(self) -> None:
        """Give the idle connections back to the pool (a read borrows
        again)."""
        if self._pid != os.getpid():
            self.forget()
            return
        while True:
            try:
                conn = self._free.pop()
            except IndexError:
                return
            with self._lock:
                self._count -= 1
            pool = self._pool()
            if pool is None:
                conn.disconnect()
            else:
                pool.release(conn)


#: seconds a command on a kept Redis connection polls its socket for the
#: reply before it sleeps in the kernel (:meth:`_RedisReader._wait`), unless
#: the region's ``reply_poll`` says otherwise
REPLY_SPIN = DEFAULT_REPLY_POLL
#: a reader that polled for :data:`SPIN_WINDOW` replies and saw more than
#: half of them come later stops polling for the next :data:`SPIN_PAUSE`
#: commands, twice as many after each such window in a row, up to
#: :data:`SPIN_PAUSE_MAX`
SPIN_WINDOW = 64
SPIN_PAUSE = 256
SPIN_PAUSE_MAX = 65536
_poll = getattr(select, "poll", None)  # (not on Windows)
_yield: Callable[[], Any] = getattr(os, "sched_yield", None) or (lambda: None)


def _packer(connection_kwargs: Mapping[str, Any]) -> Callable[[Sequence[Any]], Any] | None:
    """hiredis' ``pack_command``, for connections that would pack an ASCII
    ``str`` key as it does (an encoding that keeps ASCII as it is, no
    packer of the client's own): redis-py's packer around it costs about
    5 us a command.  None when hiredis is missing or does not apply."""
    import codecs

    if connection_kwargs.get("command_packer") is not None:
        return None
    try:
        encoding = codecs.lookup(connection_kwargs.get("encoding") or "utf-8").name
    except LookupError:
        return None
    if encoding not in ("utf-8", "ascii", "iso8859-1", "cp1252"):
        return None
    try:
        import hiredis
    except ImportError:
        return None
    return getattr(hiredis, "pack_command", None)


#: every reader (each kept on its redis-py pool), for a forked child
_readers: weakref.WeakSet[_RedisReader] = weakref.WeakSet()
_readers_lock = threading.Lock()


def _needs_command_name(pool: Any) -> bool:
    import inspect

    try:
        parameter = inspect.signature(pool.get_connection).parameters.get("command_name")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def _rotating(provider: Any) -> bool:
    """Credentials renewed while connections live (a token provider):
    redis-py re-authenticates a connection when it goes back to the pool."""
    if provider is None:
        return False
    try:
        from redis.credentials import StreamingCredentialProvider
    except ImportError:  # redis-py before 6
        return False
    return isinstance(provider, StreamingCredentialProvider)


def _retries(retry: Any) -> int | None:
    """How many times a redis-py ``Retry`` retries; None when unknown
    (absent: redis-py's default retries)."""
    if retry is None:
        return None
    get = getattr(retry, "get_retries", None)
    count = get() if get is not None else getattr(retry, "_retries", None)
    return count if isinstance(count, int) else None


def _queue(pipe: Any, commands: Sequence[tuple[Any, ...]]) -> None:
    """Queue ``commands`` (see :func:`_set_commands`) on a redis-py pipeline."""
    for command in commands:
        pipe.execute_command(*command)


def _seconds(ttl: Any) -> Any:
    """A Redis expiry as a command takes it (redis-py's commands take a
    ``timedelta`` too, and convert it so)."""
    if isinstance(ttl, datetime.timedelta):
        return int(ttl.total_seconds())
    return ttl


class _TokenWriter:
    """Writes version tokens on connections of its own that wait up to
    ``seconds`` (see :meth:`Store.use_write_timeout`): a pool of its own
    for a plain Redis region, a pylibmc client per thread for a memcached
    one.  Called with the tokens, and the channel and message that
    announce them (Redis); returns True once written (or the announcement's
    error), None when no connection is free (write them as usual), and
    raises when the backend fails."""

    def __init__(self, region: CacheRegion, seconds: float, reader: _RedisReader | None) -> None:
        backend = region.backend
        self._backend = backend
        self._pool: Any = None
        self._redis: _RedisReader | None = None
        self._local = threading.local()
        #: (pid, pylibmc client) of every thread (close() disconnects them)
        self._clients: list[tuple[int, Any]] = []
        self._lock = threading.Lock()
        self._behaviors: dict[str, Any] | None = None
        if reader is not None:
            pool = reader._pool()
            if pool is None:
                raise RuntimeError("the Redis connection pool is gone")
            kwargs = {**pool.connection_kwargs, "socket_timeout": seconds, "socket_connect_timeout": seconds}
            self._pool = type(pool)(connection_class=pool.connection_class, max_connections=4, **kwargs)
            self._redis = _RedisReader(self._pool, 4)
            with _readers_lock:
                _readers.add(self._redis)
        else:
            ms = max(1, round(seconds * 1000))
            self._behaviors = {
                **backend.behaviors,
                "cas": True,  # (gets/cas: merging version tokens of several writers)
                "connect_timeout": ms,
                "_poll_timeout": ms,
                "receive_timeout": ms * 1000,
                "send_timeout": ms * 1000,
            }

    def after_fork(self) -> None:
        """In a forked child: the parent's lock may have been held (its
        clients stay in ``_clients``: never freed, see :meth:`__call__`)."""
        self._lock = threading.Lock()

    @classmethod
    def for_region(cls, region: CacheRegion, seconds: float, reader: _RedisReader | None) -> _TokenWriter | None:
        backend = region.backend
        if reader is not None:
            return cls(region, seconds, reader)
        if (
            type(backend).__module__ == "dogpile.cache.backends.memcached"
            and type(backend).__name__ == "PylibmcBackend"
        ):
            return cls(region, seconds, None)
        return None

    def __call__(
        self,
        payload: Mapping[str, Any],
        channel: str | None,
        message: Any,
        lua: bool = False,
        writer: str | None = None,
    ) -> Any:
        if self._redis is not None:
            commands = _token_commands(_redis_ttl(self._backend), payload, lua, writer)
            if channel is not None:
                commands.append(("PUBLISH", channel, message))
            # (sent again after a reconnect: the same tokens, and a second
            # announcement of them, which changes nothing)
            replies = self._redis.pipeline(commands)
            if replies is None:
                return None
            if channel is None:
                _raise_first(replies)
                return True
            _raise_first(replies[:-1])
            return replies[-1] if isinstance(replies[-1], Exception) else True
        failed = self._client().set_multi(dict(payload), **self._backend.set_arguments)
        if failed:
            raise RuntimeError(f"memcached stored {len(failed)} of {len(payload)} version tokens")
        return True

    @property
    def can_cas(self) -> bool:
        """Whether :meth:`cas_merge` can merge: a memcached region on the
        binary protocol (``binary = true`` in its arguments).  On the text
        protocol, libmemcached was seen spinning in an ``add`` that
        followed a ``gets`` on the same client, under concurrent writers
        (tests/test_consistency.py); text-only proxies (twemproxy,
        mcrouter) rule out switching protocols behind the region's back."""
        return self._behaviors is not None and bool(getattr(self._backend, "binary", False))

    def cas_merge(self, key: str, token: str, writer: str | None, decode: Callable[[Any], Any]) -> None:
        """Write ``token`` into memcached's ``key`` as
        :func:`~.invalidation.merge_token` says, with ``gets`` and ``cas``
        (``add`` where it is absent), reading again when another process
        wrote the key in between; after :data:`CAS_TRIES` such races, as a
        plain write."""
        client = self._client()
        arguments = self._backend.set_arguments
        new = None
        for _ in range(CAS_TRIES):
            value, cas_id = client.gets(key)
            new = merge_token(decode(value), token, writer, time.time())
            if new is None:
                return
            if value is None or cas_id is None:
                if client.add(key, new.encode("ascii"), **arguments):
                    return
            elif client.cas(key, new.encode("ascii"), cas_id, arguments.get("time", 0)):
                return  # (cas takes no min_compress_len, which set_arguments may hold)
        if new is not None and not client.set(key, new.encode("ascii"), **arguments):
            raise RuntimeError("memcached did not store a version token")

    def read(self, keys: Sequence[str]) -> list[Any] | None:
        """The raw values of ``keys`` (None where absent), on this writer's
        connections; None when no connection is free (read them as usual)."""
        if self._redis is not None:
            return self._redis(keys)
        found = self._client().get_multi(list(keys))
        return [found.get(key) for key in keys]

    def _client(self) -> Any:
        """This thread's pylibmc client."""
        client = getattr(self._local, "client", None)
        if client is None or self._local.pid != os.getpid():
            if client is not None:
                # a forked child: freeing the parent's client would send
                # "quit" on the socket the parent still uses
                _inherited.append(client)
            backend = self._backend
            # (version tokens are strings: a value pylibmc would unpickle
            # is nothing ormcache wrote, and is never unpickled)
            client = _compat.no_pickle_client(backend.url, binary=backend.binary, behaviors=self._behaviors)
            self._local.client, self._local.pid = client, os.getpid()
            with self._lock:
                self._clients.append((os.getpid(), client))
        return client

    def reconnect_this_thread(self) -> None:
        """Have this thread's memcached client connect again at its next
        command, its failed servers forgotten (libmemcached disables a
        server that failed for ``retry_timeout``, a second, and refuses
        commands meanwhile).  Other threads' clients are left alone: a
        client is used by its own thread only."""
        client = getattr(self._local, "client", None)
        if client is not None and self._local.pid == os.getpid():
            try:
                client.disconnect_all()
            except Exception:
                pass

    def close(self) -> None:
        """Give the connections back (they reconnect when used again)."""
        if self._redis is not None:
            self._redis.close()
            self._pool.disconnect()
        pid = os.getpid()
        with self._lock:
            # (a forked child's: never the parent's, whose sockets it shares)
            clients = [c for owner, c in self._clients if owner == pid]
        for client in clients:
            try:
                client.disconnect_all()
            except Exception:
                pass


#: writers a lost version key remembers, to write their fresh tokens again
#: as theirs (one round trip each) when the backend answers; beyond that,
#: their pending entries expire (their tables uncached meanwhile)
MAX_LOST_WRITERS = 64

#: compare-and-set races a version token's merge runs before it writes
#: plainly (see :meth:`_TokenWriter.cas_merge`)
CAS_TRIES = 8

#: pylibmc clients a forked child inherited: kept, never freed (see __call__)
_inherited: list[Any] = []


def _set_commands(ttl: Any, mapping: Mapping[str, bytes]) -> list[tuple[Any, ...]]:
    """Writes of ``mapping`` as dogpile's Redis backend makes them: each with
    its ``redis_expiration_time`` (``SET EX``, as its ``SETEX``, which
    redis-py deprecates), else one ``MSET``."""
    if ttl:
        ttl = _seconds(ttl)
        return [("SET", key, value, "EX", ttl) for key, value in mapping.items()]
    return [("MSET", *[part for item in mapping.items() for part in item])]


#: MERGE_LUA as sent (without its indentation)
_MERGE_SCRIPT = "\n".join(line.strip() for line in MERGE_LUA.strip().splitlines())


def _token_commands(
    ttl: Any, mapping: Mapping[str, bytes], lua: bool, writer: str | None, per_key: bool = False
) -> list[tuple[Any, ...]]:
    """Writes of version tokens: merged by the server (``lua``, see
    :func:`~.invalidation.merge_token`), one script call for the keys that
    take one token (``per_key``: one call per key, for a cluster, where
    the keys of a call must share a hash slot), else as
    :func:`_set_commands`."""
    if not lua:
        return _set_commands(ttl, mapping)
    expiry = str(_seconds(ttl)) if ttl else ""
    now = repr(time.time())
    by_token: dict[bytes, list[str]] = {}
    for key, value in mapping.items():
        by_token.setdefault(value, []).append(key)
    groups = [([key], value) for value, keys in by_token.items() for key in keys] if per_key else [
        (keys, value) for value, keys in by_token.items()
    ]
    return [
        ("EVAL", _MERGE_SCRIPT, len(keys), *keys, value, writer or "", now, expiry, MAX_PENDING)
        for keys, value in groups
    ]


def _redis_ttl(backend: Any) -> Any:
    return getattr(backend, "redis_expiration_time", 0) or getattr(backend, "valkey_expiration_time", 0)


def _redis_module(region: CacheRegion) -> bool:
    """A region on a Redis (or Valkey) backend dogpile or ormcache
    provides: its version tokens are merged by the server."""
    backend = region.backend
    return region.serializer is not None and type(backend).__module__ in _REDIS_MODULES


def _raise_first(replies: Sequence[Any]) -> None:
    """As a pipeline's ``execute()`` does: the first error reply, raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _lock_owner() -> bytes:
    """A token naming one holder of a distributed lock (redis-py's ``Lock``
    takes ``uuid1()``, which costs 9 us here; any unique bytes will do)."""
    return os.urandom(16).hex().encode()


def _set_unlocker(region: CacheRegion, reader: _RedisReader | None = None) -> Any:
    """For :func:`_single_redis` regions: a function that stores an entry
    and releases dogpile's distributed lock (redis-py's ``Lock``) in one
    round trip, saving the release's own round trip on every miss, on
    ``reader``'s connections when there is one.  None elsewhere."""
    if not _single_redis(region):
        return None
    backend = region.backend
    from redis.exceptions import LockNotOwnedError
    from redis.lock import Lock

    if reader is not None and backend.writer_client is not backend.reader_client:  # type: ignore[attr-defined]
        reader = None  # (the reader's pool is the one reads go to)

    def set_unlocking(key: str, value: Any, unlock: _TwoLevelLock) -> None:
        lock = getattr(unlock.remote, "mutex", None)
        if type(lock) is not Lock or lock.local.token is None:
            region.set(key, value)
            return
        token = lock.local.token
        if region.key_mangler is not None:
            key = region.key_mangler(key)
        payload = _compat.serialized_payload(region, value)
        ttl = backend.redis_expiration_time  # type: ignore[attr-defined]
        replies = None
        if reader is not None:
            # (sent twice after a reconnect: the write is the same, and a
            # second release finds the lock released: "expired", logged)
            commands = _set_commands(ttl, {key: payload})
            commands.append(("EVAL", Lock.LUA_RELEASE_SCRIPT, 1, lock.name, token))
            replies = reader.pipeline(commands)
        if replies is None:
            pipe = backend.writer_client.pipeline(transaction=False)  # type: ignore[attr-defined]
            _queue(pipe, _set_commands(ttl, {key: payload}))
            pipe.eval(Lock.LUA_RELEASE_SCRIPT, 1, lock.name, token)
            # (a connection error raises here: the lock is released as usual)
            replies = pipe.execute(raise_on_error=False)
        stored, released = replies
        lock.local.token = None
        unlock.remote_released = True
        if isinstance(released, Exception):
            if _backend_failure(released):
                # refused, not run (BUSY with a script, READONLY once made a
                # replica): tried again, owner-checked, until it expires,
                # as a release that failed on its own is
                unlock.store.lose_release(lambda: lock.do_release(token), unlock.expires())
            unlock.remote_failed(released)
        elif not released:
            unlock.remote_failed(LockNotOwnedError("lock expired before its release"))
        if isinstance(stored, Exception):
            raise stored

    return set_unlocking


def _lock_adder(region: CacheRegion, reader: _RedisReader | None = None) -> Any:
    """For :func:`_single_redis` regions: a function that creates absent
    version tokens (``SET NX``, as ``add`` does) and takes dogpile's
    distributed lock (``SET NX PX``, as redis-py's ``Lock`` does) in one
    round trip, on ``reader``'s connections when there is one.  None
    elsewhere."""
    if not _single_redis(region) or region.key_mangler is not None:
        return None
    from redis.lock import Lock

    backend = region.backend
    if reader is not None and backend.writer_client is not backend.reader_client:  # type: ignore[attr-defined]
        reader = None

    def lock_adding(
        remote: Any, tokens: Mapping[str, str], lost: Callable[[Callable[[], Any], float | None], None]
    ) -> tuple[bool, dict[str, bool | None] | None]:
        lock = getattr(remote, "mutex", None)
        if type(lock) is not Lock or lock.local.token is not None:
            return bool(remote.acquire(False)), None
        ttl = _seconds(backend.redis_expiration_time) or None  # type: ignore[attr-defined]
        owner = _lock_owner()
        try:
            return _take(lock, ttl, owner, tokens)
        except Exception:
            # the lock's SET may have reached the server and run (a reply
            # that timed out): released once the server answers, if it is
            # this owner's, rather than left for waiters until it expires
            expires = time.monotonic() + lock.timeout if lock.timeout else None
            lost(lambda: lock.do_release(owner), expires)  # type: ignore[arg-type]
            raise

    def _take(
        lock: Any, ttl: Any, owner: bytes, tokens: Mapping[str, str]
    ) -> tuple[bool, dict[str, bool | None] | None]:
        px = int(lock.timeout * 1000) if lock.timeout else None
        replies = None
        if reader is not None:
            # sent twice after a reconnect: an add the first sending made
            # then reads as someone else's (the miss stores nothing), and
            # the lock's GET tells whether the first sending took it
            commands: list[tuple[Any, ...]] = []
            for key, token in tokens.items():
                value = _backend_value(region, token)
                commands.append(("SET", key, value, "NX", "EX", ttl) if ttl else ("SET", key, value, "NX"))
            commands.append(("SET", lock.name, owner, "NX", "PX", px) if px else ("SET", lock.name, owner, "NX"))
            commands.append(("GET", lock.name))
            replies = reader.pipeline(commands)
            if replies is not None:
                _raise_first(replies)
                *adds, _taken, holder = replies
                locked = holder == owner or holder == owner.decode()
        if replies is None:
            pipe = backend.writer_client.pipeline(transaction=False)  # type: ignore[attr-defined]
            for key, token in tokens.items():
                pipe.set(key, _backend_value(region, token), nx=True, ex=ttl)
            pipe.set(lock.name, owner, nx=True, px=px)
            *adds, taken = pipe.execute()
            locked = bool(taken)
        if locked:
            lock.local.token = owner
        return locked, {key: bool(a) for key, a in zip(tokens, adds)}

    return lock_adding


MISSING = NO_VALUE


def _local_lock(key: str) -> Any:
    return CacheRegion._LockWrapper()


def _wait(take: Callable[[], bool], limit: float | None, pause: float) -> bool:
    """``take()`` every ``pause`` seconds until it succeeds, or until
    ``limit`` seconds have passed (None: no limit), as redis-py's ``Lock``
    waits: never sleeping past the limit."""
    deadline = time.monotonic() + limit if limit is not None else float("inf")
    while not take():
        if time.monotonic() + pause > deadline:
            return False
        time.sleep(pause)
    return True


def _redis_lock(remote: Any) -> bool:
    """``remote`` is dogpile's wrapper of a redis-py ``Lock``, unheld."""
    lock: Any = getattr(remote, "mutex", None)
    return type(lock).__name__ == "Lock" and type(lock).__module__ == "redis.lock" and lock.local.token is None


#: seconds between two tries at a memcached lock another caller holds (as
#: ``lock_sleep`` for Redis regions)
LOCK_POLL = 0.01

def _release_again(remote: Any) -> tuple[Callable[[], Any], bool]:
    """What releases ``remote`` (a distributed lock, held) later, should its
    release fail now, and whether it releases the lock only if it is still
    this holder's.  redis-py's ``Lock`` forgets its token as it starts
    releasing, so its release is kept with the token; so is an
    :class:`_OwnedMemcachedLock`'s.  Other locks have no owner (dogpile's
    own memcached lock: its release deletes the key, whoever holds it)."""
    if type(remote) is _OwnedMemcachedLock and remote.token is not None:
        return remote.release_if_held(remote.token, remote.expires), True
    lock = getattr(remote, "mutex", None)  # dogpile's wrapper of redis-py's Lock
    token = getattr(getattr(lock, "local", None), "token", None)
    do_release = getattr(lock, "do_release", None)
    if token is not None and do_release is not None:
        return (lambda: do_release(token)), True
    return remote.release, False


def _lock_timeout(remote: Any) -> float | None:
    """Seconds after which ``remote`` expires by itself (None: never or
    unknown)."""
    timeout = getattr(getattr(remote, "mutex", remote), "timeout", None)
    return float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None


#: pylibmc errors raised before a command is sent (the server is marked
#: failed, or cannot be reached): a delete that raised one never ran
_NEVER_SENT = frozenset({"ServerDown", "ServerDead", "HostLookupError", "SocketCreateError", "ConnectionBindError"})
# (not ConnectionError: libmemcached raises it too when the server closed
# the connection after it received the command)


def _never_sent(err: Exception) -> bool:
    return type(err).__module__.split(".")[0] in ("pylibmc", "_pylibmc") and type(err).__name__ in _NEVER_SENT


#: what redis-py raises releasing a lock that expired (or was released)
_LOCK_GONE = ("LockNotOwnedError", "LockError")


def _no_lua(err: Exception) -> bool:
    """The server runs no Lua script for us: fakeredis without ``lupa``, a
    server with scripting disabled, an ACL user without ``EVAL`` /
    ``EVALSHA`` (NOPERM)."""
    name = type(err).__name__
    return name == "NoPermissionError" or (name == "ResponseError" and "unknown command" in str(err).lower())


def _backend_failure(err: Exception) -> bool:
    """A lock's release failed because the backend did not answer (not
    because the lock expired, or the server runs no Lua)."""
    return type(err).__name__ not in _LOCK_GONE and not _no_lua(err)


class _OwnedMemcachedLock(MemcachedLock):
    """dogpile's memcached lock, taken under an owner token: the lock's
    key holds a token of this holder's rather than 1.  A release is the
    same one ``delete``; but one sent again later, after a release or a
    try at the lock whose reply timed out (the server may have run it, or
    not), first reads the key and deletes it only if it still holds this
    holder's token.  (Reading then deleting is not atomic: the lock could
    change hands in between only by expiring meanwhile, and nothing is sent
    again, nor deleted after the read, from a second before it could expire:
    memcached's clock ticks once a second, and the lock's time counts from
    before the try was sent.)  Without it, a lock left held by a lost reply
    made every caller of that key wait for it to expire (``lock_timeout``,
    30 s by default).  pylibmc raises on a failed command; the other
    memcached drivers dogpile supports mostly return a default instead,
    and nothing is then sent again."""

    def __init__(self, lock: MemcachedLock, lose: Callable[[Callable[[], Any], float | None], None]) -> None:
        self.client_fn = lock.client_fn
        self.key = lock.key
        self.timeout = lock.timeout
        #: this holder's token while it holds the lock
        self.token: str | None = None
        #: ``time.monotonic()`` after which it may have expired (None: never)
        self.expires: float | None = None
        self._lose = lose

    def acquire(self, wait: bool = True) -> bool:
        if wait:
            # dogpile's own wait sleeps 0.4 to 0.8 s before the second try
            # and doubles that each time, up to hours: far longer than the
            # query it waits for.  Every LOCK_POLL seconds, until the lock
            # would have expired.
            return _wait(lambda: self.acquire(False), self.timeout or None, LOCK_POLL)
        token = _lock_owner().decode()
        expires = time.monotonic() + self.timeout - 1.0 if self.timeout else None
        try:
            taken = self.client_fn().add(self.key, token, self.timeout)
        except Exception as err:
            if not _never_sent(err):  # it may have run: release it if it did
                self._lose(self.release_if_held(token, expires), expires)
            raise
        if taken:
            self.token, self.expires = token, expires
        return bool(taken)

    def release(self) -> None:
        self.token = None
        self.client_fn().delete(self.key)

    def release_if_held(self, token: str, expires: float | None) -> Callable[[], None]:
        """What deletes the lock if it still holds ``token`` and cannot
        have expired (``expires``, ``time.monotonic()``)."""
        client_fn, key = self.client_fn, self.key

        def release() -> None:
            client = client_fn()
            value = client.get(key)
            if isinstance(value, bytes):  # (a driver or serde of bytes)
                value = value.decode("ascii", "replace")
            if value == token and (expires is None or time.monotonic() < expires):
                client.delete(key)

        return release


class _TwoLevelLock:
    """An in-process lock, then a backend's distributed lock."""

    __slots__ = ("local", "remote", "store", "remote_released", "taken_at")

    def __init__(self, local: Any, remote: Any, store: Store) -> None:
        self.local = local
        self.remote = remote
        self.store = store
        #: released already, with the entry's write (:meth:`Store.set`)
        self.remote_released = False
        #: ``time.monotonic()`` when the distributed lock was taken
        self.taken_at = 0.0

    def acquire(self, wait: bool = True) -> bool:
        if not self.local.acquire(wait):
            return False
        try:
            remote = self.remote
            if wait and self.store._lock_adding is not None and _redis_lock(remote):
                # as redis-py's acquire waits (every lock_sleep, at most
                # lock_blocking_timeout), each try under an owner token of
                # ormcache's own: a try whose reply timed out after the
                # server took the lock is released once the server answers,
                # rather than left for every waiter until it expires
                adding, lose = self.store._lock_adding, self.store.lose_release
                lock = remote.mutex
                taken = _wait(lambda: adding(remote, {}, lose)[0], lock.blocking_timeout, lock.sleep)
            else:
                taken = remote.acquire(wait)
            if taken:
                self.taken_at = time.monotonic()
                return True
        except BaseException:
            self.local.release()
            raise
        self.local.release()
        return False

    def release(self) -> None:
        try:
            if not self.remote_released:
                self.remote_released = True
                again, owned = _release_again(self.remote)
                try:
                    self.remote.release()
                except Exception as err:
                    # again later, unless it may have run (a timed-out
                    # reply): a lock without an owner may be someone
                    # else's by then
                    if _backend_failure(err) and (owned or _never_sent(err)):
                        self.store.lose_release(again, self.expires())
                    self.remote_failed(err)
        finally:
            self.local.release()

    def expires(self) -> float | None:
        """When (``time.monotonic()``) the distributed lock expires by
        itself; None: never, or unknown."""
        if type(self.remote) is _OwnedMemcachedLock:
            return self.remote.expires
        timeout = _lock_timeout(self.remote)
        return self.taken_at + timeout if timeout else None

    def remote_failed(self, err: Exception) -> None:
        """The distributed lock's release failed: expired locks and servers
        without Lua are not backend failures; other errors are raised."""
        if _no_lua(err):
            self.store._lock_unsupported(self.remote, err)
        elif type(err).__name__ in _LOCK_GONE:
            # held longer than lock_timeout: it expired (and may be
            # someone else's now); the backend is fine
            log.debug("cache region %r: lock expired before release", self.store.name)
        else:
            raise err
