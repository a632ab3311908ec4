"""Private directories and files: what membershipd keeps from the other users of its host.

The data directory holds the nkey seeds, the route password (in ``nats.conf``)
and the store. Another local user must not be able to read it, nor to plant
something in it that membershipd then trusts or writes a secret into
(docs/operations.md, "The data directory").

- :func:`make_private_dirs` creates every missing directory of a path with
  mode 0700 (``mkdir -p`` gives the parents the umask's mode: 0777 under
  umask 000), then checks the last one with :func:`check_private_dir`.
- :func:`check_private_dir` refuses a directory of another user, or one that
  group or others may write to, or one below a directory they could rename
  it in (:func:`check_ancestors`), and makes one they may only read 0700.
- :func:`check_own_file` refuses a file of another user and makes a looser
  mode 0600.
- :func:`read_private_file` reads a secret only from a regular file of this
  user that no one else may read (exit 1 otherwise, saying what to change).
- :func:`write_private_file` writes through a temporary file with a random
  name, created exclusively and never through a symbolic link, mode 0600
  from the first byte, fsynced, and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, RuntimeFailure

__all__ = ["check_ancestors", "check_own_file", "check_private_dir", "make_missing_dirs", "make_private_dirs",
           "read_private_file", "write_private_file"]

_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def make_missing_dirs(path: Path) -> list[Path]:
    """Create ``path`` and every missing directory above it, one at a time, each mode 0700
    (``os.makedirs`` gives the ones above the umask's mode). Existing ones are left as they are.
    Returns the directories made here, the topmost first (a caller that fails removes them)."""
    path = Path(path)
    missing: list[Path] = []
    d = path
    while not os.path.lexists(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    made = []
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile: not ours to remove
            os.mkdir(d, 0o700)
            made.append(d)
    return made


def make_private_dirs(path: Path, flag: str) -> None:
    """:func:`make_missing_dirs`, then :func:`check_private_dir`. ``flag`` names the option in the
    error (exit 2)."""
    try:
        make_missing_dirs(path)
    except OSError as e:
        raise ConfigError(f"{flag}: cannot create {path} ({e.strerror}); choose a writable directory") from None
    check_private_dir(path, flag)


def check_ancestors(path: Path, flag: str) -> None:
    """Refuse (exit 2) a ``path`` that someone else could swap for a directory of theirs.

    Every directory that resolving ``path`` passes through (:func:`resolution`: the directories
    above it, those above every symbolic link followed, a link's own links, and a directory left
    again by ``..``, as the kernel walks them) must be root's or this user's, and not writable
    by group or others unless it has the sticky bit (as ssh's StrictModes). In a sticky
    directory that others may write to, a link followed must be root's or this user's too: its
    owner may replace it.

    Without this, another user who may write to a parent swapped the data directory for one of
    theirs between the check of the directory and the files opened in it (red team: 4 of 25
    tries of a rename race won); another user's link in /tmp passed, then was pointed at their
    directory, and a restarted nats-server read their nats.conf (a later red team); a link in a
    directory others may write to further up the path, a ``..`` after a link, and a directory of
    another user left by ``..`` passed too (two reviews)."""
    me = os.geteuid()
    try:
        walk = resolution(path)
    except ConfigError as e:
        raise ConfigError(f"{flag}: {e}") from None
    for d, st in walk.directories:
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in (0, me):
            raise ConfigError(f"{flag}: {d} above {path} belongs to uid {st.st_uid}, who could swap {path} "
                              "for a directory of theirs; use a directory under your own or root's")
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise ConfigError(f"{flag}: group or others may write to {d} above {path} (mode {mode:04o}), so "
                              f"they could swap {path} for a directory of theirs; run chmod go-w {d}, or use "
                              "another directory")
    modes = dict(walk.directories)
    for link, st in walk.links:
        if st.st_uid in (0, me):
            continue
        held_in = modes.get(link.parent) or os.stat(link.parent)
        if stat.S_IMODE(held_in.st_mode) & 0o022:  # sticky (refused above otherwise)
            raise ConfigError(f"{flag}: {link} on the way to {path} is a symbolic link of uid {st.st_uid}, who could "
                              f"point it elsewhere; give the directory it names instead ({walk.resolved})")


@dataclass
class Resolution:
    """How the kernel resolves a path: the directories it passes through (with their ``lstat``),
    the symbolic links it follows (with theirs), and where it ends."""

    directories: list[tuple[Path, os.stat_result]] = field(default_factory=list)
    links: list[tuple[Path, os.stat_result]] = field(default_factory=list)
    resolved: Path = Path("/")


def resolution(path: Path, limit: int = 40) -> Resolution:
    """Resolve ``path`` component by component as the kernel does (a link's own links included;
    ``..`` taken after the links before it), in one walk: each directory is looked at once, and
    what is checked is what was walked. What does not exist yet is taken as it stands."""
    walk = Resolution()
    todo = list(Path(os.path.join(os.getcwd(), path)).parts[1:])
    current = Path("/")

    def enter(d: Path, st: os.stat_result) -> None:
        if not any(seen == d for seen, _ in walk.directories):
            walk.directories.append((d, st))

    enter(current, os.lstat(current))
    while todo:
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):  # missing (made later): nothing more to follow
            walk.resolved = Path(candidate, *todo)
            return walk
        except OSError as e:  # not searchable, or too long a name to look at: nothing is checked
            # past it, so nothing is taken (a third review: a link in a path of more than 4,095
            # characters, which the kernel resolves from a shorter name, was never looked at)
            raise ConfigError(f"cannot look at {candidate} on the way to {path} ({e.strerror})") from None
        if not stat.S_ISLNK(st.st_mode):
            current = candidate
            if todo:  # passed through (not the last component, which is the path itself)
                enter(current, st)
            continue
        walk.links.append((candidate, st))
        if len(walk.links) > limit:
            raise ConfigError(f"{path}: too many levels of symbolic links")  # (check_ancestors adds the flag)
        try:
            target = os.readlink(candidate)
        except OSError:  # replaced while walked
            raise ConfigError(f"{candidate} on the way to {path} changed while it was checked; try again") from None
        if os.path.isabs(target):
            current = Path("/")
        todo[:0] = list(Path(target).parts[1:] if os.path.isabs(target) else Path(target).parts)
    walk.resolved = current
    return walk


def links_followed(path: Path, limit: int = 40) -> list[tuple[Path, os.stat_result]]:
    """Every symbolic link that resolving ``path`` follows, with its ``lstat`` (:func:`resolution`)."""
    return resolution(path, limit).links


def check_private_dir(path: Path, flag: str) -> None:
    """Refuse (exit 2) a ``path`` that is not a directory of this user or that group or others
    may write to, or that has such a directory above it (:func:`check_ancestors`); make it 0700
    when they may only read it or enter it.

    A symbolic link is followed: an operator may link the data directory elsewhere, and
    what is checked is the directory it names (and the directories above the link)."""
    check_ancestors(path, flag)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise ConfigError(f"{flag}: {path} is not a directory; choose a directory") from None
    except OSError as e:
        raise ConfigError(f"{flag}: cannot open {path} ({e.strerror}); choose a directory of your own") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise ConfigError(f"{flag}: {path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); "
                              "use a directory of your own")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise ConfigError(f"{flag}: group or others may write to {path} (mode {mode:04o}), so they may have put "
                              f"files in it; check its files, then run chmod 700 {path}")
        if mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _open_own(path: Path, fail: Callable[[str], Exception]) -> tuple[int, os.stat_result]:
    """``path`` opened for reading without following a link, with its ``fstat``: a regular file of
    this user, else ``fail(why)`` is raised (``FileNotFoundError`` passes through)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise fail("is a symbolic link" if os.path.islink(path) else f"cannot be opened ({e.strerror})") from None
    st = os.fstat(fd)
    why = ("is not a regular file" if not stat.S_ISREG(st.st_mode) else
           f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})" if st.st_uid != os.geteuid() else None)
    if why is not None:
        os.close(fd)
        raise fail(why)
    return fd, st


def check_own_file(path: Path, flag: str) -> None:
    """Refuse (exit 2) a ``path`` that another user owns, that is a link or that is not a regular
    file; make a looser mode 0600. Nothing there is fine: it is made later, 0600."""
    try:
        fd, st = _open_own(path, lambda why: ConfigError(f"{flag}: {path} {why}; move it away"))
    except FileNotFoundError:
        return
    try:
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def read_private_file(path: Path) -> bytes:
    """The bytes of a secret at ``path``: a regular file (not a link) of this user that group and
    others may not read; :class:`RuntimeFailure` (exit 1) otherwise, naming the fix."""
    try:
        fd, st = _open_own(path, lambda why: RuntimeFailure(f"{path} {why}; a secret must be a file of your own"))
    except FileNotFoundError:
        raise RuntimeFailure(f"cannot read {path}: it does not exist") from None
    with os.fdopen(fd, "rb") as f:
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise RuntimeFailure(f"{path} is open to group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                                 f"run chmod 600 {path}")
        try:
            return f.read()
        except OSError as e:
            raise RuntimeFailure(f"cannot read {path}: {e.strerror}") from None


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600 from the first byte.

    The temporary file beside it has a random name and is created exclusively,
    never through a link, so nothing another user put there in advance receives
    the bytes; a crash leaves the old file or the new one, never a part."""
    path = Path(path)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp, _TEMP_FLAGS, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not create a temporary file beside {path}")
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only take bits away; this is exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
