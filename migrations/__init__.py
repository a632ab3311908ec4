"""Alembic environment and revisions for the membershipd SQLite store."""
