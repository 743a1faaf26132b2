"""Signed serialization of what ormcache stores in shared backends.

A payload written to Redis, memcached or a dbm file is pickled, so reading
one that someone else wrote is running their code.  With a signing key
(``signing_key`` in settings, or ``$ORMCACHE_SIGNING_KEY``) every payload
ormcache writes carries an HMAC-SHA256 of its bytes, and a payload whose
signature is missing, wrong (another key), or that is truncated or corrupt
is never unpickled: it reads as a miss, and is logged.

Layout: ``b"ormc1" + hmac(32 bytes) + pickle``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import pickle
import time
from typing import Any

from dogpile.cache.api import CantDeserializeException

from .exc import ConfigurationError

__all__ = ["SignedSerializer"]

log = logging.getLogger("ormcache")

_MAGIC = b"ormc1"
_DIGEST = 32


class SignedSerializer:
    """``dumps``/``loads`` for a dogpile region's ``serializer`` and
    ``deserializer``."""

    def __init__(self, key: str | bytes, region: str = "?") -> None:
        if not isinstance(key, (str, bytes)) or len(key.strip()) < 16:
            raise ConfigurationError(
                "a signing key must be a secret of at least 16 characters (str or "
                f"bytes), not {type(key).__name__}" + (f" of {len(key)}" if isinstance(key, (str, bytes)) else ""),
                region=None if region == "?" else region,
                key="signing_key",
            )
        self._key = key.encode() if isinstance(key, str) else bytes(key)
        self.region = region
        self._last_warning = 0.0
        #: payloads refused so far
        self.rejected = 0

    def _sign(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def dumps(self, value: Any) -> bytes:
        data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        return _MAGIC + self._sign(data) + data

    def loads(self, payload: bytes) -> Any:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            self._reject("not bytes")
        payload = bytes(payload)
        head = len(_MAGIC) + _DIGEST
        if len(payload) < head or not payload.startswith(_MAGIC):
            self._reject("unsigned or truncated")
        signature, data = payload[len(_MAGIC) : head], payload[head:]
        if not hmac.compare_digest(signature, self._sign(data)):
            self._reject("bad signature (corrupt, or signed with another key)")
        try:
            return pickle.loads(data)
        except Exception:
            self._reject("signed but unreadable")

    def _reject(self, why: str) -> None:
        self.rejected += 1
        now = time.monotonic()
        if now - self._last_warning >= 10.0:
            self._last_warning = now
            log.warning("cache region %r: refused a payload: %s", self.region, why)
        raise CantDeserializeException(why)
