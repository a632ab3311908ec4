"""unibus.stopsignals: how membershipd's operator commands stop on SIGTERM, SIGHUP and Ctrl-C.

A first version raised wherever the signal came; a review stopped clean-ups half-way, left the
process ignoring SIGTERM, and exited 143 after a complete restore. These run in a new interpreter
of their own: they send signals to the process that checks them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import json, signal
    from unibus.stopsignals import StopSignal, operator_command, stoppable

    out = {}

    def outcome(fn):
        try:
            fn()
            return "done"
        except StopSignal as e:
            return f"stopped {e.signum}"

    def kept_until_a_stoppable_part():
        with operator_command():
            signal.raise_signal(signal.SIGTERM)   # outside any stoppable part: kept
            out["after the signal"] = "ran"
            with stoppable():
                out["inside the stoppable part"] = "ran"  # never: the kept signal raises on entry
    out["kept"] = outcome(kept_until_a_stoppable_part)

    def raised_inside_then_clean_up_whole():
        with operator_command():
            try:
                with stoppable():
                    signal.raise_signal(signal.SIGHUP)
                    out["after the raise"] = "ran"  # never
            finally:
                signal.raise_signal(signal.SIGTERM)  # a second signal in the clean-up: nothing
                out["clean-up"] = "whole"
    out["inside"] = outcome(raised_inside_then_clean_up_whole)

    def past_the_last_stoppable_part():
        with operator_command():
            with stoppable():
                pass
            signal.raise_signal(signal.SIGTERM)    # past the commit point: the command finishes
            out["finished"] = "yes"
    out["past"] = outcome(past_the_last_stoppable_part)

    def ctrl_c():
        with operator_command():
            with stoppable():
                signal.raise_signal(signal.SIGINT)
    out["ctrl-c"] = outcome(ctrl_c)

    out["handlers after"] = [signal.getsignal(s) == signal.SIG_DFL for s in (signal.SIGTERM, signal.SIGHUP)]

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    def nohup():
        with operator_command():
            with stoppable():
                signal.raise_signal(signal.SIGHUP)
                out["nohup"] = "ignored"
    out["nohup outcome"] = outcome(nohup)
    out["sighup after nohup"] = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    print(json.dumps(out))
''')


def test_a_stop_signal_ends_only_a_stoppable_part_and_never_a_clean_up():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["kept"] == "stopped 15" and out["after the signal"] == "ran", out
    assert "inside the stoppable part" not in out, out
    assert out["inside"] == "stopped 1" and "after the raise" not in out and out["clean-up"] == "whole", out
    assert out["past"] == "done" and out["finished"] == "yes", out
    assert out["ctrl-c"] == "stopped 2", out
    assert out["handlers after"] == [True, True], out
    assert out["nohup outcome"] == "done" and out["nohup"] == "ignored", out
    assert out["sighup after nohup"] is True, out
