"""unibus.logthrottle: what any client can repeat is logged a bounded number of times per window."""

from __future__ import annotations

from unibus.logthrottle import MAX_KINDS, LogThrottle, left_out_note, nats_line_kind


def test_a_kind_is_logged_burst_times_per_window_and_the_next_window_says_how_many_were_left_out():
    now = [0.0]
    t = LogThrottle(burst=3, window=10.0, clock=lambda: now[0])
    assert [t.admit("refused") for _ in range(5)] == [0, 0, 0, None, None]
    assert t.admit("other") == 0  # each kind has its own count
    now[0] = 9.9
    assert t.admit("refused") is None
    now[0] = 10.0
    assert t.admit("refused") == 3  # the first line of the new window names what was left out
    assert t.admit("refused") == 0
    assert left_out_note(3) == " (3 more like it in the last window not logged)" and left_out_note(0) == ""


def test_the_kinds_kept_are_bounded():
    t = LogThrottle(burst=1, window=10.0, clock=lambda: 0.0)
    for i in range(MAX_KINDS * 3):
        assert t.admit(f"kind {i}") == 0
    assert len(t._kinds) <= MAX_KINDS


def test_nats_lines_of_one_refused_login_and_the_next_are_one_kind():
    one = ('[18464] 2026/12/05 23:27:16.545375 [ERR] 127.0.0.1:51234 - cid:17 - authentication error - '
           'Nkey "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAOFRPFANPMGYBFRQQXDTN2OO"')
    two = ('[18464] 2026/12/05 23:27:17.000001 [ERR] 127.0.0.1:51299 - cid:18 - authentication error - '
           'Nkey "UAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"')
    assert nats_line_kind(one) == nats_line_kind(two)
    assert nats_line_kind("[1] 2026/12/05 23:27:16.5 [ERR] JetStream out of resources") != nats_line_kind(one)
