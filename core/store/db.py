"""The SQLite database: engine and alembic migrations."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import sqlite3
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event

from ..errors import ConfigError, RuntimeFailure
from ..migrations import HEAD_REVISION

if TYPE_CHECKING:  # alembic is imported only when a migration must run
    from alembic.config import Config

log = logging.getLogger("unibus.store")


def make_engine(db_path: Path) -> Engine:
    """A SQLite engine with WAL, foreign keys on and a busy timeout."""
    engine = create_engine(f"sqlite:///{db_path}", connect_args={"timeout": 10})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    return engine


def alembic_config() -> Config:
    from alembic.config import Config

    import unibus.migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(unibus.migrations.__file__).parent))
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _read_only_value(db_path: Path, sql: str) -> object | None:
    """The first column of the first row ``sql`` selects, read with plain sqlite3 (no alembic),
    the database opened read-only; None for no row, no such table or no database."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as conn:
            row = conn.execute(sql).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _read_only_rows(db_path: Path, sql: str) -> list[tuple[object, ...]]:
    """Every row ``sql`` selects, read as :func:`_read_only_value` reads one; [] when there is nothing to read."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as conn:
            return list(conn.execute(sql).fetchall())
    except sqlite3.Error:
        return []


def revision_rows(db_path: Path) -> list[tuple[object, ...]]:
    """The rows of ``alembic_version`` (one, in a database a unibus made)."""
    return _read_only_rows(db_path, "SELECT version_num FROM alembic_version")


def stored_revision(db_path: Path) -> str | None:
    """The revision recorded in the database, read with plain sqlite3 (no alembic)."""
    value = _read_only_value(db_path, "SELECT version_num FROM alembic_version")
    return value if value is None else str(value)


def known_revision(revision: str) -> bool:
    """Whether ``revision`` is one of this unibus's schema revisions (exactly: not ``head`` or a range)."""
    from alembic.script import ScriptDirectory

    if not isinstance(revision, str) or not revision.strip():
        return False
    try:
        script = ScriptDirectory.from_config(alembic_config()).get_revision(revision)
    except Exception:  # noqa: BLE001 - whatever alembic makes of a damaged row (CommandError...): not ours
        return False
    return script is not None and script.revision == revision


def newer_database(db_path: Path, revision: str) -> ConfigError:
    """The refusal of a database at a revision this unibus does not know: a newer unibus made it."""
    from .. import __version__

    if not revision.strip():
        return ConfigError(f"{db_path} has an empty schema revision (alembic_version): it is damaged; restore a "
                           "backup")
    return ConfigError(f"{db_path} is at schema revision {revision!r}, which unibus {__version__} does not know: "
                       "a newer unibus made it; run that version, or restore a backup this version made")


def migrate(db_path: Path, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the database at ``db_path`` to the newest revision (or to ``revision``: restore
    builds a database at an archive's own revision before it copies the archive's rows in).

    Returns ``(revision before, revision after)``. The database file is created
    with mode 0600. Each revision runs in a transaction: a crash mid-migration
    leaves the previous revision in place.
    """
    if not db_path.exists():
        fd = os.open(db_path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    elif revision == "head":
        # Fast path for every start after the first: no alembic import at all.
        rows = revision_rows(db_path)
        current = None if not rows or rows[0][0] is None else str(rows[0][0])
        if len(rows) == 1 and current == HEAD_REVISION:
            return current, current
        if len(rows) > 1:
            raise ConfigError(f"{db_path} names {len(rows)} schema revisions (alembic_version), not one: "
                              "not a database a unibus made; restore a backup")
        if current is not None and not known_revision(current):
            # exit 2, not alembic's "Can't locate revision" as a failure that systemd restarts 10 times
            raise newer_database(db_path, current)
    from alembic import command

    engine = make_engine(db_path)
    try:
        before = current_revision(engine)
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        after = current_revision(engine)
    except Exception as e:
        raise RuntimeFailure(f"migrating {db_path} failed: {type(e).__name__}: {e}") from e
    finally:
        engine.dispose()
    if before != after:
        log.info("database %s migrated from %s to %s", db_path, before or "empty", after)
        root = trust_root(db_path)
        if root is not None:
            log.info("membership log trust root fingerprint: %s (members pin it with `unibus trust %s`)", root, root)
    return before, after


def trust_root(db_path: Path) -> str | None:
    """``hash(entry 0)`` of the membership log (docs/formats.md); None for an empty log or no log table."""
    value = _read_only_value(db_path, "SELECT hash FROM log_entries WHERE seq = 0")
    return value if value is None else str(value)
