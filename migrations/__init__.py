"""Alembic environment and revisions for the membershipd SQLite store."""

#: The newest revision in versions/; a test checks it against alembic's own head,
#: and membershipd skips importing alembic at start-up when the store is there.
HEAD_REVISION = "0004"
