"""Invalidations over Redis pub/sub, for L1s in relaxed mode.

Every process that writes version tokens to a Redis region publishes them
on the channel ``<namespace>:inv:<region>``.  A process whose region has an
L1 in relaxed mode keeps the tokens it has read in memory and subscribes to
that channel: a hit found in its L1 is then validated against those local
tokens, with no round trip at all, and a message makes it forget the
tokens of the keys it names (read from Redis again at the next lookup).  A
result can be served stale for as long as a message takes to arrive
(measured in docs/guide.md); whenever the
subscription is not known to be live (connecting, a dropped connection, a
server that has not answered a PING for :data:`LIVENESS` seconds), the
local tokens are forgotten and hits are validated against Redis as in the
default mode.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from typing import Any

__all__ = ["Subscriber", "publish"]

log = logging.getLogger("ormcache")


def channel_name(namespace: str, region: str) -> str:
    return f"{namespace}:inv:{region}"


def message(mapping: dict[str, str]) -> str:
    """What is published for version tokens written: ``{key: token}``."""
    return json.dumps(mapping, separators=(",", ":"))


def publish(client: Any, channel: str, mapping: dict[str, str]) -> None:
    client.publish(channel, message(mapping))


class Subscriber:
    """Follows one channel in a daemon thread and keeps ``tokens`` current."""

    def __init__(self, client: Any, channel: str, max_tokens: int = 100_000) -> None:
        #: the redis client, or a function that returns it (asked in the
        #: thread, so that a server that is down delays nothing else)
        self.client = client
        self.channel = channel
        #: version key -> token, as last published or read
        self.tokens: dict[str, str] = {}
        #: past this many, ``tokens`` starts again from none (each version
        #: key of every row read would otherwise stay for the process's
        #: life; a forgotten token is read from Redis at its next use)
        self.max_tokens = max_tokens
        #: moves on every message: a read that began before a message must
        #: not put its (maybe older) tokens into ``tokens``
        self.generation = 0
        self.healthy = False
        #: when the thread last ran (``time.monotonic()``): at least every
        #: BEAT_EVERY seconds while it is well; see :meth:`current`
        self.beat = 0.0
        self._warned = 0.0
        #: guards ``tokens`` with ``generation``: a read's tokens must not
        #: overwrite a message's that came between its check and its write
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start()
        _subscribers.add(self)

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"ormcache-pubsub-{self.channel}", daemon=True
        )
        self._thread.start()

    def _after_fork(self) -> None:
        """In a forked child: the thread that followed the channel did not
        survive the fork, and the tokens it kept stop moving; forget them
        and follow the channel again from this process."""
        self._lock = threading.Lock()  # the parent's may have been held
        self._forget()
        if not self._stop.is_set():
            self._start()

    def current(self) -> bool:
        """Whether ``tokens`` can be trusted now: subscribed, and the thread
        ran within :data:`STALE_AFTER` seconds.  A thread that could not run
        (its process busy in a loop that takes the GIL back at once each
        time it lets it go, as a pool's psycopg2 ``rollback`` at every
        check-in does: the waiting thread never gets it) may have messages
        waiting unread for seconds; its process's hits are then validated
        against Redis until it runs again."""
        return self.healthy and time.monotonic() - self.beat < STALE_AFTER

    def remember(self, generation: int, keys: list[str], tokens: list[Any]) -> None:
        """Keep tokens read from Redis, unless a message came meanwhile."""
        with self._lock:
            if not self.healthy or generation != self.generation:
                return
            if len(self.tokens) + len(keys) > self.max_tokens:
                self.tokens.clear()
            for key, token in zip(keys, tokens):
                if isinstance(token, str):
                    self.tokens[key] = token

    def apply(self, mapping: dict[str, str]) -> None:
        """A message: those version keys moved.  They are forgotten, not
        set to the tokens it carries, and read from Redis next time:
        messages of two writers may arrive in another order than their
        writes (a cluster: SET and PUBLISH are two commands), and a
        message sent before this process's own write may arrive after it;
        either would otherwise put back an older token."""
        with self._lock:
            self.generation += 1
            for key in mapping:
                self.tokens.pop(key, None)

    def drop(self, keys: list[str]) -> None:
        """Tokens this process wrote: read them from the backend next time
        (writing them here could put back a token older than one a message
        from another process brought meanwhile)."""
        with self._lock:
            self.generation += 1
            for key in keys:
                self.tokens.pop(key, None)

    def _unreadable(self) -> None:
        """A message that names no keys ormcache can read (not ormcache's,
        or damaged): it may stand for any write, so every token goes; the
        subscription itself is fine, and stays."""
        with self._lock:
            self.generation += 1
            self.tokens.clear()
        now = time.monotonic()
        if now - self._warned >= 10.0:
            self._warned = now
            log.warning("invalidation channel %r: a message that is not ormcache's; tokens forgotten", self.channel)

    def close(self) -> None:
        self._stop.set()

    def _forget(self) -> None:
        with self._lock:
            self.healthy = False
            self.tokens.clear()
            self.generation += 1

    def _run(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            pubsub = None
            try:
                client = self.client() if callable(self.client) else self.client
                pubsub = client.pubsub(ignore_subscribe_messages=False)
                pubsub.subscribe(self.channel)
                heard = time.monotonic()  # from the server, last
                pinged = heard
                while not self._stop.is_set():
                    last = self.beat
                    message = pubsub.get_message(timeout=BEAT_EVERY)
                    now = self.beat = time.monotonic()
                    if now - last > LIVENESS / 2 and last:
                        # this thread could not run for a while (its process
                        # kept the GIL): the server's silence is not known
                        heard = max(heard, now - PING_EVERY)
                    if message is None:
                        # a connection that died silently (a partition, a
                        # half-open socket after a failover) raises nothing:
                        # a PING unanswered for LIVENESS seconds ends it
                        if now - heard > LIVENESS:
                            raise ConnectionError(f"no reply from the server for {LIVENESS:g} s")
                        if now - pinged >= PING_EVERY:
                            pubsub.ping()
                            pinged = now
                        continue
                    heard = now
                    kind = message.get("type")
                    if kind == "subscribe":
                        with self._lock:
                            self.tokens.clear()
                            self.generation += 1
                            self.healthy = True
                        delay = 0.05
                    elif kind == "message":
                        try:
                            update = json.loads(message["data"])
                        except (ValueError, TypeError):
                            update = None
                        if isinstance(update, dict):
                            self.apply(update)
                        else:
                            self._unreadable()
            except Exception as err:
                if self.healthy:
                    log.warning("invalidation channel %r lost: %s", self.channel, err)
                self._forget()
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self._forget()
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass


#: an idle subscription PINGs the server every PING_EVERY seconds, and is
#: given up (its tokens forgotten: hits are validated against Redis) when
#: nothing came from the server for LIVENESS seconds
PING_EVERY = 0.25
LIVENESS = 1.0
#: the subscription's thread wakes at least this often, and its tokens are
#: not trusted when it has not run for STALE_AFTER seconds (see
#: Subscriber.current)
BEAT_EVERY = 0.02
STALE_AFTER = 0.08

_subscribers: weakref.WeakSet[Subscriber] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for subscriber in list(_subscribers):
        subscriber._after_fork()


if hasattr(os, "register_at_fork"):
    # gunicorn --preload, multiprocessing's fork, celery's prefork pool
    os.register_at_fork(after_in_child=_after_fork_in_child)
