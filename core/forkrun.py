"""Python processes for tests, forked from an interpreter that has imported unibus already.

A test that runs ``membershipd`` or ``unibus`` as a process pays for a new
interpreter and its imports each time: 1.2 s of CPU for ``membershipd serve``
started on a new data directory and stopped, 0.4 s for a command, on the
2-core VM of docs/benchmarks.md, where they were a third of the suite's CPU
(0.4 s and 0.1 s forked, the zygotes' own starts shared out). Here a few
helper processes per test process (the *zygotes*) import unibus once, and
each process asked for is a ``fork`` of one of them that runs ``python -m
MODULE ARGS`` there (``runpy``, as ``-m`` does). It has its own pid,
descriptors (only its standard three), environment and exit status; the
working directory, umask, resource limits, nice value, CPUs, ignored signals
and process group of the process that asked for it, as they are when it
asks; the other signals as an interpreter starts them; and the interpreter's
own exit (``SystemExit``, a traceback, stdout flushed, ``atexit``).

What a fork cannot give:

- what an interpreter reads as it starts: the ``PYTHON*`` variables
  (``PYTHONPATH``...), the locale, glibc's and OpenSSL's start-up settings.
  :func:`spawn` and :func:`run` fork only when the environment asked for
  differs from the zygote's in variables read as a program runs
  (:data:`RUNTIME_PREFIXES`, and ``HOME`` in a venv), and start a new
  interpreter otherwise, as they do for arguments or an environment a new
  process would refuse (Popen raises as before), and under
  ``UNIBUS_TESTING_FORK=0``;
- its own command line and environment in ``/proc/PID/cmdline`` and
  ``/proc/PID/environ``: those are the zygote's. A test of what other local
  users can read there starts its process with ``UNIBUS_TESTING_FORK=0``;
- its own hash seed: every fork of one zygote iterates a set of strings in
  the same order. Successive forks come from the :data:`ZYGOTES` zygotes in
  turn, each with its own seed, and ``spawn(not_like=...)`` (a daemon's
  restart in :mod:`unibus.testing`) never from the zygote of the process given.

A zygote is the parent of every process it forks. It reports each exit by
the request that started the process (never by a pid, which the kernel hands
out again), and sends a pidfd with each new process, through which alone
signals are sent: never to a pid another process took since. Each zygote has
a process group of its own, so a signal to the test's group (Ctrl-C, a CI
runner's SIGTERM) reaches the forked processes, which are in that group, and
not the zygotes. When the test process's end of the socket closes, or the
zygote fails, it kills whatever it forked that still runs; a process it forked
dies with it (a parent-death signal), so nothing outlives a zygote killed
outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import selectors
import signal
import site
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

#: Set to ``0`` to start every process as a new interpreter.
FORK_ENV = "UNIBUS_TESTING_FORK"
#: What a zygote imports before it forks: everything ``membershipd`` and ``unibus`` import.
PRELOAD = ("unibus.cli", "unibus.daemon", "unibus.client.cli", "unibus.plugins.auth_enforce",
           "unibus.plugins.blobstore", "unibus.plugins.nats_monitor", "unibus.plugins.route_tls")
#: Zygotes per test process, used in turn: each has a hash seed of its own.
ZYGOTES = 3
#: Variables read only once a program runs, never as an interpreter starts: ours, pytest's
#: (``PYTEST_CURRENT_TEST`` changes with every test), the XDG directories.
RUNTIME_PREFIXES = ("UNIBUS_", "PYTEST_", "XDG_")
#: A request larger than this (its environment and arguments) starts a new interpreter: a
#: message must fit the socket's buffer (212,992 bytes by default on Linux).
MAX_REQUEST = 128 * 1024
_REPLY_SIZE = 4096
PR_SET_PDEATHSIG = 1


def _runtime_only(name: str) -> bool:
    # HOME too, unless the interpreter adds the user's site-packages (never in a venv)
    return name.startswith(RUNTIME_PREFIXES) or (name == "HOME" and not site.ENABLE_USER_SITE)


def _may_fork(env: Mapping[str, str], base: Mapping[str, str]) -> bool:
    """True when ``env`` differs from ``base`` (the zygote's) only in variables a program
    reads as it runs (:func:`_runtime_only`)."""
    keys = set(env) | set(base)
    return all(env.get(k) == base.get(k) for k in keys if not _runtime_only(k))


class ZygoteGone(RuntimeError):
    """The zygote that forked a process has exited: that process's exit status is unknown
    (a parent-death signal has killed it)."""


class ForkedProcess:
    """A process a zygote forked, with the part of :class:`subprocess.Popen` the tests use:
    ``pid``, ``args``, ``returncode``, ``poll()``, ``wait()``, ``send_signal()``,
    ``terminate()``, ``kill()`` (its standard streams are the descriptors it was given)."""

    stdin = stdout = stderr = None

    def __init__(self, zygote: _Zygote, request: int, pid: int, pidfd: int, args: list[str]) -> None:
        self._zygote = zygote
        self._request = request
        self._pidfd: int | None = pidfd
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def _exited(self, code: int) -> int:
        self.returncode = code
        self._close_pidfd()
        return code

    def _close_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._close_pidfd()

    def poll(self) -> int | None:
        """The exit status once the zygote has reported it; :class:`ZygoteGone` if it never will."""
        if self.returncode is None:
            code = self._zygote.exit_code(self._request)
            if code is not None:
                return self._exited(code)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        deadline = None if timeout is None else time.monotonic() + timeout
        code = self._zygote.wait_exit(self._request, deadline)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._exited(code)

    def send_signal(self, sig: int) -> None:
        """Through the process's pidfd: a process that has exited gets nothing, and neither does
        one that took its pid since."""
        if self.poll() is None and self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Zygote:
    """This process's end of one zygote: a SOCK_SEQPACKET socket and a thread that reads it."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.env = dict(os.environ)
        # A process group of its own: a signal to the test's group (Ctrl-C, a CI runner's SIGTERM)
        # reaches the processes it forked, which join that group, and not the zygote.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from unibus.forkrun import zygote_main; zygote_main({theirs.fileno()})"],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=self.env,
            process_group=0)
        theirs.close()
        self.sock = ours
        self.forked = 0
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, tuple[dict[str, Any], list[int]]] = {}
        self._exits: dict[int, int] = {}
        self._abandoned: set[int] = set()  # requests given up on: a late reply's process is killed
        self._next = 0
        self.closed = False
        threading.Thread(target=self._read, name="unibus-forkrun", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data, fds, _, _ = socket.recv_fds(self.sock, _REPLY_SIZE, 1, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    break
                msg = json.loads(data)
                with self._cond:
                    if "exited" in msg:
                        self._exits[msg["exited"]] = msg["code"]
                    elif msg["request"] in self._abandoned:
                        self._abandoned.discard(msg["request"])
                        for fd in fds:
                            with contextlib.suppress(ProcessLookupError):
                                signal.pidfd_send_signal(fd, signal.SIGKILL)
                            os.close(fd)
                    else:
                        self._replies[msg["request"]] = (msg, fds)
                    self._cond.notify_all()
        except OSError:
            pass
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def fork(self, module: str, args: Sequence[str], env: Mapping[str, str], cwd: str,
             fds: tuple[int, int, int]) -> ForkedProcess | None:
        """The process forked; None when the request is too large for the socket. ``OSError``
        as a new process would raise it (a working directory that does not exist...);
        :class:`ZygoteGone` when the zygote has exited."""
        with self._cond:
            self._next += 1
            request = self._next
        message = json.dumps({"request": request, "module": module, "args": list(args), "env": dict(env),
                              "cwd": cwd, **_inherited()}).encode()
        if len(message) > MAX_REQUEST:
            return None
        try:
            with self._send_lock:
                socket.send_fds(self.sock, [message], list(fds))
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                return None
            raise ZygoteGone(f"the test zygote is gone ({e})") from e
        deadline = time.monotonic() + 30
        with self._cond:
            while request not in self._replies:
                if self.closed:
                    raise ZygoteGone(f"the test zygote exited before it forked {module}")
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    self._abandoned.add(request)
                    raise RuntimeError(f"the test zygote did not fork {module} within 30 s")
            reply, pidfds = self._replies.pop(request)
        if "error" in reply:
            raise OSError(*reply["error"])  # errno, strerror, filename: FileNotFoundError...
        self.forked += 1
        return ForkedProcess(self, request, int(reply["pid"]), pidfds[0], [sys.executable, "-m", module, *args])

    def exit_code(self, request: int) -> int | None:
        with self._cond:
            if request in self._exits:
                return self._exits.pop(request)
            if self.closed:
                raise ZygoteGone("the test zygote exited: a process it forked has been killed with it")
            return None

    def wait_exit(self, request: int, deadline: float | None) -> int | None:
        with self._cond:
            while request not in self._exits:
                if self.closed:
                    raise ZygoteGone("the test zygote exited: a process it forked has been killed with it")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            return self._exits.pop(request)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _inherited() -> dict[str, Any]:
    """What a child of this process would inherit from it now, and the zygote's children must
    be given: a test may have changed them since the zygote started (``os.umask(0)``...)."""
    import resource

    with open("/proc/self/status") as status:  # one read for both: it is read for every process
        fields = dict(line.split(":", 1) for line in status if line.startswith(("Umask:", "SigIgn:")))
    ignored = int(fields["SigIgn"], 16)  # the signals this process ignores: a new process inherits them
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource)
              if name.startswith("RLIMIT_")}
    return {"umask": int(fields["Umask"], 8), "limits": limits, "nice": os.nice(0),
            "cpus": sorted(os.sched_getaffinity(0)), "pgid": os.getpgrp(),
            "ignored": [n for n in range(1, 65) if ignored >> (n - 1) & 1]}


def _take_on(spec: Mapping[str, Any]) -> None:
    """In a forked child: :func:`_inherited`'s values, where they differ from the zygote's."""
    import resource

    os.umask(spec["umask"])
    for name, limit in spec["limits"].items():
        if resource.getrlimit(getattr(resource, name)) != tuple(limit):
            resource.setrlimit(getattr(resource, name), tuple(limit))
    if spec["nice"] != os.nice(0):
        os.nice(spec["nice"] - os.nice(0))
    if set(spec["cpus"]) != os.sched_getaffinity(0):
        os.sched_setaffinity(0, spec["cpus"])
    # The signals ignored where a new process would inherit them ignored; every other one as
    # an interpreter starts it (SIGPIPE and SIGXFSZ ignored, SIGINT raising KeyboardInterrupt).
    ignored = set(spec["ignored"]) | {signal.SIGPIPE, signal.SIGXFSZ}
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        want = (signal.SIG_IGN if sig in ignored else signal.default_int_handler if sig == signal.SIGINT
                else signal.SIG_DFL)
        if signal.getsignal(sig) != want:
            signal.signal(sig, want)
    os.setpgid(0, spec["pgid"])  # the test process's group, as its own child would be in


_zygotes: list[_Zygote] = []
_turn = 0
_zygote_lock = threading.Lock()
#: Set when a zygote exited before it forked anything (its imports failed, say): new interpreters from then on.
_unusable = False


def _forget_zygotes() -> None:
    """In a child of the test process (``os.fork``, multiprocessing): the zygotes are the parent's."""
    global _zygotes, _zygote_lock
    for zygote in _zygotes:  # the parent's: closed here, so they see the parent's end alone
        with contextlib.suppress(OSError):
            zygote.sock.close()
    _zygotes = []
    _zygote_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_zygotes)


def _next_zygote(env: Mapping[str, str], avoid: _Zygote | None = None) -> _Zygote | None:
    """The next zygote in turn but ``avoid``, started on first use; None when ``env`` needs a
    new interpreter."""
    global _turn, _unusable
    if (os.environ.get(FORK_ENV) == "0" or env.get(FORK_ENV) == "0" or _unusable
            or not hasattr(socket, "send_fds") or not hasattr(os, "pidfd_open")):
        return None
    with _zygote_lock:
        if not _zygotes:  # all at once: their imports run side by side
            import atexit

            _zygotes.extend(_Zygote() for _ in range(ZYGOTES))
            atexit.register(_close_all)
        turn, _turn = _turn, (_turn + 1) % ZYGOTES
        if _zygotes[turn] is avoid:
            turn, _turn = _turn, (_turn + 1) % ZYGOTES
        zygote = _zygotes[turn]
        if zygote.closed:
            if not zygote.forked:
                _unusable = True
                return None
            zygote.close()
            zygote = _zygotes[turn] = _Zygote()
    return zygote if _may_fork(env, zygote.env) else None


def _close_all() -> None:
    for zygote in list(_zygotes):
        zygote.close()


def _std(spec: Any, own: int, mode: int, opened: list[int]) -> int:
    """The descriptor a child gets for one standard stream (``own``: this process's, for None)."""
    if spec is None:
        return own
    if spec == subprocess.DEVNULL:
        fd = os.open(os.devnull, mode)
        opened.append(fd)
        return fd
    return spec if isinstance(spec, int) else spec.fileno()


def _plain(args: Sequence[Any], env: Mapping[Any, Any]) -> list[str] | None:
    """``args`` as strings, or None when a new process would refuse them or ``env`` (a NUL, a
    key with ``=``, a value that is not a string): Popen then raises as it always has."""
    try:
        plain = [os.fsdecode(a) for a in args]
    except TypeError:
        return None
    if any("\0" in a for a in plain):
        return None
    for key, value in env.items():
        if not (isinstance(key, str) and isinstance(value, str)) or "=" in key or "\0" in key + value:
            return None
    return plain


def spawn(module: str, args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
          cwd: str | os.PathLike[str] | None = None, stdin: Any = subprocess.DEVNULL, stdout: Any = None,
          stderr: Any = None, not_like: ForkedProcess | subprocess.Popen[bytes] | None = None,
          ) -> subprocess.Popen[bytes] | ForkedProcess:
    """``python -m MODULE ARGS``, forked from a zygote when it can be (see the module).

    ``stdin``, ``stdout`` and ``stderr`` are each None (this process's own),
    ``subprocess.DEVNULL``, a descriptor or a file; ``stderr`` may also be
    ``subprocess.STDOUT``. Pipes are for :func:`run`. ``not_like``: a process
    whose zygote this one must not come from (a node's previous start: a hash
    seed of its own).
    """
    full_env = dict(os.environ if env is None else env)
    argv = [sys.executable, "-m", module, *args]
    plain = _plain(args, full_env)
    zygote = None if plain is None else _next_zygote(full_env, getattr(not_like, "_zygote", None))
    proc: ForkedProcess | None = None
    if zygote is not None:
        try:
            where = os.path.abspath(os.getcwd() if cwd is None else os.fsdecode(cwd))
        except OSError:  # a working directory that is gone, or too deep to name: only a new process inherits it
            zygote = None
    if zygote is not None:
        opened: list[int] = []  # opened here for the child: closed once it has them
        try:
            fd_in = _std(stdin, 0, os.O_RDONLY, opened)
            fd_out = _std(stdout, 1, os.O_WRONLY, opened)
            fd_err = fd_out if stderr == subprocess.STDOUT else _std(stderr, 2, os.O_WRONLY, opened)
            proc = zygote.fork(module, plain or [], full_env, where, (fd_in, fd_out, fd_err))
        except ZygoteGone:
            proc = None
        finally:
            for fd in opened:
                os.close(fd)
    if proc is None:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=full_env, cwd=cwd)
    return proc


def run(module: str, args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None, input: str | None = None, timeout: float = 60,
        stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` to completion, as ``subprocess.run(..., text=True)``: its
    output captured (``stdout``/``stderr`` may instead be None, DEVNULL or a file), ``input``
    on its standard input (else ``/dev/null``); killed and :class:`subprocess.TimeoutExpired`
    (with what it wrote) after ``timeout`` seconds."""
    ends: list[int] = []  # the child's ends, closed here once it has them
    reads: dict[int, str] = {}
    try:
        if input is not None:
            in_r, in_w = os.pipe()
            ends.append(in_r)
            child_in: Any = in_r
        else:
            in_w, child_in = -1, subprocess.DEVNULL
        streams = []
        for name, spec in (("stdout", stdout), ("stderr", stderr)):
            if spec == subprocess.PIPE:
                r, w = os.pipe()
                ends.append(w)
                reads[r] = name
                streams.append(w)
            else:
                streams.append(spec)
        proc = spawn(module, args, env=env, cwd=cwd, stdin=child_in, stdout=streams[0], stderr=streams[1])
    except BaseException:
        for fd in [*ends, *reads]:
            os.close(fd)
        if in_w >= 0:
            os.close(in_w)
        raise
    for fd in ends:
        os.close(fd)
    out = _collect(proc, reads, in_w, input, timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.get("stdout"), out.get("stderr"))


def _collect(proc: subprocess.Popen[bytes] | ForkedProcess, reads: dict[int, str], in_w: int,
             input: str | None, timeout: float) -> dict[str, str]:
    """Write ``input``, read the pipes to their end and wait for ``proc``, within ``timeout``."""
    deadline = time.monotonic() + timeout
    chunks: dict[str, list[bytes]] = {name: [] for name in reads.values()}
    pending = (input or "").encode()

    def text() -> dict[str, str]:
        # as text=True reads them: the locale's encoding (UTF-8 here), universal newlines
        return {name: b"".join(parts).decode().replace("\r\n", "\n").replace("\r", "\n")
                for name, parts in chunks.items()}

    sel = selectors.DefaultSelector()
    try:
        for fd in reads:
            sel.register(fd, selectors.EVENT_READ)
        if in_w >= 0:
            if pending:
                os.set_blocking(in_w, False)
                sel.register(in_w, selectors.EVENT_WRITE)
            else:
                os.close(in_w)
                in_w = -1
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(min(left, 1.0)):
                if key.fd == in_w:
                    try:
                        pending = pending[os.write(in_w, pending[:65536]):]
                    except BrokenPipeError:
                        pending = b""
                    if not pending:
                        sel.unregister(in_w)
                        os.close(in_w)
                        in_w = -1
                    continue
                data = os.read(key.fd, 65536)
                if data:
                    chunks[reads[key.fd]].append(data)
                else:
                    sel.unregister(key.fd)
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            proc.wait(left)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            seen = text()
            raise subprocess.TimeoutExpired(proc.args, timeout, output=seen.get("stdout"),
                                            stderr=seen.get("stderr")) from None
    finally:
        sel.close()
        for fd in reads:
            os.close(fd)
        if in_w >= 0:
            os.close(in_w)
    return text()


# -- the zygote ---------------------------------------------------------------------


def zygote_main(fd: int) -> None:
    """A zygote: import unibus, then fork a process for each request on ``fd`` until it closes.

    In a forked process this returns into ``python -m MODULE``, so the
    interpreter ends it as it would end that command.
    """
    import gc
    import importlib
    import runpy

    for name in PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # the imports' objects stay on pages the forks share
    if threading.active_count() != 1:  # a fork keeps only the thread that forks
        raise RuntimeError(f"an import started a thread: {threading.enumerate()}")
    spec = _serve(socket.socket(fileno=fd))
    # As in ``python -m MODULE``: MODULE runs as ``__main__`` and is not imported yet (its
    # imports are); an ``import MODULE`` during the run makes a second copy, as it would there.
    module = spec["module"]
    sys.modules.pop(module, None)
    parent, _, name = module.rpartition(".")
    if parent in sys.modules and hasattr(sys.modules[parent], name):
        delattr(sys.modules[parent], name)
    if sys.path and sys.path[0] == "":  # ``-c``'s; ``-m`` puts the directory it starts in
        sys.path[0] = os.getcwd()
    sys.argv = [module, *spec["args"]]
    if sys.stdout is not None and not sys.stdout.write_through:  # as an interpreter sets up its stdout
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
    runpy._run_module_as_main(module)  # what ``python -m`` calls: ``__main__`` and argv[0] stay its own


def _set_up_child(spec: Mapping[str, Any], fds: list[int], keep_closed: list[Any], zygote: int) -> None:
    """In a forked child, before its module runs: what a new process started so would have."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != zygote:  # the zygote died before the signal was set
        os._exit(1)
    signal.set_wakeup_fd(-1)
    for thing in keep_closed:
        if isinstance(thing, int):
            os.close(thing)
        else:
            thing.close()
    for target, f in enumerate(fds):
        os.dup2(f, target)
    for f in set(fds):
        if f > 2:
            os.close(f)
    os.environ.clear()
    os.environ.update(spec["env"])
    os.chdir(spec["cwd"])
    _take_on(spec)


def _serve(sock: socket.socket) -> dict[str, Any]:
    """Fork a process for each request; in the process forked, return its request."""
    me = os.getpid()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, int] = {}  # pid: the request that started it
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)

    def send(message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        with contextlib.suppress(OSError):
            socket.send_fds(sock, [json.dumps(message).encode()], list(fds))

    try:
        while True:
            for key, _ in sel.select():
                if key.fd == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                    while children:
                        try:
                            pid, status = os.waitpid(-1, os.WNOHANG)
                        except ChildProcessError:
                            break
                        if pid == 0:
                            break
                        if pid in children:
                            send({"exited": children.pop(pid), "code": os.waitstatus_to_exitcode(status)})
                    continue
                try:
                    data, fds, _, _ = socket.recv_fds(sock, 2 * MAX_REQUEST, 3, socket.MSG_CMSG_CLOEXEC)
                except OSError:
                    data, fds = b"", []
                if not data:  # the test process has gone
                    return {}
                spec = json.loads(data)
                # set-up errors come back on this pipe, as subprocess's do before an exec
                err_r, err_w = os.pipe()
                try:
                    pid = os.fork()
                except OSError as e:
                    for f in (*fds, err_r, err_w):
                        os.close(f)
                    send({"request": spec["request"], "error": [e.errno, f"fork: {e.strerror}"]})
                    continue
                if pid == 0:
                    try:
                        os.close(err_r)
                        _set_up_child(spec, fds, [sel, sock, wake_r, wake_w], me)
                        os.close(err_w)
                    except BaseException as e:  # noqa: BLE001 - this fork must never return into the loop
                        with contextlib.suppress(OSError):
                            os.write(err_w, json.dumps([getattr(e, "errno", None) or errno.EINVAL,
                                                        str(getattr(e, "strerror", None) or e),
                                                        os.fsdecode(getattr(e, "filename", None) or "")
                                                        or None]).encode())
                        os._exit(127)
                    return spec
                for f in (*fds, err_w):
                    os.close(f)
                pidfd = os.pidfd_open(pid)  # never reaped before this: only this loop reaps
                failure = b""
                while chunk := os.read(err_r, 65536):
                    failure += chunk
                os.close(err_r)
                if failure:
                    os.waitpid(pid, 0)
                    os.close(pidfd)
                    send({"request": spec["request"], "error": json.loads(failure)})
                    continue
                children[pid] = spec["request"]
                send({"request": spec["request"], "pid": pid}, [pidfd])
                os.close(pidfd)
    finally:
        if os.getpid() == me:  # the zygote, ending: nothing it forked may outlive it
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in children:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            os._exit(0)
