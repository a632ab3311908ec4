"""unibus-hello-plugin: the smallest useful unibus plugin.

It adds one flag to ``membershipd serve`` and one field to ``/healthz``:

    membershipd serve --hello-greeting "hi"
    curl -s 127.0.0.1:8470/healthz   # ... "hello": {"greeting": "hi"} ...
"""

from __future__ import annotations

from typing import Any

from unibus import Option, hookimpl

PLUGIN_NAME = "hello"
DEFAULT_GREETING = "hello from a plugin"
MAX_GREETING = 200


def parse_greeting(raw: str) -> str:
    """The --hello-greeting converter: a ValueError says what is allowed (exit 2)."""
    greeting = raw.strip()
    if not 1 <= len(greeting) <= MAX_GREETING:
        raise ValueError(f"the greeting must be 1-{MAX_GREETING} characters")
    return greeting


@hookimpl
def cli_options() -> list[Option]:
    return [
        Option(
            "--hello-greeting",
            help=f"the greeting /healthz shows (default {DEFAULT_GREETING!r})",
            default=DEFAULT_GREETING,
            convert=parse_greeting,
            env="UNIBUS_HELLO_GREETING",
            metavar="TEXT",
        )
    ]


@hookimpl
def healthz_fields(app) -> dict[str, Any]:
    # Imported here, not at the top: `membershipd plugins` and `--help` load
    # every plugin, and they need no HTTP stack.
    from unibus.app import SETTINGS

    # Only this plugin's own fields: the core places them under "hello".
    return {"greeting": app[SETTINGS].option("hello_greeting", DEFAULT_GREETING)}
