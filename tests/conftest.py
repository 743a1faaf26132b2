import os
import uuid
from collections.abc import Iterator

import pytest

from ormcache import OrmCache

pytest_plugins = ["servers", "redis_topologies"]

# Regions wait 5 ms for a server by default (backend_timeout); a loaded CI
# machine's loopback Redis goes silent that long a few times in 10,000
# calls, which would turn a hit the test expects into a miss.  The tests
# that check the default and the fallback set or clear this themselves.
os.environ.setdefault("ORMCACHE_BACKEND_TIMEOUT", "0.25")


@pytest.fixture
def memory_cache() -> Iterator[OrmCache]:
    """An ``OrmCache`` with one in-process region, ``default``, under a
    namespace of its own; closed after the test."""
    cache = OrmCache.from_settings(
        {"namespace": "m" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}}
    )
    yield cache
    cache.close()
