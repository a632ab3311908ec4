"""Bounded logging of what any client can make happen again and again.

A refused NATS login costs its sender nothing, and each one wrote three log
lines (membershipd's refusal, and nats-server's ``[ERR]`` and ``[WRN]`` lines
that the supervisor forwards): a flood without any credentials grew the log
by about 450 bytes per try, 2.2 GB an hour from four threads (a red team).
The HTTP listener had the same problem and bounds it in
:mod:`unibus.connlimits`. The counters (``unibus_bus_auth_callouts_total``)
still count every one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Lines of one kind logged per window, and the window (seconds).
BURST = 5
WINDOW = 10.0
#: Kinds remembered at most: the oldest window is forgotten first.
MAX_KINDS = 256


@dataclass(slots=True)
class _Kind:
    started: float
    logged: int = 0
    left_out: int = 0


class LogThrottle:
    """At most ``burst`` lines of one kind per ``window`` seconds.

    ``admit(kind)`` says whether to log a line of ``kind``, and how many of
    that kind were left out before it (to say so on the line that is
    logged), or None when it must be left out.
    """

    def __init__(self, burst: int = BURST, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.window, self.clock = burst, window, clock
        self._kinds: dict[str, _Kind] = {}

    def admit(self, kind: str) -> int | None:
        now = self.clock()
        k = self._kinds.get(kind)
        if k is None or now - k.started >= self.window:
            left_out = k.left_out if k is not None else 0
            self._kinds.pop(kind, None)
            if len(self._kinds) >= MAX_KINDS:
                self._kinds.pop(next(iter(self._kinds)))
            self._kinds[kind] = _Kind(now, 1)
            return left_out
        if k.logged < self.burst:
            k.logged += 1
            return 0
        k.left_out += 1
        return None


def left_out_note(count: int) -> str:
    """The words a logged line ends with when ``count`` lines like it were left out before it."""
    return f" ({count} more like it in the last window not logged)" if count else ""


_NATS_PREFIX = re.compile(r"^\[\d+\] \S+ \S+ ")
#: What varies from one line of a kind to the next: what a client chose (quoted: a user name, a
#: protocol line), nkeys and other long base32 runs, addresses, numbers. A red team made a kind per
#: try with a fresh user name, and 3.7 KB of log per refused login.
_VARYING = re.compile(r'"[^"]*"|\'[^\']*\'|\b[A-Z2-7]{20,}\b|\d+(?:\.\d+){3}(?::\d+)?|\[[0-9a-f:]+\](?::\d+)?|\d+')
#: The longest nats-server line forwarded; the rest is cut (a client's bytes can make a line ~4 KB).
MAX_LINE = 512


def nats_line_kind(line: str) -> str:
    """The kind of a nats-server log line: its text without the pid, the time, and whatever varies
    (client ids, addresses, nkeys, anything quoted), so that one login's refusal and the next are one kind."""
    return _VARYING.sub("#", _NATS_PREFIX.sub("", line))


def cut(line: str) -> str:
    """``line`` at most :data:`MAX_LINE` characters long, saying how much was cut."""
    return line if len(line) <= MAX_LINE else f"{line[:MAX_LINE]}... ({len(line) - MAX_LINE} more characters)"


__all__ = ["BURST", "MAX_LINE", "WINDOW", "LogThrottle", "cut", "left_out_note", "nats_line_kind"]
