pytest_plugins = ["servers", "redis_topologies"]
