"""Python processes for tests, forked from an interpreter that has imported unibus already.

A test that runs ``membershipd`` or ``unibus`` as a process pays for a new
interpreter and its imports each time: 0.7 s of CPU for ``membershipd serve``,
0.35 s for a ``unibus`` command, on the 2-core VM of docs/benchmarks.md, where
they were a third of the suite's CPU. Here one helper process per test process
(the *zygote*) imports unibus once, and each process asked for is a ``fork`` of
it that runs ``python -m MODULE ARGS`` there (``runpy``): its own process, pid,
descriptors, environment, signals and exit status, the working directory,
umask, resource limits, nice value and CPUs of the process that asked for it,
as a new interpreter would have, and the interpreter's own exit
(``SystemExit``, a traceback, stdout flushed, ``atexit``).

What a fork cannot give is what an interpreter reads as it starts: the
``PYTHON*`` variables (``PYTHONPATH``...), the locale, glibc's and OpenSSL's
start-up settings. :func:`spawn` and :func:`run` therefore fork only when the
environment asked for differs from the zygote's only in variables read
as a program runs (``UNIBUS_*``, ``PYTEST_*``, ``XDG_*``, ``HOME`` in a venv), and start a new interpreter otherwise, as they do when
``UNIBUS_TESTING_FORK=0`` is set (for a run that must see the start itself).

The zygote is the parent of every process it forks and tells this process
when each one exits; when this process goes away (its end of the socket
closes), the zygote kills whatever it forked that still runs, and exits.
"""

from __future__ import annotations

import contextlib
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
#: What the zygote imports before it forks: everything ``membershipd`` and ``unibus`` import.
PRELOAD = ("unibus.cli", "unibus.daemon", "unibus.client.cli", "unibus.plugins.auth_enforce",
           "unibus.plugins.blobstore", "unibus.plugins.nats_monitor", "unibus.plugins.route_tls")
_MAX_MESSAGE = 1 << 20


#: Variables read only once a program runs, never as an interpreter starts: ours, pytest's
#: (``PYTEST_CURRENT_TEST`` changes with every test), the XDG directories.
RUNTIME_PREFIXES = ("UNIBUS_", "PYTEST_", "XDG_")


def _runtime_only(name: str) -> bool:
    # HOME too, unless the interpreter adds the user's site-packages (never in a venv)
    return name.startswith(RUNTIME_PREFIXES) or (name == "HOME" and not site.ENABLE_USER_SITE)


def _may_fork(env: Mapping[str, str], base: Mapping[str, str]) -> bool:
    """True when ``env`` differs from ``base`` (the zygote's) only in variables a program
    reads as it runs (:func:`_runtime_only`)."""
    keys = set(env) | set(base)
    return all(env.get(k) == base.get(k) for k in keys if not _runtime_only(k))


class ForkedProcess:
    """A process the zygote forked, with the part of :class:`subprocess.Popen` the tests use:
    ``pid``, ``args``, ``returncode``, ``poll()``, ``wait()``, ``send_signal()``,
    ``terminate()``, ``kill()`` (its standard streams are the descriptors it was given)."""

    stdin = stdout = stderr = None

    def __init__(self, zygote: _Zygote, pid: int, args: list[str]) -> None:
        self._zygote = zygote
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        code = self._zygote.wait_exit(self.pid, deadline)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as Popen: never a signal to a pid the zygote has reaped
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Zygote:
    """This process's end of the zygote: a SOCK_SEQPACKET socket and a thread that reads it."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from unibus.forkrun import zygote_main; zygote_main({theirs.fileno()})"],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=self.env)
        theirs.close()
        self.sock = ours
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self._exits: dict[int, int] = {}
        self._next = 0
        self.closed = False
        threading.Thread(target=self._read, name="unibus-forkrun", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(_MAX_MESSAGE)
                if not data:
                    break
                msg = json.loads(data)
                with self._cond:
                    if "exited" in msg:
                        self._exits[msg["exited"]] = msg["code"]
                    else:
                        self._replies[msg["request"]] = msg
                    self._cond.notify_all()
        except OSError:
            pass
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def fork(self, module: str, args: Sequence[str], env: Mapping[str, str], cwd: str,
             fds: tuple[int, int, int]) -> int:
        with self._cond:
            self._next += 1
            request = self._next
        message = json.dumps({"request": request, "module": module, "args": list(args), "env": dict(env),
                              "cwd": cwd, **_inherited()}).encode()
        with self._send_lock:
            socket.send_fds(self.sock, [message], list(fds))
        deadline = time.monotonic() + 30
        with self._cond:
            while request not in self._replies:
                if self.closed or not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"the test zygote did not fork {module} (it has exited or hangs)")
            reply = self._replies.pop(request)
        if "error" in reply:
            raise OSError(reply["error"])
        return int(reply["pid"])

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, deadline: float | None) -> int | None:
        with self._cond:
            while pid not in self._exits:
                if self.closed:
                    raise RuntimeError(f"the test zygote exited while process {pid} ran")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            return self._exits[pid]

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

    umask = next(int(line.split()[1], 8) for line in open("/proc/self/status") if line.startswith("Umask:"))
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource)
              if name.startswith("RLIMIT_")}
    return {"umask": umask, "limits": limits, "nice": os.nice(0), "cpus": sorted(os.sched_getaffinity(0))}


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


_zygote: _Zygote | None = None
_zygote_lock = threading.Lock()


def _get_zygote(env: Mapping[str, str]) -> _Zygote | None:
    """The zygote, started on first use; None when ``env`` needs a new interpreter."""
    global _zygote
    if os.environ.get(FORK_ENV) == "0" or env.get(FORK_ENV) == "0" or not hasattr(socket, "send_fds"):
        return None
    with _zygote_lock:
        if _zygote is None or _zygote.closed:
            import atexit

            _zygote = _Zygote()
            atexit.register(_zygote.close)
        zygote = _zygote
    return zygote if _may_fork(env, zygote.env) else None


def _std(spec: Any, own: int, mode: int, opened: list[int]) -> int:
    """The descriptor a child gets for one standard stream (``own``: this process's, for None)."""
    if spec is None:
        return own
    if spec == subprocess.DEVNULL:
        fd = os.open(os.devnull, mode)
        opened.append(fd)
        return fd
    return spec if isinstance(spec, int) else spec.fileno()


def spawn(module: str, args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
          cwd: str | os.PathLike[str] | None = None, stdin: Any = subprocess.DEVNULL, stdout: Any = None,
          stderr: Any = None) -> subprocess.Popen[bytes] | ForkedProcess:
    """``python -m MODULE ARGS``, forked from the zygote when it can be (see the module).

    ``stdin``, ``stdout`` and ``stderr`` are each None (this process's own),
    ``subprocess.DEVNULL``, a descriptor or a file; ``stderr`` may also be
    ``subprocess.STDOUT``. Pipes are for :func:`run`.
    """
    full_env = dict(os.environ if env is None else env)
    argv = [sys.executable, "-m", module, *args]
    zygote = _get_zygote(full_env)
    try:
        where = os.getcwd() if cwd is None else os.fspath(cwd)
    except OSError:  # a working directory that is gone, or too deep to name: only a new one inherits it
        zygote = None
    if zygote is None:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=full_env, cwd=cwd)
    opened: list[int] = []  # opened here for the child: closed once it has them
    try:
        fd_in = _std(stdin, 0, os.O_RDONLY, opened)
        fd_out = _std(stdout, 1, os.O_WRONLY, opened)
        fd_err = fd_out if stderr == subprocess.STDOUT else _std(stderr, 2, os.O_WRONLY, opened)
        pid = zygote.fork(module, args, full_env, where, (fd_in, fd_out, fd_err))
    finally:
        for fd in opened:
            os.close(fd)
    return ForkedProcess(zygote, pid, argv)


def run(module: str, args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None, input: str | None = None, timeout: float = 60,
        stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` to completion, as ``subprocess.run(..., text=True)``: its
    output captured (``stdout``/``stderr`` may instead be None, DEVNULL or a file), ``input``
    on its standard input (else ``/dev/null``); killed and :class:`subprocess.TimeoutExpired`
    after ``timeout`` seconds."""
    full_env = dict(os.environ if env is None else env)
    if _get_zygote(full_env) is None:
        return subprocess.run([sys.executable, "-m", module, *args], input=input, text=True, env=full_env,
                              cwd=cwd, timeout=timeout, stdout=stdout, stderr=stderr,
                              **({} if input is not None else {"stdin": subprocess.DEVNULL}))
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
        proc = spawn(module, args, env=full_env, cwd=cwd, stdin=child_in, stdout=streams[0], stderr=streams[1])
    except BaseException:
        for fd in [*ends, *reads]:
            os.close(fd)
        raise
    for fd in ends:
        os.close(fd)
    out = _collect(proc, reads, in_w, input, timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode or 0, out.get("stdout"), out.get("stderr"))


def _collect(proc: subprocess.Popen[bytes] | ForkedProcess, reads: dict[int, str], in_w: int,
             input: str | None, timeout: float) -> dict[str, str]:
    """Write ``input``, read the pipes to their end and wait for ``proc``, within ``timeout``."""
    deadline = time.monotonic() + timeout
    chunks: dict[str, list[bytes]] = {name: [] for name in reads.values()}
    pending = (input or "").encode()
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
            raise subprocess.TimeoutExpired(proc.args, timeout) from None
    finally:
        sel.close()
        for fd in reads:
            os.close(fd)
        if in_w >= 0:
            os.close(in_w)
    # as text=True reads them: the locale's encoding (UTF-8 here), universal newlines
    return {name: b"".join(parts).decode().replace("\r\n", "\n").replace("\r", "\n")
            for name, parts in chunks.items()}


# -- the zygote ---------------------------------------------------------------------


def zygote_main(fd: int) -> None:
    """The zygote: import unibus, then fork a process for each request on ``fd`` until it closes.

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
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _serve(sock: socket.socket) -> dict[str, Any]:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)

    def send(message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            sock.send(json.dumps(message).encode())

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
                    children.discard(pid)
                    send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})
                continue
            try:
                data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 3)
            except OSError:
                data, fds = b"", []
            if not data:  # the test process has gone: nothing of it may outlive it
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                for pid in list(children):
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
                os._exit(0)
            spec = json.loads(data)
            try:
                pid = os.fork()
            except OSError as e:
                for f in fds:
                    os.close(f)
                send({"request": spec["request"], "error": f"fork: {e}"})
                continue
            if pid == 0:
                try:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    sel.close()
                    sock.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    for target, f in enumerate(fds):
                        os.dup2(f, target)
                    for f in set(fds):
                        if f > 2:
                            os.close(f)
                    os.environ.clear()
                    os.environ.update(spec["env"])
                    os.chdir(spec["cwd"])
                    _take_on(spec)
                except BaseException as e:  # noqa: BLE001 - this fork must never return into the loop
                    with contextlib.suppress(OSError):
                        os.write(2, f"forkrun: could not set up the process: {e}\n".encode())
                    os._exit(127)
                return spec
            for f in fds:
                os.close(f)
            children.add(pid)
            send({"request": spec["request"], "pid": pid})
