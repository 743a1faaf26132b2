"""Settings: which cache regions exist and how to build them.

ormcache reads its settings from one of three places, and all three give
the same immutable :class:`Settings`:

* a mapping, passed to :func:`load_settings`::

      settings = load_settings(
          {
              "regions": {
                  "default": {"backend": "memory", "expiration_time": 300},
                  "shared": {
                      "backend": "redis",
                      "arguments": {"url": "redis://:${REDIS_PASSWORD}@cache:6379/0"},
                  },
              },
              "cache_all": "default",
              "uncached_tables": ["audit_log"],
          }
      )

* a TOML file, passed to :func:`load_settings` as a path; the settings live
  in its ``[ormcache]`` table::

      [ormcache]
      cache_all = "default"

      [ormcache.regions.default]
      backend = "memory"
      expiration_time = 300

* the flat, prefixed dictionary an INI file gives, passed to
  :func:`settings_from_config`; it is read the way dogpile.cache's
  :meth:`~dogpile.cache.region.CacheRegion.configure_from_config` reads it,
  one region per name::

      ormcache.default.backend = memory
      ormcache.default.expiration_time = 300
      ormcache.shared.backend = redis
      ormcache.shared.arguments.url = redis://cache:6379/0
      ormcache.cache_all = default

A region names a dogpile backend, either by its full registered name
(``"dogpile.cache.redis"``) or by one of the :data:`SHORT_BACKEND_NAMES`
(``"redis"``), an optional ``expiration_time`` in seconds and optional
``arguments`` for the backend. Any string value may refer to an environment
variable as ``${NAME}``, alone or inside a longer string; ``$${`` stands for
a literal ``${``. Values taken from the environment stay strings, except an
``expiration_time``, which is read as a number.

Settings are only parsed here; :func:`make_region` turns one
:class:`RegionSettings` into a configured dogpile
:class:`~dogpile.cache.region.CacheRegion`. Backend drivers (redis,
pylibmc) are imported then and not before, and no connection is opened
until the region is first used.

Every mistake raises :class:`~ormcache.exc.ConfigurationError`, whose
``region`` and ``key`` attributes name what is at fault.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from dogpile.cache import make_region as _dogpile_make_region
from dogpile.cache import register_backend as _dogpile_register_backend
from dogpile.cache.backends import _backend_loader
from dogpile.cache.exception import PluginNotFound
from dogpile.cache.region import CacheRegion
from dogpile.util import coerce_string_conf

from .exc import ConfigurationError
from .exc import UnknownRegionError

# ormcache's fixed backends (``ormcache.backends``): registered by name only,
# nothing is imported until a region uses one
_dogpile_register_backend("ormcache.redis_cluster", "ormcache.backends", "RedisClusterBackend")
_dogpile_register_backend("ormcache.redis_sentinel", "ormcache.backends", "RedisSentinelBackend")

__all__ = [
    "RegionSettings",
    "SHORT_BACKEND_NAMES",
    "Settings",
    "load_settings",
    "make_region",
    "settings_from_config",
]

SHORT_BACKEND_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "memory": "dogpile.cache.memory",
        "memory_pickle": "dogpile.cache.memory_pickle",
        "dbm": "dogpile.cache.dbm",
        "redis": "dogpile.cache.redis",
        "redis_sentinel": "ormcache.redis_sentinel",
        "redis_cluster": "ormcache.redis_cluster",
        "memcached": "dogpile.cache.pylibmc",
        "null": "dogpile.cache.null",
    }
)
"""Short backend names accepted in settings, and the dogpile backend each
stands for."""

_TOP_LEVEL_KEYS = ("cache_all", "namespace", "regions", "signing_key", "uncached_tables")
_REGION_KEYS = (
    "arguments",
    "backend",
    "backend_timeout",
    "expiration_time",
    "l1",
    "reply_poll",
    "stale_while_revalidate",
)
#: seconds a query waits for a network backend before it answers from the
#: database.  Issue 6 allows 5 ms added per query while a backend hangs:
#: redis-py adds about 1 ms to a socket timeout (reconnecting, cleaning up),
#: and opening the circuit some more (python -m bench.degraded)
DEFAULT_BACKEND_TIMEOUT = 0.003
#: seconds a command on a ``redis`` region's kept connections polls its
#: socket for the reply before it sleeps in the kernel (see guide.md)
DEFAULT_REPLY_POLL = 0.0001
#: the most ``reply_poll`` may be: polling longer than this is spinning
_MAX_REPLY_POLL = 0.01
_SEQUENCES = (list, tuple, set, frozenset)  # copied; subclasses are not
#: printable ASCII, no whitespace, no ":" (the separator of the keys it
#: prefixes: namespace "app:s" would share keys and key patterns with
#: namespace "app") nor the characters of Redis key patterns
_NAMESPACE = re.compile(r"[!-~]{1,32}")
_NAMESPACE_REFUSED = frozenset(':*?[]\\')
# "$${" (a literal "${"), "${NAME}", or a malformed "${"
_ENV_REFERENCE = re.compile(r"\$\$\{|\$\{(?P<name>[A-Za-z_]\w*)\}|\$\{", re.ASCII)


@dataclass(frozen=True)
class RegionSettings:
    """One cache region: a dogpile backend and how to configure it.

    ``arguments`` is copied into a read-only mapping, so neither the caller
    nor a backend can change it later:

        >>> spec = RegionSettings("default", "dogpile.cache.memory", 300, {})
        >>> make_region(spec).expiration_time
        300
    """

    name: str
    backend: str
    """Full dogpile backend name, e.g. ``"dogpile.cache.redis"``."""
    expiration_time: float | None
    """Seconds before a value is regenerated; ``None`` never expires."""
    arguments: Mapping[str, Any] = field(default_factory=dict)
    """Passed to the backend's constructor."""
    # (the settings below are keyword-only: positional use would swap them)
    l1_max_entries: int | None = field(default=None, kw_only=True)
    """An in-process first tier of at most this many entries in front of a
    shared backend (``l1 = {max_entries = 10000}``); ``None``: no L1."""
    l1_max_bytes: int | None = field(default=None, kw_only=True)
    """And at most about this many bytes of results (``max_bytes``)."""
    stale_while_revalidate: bool = field(default=False, kw_only=True)
    """Serve an *expired* entry (never an invalidated one) while another
    thread or process refreshes it, instead of waiting for it."""
    l1_mode: str = field(default="validated", kw_only=True)
    """``"validated"``: an L1 hit checks its version tokens in the backend;
    ``"relaxed"`` (Redis only): against tokens received over pub/sub."""
    backend_timeout: float | None = field(default=DEFAULT_BACKEND_TIMEOUT, kw_only=True)
    """Seconds to wait for a Redis or memcached server before giving up on
    it (socket and connect timeouts; arguments that set them win);
    ``None`` (``false`` in settings): the driver's own defaults."""
    reply_poll: float | None = field(default=None, kw_only=True)
    """``redis`` regions: seconds a command polls its socket for the reply
    before it sleeps in the kernel; 0 (``false`` in settings): never poll;
    ``None``: the default, :data:`DEFAULT_REPLY_POLL`.  Regions on one
    connection pool share its reads' connections: the last set wins."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "arguments", MappingProxyType(_copy(self.arguments)))
        if self.reply_poll is not None:
            object.__setattr__(self, "reply_poll", _reply_poll(self.name, self.reply_poll))


@dataclass(frozen=True)
class Settings:
    """Validated ormcache settings; build them with :func:`load_settings`.

    >>> settings = load_settings({"regions": {"default": {"backend": "memory"}}})
    >>> settings.region("default").backend
    'dogpile.cache.memory'
    >>> settings.namespace
    'ormcache'
    """

    regions: Mapping[str, RegionSettings]
    """Declared regions by name, in declaration order."""
    cache_all: str | None = None
    """Region that "cache everything" mode uses; ``None`` turns it off."""
    uncached_tables: frozenset[str] = frozenset()
    """Tables whose rows are never cached."""
    namespace: str = "ormcache"
    """Prefix of every cache key."""
    signing_key: str | None = field(default=None, repr=False)
    """Secret that signs what ormcache stores in shared backends (HMAC);
    ``None``: ``$ORMCACHE_SIGNING_KEY``, else unsigned."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", MappingProxyType(dict(self.regions)))
        object.__setattr__(self, "uncached_tables", frozenset(self.uncached_tables))
        if self.cache_all is not None and self.cache_all not in self.regions:
            declared = ", ".join(repr(name) for name in self.regions) or "none"
            raise ConfigurationError(
                "names a region that is not declared; declare it under "
                f"regions or name a declared one: {declared}",
                region=self.cache_all,
                key="cache_all",
            )
        if (
            not isinstance(self.namespace, str)
            or not _NAMESPACE.fullmatch(self.namespace)
            or not _NAMESPACE_REFUSED.isdisjoint(self.namespace)
        ):
            raise ConfigurationError(
                f"{self.namespace!r} cannot prefix cache keys; use 1 to 32 "
                "ASCII characters without whitespace, ':', '*', '?', '[', ']' "
                "or '\\', e.g. 'myapp'",
                key="namespace",
            )

    def region(self, name: str) -> RegionSettings:
        """Return the settings of region ``name``.

        Raises :class:`~ormcache.exc.UnknownRegionError`, also a
        :class:`KeyError`, when no such region is declared.
        """
        try:
            return self.regions[name]
        except KeyError:
            raise UnknownRegionError(name, self.regions) from None


def load_settings(source: Mapping[str, Any] | str | os.PathLike[str]) -> Settings:
    """Validate settings given as a mapping, or read from a TOML file.

    A path names a TOML file whose ``[ormcache]`` table holds the settings.
    The mapping is never modified:

        >>> settings = load_settings({"regions": {"r": {"backend": "null"}}})
        >>> settings.region("r").backend
        'dogpile.cache.null'
    """
    if isinstance(source, (str, os.PathLike)):
        return _parse(_read_toml(source))
    if isinstance(source, Mapping):
        return _parse(source)
    hint = "; a Settings object goes to OrmCache(settings) itself" if isinstance(source, Settings) else ""
    raise ConfigurationError(
        f"cannot read settings from {type(source).__name__}; pass a mapping "
        "or the path of a TOML file" + hint
    )


def settings_from_config(
    config: Mapping[str, Any], prefix: str = "ormcache."
) -> Settings:
    """Validate settings given as a flat, prefixed INI-style dictionary.

    Keys are ``<prefix><region>.backend``, ``<prefix><region>.expiration_time``,
    ``<prefix><region>.backend_timeout``, ``<prefix><region>.reply_poll``,
    ``<prefix><region>.stale_while_revalidate``, ``<prefix><region>.l1.<name>``
    and ``<prefix><region>.arguments.<name>``, plus ``<prefix>cache_all``,
    ``<prefix>namespace``, ``<prefix>signing_key`` and
    ``<prefix>uncached_tables`` (comma-separated).
    Argument values are coerced the way dogpile's ``configure_from_config``
    coerces them (``"10"`` to ``10``, ``"true"`` to ``True``); keys without
    the prefix are ignored:

        >>> settings = settings_from_config(
        ...     {
        ...         "ormcache.local.backend": "memory",
        ...         "ormcache.local.expiration_time": "60",
        ...         "ormcache.uncached_tables": "audit_log, sessions",
        ...         "sqlalchemy.url": "sqlite://",
        ...     }
        ... )
        >>> settings.region("local").expiration_time, sorted(settings.uncached_tables)
        (60, ['audit_log', 'sessions'])
    """
    if not isinstance(config, Mapping):
        raise ConfigurationError(
            f"settings_from_config() takes a mapping of prefixed keys "
            f"({prefix!r}...), not {type(config).__name__}"
        )
    if not isinstance(prefix, str):
        raise ConfigurationError(f"the prefix of settings keys must be a string, not {prefix!r}")
    tree: dict[str, Any] = {}
    regions: dict[str, dict[str, Any]] = {}
    for flat_key, value in config.items():
        if not isinstance(flat_key, str) or not flat_key.startswith(prefix):
            continue
        rest = flat_key[len(prefix) :]
        if rest[:1] == "." and prefix and prefix[-1] != ".":
            raise ConfigurationError(
                f"setting {flat_key!r}: the prefix is {prefix!r}, without the dot that "
                f"follows it in the keys; pass prefix={prefix + '.'!r}",
                key=flat_key,
            )
        if rest in ("cache_all", "namespace", "signing_key"):
            tree[rest] = value
            continue
        if rest == "uncached_tables":
            if isinstance(value, str):
                value = [t.strip() for t in value.split(",") if t.strip()]
            tree[rest] = value
            continue
        region, _, setting = rest.partition(".")
        spec = regions.setdefault(region, {}) if region else {}
        if region and setting in (
            "backend",
            "expiration_time",
            "backend_timeout",
            "reply_poll",
            "stale_while_revalidate",
        ):
            spec[setting] = value
        elif region and setting.startswith("arguments.") and setting != "arguments.":
            spec.setdefault("arguments", {})[setting[len("arguments.") :]] = value
        elif region and setting.startswith("l1.") and setting != "l1.":
            spec.setdefault("l1", {})[setting[len("l1.") :]] = value
        else:
            raise ConfigurationError(
                f"unknown setting; use {prefix}<region>.backend, "
                f"{prefix}<region>.expiration_time, "
                f"{prefix}<region>.backend_timeout, "
                f"{prefix}<region>.reply_poll, "
                f"{prefix}<region>.stale_while_revalidate, "
                f"{prefix}<region>.l1.<name>, "
                f"{prefix}<region>.arguments.<name>, {prefix}cache_all, "
                f"{prefix}namespace, {prefix}signing_key or {prefix}uncached_tables",
                region=region or None,
                key=flat_key,
            )
    tree["regions"] = {
        name: {
            **coerce_string_conf(spec),
            "arguments": coerce_string_conf(spec.get("arguments", {})),
            **({"l1": coerce_string_conf(spec["l1"])} if "l1" in spec else {}),
        }
        for name, spec in regions.items()
    }
    return _parse(tree)


def make_region(
    spec: RegionSettings,
    serializer: Any = None,
    deserializer: Any = None,
) -> CacheRegion:
    """Build a configured dogpile region from ``spec``.

    Backend drivers are imported here; no server is contacted until the
    region is used. Whatever dogpile or the backend raises is re-raised as
    :class:`~ormcache.exc.ConfigurationError`, the original as its cause:

        >>> region = make_region(RegionSettings("local", "dogpile.cache.memory", None))
        >>> region.get_or_create("answer", lambda: 42)
        42
    """
    arguments = _ReadArguments(_copy(spec.arguments))
    try:
        region = _dogpile_make_region(
            name=spec.name, serializer=serializer, deserializer=deserializer
        ).configure(
            spec.backend,
            expiration_time=spec.expiration_time,
            arguments=arguments,
        )
    except PluginNotFound as err:
        full = SHORT_BACKEND_NAMES.get(spec.backend) if isinstance(spec.backend, str) else None
        if full is not None:
            # a RegionSettings made by hand: short names are load_settings()'s
            raise ConfigurationError(
                f"backend {spec.backend!r} is a short name, which load_settings() "
                f"(OrmCache.from_settings()) translates; a RegionSettings made "
                f"directly takes dogpile's name, {full!r}",
                region=spec.name,
                key="backend",
            ) from err
        raise ConfigurationError(
            f"dogpile.cache has no backend {spec.backend!r}; use one of "
            f"{_short_names()} or a registered dogpile backend name",
            region=spec.name,
            key="backend",
        ) from err
    except ImportError as err:
        raise ConfigurationError(
            f"backend {spec.backend!r} needs a driver that is not installed "
            f"({err}); install it, e.g. pip install 'ormcache[redis]' or "
            "'ormcache[memcached]'",
            region=spec.name,
            key="backend",
        ) from err
    except Exception as err:
        if type(err) is KeyError and len(err.args) == 1 and isinstance(err.args[0], str):
            # (dogpile's backends read a required argument with arguments[name])
            raise ConfigurationError(
                f"backend {spec.backend!r} needs the argument {err.args[0]!r}",
                region=spec.name,
                key="arguments",
            ) from err
        raise ConfigurationError(
            f"backend {spec.backend!r} rejected its arguments: "
            f"{type(err).__name__}: {err}; fix the region's arguments",
            region=spec.name,
            key="arguments",
        ) from err
    if spec.backend == "dogpile.cache.pylibmc":
        _check_memcached_servers(spec.name, getattr(region.backend, "url", None))
    if spec.backend.startswith(("dogpile.cache.", "ormcache.")) and not arguments.read_all:
        # dogpile's and ormcache's backends read their arguments when they
        # are built: a name none of them read is a typo ("hots") that would
        # otherwise pass unnoticed
        unknown = sorted(set(spec.arguments) - arguments.read)
        if unknown:
            raise ConfigurationError(
                f"backend {spec.backend!r} does not take the argument(s) "
                f"{', '.join(repr(k) for k in unknown)} (misspelt?); see its "
                "documentation for the arguments it takes",
                region=spec.name,
                key="arguments",
            )
    return region


def _check_memcached_servers(region: str, servers: Any) -> None:
    """pylibmc reads its server addresses when it first makes a client, at
    the region's first use: a bad one ("127.0.0.1:11211x") would then only
    show as a failing backend.  Read them now, as pylibmc will."""
    try:
        from pylibmc.client import translate_server_spec
    except ImportError:  # (an older pylibmc: it will say so itself)
        return
    for server in servers or ():
        if isinstance(server, tuple) and len(server) == 3:
            continue  # pylibmc's own (type, address, port), taken as it is
        try:
            if not isinstance(server, str):
                raise TypeError(f"not a string but {type(server).__name__}")
            translate_server_spec(server)
        except Exception as err:
            raise ConfigurationError(
                f"memcached server address {server!r} cannot be read ({err}); "
                "write it as 'host', 'host:port', 'host:port:weight', '[ipv6]:port', "
                "'udp:host:port' or a socket path",
                region=region,
                key="arguments.url",
            ) from err


class _ReadArguments(dict):  # type: ignore[type-arg]
    """Arguments handed to a dogpile backend, remembering the names it
    reads (``read``), or that it read them all (``read_all``: it iterated
    them, so nothing can be told)."""

    def __init__(self, data: Mapping[str, Any], owner: _ReadArguments | None = None) -> None:
        super().__init__(dict.items(data) if isinstance(data, dict) else data)
        self._owner = owner if owner is not None else self
        if owner is None:
            self.read: set[str] = set()
            self.read_all = False

    def _mark(self, key: Any) -> None:
        self._owner.read.add(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._mark(key)
        return super().get(key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        self._mark(key)
        return super().pop(key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._mark(key)
        return super().setdefault(key, default)

    def __getitem__(self, key: Any) -> Any:
        self._mark(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self._mark(key)
        return super().__contains__(key)

    def copy(self) -> _ReadArguments:
        return _ReadArguments(self, self._owner)

    def _everything(self) -> None:
        self._owner.read_all = True

    def __iter__(self) -> Any:
        self._everything()
        return super().__iter__()

    def keys(self) -> Any:
        self._everything()
        return super().keys()

    def items(self) -> Any:
        self._everything()
        return super().items()

    def values(self) -> Any:
        self._everything()
        return super().values()


def _read_toml(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as err:
        raise ConfigurationError(
            f"cannot read settings file {os.fspath(path)!r}: "
            f"{err.strerror or err}; check the path"
        ) from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigurationError(
            f"settings file {os.fspath(path)!r} is not valid TOML (UTF-8): {err}"
        ) from err
    table = document.get("ormcache")
    if not isinstance(table, dict):
        raise ConfigurationError(
            f"settings file {os.fspath(path)!r} has no [ormcache] table; "
            "put the settings under [ormcache] and the regions under "
            "[ormcache.regions.<name>]"
        )
    return table


def _parse(tree: Mapping[str, Any]) -> Settings:
    unknown = [key for key in tree if key not in _TOP_LEVEL_KEYS]
    if unknown:
        hint = (
            "; this looks like a whole TOML document: pass its [ormcache] table (or the file's path)"
            if unknown == ["ormcache"] and isinstance(tree["ormcache"], Mapping)
            else ""
        )
        raise ConfigurationError(
            f"unknown setting; accepted settings are {', '.join(_TOP_LEVEL_KEYS)}{hint}",
            key=str(unknown[0]),
        )
    regions = tree.get("regions")
    if regions is not None and not isinstance(regions, Mapping):
        raise ConfigurationError(
            f"must map region names to their settings, not {type(regions).__name__}, e.g. "
            "{'regions': {'default': {'backend': 'memory'}}}",
            key="regions",
        )
    if not regions:
        raise ConfigurationError(
            "declare at least one region, e.g. "
            "{'regions': {'default': {'backend': 'memory'}}}",
            key="regions",
        )
    parsed = {}
    for name, spec in regions.items():
        if not isinstance(name, str) or not name or not name.isprintable():
            raise ConfigurationError(
                f"region names must be non-empty strings of printable characters, not {name!r}",
                key="regions",
            )
        parsed[name] = _region_settings(name, spec)

    cache_all = _interpolate(tree.get("cache_all"), None, "cache_all")
    if cache_all is not None and not isinstance(cache_all, str):
        raise ConfigurationError(
            f"must be a region name, not {cache_all!r}", key="cache_all"
        )
    tables = _interpolate(tree.get("uncached_tables", ()), None, "uncached_tables")
    if not isinstance(tables, (list, tuple, set, frozenset)) or not all(
        isinstance(table, str) and table.strip() for table in tables
    ):
        raise ConfigurationError(
            f"must be a list of table names, e.g. ['audit_log'], not {tables!r}",
            key="uncached_tables",
        )
    tables = [table.strip() for table in tables]
    quoted = [t for t in tables if set(t) & set("\"`[]")]
    if quoted:
        raise ConfigurationError(
            f"takes table names as they are, without quotes: {quoted[0]!r}",
            key="uncached_tables",
        )
    namespace = _interpolate(tree.get("namespace", "ormcache"), None, "namespace")
    signing_key = _interpolate(tree.get("signing_key"), None, "signing_key")
    if signing_key is not None and (not isinstance(signing_key, str) or len(signing_key.strip()) < 16):
        raise ConfigurationError(
            "must be a secret string of at least 16 characters, e.g. "
            "'${ORMCACHE_SIGNING_KEY}'",
            key="signing_key",
        )
    return Settings(parsed, cache_all, frozenset(tables), namespace, signing_key)


def _region_settings(name: str, spec: Any) -> RegionSettings:
    if not isinstance(spec, Mapping):
        raise ConfigurationError(
            f"must be a mapping with at least a 'backend' key, not "
            f"{type(spec).__name__}",
            region=name,
        )
    for key in spec:
        if key not in _REGION_KEYS:
            raise ConfigurationError(
                f"unknown region setting; accepted are {', '.join(_REGION_KEYS)}",
                region=name,
                key=str(key),
            )
    if "backend" not in spec:
        raise ConfigurationError(
            f"is required; name a dogpile backend, e.g. one of {_short_names()}",
            region=name,
            key="backend",
        )
    arguments = _interpolate(spec.get("arguments", {}), name, "arguments")
    if not isinstance(arguments, Mapping):
        raise ConfigurationError(
            f"must be a mapping of backend arguments, not {arguments!r}",
            region=name,
            key="arguments",
        )
    arguments = _server_ttls(name, arguments)
    backend = _backend(name, _interpolate(spec["backend"], name, "backend"))
    arguments = _backend_arguments(name, backend, _redis_numbers(name, backend, arguments))
    if (
        backend in _NO_SERVER
        and "backend_timeout" in spec
        and _timeout(name, _interpolate(spec["backend_timeout"], name, "backend_timeout")) is not None
    ):
        raise ConfigurationError(
            f"applies to regions on a server (Redis, memcached); {backend!r} has "
            "none to wait for",
            region=name,
            key="backend_timeout",
        )
    reply_poll = None
    if spec.get("reply_poll") is not None:
        reply_poll = _reply_poll(name, _interpolate(spec["reply_poll"], name, "reply_poll"))
        if backend != "dogpile.cache.redis" and reply_poll > 0:
            raise ConfigurationError(
                "applies to redis regions (their reads on kept connections); "
                f"{backend!r} does not poll",
                region=name,
                key="reply_poll",
            )
    return RegionSettings(
        name=name,
        backend=backend,
        expiration_time=_expiration_time(
            name, _interpolate(spec.get("expiration_time"), name, "expiration_time")
        ),
        arguments=arguments,
        **_l1(name, _interpolate(spec.get("l1"), name, "l1")),
        stale_while_revalidate=_flag(
            name,
            "stale_while_revalidate",
            _interpolate(spec.get("stale_while_revalidate", False), name, "stale_while_revalidate"),
        ),
        backend_timeout=_timeout(
            name,
            _interpolate(spec["backend_timeout"], name, "backend_timeout")
            if "backend_timeout" in spec
            else _default_timeout(name),
        ),
        reply_poll=reply_poll,
    )


#: the backends' own time-to-live arguments, and their largest value
#: (memcached reads more than 30 days as a date: the item would expire at once)
_SERVER_TTLS = {"redis_expiration_time": 10**12, "memcached_expire_time": 30 * 24 * 3600}


def _server_ttls(region: str, arguments: Mapping[str, Any]) -> Mapping[str, Any]:
    """``arguments`` with the server TTLs checked, and given as whole
    seconds (a numeric string from an INI file or ``${NAME}``, a whole
    float, a ``timedelta``): the server refuses anything else on every
    write (Redis's ``SET EX``), or drops the item (memcached)."""
    found = {k: v for k, v in arguments.items() if k in _SERVER_TTLS and v is not None}
    if not found:
        return arguments
    checked = dict(arguments)
    for key, value in found.items():
        seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else _number(value)
        limit = _SERVER_TTLS[key]
        whole = _whole(value, seconds, 0, limit)
        if whole is None:
            if key == "memcached_expire_time":
                most = f"to {limit:,} (30 days; memcached reads more as a date)"
            else:
                most = f"to {limit:,}"
            raise ConfigurationError(
                f"must be a whole number of seconds, 0 (no expiry) {most}, not {value!r}",
                region=region,
                key=f"arguments.{key}",
            )
        checked[key] = whole
    return checked


def _whole(value: Any, number: float | None, low: int, high: int) -> int | None:
    """``number`` (what ``value`` reads as) as an ``int`` when it is a
    whole number from ``low`` to ``high`` and ``value`` no bool; else None."""
    if isinstance(value, bool) or number is None or number != int(number) or not low <= number <= high:
        return None
    return int(number)


#: whole-number arguments of the Redis backends (redis-py refuses anything
#: else at every command, which would look like an outage), and their range
_REDIS_NUMBERS = {"port": (1, 65535), "db": (0, 2**31 - 1)}
_REDIS_BACKENDS = frozenset({"dogpile.cache.redis", "ormcache.redis_sentinel", "ormcache.redis_cluster"})


def _redis_numbers(region: str, backend: str, arguments: Mapping[str, Any]) -> Mapping[str, Any]:
    """``arguments`` of a Redis region with ``port`` and ``db`` checked and
    given as ``int`` (a numeric string from an INI file or ``${NAME}`` is
    one); an error naming the argument otherwise."""
    if backend not in _REDIS_BACKENDS:
        return arguments
    checked = dict(arguments)
    for key, (low, high) in _REDIS_NUMBERS.items():
        if key not in arguments:
            continue
        value = arguments[key]  # (None too: redis-py refuses it at every command)
        digits = not isinstance(value, str) or (value.strip().isascii() and value.strip().isdigit())
        whole = _whole(value, _number(value), low, high) if digits else None  # (not "1e3", "６")
        if whole is None:
            raise ConfigurationError(
                f"must be a whole number from {low} to {high:,}, not {value!r}",
                region=region,
                key=f"arguments.{key}",
            )
        checked[key] = whole
    if backend == "ormcache.redis_sentinel" and "sentinels" in arguments:
        checked["sentinels"] = _sentinels(region, arguments["sentinels"])
    if backend == "ormcache.redis_cluster":
        db = checked.get("db", 0)
        url = arguments.get("url")
        if isinstance(url, str) and db == 0:
            from urllib.parse import urlsplit

            path = urlsplit(url).path.strip("/")
            db = int(path) if path.isdigit() else 0  # (a bad URL: see _backend_arguments)
        if db != 0:
            raise ConfigurationError(
                f"a Redis Cluster has database 0 only, not {db!r}; applications that "
                "share a cluster tell their keys apart by the 'namespace' setting",
                region=region,
                key="arguments.url" if "db" not in arguments else "arguments.db",
            )
    return checked


#: backend arguments that are flags (dogpile's Redis and memcached
#: backends, pylibmc's protocol): ``"false"`` from ``${NAME}`` or a quoted
#: TOML value was a true string, the opposite of what it says
_BACKEND_FLAGS = ("distributed_lock", "thread_local_lock", "binary")
#: backend arguments that are mappings, merged with ormcache's defaults
_BACKEND_MAPPINGS = ("behaviors", "connection_kwargs", "sentinel_kwargs")


def _backend_arguments(region: str, backend: str, arguments: Mapping[str, Any]) -> Mapping[str, Any]:
    """``arguments`` with flags as ``bool`` (true/false spellings, as for
    ormcache's own flags) and mappings checked to be mappings."""
    checked = dict(arguments)
    for key in _BACKEND_FLAGS:
        if key in arguments:
            checked[key] = _flag(region, f"arguments.{key}", arguments[key])
    for key in _BACKEND_MAPPINGS:
        if key in arguments and arguments[key] is None:
            del checked[key]  # (None: the backend's default, as dogpile takes it)
        elif key in arguments and not isinstance(arguments[key], Mapping):
            raise ConfigurationError(
                f"must be a mapping of names to values, not {arguments[key]!r}",
                region=region,
                key=f"arguments.{key}",
            )
    return checked


def _whole_port(value: Any) -> int | None:
    digits = not isinstance(value, str) or (value.strip().isascii() and value.strip().isdigit())
    return _whole(value, _number(value), 1, 65535) if digits else None


def _sentinels(region: str, sentinels: Any) -> list[tuple[str, int]]:
    """``sentinels`` as redis-py wants them, ``(host, port)`` pairs, from
    pairs or ``"host:port"`` strings (a string of several, separated by
    commas, as an INI file or ``${NAME}`` gives them); an error naming the
    bad one otherwise (a wrong one made every command fail)."""
    if isinstance(sentinels, str):
        sentinels = [part for part in re.split(r"[,\s]+", sentinels) if part]
    elif not isinstance(sentinels, (list, tuple)):
        sentinels = [sentinels]  # (reported below as not a pair)
    pairs = []
    for item in sentinels:
        pair = item
        if isinstance(item, str):
            host, sep, port_text = item.rpartition(":")
            pair = (host.strip("[]"), port_text) if sep else item
        port = None
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]:
            port = _whole_port(pair[1])
        if port is None:
            raise ConfigurationError(
                f"must be a list of [host, port] pairs (or \"host:port\" strings) with ports "
                f"from 1 to 65535, e.g. [[\"10.0.0.1\", 26379]]; {item!r} is not one",
                region=region,
                key="arguments.sentinels",
            )
        pairs.append((pair[0], port))
    return pairs


#: backends that wait for no server: ``backend_timeout`` means nothing there
_NO_SERVER = frozenset(
    {"dogpile.cache.memory", "dogpile.cache.memory_pickle", "dogpile.cache.null", "dogpile.cache.dbm"}
)


def _default_timeout(region: str) -> float | None:
    """``$ORMCACHE_BACKEND_TIMEOUT``, else :data:`DEFAULT_BACKEND_TIMEOUT`."""
    value = os.environ.get("ORMCACHE_BACKEND_TIMEOUT")
    if value is None:
        return DEFAULT_BACKEND_TIMEOUT
    try:
        return _timeout(region, value)
    except ConfigurationError as err:
        raise ConfigurationError(
            f"$ORMCACHE_BACKEND_TIMEOUT: {err.args[0].split(': ', 1)[-1]}",
            region=region,
            key="backend_timeout",
        ) from None


def _number(value: Any) -> float | None:
    """A finite number of seconds given as a number or a numeric string
    (not a bool), else None."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value):
        return float(value)
    return None


def _timeout(region: str, value: Any) -> float | None:
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.lower() in ("false", "none", "off"):
        return None
    seconds = _number(value)
    if seconds is not None and seconds > 0:
        return seconds
    raise ConfigurationError(
        f"{value!r} is not a timeout; use a number of seconds > 0 (default "
        f"{DEFAULT_BACKEND_TIMEOUT}), or false for the driver's own timeouts",
        region=region,
        key="backend_timeout",
    )


def _reply_poll(region: str, value: Any) -> float:
    if value is False or (isinstance(value, str) and value.lower() in ("false", "off")):
        return 0.0
    seconds = _number(value)
    if seconds is not None and 0 <= seconds <= _MAX_REPLY_POLL:
        return seconds
    raise ConfigurationError(
        f"{value!r} is not a polling time; use seconds from 0 to {_MAX_REPLY_POLL} "
        f"(default {DEFAULT_REPLY_POLL}), or false not to poll",
        region=region,
        key="reply_poll",
    )


def _flag(region: str, key: str, value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        value = value.strip().lower() in ("true", "1", "yes", "on")
    elif type(value) is int and value in (0, 1):  # (dogpile's INI coercion makes "1" one)
        value = bool(value)
    if not isinstance(value, bool):
        raise ConfigurationError(f"must be true or false, not {value!r}", region=region, key=key)
    return value


def _l1(region: str, value: Any) -> dict[str, Any]:
    if value is None or value is False or (
        isinstance(value, str) and value.lower() in ("false", "off", "none", "no")
    ):
        return {}  # no L1
    mode = "validated"
    max_bytes: Any = None
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in ("max_entries", "max_bytes", "mode")]
        if unknown:
            raise ConfigurationError(
                f"unknown L1 setting {unknown[0]!r}; accepted: max_entries, max_bytes, mode",
                region=region,
                key="l1",
            )
        mode = value.get("mode", "validated")
        max_bytes = value.get("max_bytes")
        if isinstance(max_bytes, str) and max_bytes.isdigit():
            max_bytes = int(max_bytes)
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1
        ):
            raise ConfigurationError(
                f"max_bytes must be a whole number >= 1, not {max_bytes!r}",
                region=region,
                key="l1",
            )
        if mode not in ("validated", "relaxed"):
            raise ConfigurationError(
                f"mode must be 'validated' or 'relaxed', not {mode!r}",
                region=region,
                key="l1",
            )
        value = value.get("max_entries")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"must be {{max_entries = N}} with N a whole number >= 1, not {value!r}",
            region=region,
            key="l1",
        )
    return {
        "l1_max_entries": value,
        "l1_mode": mode,
        "l1_max_bytes": max_bytes if isinstance(value, int) else None,
    }


def _backend(region: str, value: Any) -> str:
    if isinstance(value, str) and value in SHORT_BACKEND_NAMES:
        return SHORT_BACKEND_NAMES[value]
    if isinstance(value, str) and _is_registered(value):
        return value
    raise ConfigurationError(
        f"unknown backend {value!r}; use one of {_short_names()} or a backend "
        "name registered with dogpile.cache, e.g. 'dogpile.cache.redis'",
        region=region,
        key="backend",
    )


def _is_registered(name: str) -> bool:
    # dogpile's registry, without importing any backend module; plus
    # third-party backends declared as "dogpile.cache" entry points.
    loader = _backend_loader
    return (
        name in loader._unloaded
        or name in loader.impls
        or any(ep.name == name for ep in entry_points(group=loader.group))
    )


def _finite(number: float) -> bool:
    """``math.isfinite``, also of an int too large for a float (False)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def _expiration_time(region: str, value: Any) -> float | None:
    number: Any = value
    if isinstance(value, datetime.timedelta):
        number = value.total_seconds()
    elif isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                pass
    if number is None or (
        isinstance(number, (int, float))
        and not isinstance(number, bool)
        and _finite(number)
        and number > 0
    ):
        return number
    raise ConfigurationError(
        f"{value!r} is not a number of seconds; use a number > 0, a "
        "timedelta, or leave it out (or None) for values that never expire "
        "(0 would expire every entry at once: nothing would be served)",
        region=region,
        key="expiration_time",
    )


def _interpolate(value: Any, region: str | None, key: str) -> Any:
    """Copy ``value``, replacing ``${NAME}`` in every string it holds."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group("name")
            if match.group() == "$${":
                return "${"
            if name is None:
                raise ConfigurationError(
                    f"malformed environment reference in {value!r}; write "
                    "${NAME}, or $${ for a literal ${",
                    region=region,
                    key=key,
                )
            if name not in os.environ:
                raise ConfigurationError(
                    f"environment variable {name!r} is not set; set it, or "
                    "write $${ for a literal ${",
                    region=region,
                    key=key,
                )
            return os.environ[name]

        return _ENV_REFERENCE.sub(replace, value)
    if isinstance(value, Mapping):
        return {k: _interpolate(v, region, f"{key}.{k}") for k, v in value.items()}
    if type(value) in _SEQUENCES:
        return type(value)(
            _interpolate(v, region, f"{key}[{i}]") for i, v in enumerate(value)
        )
    return value


def _copy(value: Any) -> Any:
    """Copy plain containers all the way down; share any other object."""
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if type(value) in _SEQUENCES:
        return type(value)(_copy(v) for v in value)
    return value


def _short_names() -> str:
    return ", ".join(repr(name) for name in SHORT_BACKEND_NAMES)
