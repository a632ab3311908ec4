"""unibus built-in plugins (each registered through the ``unibus`` entry-point group)."""
