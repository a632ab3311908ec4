"""Fixtures for unibus's own tests come from unibus.testing (a pytest11 plugin)."""
