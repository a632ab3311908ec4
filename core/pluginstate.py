"""Per-plugin state: a typed ``stash`` on the running app and a private directory in the data dir.

A plugin keeps what it runs (connections, tasks, caches) in its own
:class:`Stash` under typed :class:`StashKey` keys, never in module globals:
several daemons may share one process (tests), and two plugins never collide.
Files go to ``<data-dir>/plugins/<plugin name>/`` (mode 0700), made on first
use. docs/plugins.md, "State: stash and state directory".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from .pluginmanager import current_plugin
from .privatefiles import check_private_dir, make_missing_dirs

T = TypeVar("T")
D = TypeVar("D")

#: A plugin name that is safe as one path component.
_SAFE_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\Z")
PLUGINS_DIR = "plugins"


class StashKey(Generic[T]):
    """A key of a :class:`Stash`; its type parameter is the type of the value (as pytest's ``StashKey``)."""

    __slots__ = ("name",)

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """A dict keyed by :class:`StashKey` objects: only code that holds the key object reads or writes."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], Any] = {}

    @staticmethod
    def _check(key: object) -> None:
        if not isinstance(key, StashKey):
            raise TypeError(f"stash keys are unibus.StashKey objects, not {type(key).__name__}")

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._check(key)
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        self._check(key)
        return self._data[key]

    @overload
    def get(self, key: StashKey[T]) -> T | None: ...

    @overload
    def get(self, key: StashKey[T], default: D) -> T | D: ...

    def get(self, key: StashKey[T], default: Any = None) -> Any:
        self._check(key)
        return self._data.get(key, default)

    def setdefault(self, key: StashKey[T], default: T) -> T:
        self._check(key)
        return self._data.setdefault(key, default)

    def pop(self, key: StashKey[T], default: Any = None) -> Any:
        self._check(key)
        return self._data.pop(key, default)

    def __delitem__(self, key: StashKey[T]) -> None:
        self._check(key)
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


def plugin_name(name: str | None, call: str = "stash") -> str:
    """``name``, or the plugin whose hook runs now; ValueError for a name unsafe as a directory.
    ``call`` is the function asked (``stash``, ``state_dir``), which the error shows with the name."""
    name = name if name is not None else current_plugin()
    if name is None:
        raise RuntimeError(f"outside a plugin's hook, name the plugin ({call}(app, PLUGIN_NAME))")
    if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"plugin name {name!r} cannot name a directory; use letters, digits, _ . -")
    return name


def state_dir_of(data_dir: Path, name: str | None = None) -> Path:
    """``<data_dir>/plugins/<name>/``, made (and kept) mode 0700, as is ``<data_dir>/plugins``;
    a directory of another user, or one that group or others may write to, is refused (exit 2)."""
    name = plugin_name(name, "state_dir")
    base = Path(data_dir) / PLUGINS_DIR
    path = base / name
    for d in (base, path):
        make_missing_dirs(d)
        if d.is_symlink():
            raise RuntimeError(f"{d} is a symbolic link; a plugin's state directory must be a real directory")
        check_private_dir(d, "--data-dir")  # this user's, and no one else's to write to
    return path


__all__ = ["Stash", "StashKey", "plugin_name", "state_dir_of"]
