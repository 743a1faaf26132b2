"""ormcache.testing's own helpers."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine

from ormcache.testing import QueryCounter


def test_query_counter_counts_reads_however_they_start(tmp_path: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/qc.db")
    reads = ["SELECT 1", "/* a comment */ select 1", "-- a comment\nSELECT 1", "WITH a AS (SELECT 1) SELECT * FROM a"]
    try:
        with QueryCounter(engine) as counter:
            with engine.begin() as conn:
                conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
                for sql in reads:
                    conn.exec_driver_sql(sql)
                conn.exec_driver_sql("INSERT INTO t VALUES (1)")
                with counter:  # nested: counts once, keeps counting
                    conn.exec_driver_sql("SELECT x FROM t")
                conn.exec_driver_sql("SELECT 2")
        assert counter.count == 8 and counter.selects == 6
    finally:
        engine.dispose()
