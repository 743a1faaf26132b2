from ormcache.testing.fixtures import BackendTests


class TestMemory(BackendTests):
    backend = "memory"


class TestMemoryPickle(BackendTests):
    backend = "memory_pickle"
