"""Benchmarks for ormcache: ``python -m bench`` from the repository root.

Every scenario runs the uncached query and ormcache on each backend
(memory, Redis, memcached) side by side in one process, interleaved batch
by batch, and reports medians, ratios and PASS/MISS against the targets of
issue 5.  See ``docs/benchmarks.md`` for the method and the latest numbers,
and ``python -m bench --help`` for the options.

This package must not be imported by ormcache itself; it imports ormcache
lazily (``bench.data`` and ``bench.overhead_child`` never do, so that the
"ormcache absent" measurement really runs without it).
"""
