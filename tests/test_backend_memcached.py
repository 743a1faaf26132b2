from typing import Any

import pytest

from ormcache.testing.fixtures import BackendTests


class TestPylibmc(BackendTests):
    """A real memcached server through pylibmc (``make services``)."""

    backend = "memcached"

    def arguments_for(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        return {"url": [request.getfixturevalue("memcached_url")]}
