"""unibus.logthrottle: what any client can repeat is logged a bounded number of times per window."""

from __future__ import annotations

from unibus.logthrottle import MAX_KINDS, MAX_LINE, LogThrottle, cut, left_out_note, nats_line_kind


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


def test_what_a_client_chose_never_makes_a_kind_of_its_own():
    """A red team sent a fresh user name with each try: a kind per try, and 3.7 KB of log each."""
    lines = [f'[1] 2026/12/05 23:27:16.5 [ERR] 127.0.0.1:{40000 + i} - cid:{i} - authentication error - User "{u}"'
             for i, u in enumerate(["mallory", "x" * 3500, "a'b", "U" + "A" * 57])]
    lines.append("[1] 2026/12/05 23:27:16.5 [ERR] 127.0.0.1:1 - cid:2 - authentication error - User 'quoted'")
    assert len({nats_line_kind(line) for line in lines[:4]}) == 1
    long = lines[1]
    assert len(cut(long)) < MAX_LINE + 40 and cut(long).endswith("more characters)") and cut(lines[0]) == lines[0]
