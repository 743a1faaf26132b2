from __future__ import annotations

import copy
import datetime
import doctest
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dogpile.cache.backends.file import DBMBackend
from dogpile.cache.backends.memcached import PylibmcBackend
from dogpile.cache.backends.memory import MemoryBackend
from dogpile.cache.backends.memory import MemoryPickleBackend
from dogpile.cache.backends.redis import RedisBackend

from ormcache import settings as settings_module
from ormcache.exc import ConfigurationError
from ormcache.exc import UnknownRegionError
from ormcache.settings import SHORT_BACKEND_NAMES
from ormcache.settings import RegionSettings
from ormcache.settings import Settings
from ormcache.settings import load_settings
from ormcache.settings import make_region
from ormcache.settings import settings_from_config

SETTINGS_DICT: dict[str, Any] = {
    "regions": {
        "default": {"backend": "memory", "expiration_time": 300},
        "shared": {
            "backend": "redis",
            "expiration_time": 3600,
            "arguments": {
                "url": "redis://127.0.0.1:1/0",
                "distributed_lock": True,
                "thread_local_lock": False,
                "lock_timeout": 30,
                "socket_timeout": 0.5,
            },
        },
    },
    "cache_all": "default",
    "uncached_tables": ["audit_log", "sessions"],
    "namespace": "myapp",
}

SETTINGS_TOML = """
[other]
unrelated = true

[ormcache]
cache_all = "default"
uncached_tables = ["audit_log", "sessions"]
namespace = "myapp"

[ormcache.regions.default]
backend = "memory"
expiration_time = 300

[ormcache.regions.shared]
backend = "redis"
expiration_time = 3600

[ormcache.regions.shared.arguments]
url = "redis://127.0.0.1:1/0"
distributed_lock = true
thread_local_lock = false
lock_timeout = 30
socket_timeout = 0.5
"""

SETTINGS_FLAT = {
    "sqlalchemy.url": "sqlite://",
    "ormcache.default.backend": "memory",
    "ormcache.default.expiration_time": "300",
    "ormcache.shared.backend": "redis",
    "ormcache.shared.expiration_time": "3600",
    "ormcache.shared.arguments.url": "redis://127.0.0.1:1/0",
    "ormcache.shared.arguments.distributed_lock": "true",
    "ormcache.shared.arguments.thread_local_lock": "False",
    "ormcache.shared.arguments.lock_timeout": "30",
    "ormcache.shared.arguments.socket_timeout": "0.5",
    "ormcache.cache_all": "default",
    "ormcache.uncached_tables": "audit_log, sessions",
    "ormcache.namespace": "myapp",
}


@pytest.fixture(autouse=True)
def _default_backend_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check the defaults, not the test suite's (conftest.py)."""
    monkeypatch.delenv("ORMCACHE_BACKEND_TIMEOUT", raising=False)


def regions(**specs: Any) -> dict[str, Any]:
    return {"regions": specs}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ormcache.toml"
    path.write_text(text)
    return path


class TestSources:
    def test_dict_toml_and_flat_config_agree(self, tmp_path: Path) -> None:
        from_dict = load_settings(SETTINGS_DICT)
        from_toml = load_settings(write(tmp_path, SETTINGS_TOML))
        from_str_path = load_settings(str(write(tmp_path, SETTINGS_TOML)))
        from_flat = settings_from_config(SETTINGS_FLAT)

        assert from_dict == from_toml == from_str_path == from_flat
        assert list(from_dict.regions) == ["default", "shared"]
        shared = from_flat.region("shared")
        assert shared == RegionSettings(
            name="shared",
            backend="dogpile.cache.redis",
            expiration_time=3600,
            arguments={
                "url": "redis://127.0.0.1:1/0",
                "distributed_lock": True,
                "thread_local_lock": False,
                "lock_timeout": 30,
                "socket_timeout": 0.5,
            },
        )
        assert from_flat.cache_all == "default"
        assert from_flat.uncached_tables == frozenset({"audit_log", "sessions"})
        assert from_flat.namespace == "myapp"

    def test_defaults(self) -> None:
        settings = load_settings(regions(r={"backend": "memory"}))
        assert settings.cache_all is None
        assert settings.uncached_tables == frozenset()
        assert settings.namespace == "ormcache"
        assert settings.region("r").expiration_time is None
        assert dict(settings.region("r").arguments) == {}

    def test_flat_config_with_custom_prefix(self) -> None:
        settings = settings_from_config(
            {
                "cache.local.backend": "dbm",
                "cache.local.arguments.filename": "/tmp/x.dbm",
                "ormcache.ignored.backend": "nonsense",
            },
            prefix="cache.",
        )
        assert list(settings.regions) == ["local"]
        assert settings.region("local").backend == "dogpile.cache.dbm"

    def test_flat_config_unknown_key(self) -> None:
        with pytest.raises(ConfigurationError) as info:
            settings_from_config(
                {"ormcache.r.backend": "memory", "ormcache.r.expiry": "10"}
            )
        assert info.value.region == "r"
        assert info.value.key == "ormcache.r.expiry"
        assert "ormcache.<region>.backend" in str(info.value)

        with pytest.raises(ConfigurationError) as info:
            settings_from_config({"ormcache.cacheall": "r"})
        assert info.value.key == "ormcache.cacheall"

    def test_flat_config_expiration_none(self) -> None:
        settings = settings_from_config(
            {"ormcache.r.backend": "memory", "ormcache.r.expiration_time": "None"}
        )
        assert settings.region("r").expiration_time is None


class TestBackendNames:
    @pytest.mark.parametrize(
        ("short", "full"),
        [
            ("memory", "dogpile.cache.memory"),
            ("memory_pickle", "dogpile.cache.memory_pickle"),
            ("dbm", "dogpile.cache.dbm"),
            ("redis", "dogpile.cache.redis"),
            ("redis_sentinel", "ormcache.redis_sentinel"),
            ("redis_cluster", "ormcache.redis_cluster"),
            ("memcached", "dogpile.cache.pylibmc"),
            ("null", "dogpile.cache.null"),
        ],
    )
    def test_short_names(self, short: str, full: str) -> None:
        assert SHORT_BACKEND_NAMES[short] == full
        assert load_settings(regions(r={"backend": short})).region("r").backend == full

    def test_short_names_are_read_only(self) -> None:
        with pytest.raises(TypeError):
            SHORT_BACKEND_NAMES["x"] = "y"  # type: ignore[index]

    @pytest.mark.parametrize(
        "name", ["dogpile.cache.redis", "dogpile.cache.pymemcache"]
    )
    def test_full_dogpile_name_accepted(self, name: str) -> None:
        assert load_settings(regions(r={"backend": name})).region("r").backend == name

    def test_unknown_backend(self) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(regions(sessions={"backend": "rediss"}))
        assert info.value.region == "sessions"
        assert info.value.key == "backend"
        message = str(info.value)
        assert "region 'sessions'" in message and "'rediss'" in message
        for short in SHORT_BACKEND_NAMES:
            assert repr(short) in message


class TestErrors:
    def test_unknown_region_key(self) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(regions(r={"backend": "memory", "expires": 10}))
        assert (info.value.region, info.value.key) == ("r", "expires")
        assert "region 'r', setting 'expires'" in str(info.value)
        assert "arguments, backend, backend_timeout, expiration_time" in str(info.value)

    @pytest.mark.parametrize("value", [0, -1, "soon", True, [0.1], float("nan")])
    def test_bad_backend_timeout(self, value: Any) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(regions(r={"backend": "redis", "backend_timeout": value}))
        assert (info.value.region, info.value.key) == ("r", "backend_timeout")
        assert "number of seconds > 0" in str(info.value)

    @pytest.mark.parametrize("backend", ["memory", "memory_pickle", "null", "dbm"])
    def test_backend_timeout_without_a_server(self, backend: str) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(regions(r={"backend": backend, "backend_timeout": 0.5}))
        assert (info.value.region, info.value.key) == ("r", "backend_timeout")
        assert "has none to wait for" in str(info.value)
        # false (the driver's own) says nothing; the default applies to every region
        assert load_settings(regions(r={"backend": backend, "backend_timeout": False}))
        assert load_settings(regions(r={"backend": backend}))

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [(None, None), (False, None), ("false", None), (0.02, 0.02), ("0.5", 0.5), (1, 1.0)],
    )
    def test_good_backend_timeout(self, value: Any, seconds: float | None) -> None:
        spec = load_settings(regions(r={"backend": "redis", "backend_timeout": value})).region("r")
        assert spec.backend_timeout == seconds
        assert load_settings(regions(r={"backend": "redis"})).region("r").backend_timeout == 0.003

    @pytest.mark.parametrize("value", [-0.0001, 0.5, "0.0100001", "soon", "none", True, [0.1], float("nan")])
    def test_bad_reply_poll(self, value: Any) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(regions(r={"backend": "redis", "reply_poll": value}))
        assert (info.value.region, info.value.key) == ("r", "reply_poll")
        assert f"{value!r} is not a polling time" in str(info.value)
        assert "from 0 to 0.01" in str(info.value)

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [(False, 0.0), ("false", 0.0), ("off", 0.0), (0, 0.0), (0.0005, 0.0005), ("0.002", 0.002), (0.01, 0.01)],
    )
    def test_good_reply_poll(self, value: Any, seconds: float) -> None:
        spec = load_settings(regions(r={"backend": "redis", "reply_poll": value})).region("r")
        assert spec.reply_poll == seconds
        # not set: None, the default (0.0001 s)
        assert load_settings(regions(r={"backend": "redis"})).region("r").reply_poll is None
        assert load_settings(regions(r={"backend": "redis", "reply_poll": None})).region("r").reply_poll is None
        flat = settings_from_config({"ormcache.r.backend": "redis", "ormcache.r.reply_poll": str(value)})
        assert flat.region("r").reply_poll == seconds

    @pytest.mark.parametrize("backend", ["memory", "memcached", "redis_cluster", "redis_sentinel"])
    def test_reply_poll_on_a_region_that_does_not_poll(self, backend: str) -> None:
        for value in (0.001, 0.0001, "1e-4"):  # (the default written out too)
            with pytest.raises(ConfigurationError) as info:
                load_settings(regions(r={"backend": backend, "reply_poll": value}))
            assert (info.value.region, info.value.key) == ("r", "reply_poll")
            assert "applies to redis regions" in str(info.value)
        for off in (False, 0, "off"):  # not polling: true of every backend
            assert load_settings(regions(r={"backend": backend, "reply_poll": off})).region("r").reply_poll == 0

    def test_reply_poll_of_region_settings_made_directly(self) -> None:
        with pytest.raises(ConfigurationError) as info:
            RegionSettings("r", "dogpile.cache.redis", None, {}, reply_poll=-1)
        assert (info.value.region, info.value.key) == ("r", "reply_poll")

    def test_backend_timeout_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ORMCACHE_BACKEND_TIMEOUT", "0.1")
        assert load_settings(regions(r={"backend": "redis"})).region("r").backend_timeout == 0.1
        spec = regions(r={"backend": "redis", "backend_timeout": 0.02})
        assert load_settings(spec).region("r").backend_timeout == 0.02  # settings win
        monkeypatch.setenv("ORMCACHE_BACKEND_TIMEOUT", "soon")
        with pytest.raises(ConfigurationError, match=r"\$ORMCACHE_BACKEND_TIMEOUT: 'soon' is not"):
            load_settings(regions(r={"backend": "redis"}))

    def test_missing_backend(self) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(regions(r={"expiration_time": 10}))
        assert (info.value.region, info.value.key) == ("r", "backend")
        assert "required" in str(info.value)

    def test_unknown_top_level_key(self) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings({**regions(r={"backend": "memory"}), "cacheall": "r"})
        assert info.value.region is None
        assert info.value.key == "cacheall"
        assert "cache_all, namespace, regions, signing_key, uncached_tables" in str(info.value)

    @pytest.mark.parametrize(
        "value", [-1, -0.5, 0, "0", datetime.timedelta(0), "soon", "-5", True, float("nan"), [300], {"s": 1}]
    )
    def test_bad_expiration_time(self, value: Any) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(regions(r={"backend": "memory", "expiration_time": value}))
        assert (info.value.region, info.value.key) == ("r", "expiration_time")
        assert "region 'r', setting 'expiration_time'" in str(info.value)
        assert "> 0" in str(info.value)

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            (300, 300),
            (1.5, 1.5),
            ("300", 300),
            (" 2.5 ", 2.5),
            (None, None),
            (datetime.timedelta(minutes=5), 300.0),
        ],
    )
    def test_good_expiration_time(self, value: Any, seconds: float | None) -> None:
        spec = load_settings(
            regions(r={"backend": "memory", "expiration_time": value})
        ).region("r")
        assert spec.expiration_time == seconds

    @pytest.mark.parametrize("spec", ["memory", None, ["memory"]])
    def test_region_not_a_mapping(self, spec: Any) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(regions(default=spec))
        assert info.value.region == "default"
        assert "region 'default'" in str(info.value)
        assert "'backend'" in str(info.value)

    @pytest.mark.parametrize("tree", [{}, {"regions": {}}, {"regions": "memory"}])
    def test_no_regions(self, tree: dict[str, Any]) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(tree)
        assert info.value.key == "regions"
        if tree.get("regions") == "memory":
            assert "must map region names to their settings, not str" in str(info.value)
        else:
            assert "at least one region" in str(info.value)

    def test_bad_arguments(self) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(regions(r={"backend": "redis", "arguments": "url"}))
        assert (info.value.region, info.value.key) == ("r", "arguments")

    def test_cache_all_undeclared(self) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(
                {
                    **regions(default={"backend": "memory"}, big={"backend": "null"}),
                    "cache_all": "missing",
                }
            )
        assert info.value.key == "cache_all"
        assert info.value.region == "missing"
        assert "'default', 'big'" in str(info.value)

    @pytest.mark.parametrize(
        "namespace", ["", "my app", "x" * 33, "café", "tab\t", 7, "app:s", "app*", "a?", "[a]", "a\\b"]
    )
    def test_bad_namespace(self, namespace: Any) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings({**regions(r={"backend": "memory"}), "namespace": namespace})
        assert info.value.key == "namespace"
        assert "1 to 32 ASCII characters" in str(info.value)

    @pytest.mark.parametrize(
        "backend,key,value,seconds",
        [
            ("redis", "redis_expiration_time", "300", 300),  # INI files, ${NAME}
            ("redis", "redis_expiration_time", 3600.0, 3600),
            ("redis", "redis_expiration_time", __import__("datetime").timedelta(hours=1), 3600),
            ("memcached", "memcached_expire_time", "600", 600),
            ("memcached", "memcached_expire_time", 2_592_000, 2_592_000),
            ("redis", "redis_expiration_time", None, None),  # dogpile's "no expiry"
        ],
    )
    def test_server_ttls_are_whole_seconds(self, backend: str, key: str, value: Any, seconds: int | None) -> None:
        settings = load_settings(regions(r={"backend": backend, "arguments": {key: value}}))
        assert settings.region("r").arguments[key] == seconds

    @pytest.mark.parametrize(
        "backend,key,value",
        [
            ("redis", "redis_expiration_time", 1.5),  # Redis refuses it on every SET EX
            ("redis", "redis_expiration_time", -5),
            ("redis", "redis_expiration_time", "soon"),
            ("redis", "redis_expiration_time", 10**16),  # Redis: "invalid expire time" on every SET
            ("memcached", "memcached_expire_time", 2_592_001),  # a date in 1970: gone at once
            ("memcached", "memcached_expire_time", True),
        ],
    )
    def test_bad_server_ttls(self, backend: str, key: str, value: Any) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(regions(r={"backend": backend, "arguments": {key: value}}))
        assert (info.value.region, info.value.key) == ("r", f"arguments.{key}")
        assert "whole number of seconds" in str(info.value) and repr(value) in str(info.value)

    @pytest.mark.parametrize("name", ["", "a\nb", "tab\there", 3])
    def test_bad_region_name(self, name: Any) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings({"regions": {name: {"backend": "memory"}}})
        assert info.value.key == "regions"
        assert "printable characters" in str(info.value) and repr(name) in str(info.value)

    @pytest.mark.parametrize("tables", ["audit_log", ["ok", 3], [""], [" "], ['"audit_log"'], ["`a`"]])
    def test_bad_uncached_tables(self, tables: Any) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(
                {**regions(r={"backend": "memory"}), "uncached_tables": tables}
            )
        assert info.value.key == "uncached_tables"

    def test_not_a_mapping_or_path(self) -> None:
        with pytest.raises(ConfigurationError, match="mapping or the path"):
            load_settings(42)  # type: ignore[arg-type]


class TestTomlFile:
    def test_missing_table(self, tmp_path: Path) -> None:
        path = write(tmp_path, "[cache]\nregions = {}\n")
        with pytest.raises(ConfigurationError) as info:
            load_settings(path)
        assert (info.value.region, info.value.key) == (None, None)
        assert str(path) in str(info.value)
        assert "[ormcache]" in str(info.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "absent.toml"
        with pytest.raises(ConfigurationError) as info:
            load_settings(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value.__cause__, FileNotFoundError)

    def test_invalid_toml(self, tmp_path: Path) -> None:
        path = write(tmp_path, "[ormcache\n")
        with pytest.raises(ConfigurationError) as info:
            load_settings(path)
        assert str(path) in str(info.value)
        assert "not valid TOML" in str(info.value)

    def test_errors_inside_the_table(self, tmp_path: Path) -> None:
        path = write(tmp_path, '[ormcache.regions.r]\nbackend = "nope"\n')
        with pytest.raises(ConfigurationError) as info:
            load_settings(path)
        assert (info.value.region, info.value.key) == ("r", "backend")


class TestEnvironment:
    def test_whole_and_embedded_references(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CACHE_BACKEND", "redis")
        monkeypatch.setenv("CACHE_TTL", "120")
        monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
        monkeypatch.setenv("REDIS_HOST", "cache.internal")
        monkeypatch.setenv("APP", "shop")
        settings = load_settings(
            {
                "regions": {
                    "r": {
                        "backend": "${CACHE_BACKEND}",
                        "expiration_time": "${CACHE_TTL}",
                        "arguments": {
                            "url": "redis://:${REDIS_PASSWORD}@${REDIS_HOST}:6379/0",
                            "connection_kwargs": {"client_name": "${APP}-cache"},
                            "hosts": ["${REDIS_HOST}", ("${APP}",)],
                            "port": 6379,
                        },
                    }
                },
                "namespace": "${APP}",
                "uncached_tables": ["${APP}_audit"],
            }
        )
        spec = settings.region("r")
        assert spec.backend == "dogpile.cache.redis"
        assert spec.expiration_time == 120
        assert spec.arguments["url"] == "redis://:s3cret@cache.internal:6379/0"
        assert spec.arguments["connection_kwargs"] == {"client_name": "shop-cache"}
        assert spec.arguments["hosts"] == ["cache.internal", ("shop",)]
        assert spec.arguments["port"] == 6379
        assert settings.namespace == "shop"
        assert settings.uncached_tables == frozenset({"shop_audit"})

    def test_escape(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("X", "value")
        spec = load_settings(
            regions(
                r={
                    "backend": "memory",
                    "arguments": {"a": "$${X}", "b": "$${X}-${X}", "c": "$X and $$"},
                }
            )
        ).region("r")
        assert spec.arguments == {"a": "${X}", "b": "${X}-value", "c": "$X and $$"}

    def test_escape_is_not_interpolated_again_from_flat_config(self) -> None:
        settings = settings_from_config(
            {"ormcache.r.backend": "memory", "ormcache.r.arguments.a": "$${HOME}"}
        )
        assert settings.region("r").arguments["a"] == "${HOME}"

    def test_missing_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("ORMCACHE_TEST_UNSET", raising=False)
        with pytest.raises(ConfigurationError) as info:
            load_settings(
                regions(
                    r={
                        "backend": "redis",
                        "arguments": {"url": "redis://:${ORMCACHE_TEST_UNSET}@h/0"},
                    }
                )
            )
        assert (info.value.region, info.value.key) == ("r", "arguments.url")
        assert "'ORMCACHE_TEST_UNSET'" in str(info.value)
        assert "region 'r', setting 'arguments.url'" in str(info.value)

    def test_missing_variable_at_top_level(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("ORMCACHE_TEST_UNSET", raising=False)
        with pytest.raises(ConfigurationError) as info:
            load_settings(
                {
                    **regions(r={"backend": "memory"}),
                    "namespace": "${ORMCACHE_TEST_UNSET}",
                }
            )
        assert (info.value.region, info.value.key) == (None, "namespace")
        assert "'ORMCACHE_TEST_UNSET'" in str(info.value)

    def test_non_numeric_variable_for_expiration(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CACHE_TTL", "five minutes")
        with pytest.raises(ConfigurationError) as info:
            load_settings(
                regions(r={"backend": "memory", "expiration_time": "${CACHE_TTL}"})
            )
        assert (info.value.region, info.value.key) == ("r", "expiration_time")
        assert "'five minutes'" in str(info.value)

    def test_malformed_reference(self) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(
                regions(r={"backend": "memory", "arguments": {"a": "${not closed"}})
            )
        assert (info.value.region, info.value.key) == ("r", "arguments.a")
        assert "$${" in str(info.value)


class TestImmutability:
    def test_input_not_mutated_and_not_shared(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("REDIS_HOST", "cache.internal")
        source = copy.deepcopy(SETTINGS_DICT)
        shared = source["regions"]["shared"]
        shared["arguments"]["url"] = "redis://${REDIS_HOST}/0"
        shared["arguments"]["connection_kwargs"] = {"retry": [1, 2]}
        shared["expiration_time"] = "3600"
        before = copy.deepcopy(source)

        settings = load_settings(source)
        assert source == before

        shared["arguments"]["url"] = "changed"
        shared["arguments"]["connection_kwargs"]["retry"].append(3)
        source["regions"]["default"]["backend"] = "null"
        source["regions"]["new"] = {"backend": "memory"}
        source["uncached_tables"].append("users")

        spec = settings.region("shared")
        assert spec.arguments["url"] == "redis://cache.internal/0"
        assert spec.arguments["connection_kwargs"] == {"retry": [1, 2]}
        assert settings.region("default").backend == "dogpile.cache.memory"
        assert list(settings.regions) == ["default", "shared"]
        assert "users" not in settings.uncached_tables

    def test_settings_are_read_only(self) -> None:
        settings = load_settings(SETTINGS_DICT)
        spec = settings.region("shared")
        with pytest.raises(TypeError):
            settings.regions["x"] = spec  # type: ignore[index]
        with pytest.raises(TypeError):
            spec.arguments["url"] = "x"  # type: ignore[index]
        with pytest.raises(AttributeError):
            settings.namespace = "x"  # type: ignore[misc]
        with pytest.raises(AttributeError):
            spec.backend = "x"  # type: ignore[misc]
        assert isinstance(settings.uncached_tables, frozenset)

    def test_direct_construction_copies_too(self) -> None:
        arguments = {"filename": "/tmp/a.dbm"}
        spec = RegionSettings("r", "dogpile.cache.dbm", None, arguments)
        arguments["filename"] = "/tmp/b.dbm"
        regions_ = {"r": spec}
        settings = Settings(regions_, uncached_tables={"t"})  # type: ignore[arg-type]
        regions_.clear()
        assert spec.arguments["filename"] == "/tmp/a.dbm"
        assert list(settings.regions) == ["r"]
        assert settings.uncached_tables == frozenset({"t"})


class TestUnknownRegion:
    def test_lists_declared_names_and_is_a_key_error(self) -> None:
        settings = load_settings(SETTINGS_DICT)
        with pytest.raises(KeyError) as info:
            settings.region("sesions")
        error = info.value
        assert isinstance(error, UnknownRegionError)
        assert isinstance(error, ConfigurationError)
        assert error.name == "sesions"
        assert error.declared == ["default", "shared"]
        assert str(error) == (
            "no cache region named 'sesions' is declared; "
            "declared regions: 'default', 'shared'"
        )


class TestMakeRegion:
    def region_for(self, backend: str, **arguments: Any) -> Any:
        settings = load_settings(
            regions(
                r={"backend": backend, "expiration_time": 60, "arguments": arguments}
            )
        )
        region = make_region(settings.region("r"))
        assert region.is_configured
        assert region.name == "r"
        assert region.expiration_time == 60
        return region

    @pytest.mark.parametrize(
        ("backend", "cls"),
        [("memory", MemoryBackend), ("memory_pickle", MemoryPickleBackend)],
    )
    def test_memory(self, backend: str, cls: type) -> None:
        region = self.region_for(backend)
        assert type(region.backend) is cls
        assert region.get_or_create("k", lambda: [1]) == [1]

    def test_dbm(self, tmp_path: Path) -> None:
        region = self.region_for("dbm", filename=str(tmp_path / "cache.dbm"))
        assert type(region.backend) is DBMBackend
        region.set("k", "v")
        assert region.get("k") == "v"

    def test_redis_configures_without_a_server(self) -> None:
        import redis

        region = self.region_for("redis", url="redis://127.0.0.1:1/0")
        assert type(region.backend) is RedisBackend
        # nothing listens on port 1: configuring succeeded without connecting,
        # and the first real command is what fails
        with pytest.raises(redis.exceptions.ConnectionError):
            region.get("k")

    def test_memcached_configures_without_a_server(self) -> None:
        import pylibmc

        region = self.region_for("memcached", url="127.0.0.1:1")
        assert type(region.backend) is PylibmcBackend
        assert "_clients" not in vars(region.backend)  # no client created yet
        with pytest.raises(pylibmc.Error):
            region.get("k")

    @pytest.mark.parametrize("url", ["127.0.0.1:11211x", ["127.0.0.1", "cache:port"], 5, ["127.0.0.1", None]])
    def test_memcached_addresses_are_read_when_configured(self, url: Any) -> None:
        """pylibmc reads the addresses at the first use; a bad one is a
        configuration error, not a backend that fails at every query."""
        with pytest.raises(ConfigurationError, match=r"region 'r', setting 'arguments.url'.*cannot be read"):
            make_region(load_settings(regions(r={"backend": "memcached", "arguments": {"url": url}})).region("r"))
        for good in ("cache", "cache:11211", "cache:11211:2", "[::1]:11211", "udp:cache:11211", "/run/mc.sock"):
            make_region(load_settings(regions(r={"backend": "memcached", "arguments": {"url": [good]}})).region("r"))

    def test_arguments_passed_as_a_fresh_copy(self) -> None:
        spec = load_settings(
            regions(r={"backend": "redis", "arguments": {"connection_kwargs": {}}})
        ).region("r")
        region = make_region(spec)
        region.backend.connection_kwargs["x"] = 1
        assert spec.arguments["connection_kwargs"] == {}
        assert make_region(spec).backend.connection_kwargs == {}

    def test_wraps_configure_failure(self) -> None:
        spec = load_settings(regions(local={"backend": "dbm"})).region("local")
        with pytest.raises(ConfigurationError) as info:
            make_region(spec)
        assert (info.value.region, info.value.key) == ("local", "arguments")
        assert isinstance(info.value.__cause__, KeyError)
        assert "region 'local'" in str(info.value)
        assert "'filename'" in str(info.value)

    def test_wraps_unknown_backend(self) -> None:
        spec = RegionSettings("r", "dogpile.cache.nope", None)
        with pytest.raises(ConfigurationError) as info:
            make_region(spec)
        assert (info.value.region, info.value.key) == ("r", "backend")
        assert info.value.__cause__ is not None

    def test_wraps_missing_driver(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "redis", None)  # import redis fails
        spec = load_settings(regions(r={"backend": "redis"})).region("r")
        with pytest.raises(ConfigurationError) as info:
            make_region(spec)
        assert (info.value.region, info.value.key) == ("r", "backend")
        assert isinstance(info.value.__cause__, ImportError)
        assert "pip install" in str(info.value)


def test_drivers_not_imported_by_loading_settings() -> None:
    code = (
        "import sys\n"
        "from ormcache.settings import load_settings\n"
        "load_settings({'regions': {'r': {'backend': 'redis'},"
        " 'm': {'backend': 'memcached'}}})\n"
        "print(sorted({'redis', 'pylibmc'} & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert out.stdout.strip() == "[]"


def test_docstring_examples() -> None:
    result = doctest.testmod(settings_module)
    assert result.attempted > 0
    assert result.failed == 0


def test_all_is_sorted_and_complete() -> None:
    names = settings_module.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(settings_module, name)
    public = {
        name
        for name, value in vars(settings_module).items()
        if not name.startswith("_")
        and getattr(value, "__module__", None) == settings_module.__name__
    }
    assert public <= set(names)


def test_from_config_takes_every_region_setting() -> None:
    settings = settings_from_config(
        {
            "ormcache.r.backend": "redis",
            "ormcache.r.arguments.url": "redis://127.0.0.1:6379/0",
            "ormcache.r.l1.max_entries": "100",
            "ormcache.r.l1.mode": "relaxed",
            "ormcache.r.stale_while_revalidate": "true",
            "ormcache.signing_key": "s" * 16,
        }
    )
    region = settings.region("r")
    assert (region.l1_max_entries, region.l1_mode, region.stale_while_revalidate) == (100, "relaxed", True)
    with pytest.raises(ConfigurationError, match="l1.<name>.*signing_key"):
        settings_from_config({"ormcache.r.l2.max_entries": "1"})


def test_from_config_names_a_prefix_without_its_dot() -> None:
    with pytest.raises(ConfigurationError, match=r"prefix is 'ormcache', without the dot.*prefix='ormcache\.'"):
        settings_from_config({"ormcache.r.backend": "memory"}, prefix="ormcache")


def test_a_region_settings_made_by_hand_names_dogpiles_backend_name() -> None:
    from ormcache.settings import RegionSettings, make_region

    with pytest.raises(ConfigurationError, match=r"'memory' is a short name.*'dogpile\.cache\.memory'"):
        make_region(RegionSettings("d", "memory", None))


def test_signing_key_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from ormcache import OrmCache

    regions = {"regions": {"r": {"backend": "memory_pickle"}}}
    for bad in ("short", " " * 20):
        monkeypatch.setenv("ORMCACHE_SIGNING_KEY", bad)
        with pytest.raises(ConfigurationError, match="ORMCACHE_SIGNING_KEY"):
            OrmCache.from_settings(regions)
    monkeypatch.setenv("ORMCACHE_SIGNING_KEY", "a secret of 16+ chars")
    OrmCache.from_settings(regions).close()


@pytest.mark.parametrize(("spelt", "expected"), [("on", True), ("OFF", False), ("yes", True), ("0", False)])
def test_flags_take_the_spellings_of_environment_variables(spelt: str, expected: bool) -> None:
    region = load_settings(regions(r={"backend": "memory", "stale_while_revalidate": spelt})).region("r")
    assert region.stale_while_revalidate is expected


@pytest.mark.parametrize("off", [False, "false", "off", "OFF", "none"])
def test_l1_can_be_turned_off(off: Any) -> None:
    region = load_settings(regions(r={"backend": "redis", "l1": off})).region("r")
    assert region.l1_max_entries is None


def test_l1_on_an_in_process_region_is_refused() -> None:
    from ormcache import OrmCache

    with pytest.raises(ConfigurationError, match="region 'local', setting 'l1'"):
        OrmCache.from_settings({"regions": {"local": {"backend": "memory", "l1": {"max_entries": 10}}}})


def test_api_arguments_are_checked() -> None:
    from sqlalchemy.exc import ArgumentError

    from ormcache import FromCache, OrmCache, RelationshipCache
    from ormcache.testing.fixtures import Store, Template

    cache = OrmCache.from_settings({"regions": {"shared": {"backend": "memory_pickle"}}})
    try:
        for interval in (0, -1, float("nan"), float("inf"), "10", True, 61, 1e10, 10**400):
            with pytest.raises(ConfigurationError, match="interval"):
                cache.publish_stats(interval=interval)  # type: ignore[arg-type]
        for name in (5, "", None):
            with pytest.raises(ConfigurationError, match="table name"):
                cache.invalidate_table(name)  # type: ignore[arg-type]
        for attribute in ("compress_threshold", "max_entry_bytes"):
            for value in ("big", None, 0, -1, 1.5, True):
                with pytest.raises(ConfigurationError, match=f"{attribute} must be a number of bytes"):
                    setattr(cache, attribute, value)
            setattr(cache, attribute, 4096)
            assert getattr(cache, attribute) == 4096
    finally:
        cache.close()
    for value in (float("nan"), 0, -1, datetime.timedelta(0)):
        with pytest.raises(ArgumentError, match="expiration_time"):
            FromCache(expiration_time=value)
    with pytest.raises(ArgumentError, match="another RelationshipCache"):
        RelationshipCache(Store.templates).and_(FromCache())  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="RelationshipCache takes no cache_key"):
        RelationshipCache(Store.templates, cache_key="templates")  # every store would share it
    both = RelationshipCache(Store.templates).and_(RelationshipCache(Template.store))
    assert len(both._relationships) == 2


@pytest.mark.parametrize(
    ("backend", "arguments", "typo"),
    [
        ("redis", {"hots": "cache.internal"}, "hots"),
        ("redis", {"url": "redis://127.0.0.1:6379/0", "socket_timout": 1}, "socket_timout"),
        ("memcached", {"url": "127.0.0.1:11211", "behaviours": {}}, "behaviours"),
        ("dbm", {"filename": "/tmp/ormcache-typo.dbm", "rw_lock_file": True}, "rw_lock_file"),
        ("memory", {"size": 10}, "size"),
        ("redis_sentinel", {"sentinels": [("127.0.0.1", 26379)], "dbb": 1}, "dbb"),
        ("redis_cluster", {"url": "redis://127.0.0.1:7000", "hots": "x"}, "hots"),
    ],
)
def test_misspelt_backend_arguments_are_refused(backend: str, arguments: dict[str, Any], typo: str) -> None:
    from ormcache import OrmCache

    with pytest.raises(ConfigurationError, match=f"region 'r', setting 'arguments'.*'{typo}'"):
        OrmCache.from_settings({"regions": {"r": {"backend": backend, "arguments": arguments}}})


def test_publish_stats_only_where_another_process_can_read_them() -> None:
    from ormcache import OrmCache

    cache = OrmCache.from_settings(
        {
            "regions": {
                "local": {"backend": "null"},
                "pickled": {"backend": "memory_pickle"},
                "fast": {"backend": "memory"},
            }
        }
    )
    try:
        with pytest.raises(ConfigurationError, match="no shared region to publish statistics in"):
            cache.publish_stats()
        for name in ("local", "pickled", "fast"):
            with pytest.raises(ConfigurationError, match=f"region='{name}'.*is not shared"):
                cache.publish_stats(region=name)
    finally:
        cache.close()


def test_use_schema_version_takes_a_string_or_none() -> None:
    from ormcache import OrmCache

    cache = OrmCache.from_settings({"regions": {"r": {"backend": "memory"}}})
    try:
        for bad in (3, "", "  ", b"abc"):
            with pytest.raises(ConfigurationError, match="use_schema_version"):
                cache.use_schema_version(bad)  # type: ignore[arg-type]
        assert cache.use_schema_version("ae1027a6acf").schema_version == "ae1027a6acf"
        assert cache.use_schema_version(None).schema_version is None
    finally:
        cache.close()


@pytest.mark.parametrize("given", ["not configured", "not a region"])
def test_regions_given_ready_must_be_configured_regions(given: str) -> None:
    from dogpile.cache import make_region

    from ormcache import OrmCache

    settings = load_settings(regions(r={"backend": "memory"}))
    region: Any = make_region() if given == "not configured" else {"backend": "memory"}
    with pytest.raises(ConfigurationError, match="region 'r'.*(not configured yet|not a dogpile CacheRegion)"):
        OrmCache(settings, regions={"r": region})


def test_odd_inputs_get_named_errors(tmp_path: Path) -> None:
    """Inputs that used to escape as a builtin error from deep inside."""
    from sqlalchemy.exc import ArgumentError

    from ormcache import FromCache, OrmCache, RelationshipCache, UnknownRegionError
    from ormcache.settings import settings_from_config
    from ormcache.testing.fixtures import Template

    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[ormcache.regions.default]\nbackend = "memory" # caf\xe9\n'.encode("latin-1"))
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        OrmCache.from_settings(str(latin1))
    with pytest.raises(ConfigurationError) as info:
        load_settings(regions(r={"backend": "memory", "expiration_time": 10**400}))
    assert info.value.key == "expiration_time"
    assert FromCache(expiration_time=10**400).expiration_time == float("inf")
    with pytest.raises(ConfigurationError, match="takes a mapping"):
        settings_from_config(None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="prefix"):
        settings_from_config({"ormcache.r.backend": "memory"}, prefix=None)  # type: ignore[arg-type]
    settings = load_settings(regions(r={"backend": "memory"}))
    with pytest.raises(ConfigurationError, match="regions= takes a mapping"):
        OrmCache(settings, regions=5)  # type: ignore[arg-type]
    cache = OrmCache(settings)
    try:
        with pytest.raises(UnknownRegionError):
            cache.region(["r"])  # type: ignore[arg-type]
        with pytest.raises(UnknownRegionError):
            cache.invalidate_region(["r"])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="cannot detach None"):
            cache.detach(None)
    finally:
        cache.close()
    with pytest.raises(ArgumentError, match="not Template.name$"):
        RelationshipCache(Template.name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key, value",
    [("port", "abc"), ("port", ""), ("port", 70000), ("port", 6379.5), ("port", None), ("port", "1e3"), ("db", -1), ("db", True)],
)
def test_redis_port_and_db_must_be_whole_numbers(key: str, value: Any) -> None:
    """A Redis ``port`` or ``db`` redis-py would refuse at every command
    (``port = "${REDIS_PORT}"`` with the variable empty, say) is refused
    when the settings load, naming it, rather than taken for an outage at
    every query (found by review)."""
    with pytest.raises(ConfigurationError, match=f"region 'r', setting 'arguments.{key}'.*whole number"):
        load_settings({"regions": {"r": {"backend": "redis", "arguments": {"host": "127.0.0.1", key: value}}}})


def test_redis_port_and_db_from_strings_are_numbers() -> None:
    spec = load_settings(
        {"regions": {"r": {"backend": "redis", "arguments": {"host": "127.0.0.1", "port": "6380", "db": "2"}}}}
    ).regions["r"]
    assert spec.arguments["port"] == 6380 and spec.arguments["db"] == 2


def test_common_mistakes_are_named() -> None:
    """Mistakes a new user makes get an error that says what to do
    (found by a docs walkthrough)."""
    from sqlalchemy.exc import ArgumentError

    from ormcache import OrmCache, RelationshipCache
    from ormcache.testing.fixtures import Store

    with pytest.raises(ConfigurationError, match=r"whole TOML document: pass its \[ormcache\] table"):
        load_settings({"ormcache": regions(r={"backend": "memory"})})
    with pytest.raises(ConfigurationError, match="setting 'regions': must map region names to their settings, not list"):
        load_settings({"regions": [{"backend": "memory"}]})
    with pytest.raises(ConfigurationError, match=r"goes to OrmCache\(settings\)"):
        OrmCache.from_settings(load_settings(regions(r={"backend": "memory"})))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="region 'd', setting 'arguments': .* needs the argument 'filename'"):
        OrmCache.from_settings(regions(d={"backend": "dbm"}))
    for arguments in ({}, {"sentinels": []}):
        with pytest.raises(ConfigurationError, match="region 's', setting 'arguments': .* needs the argument 'sentinels'"):
            OrmCache.from_settings(regions(s={"backend": "redis_sentinel", "arguments": arguments}))
    with pytest.raises(ArgumentError, match="relationship first, then the region"):
        RelationshipCache("default", Store.templates)


@pytest.mark.parametrize(
    "sentinels",
    [[["127.0.0.1", "abc"]], [["127.0.0.1", 70000]], ["127.0.0.1:x"], [["127.0.0.1"]], [["", 26379]], "127.0.0.1", 26379],
)
def test_sentinels_must_be_host_port_pairs(sentinels: Any) -> None:
    # (each made every command fail: the cache silently off for good)
    with pytest.raises(ConfigurationError, match=r"region 's', setting 'arguments.sentinels': must be a list of \[host, port\] pairs"):
        load_settings(regions(s={"backend": "redis_sentinel", "arguments": {"sentinels": sentinels}}))


def test_sentinel_ports_given_as_strings_are_numbers() -> None:
    settings = load_settings(
        regions(s={"backend": "redis_sentinel", "arguments": {"sentinels": [["10.0.0.1", "26379"], ("10.0.0.2", 26380)]}})
    )
    assert settings.regions["s"].arguments["sentinels"] == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    # "host:port" strings, also several in one (an INI file's, ${NAME})
    for given in ("10.0.0.1:26379, [::1]:26380", ["10.0.0.1:26379", "[::1]:26380"]):
        settings = load_settings(regions(s={"backend": "redis_sentinel", "arguments": {"sentinels": given}}))
        assert settings.regions["s"].arguments["sentinels"] == [("10.0.0.1", 26379), ("::1", 26380)]


@pytest.mark.parametrize(
    ("arguments", "key", "db"),
    [({"url": "redis://127.0.0.1:7000", "db": 2}, "arguments.db", "2"), ({"url": "redis://127.0.0.1:7000/3"}, "arguments.url", "3")],
)
def test_redis_cluster_has_database_zero_only(arguments: dict[str, Any], key: str, db: str) -> None:
    # (dogpile ignored ``db``: the keys went to database 0 unsaid; redis-py
    # refused a URL's at every command)
    with pytest.raises(ConfigurationError, match=f"region 'c', setting '{key}': a Redis Cluster has database 0 only, not {db}"):
        load_settings(regions(c={"backend": "redis_cluster", "arguments": arguments}))
    for fine in ({"url": "redis://127.0.0.1:7000/0"}, {"url": "redis://127.0.0.1:7000", "db": "0"}):
        load_settings(regions(c={"backend": "redis_cluster", "arguments": fine}))


@pytest.mark.parametrize(
    ("backend", "arguments", "key"),
    [
        ("memcached", {"url": "127.0.0.1:11211", "behaviors": "tcp_nodelay"}, "arguments.behaviors"),
        ("redis_cluster", {"url": "redis://127.0.0.1:7000", "connection_kwargs": "x"}, "arguments.connection_kwargs"),
        ("redis_sentinel", {"sentinels": [["127.0.0.1", 26379]], "sentinel_kwargs": ["x"]}, "arguments.sentinel_kwargs"),
    ],
)
def test_backend_arguments_that_are_mappings(backend: str, arguments: dict[str, Any], key: str) -> None:
    # (merged with ormcache's defaults: a TypeError traceback, not an error naming them)
    with pytest.raises(ConfigurationError, match=f"region 'r', setting '{key}': must be a mapping"):
        load_settings(regions(r={"backend": backend, "arguments": arguments}))


def test_backend_flags_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # (a "${NAME}" or quoted value stayed a string: "false" turned the
    # distributed lock on; "true" made every pylibmc call fail)
    from ormcache import OrmCache

    monkeypatch.setenv("LOCK", "false")
    monkeypatch.setenv("BINARY", "true")
    settings = load_settings(
        regions(
            r={"backend": "redis", "arguments": {"url": "redis://127.0.0.1:1/0", "distributed_lock": "${LOCK}"}},
            m={"backend": "memcached", "arguments": {"url": "127.0.0.1:1", "binary": "${BINARY}"}},
        )
    )
    assert settings.regions["r"].arguments["distributed_lock"] is False
    assert settings.regions["m"].arguments["binary"] is True
    cache = OrmCache(settings)
    assert cache._stores["r"].region.backend.distributed_lock is False
    cache.close()
    with pytest.raises(ConfigurationError, match="region 'r', setting 'arguments.thread_local_lock': must be true or false, not 'maybe'"):
        load_settings(regions(r={"backend": "redis", "arguments": {"thread_local_lock": "maybe"}}))
    # 1 and 0 (dogpile's INI coercion makes numbers of them), None for a mapping
    flat = settings_from_config(
        {"ormcache.r.backend": "redis", "ormcache.r.arguments.distributed_lock": "0"},
        "ormcache.",
    )
    assert flat.regions["r"].arguments["distributed_lock"] is False
    given = load_settings(
        regions(
            r={"backend": "redis", "arguments": {"distributed_lock": 1, "connection_kwargs": None}},
            m={"backend": "memcached", "arguments": {"binary": 0, "behaviors": None}},
        )
    )
    assert given.regions["r"].arguments == {"distributed_lock": True}
    assert given.regions["m"].arguments == {"binary": False}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"url": "nope"}, r"setting 'arguments': .* ValueError: Redis URL must specify one of the following schemes"),
        ({"url": "http://127.0.0.1:7000"}, r"setting 'arguments': .* ValueError: Redis URL must specify"),
        ({}, r"setting 'arguments': .* needs the argument 'url'"),
    ],
)
def test_a_redis_cluster_address_is_checked_when_the_region_is_made(arguments: dict[str, Any], message: str) -> None:
    # (its client is made on first use: a bad address was an outage for good,
    # where dogpile's own backend refuses it at once)
    from ormcache import OrmCache

    with pytest.raises(ConfigurationError, match=f"region 'c', {message}"):
        OrmCache.from_settings(regions(c={"backend": "redis_cluster", "arguments": arguments}))
