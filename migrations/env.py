"""Alembic environment for the membershipd SQLite store.

membershipd drives alembic programmatically (``unibus.store.db.migrate``) and
passes the connection in ``config.attributes["connection"]``; the ``alembic``
CLI works too with ``-x db=PATH``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from unibus.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or f"sqlite:///{context.get_x_argument(as_dictionary=True)['db']}"
    engine = create_engine(url)
    with engine.begin() as conn:
        _run(conn)


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
