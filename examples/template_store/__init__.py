"""The template store of issue 4: QR-card templates in 101 SQLite shards.

The reference deployment keeps its templates in 101 SQLite databases and
finds one by asking the databases in turn.  This package rebuilds that
setup on SQLAlchemy's ``ShardedSession`` and puts ormcache in front of it:

* :mod:`.models`: the schema every shard holds (stores, templates with JSON
  bodies and versions, assets, scan and analytics events);
* :mod:`.shards`: shard files, engines, the ``ShardedSession`` factory and
  :func:`~.shards.schema_revision` for ``cache.use_schema_version``;
* :mod:`.seed`: :func:`~.seed.build_store`, a seeded, deterministic store;
* :mod:`.queries`: resolution by id across shards (the reference scan and
  the cached :class:`~.queries.TemplateResolver`), listings, dashboards,
  writes;
* :mod:`.workload`: the 80/20 request stream and the runner behind
  ``ormcache demo``.

Run the demo with ``python -m examples.template_store`` (the same as
``ormcache demo``); migrate the shards with ``alembic -x data_dir=DIR
upgrade head`` from the repository root.  The walkthrough is
``docs/template-store.md``.
"""
