"""Does a pysqlite connection hold a read snapshot right now?

SQLite keeps a read transaction (a snapshot, in WAL mode) open for as long
as any statement of the connection is active, for example a result that was
only partly fetched, even when ``Connection.in_transaction`` is False.  A
query run then sees that older snapshot, so ormcache must not store its
rows.  The C API tells: ``sqlite3_txn_state`` (SQLite 3.34 and later) in
one call, else by walking the connection's prepared statements
(``sqlite3_next_stmt`` / ``sqlite3_stmt_busy``), which costs a call per
statement in pysqlite's statement cache (up to 128 by default).  The
``sqlite3`` module does not expose either, so this module calls them through
ctypes with the connection's ``sqlite3 *`` handle, which CPython keeps as
the first field after the object header of ``pysqlite_Connection``
(3.11 to 3.14).  The handle is checked against what the module itself
reports before it is trusted (once per connection type: the layout is the
type's); when anything does not fit, :func:`busy` answers None and
ormcache does not fill from that connection.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sqlite3
import sys
import threading
from typing import Any

__all__ = ["busy", "snapshot_free"]

_lib: Any = None
#: ``sqlite3_txn_state``, when the library has it (SQLite 3.34 and later)
_txn_state: Any = None
_loaded = False
_lock = threading.Lock()
_HEAD = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)


def _library() -> Any:
    global _lib, _loaded, _txn_state
    if _loaded:
        return _lib
    with _lock:
        if not _loaded:
            try:
                import _sqlite3

                candidates = [_sqlite3.__file__, ctypes.util.find_library("sqlite3")]
                for name in candidates:
                    if not name:
                        continue
                    try:
                        lib = ctypes.CDLL(name)
                        lib.sqlite3_next_stmt  # noqa: B018 - present?
                        break
                    except (OSError, AttributeError):
                        continue
                else:
                    lib = None
                if lib is not None:
                    lib.sqlite3_next_stmt.restype = ctypes.c_void_p
                    lib.sqlite3_next_stmt.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
                    lib.sqlite3_stmt_busy.restype = ctypes.c_int
                    lib.sqlite3_stmt_busy.argtypes = [ctypes.c_void_p]
                    lib.sqlite3_total_changes.restype = ctypes.c_int
                    lib.sqlite3_total_changes.argtypes = [ctypes.c_void_p]
                    lib.sqlite3_get_autocommit.restype = ctypes.c_int
                    lib.sqlite3_get_autocommit.argtypes = [ctypes.c_void_p]
                    txn_state = getattr(lib, "sqlite3_txn_state", None)
                    if txn_state is not None:
                        txn_state.restype = ctypes.c_int
                        txn_state.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
                        _txn_state = txn_state
                _lib = lib
            except Exception:
                _lib = None
            _loaded = True
    return _lib


#: connection types whose ``sqlite3 *`` was found where :data:`_HEAD` says
_checked_types: set[type] = set()


def _handle(conn: sqlite3.Connection, lib: Any) -> int | None:
    """The connection's ``sqlite3 *`` (None when closed, or when it cannot
    be trusted).  The field is checked against what the module reports
    the first time for each connection type (the layout is the type's);
    after that, reading it (NULL once the connection is closed) is enough."""
    if sys.implementation.name != "cpython" or type(conn).__module__ != "sqlite3":
        if not isinstance(conn, sqlite3.Connection):
            return None
    db = ctypes.c_void_p.from_address(id(conn) + _HEAD).value
    if not db:
        return None
    kind = type(conn)
    if kind in _checked_types:
        return int(db)
    if lib.sqlite3_total_changes(db) != conn.total_changes:
        return None
    if bool(lib.sqlite3_get_autocommit(db)) == conn.in_transaction:
        return None
    _checked_types.add(kind)
    return int(db)


def busy(conn: Any, walk: bool = False) -> bool | None:
    """True if ``conn`` holds a read snapshot (an active statement; with
    ``sqlite3_txn_state``, also a transaction that has read or written),
    False if it does not, None if this cannot be told.  ormcache asks only
    outside transactions.
    ``walk``: look at each prepared statement even when SQLite can say it
    in one call (tests compare the two)."""
    if not isinstance(conn, sqlite3.Connection):
        return None
    lib = _library()
    if lib is None:
        return None
    try:
        db = _handle(conn, lib)
    except Exception:
        return None
    if db is None:
        return None
    if _txn_state is not None and not walk:
        # SQLITE_TXN_NONE (0), else READ or WRITE: a snapshot is held
        return bool(_txn_state(db, None))
    stmt = lib.sqlite3_next_stmt(db, None)
    while stmt:
        if lib.sqlite3_stmt_busy(stmt):
            return True
        stmt = lib.sqlite3_next_stmt(db, stmt)
    return False


#: ``sqlite3_txn_state``'s answer for a transaction that has written
_TXN_WRITE = 2


def writing(conn: Any) -> bool:
    """Whether pysqlite connection ``conn``'s transaction has written: it
    holds the database's write lock, so no other connection can commit
    until it ends, and its snapshot was the latest when it took the lock
    (SQLite refuses the lock to an older one).  False when this cannot be
    told (no ``sqlite3_txn_state``).  Called in the thread that uses
    ``conn``."""
    if not isinstance(conn, sqlite3.Connection) or _library() is None or _txn_state is None:
        return False
    try:
        db = _handle(conn, _library())
    except Exception:
        return False
    return db is not None and _txn_state(db, None) == _TXN_WRITE


def snapshot_free(conn: Any) -> bool:
    """Whether a read on pysqlite connection ``conn`` would now take a new
    snapshot, and so see every transaction committed before it: no
    statement is active and no transaction has read or written.  With
    ``sqlite3_txn_state`` a transaction that has only begun (``BEGIN``,
    deferred: SQLite takes its snapshot at its first read) qualifies;
    without it, only a connection outside any transaction does.  False
    when this cannot be told.  Called in the thread that uses ``conn``."""
    if not isinstance(conn, sqlite3.Connection):
        return False
    if _library() is None:
        return False
    if _txn_state is None and conn.in_transaction:
        return False
    return busy(conn) is False
