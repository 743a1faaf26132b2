"""Run SQLAlchemy's own ORM tests with ormcache's cache_all on every Session."""
import os

_cache = None


def pytest_configure(config):
    global _cache
    if not os.environ.get("ORMCACHE_HOOK"):
        return
    from sqlalchemy.orm import Session

    from ormcache import OrmCache

    _cache = OrmCache.from_settings(
        {"cache_all": "default", "regions": {"default": {"backend": "memory_pickle"}}}
    )
    _cache.attach(Session)


def pytest_unconfigure(config):
    if _cache is not None:
        print("\normcache stats:", _cache.stats()["regions"])
