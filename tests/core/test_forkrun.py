"""unibus.forkrun: processes forked from a zygote behave as ``python -m MODULE`` would.

Each test runs the same command forked and as a new interpreter
(``UNIBUS_TESTING_FORK=0``) where the two can be compared.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from unibus import forkrun
from unibus.testing import run_membershipd

FRESH = {**os.environ, forkrun.FORK_ENV: "0"}

PROBE = textwrap.dedent("""
    import json, os, sys
    if sys.argv[1:2] == ["raise"]:
        raise ValueError("a probe that failed")
    if sys.argv[1:2] == ["exit"]:
        sys.exit(sys.argv[2])
    if sys.argv[1:2] == ["print"]:
        print("written as it exits")
        sys.exit(0)
    import resource
    mask = os.umask(0)
    json.dump({"umask": mask, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "nice": os.nice(0),
               "cpus": sorted(os.sched_getaffinity(0)), "argv": sys.argv[1:], "cwd": os.getcwd(), "env": os.environ.get("UNIBUS_PROBE"),
               "stdin": sys.stdin.read(), "name": __name__, "pid": os.getpid(), "ppid": os.getppid(),
               "path0": sys.path[0]}, sys.stdout)
    print("to stderr", file=sys.stderr)
""")


@pytest.fixture(autouse=True)
def forking(monkeypatch):
    """These tests are about forking: on even in a run of new interpreters (UNIBUS_TESTING_FORK=0)."""
    monkeypatch.setenv(forkrun.FORK_ENV, "1")


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    (tmp_path / "forkprobe.py").write_text(PROBE)
    return tmp_path


def both(*args: str, **kwargs: object) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    env = kwargs.pop("env", dict(os.environ))
    forked = forkrun.run(*args, env=env, **kwargs)  # type: ignore[arg-type]
    fresh = forkrun.run(*args, env={**env, forkrun.FORK_ENV: "0"}, **kwargs)  # type: ignore[arg-type,dict-item]
    return forked, fresh


def test_a_forked_command_answers_as_a_new_interpreter_does(probe: Path):
    env = {**os.environ, "UNIBUS_PROBE": "seen"}
    forked, fresh = both("forkprobe", ["a b", "ü"], env=env, cwd=probe, input="line 1\r\nline 2\n")
    for proc in (forked, fresh):
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "to stderr\n"
        seen = json.loads(proc.stdout)
        assert seen["argv"] == ["a b", "ü"] and seen["cwd"] == str(probe) and seen["env"] == "seen"
        assert seen["stdin"] == "line 1\r\nline 2\n" and seen["name"] == "__main__"  # as POSIX reads stdin
        assert seen["pid"] != os.getpid() and Path(seen["path0"]).resolve() == probe.resolve()
    assert json.loads(forked.stdout)["ppid"] != os.getpid()  # the zygote's child
    assert json.loads(fresh.stdout)["ppid"] == os.getpid()


def test_what_a_child_inherits_is_taken_from_the_test_process_as_it_is_now(probe: Path, monkeypatch):
    """The umask, resource limits, nice value, CPUs and working directory a test has set since the
    zygote started (a test of private files runs the daemon under umask 000)."""
    import resource

    forkrun.run("forkprobe", [], cwd=probe)  # the zygote is running before the test changes anything
    monkeypatch.chdir(probe)
    old_mask = os.umask(0o027)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 7, hard))
    try:
        forked, fresh = both("forkprobe", [])
    finally:
        os.umask(old_mask)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for proc in (forked, fresh):
        seen = json.loads(proc.stdout)
        assert (seen["umask"], seen["nofile"], seen["cwd"]) == (0o027, soft - 7, str(probe)), seen
        assert (seen["nice"], seen["cpus"]) == (os.nice(0), sorted(os.sched_getaffinity(0)))


def test_the_interpreter_ends_a_forked_command(probe: Path):
    """A traceback and exit 1, ``sys.exit("text")``, and standard output on a full disk, as the
    interpreter does them."""
    forked, fresh = both("forkprobe", ["raise"], cwd=probe)
    for proc in (forked, fresh):
        assert proc.returncode == 1 and proc.stderr.startswith("Traceback")
        assert proc.stderr.endswith("ValueError: a probe that failed\n")
    forked, fresh = both("forkprobe", ["exit", "said and gone"], cwd=probe)
    assert (forked.returncode, forked.stderr) == (fresh.returncode, fresh.stderr) == (1, "said and gone\n")
    with open("/dev/full", "w") as full:
        forked, fresh = both("forkprobe", ["print"], cwd=probe, stdout=full)
    assert forked.returncode == fresh.returncode != 0, (forked, fresh)
    assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1], (forked, fresh)


def test_membershipd_forked_says_what_a_new_one_says(tmp_path: Path):
    forked = run_membershipd("plugins", "--json")
    fresh = run_membershipd("plugins", "--json", env={forkrun.FORK_ENV: "0"})
    assert forked.returncode == fresh.returncode == 0 and forked.stdout == fresh.stdout
    forked = run_membershipd("serve", "--http-addr", "nowhere")
    fresh = run_membershipd("serve", "--http-addr", "nowhere", env={forkrun.FORK_ENV: "0"})
    assert forked.returncode == fresh.returncode == 2 and forked.stderr == fresh.stderr


def test_what_an_interpreter_reads_as_it_starts_gets_a_new_one(probe: Path, tmp_path: Path):
    """PYTHONPATH (any variable but ours, pytest's, XDG's and HOME) is read before any code runs:
    a fork could not honour it, so such a command is a new interpreter."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "onlythere.py").write_text("import sys; print(sys.argv[1:])\n")
    proc = forkrun.run("onlythere", ["x"], env={**os.environ, "PYTHONPATH": str(other)})
    assert (proc.returncode, proc.stdout) == (0, "['x']\n"), proc.stderr
    assert not forkrun._may_fork({**os.environ, "PYTHONPATH": "x"}, os.environ)
    assert not forkrun._may_fork({**os.environ, "LC_ALL": "C"}, os.environ)
    assert forkrun._may_fork({**os.environ, "UNIBUS_X": "1", "PYTEST_CURRENT_TEST": "t", "XDG_CONFIG_HOME": "/c"},
                             os.environ)


def test_a_command_past_its_timeout_is_killed(probe: Path):
    (probe / "forksleep.py").write_text("import os, sys, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        forkrun.run("forksleep", [], cwd=probe, timeout=1)
    assert time.monotonic() - started < 30


def test_a_spawned_process_takes_signals_and_reports_its_status(probe: Path, tmp_path: Path):
    (probe / "forksleep.py").write_text("import time\ntime.sleep(60)\n")
    with open(tmp_path / "out", "wb") as out:
        proc = forkrun.spawn("forksleep", [], cwd=probe, stdout=out, stderr=subprocess.STDOUT)
    assert isinstance(proc, forkrun.ForkedProcess)
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.2)
    proc.terminate()
    assert proc.wait(10) == -signal.SIGTERM
    proc.kill()  # once it has exited: nothing is sent
    assert proc.poll() == -signal.SIGTERM


def test_processes_outlive_no_test_process(tmp_path: Path):
    """A test process that dies leaves nothing it forked running: the zygote kills it and exits."""
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(tmp_path)!r})
        from unibus import forkrun
        open({str(tmp_path / "forksleep.py")!r}, "w").write("import time\\ntime.sleep(60)\\n")
        proc = forkrun.spawn("forksleep", [], cwd={str(tmp_path)!r})
        print(proc.pid, *(z.proc.pid for z in forkrun._zygotes), flush=True)
        time.sleep(60)
    """)
    test_process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                    env={**os.environ, forkrun.FORK_ENV: "1"})
    try:
        assert test_process.stdout is not None
        pids = [int(p) for p in test_process.stdout.readline().split()]
        assert len(pids) == 1 + forkrun.ZYGOTES and all(alive(p) for p in pids)
    finally:
        test_process.kill()
        test_process.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


def test_a_zygote_killed_outright_takes_what_it_forked_and_is_replaced(probe: Path):
    """Its processes die with it (a parent-death signal), asking one of them for its status
    says why, and the next process asked for comes from a new zygote."""
    (probe / "forksleep.py").write_text("import time\ntime.sleep(60)\n")
    procs = [forkrun.spawn("forksleep", [], cwd=probe) for _ in range(forkrun.ZYGOTES)]
    assert all(isinstance(p, forkrun.ForkedProcess) for p in procs)
    victim = procs[0]
    zygote = victim._zygote
    zygote.proc.kill()
    zygote.proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(victim.pid):
        time.sleep(0.02)
    assert not alive(victim.pid)
    with pytest.raises(forkrun.ZygoteGone):
        victim.wait(10)
    for proc in procs[1:]:
        proc.kill()
        assert proc.wait(10) == -signal.SIGKILL
    again = [forkrun.run("forkprobe", [], cwd=probe) for _ in range(forkrun.ZYGOTES)]
    assert [p.returncode for p in again] == [0] * forkrun.ZYGOTES


PID_REUSE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from unibus import forkrun
    first = forkrun.spawn("forkexit", ["3"])
    assert first.wait(10) == 3
    for _ in range(forkrun.ZYGOTES - 1):  # back to the zygote that forked the first
        forkrun.run("forkexit", ["0"])
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(first.pid - 1))
    second = forkrun.spawn("forkexit", ["0"])
    print(first.pid, second.pid, second.wait(10))
""")


def test_an_exit_status_belongs_to_its_process_not_its_pid(probe: Path):
    """The zygote reports an exit by the request that started the process: a pid the kernel
    hands out again never gets an earlier process's status, nor a signal meant for it."""
    (probe / "forkexit.py").write_text("import sys\nsys.exit(int(sys.argv[1]))\n")
    first = forkrun.spawn("forkexit", ["3"], cwd=probe)
    assert first.wait(10) == 3
    zygote = first._zygote
    assert first._request not in zygote._exits and first._pidfd is None  # taken and let go
    first.kill()  # long gone: nothing is sent, to this pid or another's
    assert first.poll() == 3
    # The pid itself given again, in a PID namespace of its own: the next pid is set there
    # (as root), never for the processes of the other tests running meanwhile.
    if os.geteuid() == 0 and shutil.which("unshare"):
        proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PID_REUSE],
                              capture_output=True, text=True, timeout=60, cwd=probe,
                              env={**os.environ, forkrun.FORK_ENV: "1"})
        assert proc.returncode == 0, proc.stderr
        first_pid, second_pid, status = proc.stdout.split()
        assert first_pid == second_pid and status == "0", proc.stdout


def test_a_child_that_cannot_be_set_up_raises_as_a_new_one_would(probe: Path):
    """A working directory that does not exist: subprocess's FileNotFoundError, not an exit status."""
    for env in (os.environ, FRESH):
        with pytest.raises(FileNotFoundError):
            forkrun.run("forkprobe", [], cwd=probe / "missing", env=env)


def test_a_request_too_large_for_the_socket_starts_a_new_interpreter(probe: Path):
    # each variable under the kernel's 128 KiB for one string of an exec, together over the limit
    env = {**os.environ, "UNIBUS_PROBE": "x" * 70_000, "UNIBUS_PAD": "y" * 70_000}
    proc = forkrun.run("forkprobe", [], cwd=probe, env=env)
    seen = json.loads(proc.stdout)
    assert proc.returncode == 0 and seen["env"] == env["UNIBUS_PROBE"] and seen["ppid"] == os.getpid()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_test_process_group_reaches_forked_processes_not_the_zygotes(tmp_path: Path, sig):
    """Ctrl-C (SIGINT) or a CI runner's SIGTERM to the process group: a forked process takes it as
    a new one does (it is in the test process's group, with an interpreter's handlers), and the
    zygotes, each in a group of its own, take none, so those processes are still reported."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from unibus import forkrun
        signal.signal({int(sig)}, lambda *_: None)  # this process, as pytest would, lives on
        open({str(tmp_path / "forksleep.py")!r}, "w").write("import time\\ntime.sleep(60)\\n")
        forked = forkrun.spawn("forksleep", [], cwd={str(tmp_path)!r})
        fresh = forkrun.spawn("forksleep", [], cwd={str(tmp_path)!r},
                              env={{**os.environ, forkrun.FORK_ENV: "0"}})
        time.sleep(1)  # both in their sleep
        os.killpg(0, {int(sig)})
        print(forked.wait(20), fresh.wait(20), all(z.proc.poll() is None for z in forkrun._zygotes))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          start_new_session=True, env={**os.environ, forkrun.FORK_ENV: "1"})
    assert proc.stdout.split() == [str(-sig), str(-sig), "True"], proc.stderr


def test_signals_the_test_process_ignores_are_ignored_in_what_it_starts(probe: Path):
    """A new process inherits ignored signals; so does a forked one, whatever the zygote had."""
    (probe / "forksignals.py").write_text(textwrap.dedent("""
        import signal
        print(*(int(s) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGPIPE)
                if signal.getsignal(s) == signal.SIG_IGN))
        print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGCHLD))
    """))
    forkrun.run("forkprobe", [], cwd=probe)  # the zygotes run before the change
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGHUP, signal.SIGUSR1)}
    try:
        forked, fresh = both("forksignals", [], cwd=probe)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    assert forked.stdout == fresh.stdout, (forked.stdout, fresh.stdout)
    assert forked.stdout.splitlines()[0].split() == [str(int(s)) for s in (signal.SIGHUP, signal.SIGUSR1,
                                                                           signal.SIGPIPE)]


def test_what_a_new_process_refuses_is_refused_as_it_was(probe: Path):
    """A NUL in an argument or the environment: subprocess's ValueError, never a forked run."""
    with pytest.raises(ValueError):
        forkrun.run("forkprobe", ["a\0b"], cwd=probe)
    with pytest.raises(ValueError):
        forkrun.run("forkprobe", [], cwd=probe, env={**os.environ, "UNIBUS_PROBE": "a\0b"})
    proc = forkrun.run("forkprobe", [Path("as-a-path")], cwd=probe)  # type: ignore[list-item]
    assert json.loads(proc.stdout)["argv"] == ["as-a-path"]


def test_a_restart_never_comes_from_the_zygote_of_the_start_before(probe: Path):
    (probe / "forksleep.py").write_text("import time\ntime.sleep(60)\n")
    first = forkrun.spawn("forksleep", [], cwd=probe)
    try:
        for _ in range(forkrun.ZYGOTES):  # whatever the turn, the next one must not be the first's
            forkrun.run("forkprobe", [], cwd=probe)
            again = forkrun.spawn("forksleep", [], cwd=probe, not_like=first)
            assert isinstance(again, forkrun.ForkedProcess) and again._zygote is not first._zygote
            again.kill()
            again.wait(10)
    finally:
        first.kill()
        first.wait(10)


def test_standard_output_on_a_terminal_is_line_buffered_as_in_a_new_interpreter(probe: Path):
    """Line-buffered, or unbuffered altogether under PYTHONUNBUFFERED (as on this project's CI
    machine): the zygote's stdout was a pipe, the forked process's is a terminal."""
    (probe / "forktty.py").write_text("import sys\n"
                                      "print(sys.stdout.line_buffering, sys.stdout.write_through, file=sys.stderr)\n")
    main, other = os.openpty()
    try:
        forked, fresh = both("forktty", [], cwd=probe, stdout=other)
    finally:
        os.close(main)
        os.close(other)
    assert forked.stderr == fresh.stderr and "True" in forked.stderr, (forked.stderr, fresh.stderr)


def alive(pid: int) -> bool:
    """Running, or a zombie nobody reaped: anything but gone (a zygote's child is reaped by it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
