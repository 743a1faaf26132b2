"""ormcache: query caching for the SQLAlchemy ORM on dogpile.cache.

::

    from ormcache import OrmCache, FromCache, RelationshipCache

    cache = OrmCache.from_settings({"regions": {"default": {"backend": "memory"}}})
    cache.attach(Session)
    session.scalars(select(Template).options(FromCache("default"))).all()
"""

from __future__ import annotations

from .core import OrmCache
from .exc import (
    BackendError,
    CacheKeyError,
    ConfigurationError,
    OrmCacheError,
    UnknownRegionError,
)
from .options import FromCache, RelationshipCache
from .settings import RegionSettings, Settings, load_settings

__all__ = [
    "BackendError",
    "CacheKeyError",
    "ConfigurationError",
    "FromCache",
    "OrmCache",
    "OrmCacheError",
    "RegionSettings",
    "RelationshipCache",
    "Settings",
    "UnknownRegionError",
    "load_settings",
]

__version__ = "0.1.0.dev0"
