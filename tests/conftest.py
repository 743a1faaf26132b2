import os

pytest_plugins = ["servers", "redis_topologies"]

# Regions wait 5 ms for a server by default (backend_timeout); a loaded CI
# machine's loopback Redis goes silent that long a few times in 10,000
# calls, which would turn a hit the test expects into a miss.  The tests
# that check the default and the fallback set or clear this themselves.
os.environ.setdefault("ORMCACHE_BACKEND_TIMEOUT", "0.25")
