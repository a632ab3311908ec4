"""Exceptions that carry their own exit code.

``ConfigError`` is a refused configuration or bad usage (exit 2); ``RuntimeFailure``
is something that went wrong while running (exit 1). Both are *expected*
errors: the CLI prints their message as one line, never a traceback.
"""

from __future__ import annotations


class UnibusError(Exception):
    """Base class for errors membershipd reports as one line and an exit code."""

    exit_code = 1


class ConfigError(UnibusError):
    """A refused configuration: the message names the flag and what to change."""

    exit_code = 2


class RuntimeFailure(UnibusError):
    """A failure at run time (a child that will not start, a port in use...)."""

    exit_code = 1
