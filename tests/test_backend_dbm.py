from typing import Any

import pytest

from ormcache.testing.fixtures import BackendTests


class TestDbm(BackendTests):
    backend = "dbm"

    def arguments_for(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        return {"filename": str(request.getfixturevalue("tmp_path") / "cache.dbm")}
