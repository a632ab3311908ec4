"""The SQLite database: engine and alembic migrations."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event

from ..errors import RuntimeFailure

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
    import unibus.migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(unibus.migrations.__file__).parent))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(db_path: Path) -> tuple[str | None, str | None]:
    """Bring the database at ``db_path`` to the newest revision.

    Returns ``(revision before, revision after)``. The database file is created
    with mode 0600. Each revision runs in a transaction: a crash mid-migration
    leaves the previous revision in place.
    """
    if not db_path.exists():
        fd = os.open(db_path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    engine = make_engine(db_path)
    try:
        before = current_revision(engine)
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        after = current_revision(engine)
    except Exception as e:
        raise RuntimeFailure(f"migrating {db_path} failed: {type(e).__name__}: {e}") from e
    finally:
        engine.dispose()
    if before != after:
        log.info("database %s migrated from %s to %s", db_path, before or "empty", after)
    return before, after
