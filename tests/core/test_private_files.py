"""Adversary: another local user of the host (docs/operations.md, "The data directory").

membershipd keeps its nkey seeds, the route password and the store in the data
directory. These tests try to make it adopt a directory or a file that another
user made or may write to, to plant a link where it writes a secret, and to
make it leave parents open under a umask of 000."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from unibus.bus import Bus
from unibus.errors import ConfigError, RuntimeFailure
from unibus.natsconf import write_config
from unibus.privatefiles import check_private_dir, make_private_dirs, read_private_file, write_private_file
from unibus.servicekey import ensure_service_nkey
from unibus.testing import run_membershipd

OTHER_UID = 65534  # nobody

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root (CI runs as root)")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def one_line_refusal(done) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_data_dir_others_may_write_to_is_refused_and_left_as_it_was(tmp_path):
    data = tmp_path / "shared"
    data.mkdir()
    os.chmod(data, 0o777)
    line = one_line_refusal(run_membershipd("migrate", "--data-dir", str(data)))
    assert "--data-dir" in line and f"chmod 700 {data}" in line
    assert list(data.iterdir()) == []  # nothing written into it
    assert mode(data) == 0o777


def test_a_data_dir_others_may_read_is_closed(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    os.chmod(data, 0o755)
    done = run_membershipd("migrate", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert mode(data) == 0o700
    assert mode(data / "membershipd.db") == 0o600


def test_under_umask_000_every_directory_made_for_the_data_dir_is_0700(tmp_path):
    data = tmp_path / "srv" / "unibus" / "data"
    old = os.umask(0)
    try:
        done = run_membershipd("migrate", "--data-dir", str(data))
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    assert [mode(d) for d in (tmp_path / "srv", tmp_path / "srv" / "unibus", data)] == [0o700] * 3
    assert mode(data / "membershipd.db") == 0o600


@pytest.mark.parametrize("parent_mode, refused", [(0o777, True), (0o775, True), (0o1777, False), (0o755, False)])
def test_a_data_dir_below_a_directory_others_may_write_to_is_refused(tmp_path, parent_mode, refused):
    """Another user who may write to a directory above the data dir renames it away between the check
    and the opens that follow, and puts one of theirs there (red team: won 4 of 25 races). A sticky
    directory (as /tmp) lets no one rename what is not theirs."""
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, parent_mode)
    data = parent / "data"
    done = run_membershipd("migrate", "--data-dir", str(data))
    if refused:
        line = one_line_refusal(done)
        assert f"chmod go-w {parent}" in line and f"above {data}" in line
    else:
        assert done.returncode == 0, done.stderr


def test_a_link_to_the_data_dir_is_checked_where_the_link_lives(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # whoever may write here may point the link elsewhere
    (shared / "data").symlink_to(real)
    line = one_line_refusal(run_membershipd("migrate", "--data-dir", str(shared / "data")))
    assert f"chmod go-w {shared}" in line
    assert list(real.iterdir()) == []


@needs_root
def test_a_data_dir_below_a_directory_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    line = one_line_refusal(run_membershipd("migrate", "--data-dir", str(theirs / "data")))
    assert f"belongs to uid {OTHER_UID}" in line


def test_backup_and_migrate_to_kv_check_the_data_dir_too(tmp_path):
    """They read the data directory only, and create nothing in it: a directory others may write to
    (or another user's database) is refused before anything is read or copied (red team: migrate-to-kv
    copied another user's database, their admin included, into the cluster's KV)."""
    data = tmp_path / "d"
    assert run_membershipd("migrate", "--data-dir", str(data)).returncode == 0
    os.chmod(data, 0o777)
    line = one_line_refusal(run_membershipd("backup", "--data-dir", str(data), "--out", str(tmp_path / "b.tar.gz")))
    assert f"chmod 700 {data}" in line and not (tmp_path / "b.tar.gz").exists()
    line = one_line_refusal(run_membershipd("migrate-to-kv", "--data-dir", str(data), "--nats-url",
                                            "nats://127.0.0.1:1"))
    assert f"chmod 700 {data}" in line


def test_a_looser_database_of_ours_is_made_0600(tmp_path):
    data = tmp_path / "d"
    assert run_membershipd("migrate", "--data-dir", str(data)).returncode == 0
    os.chmod(data / "membershipd.db", 0o644)
    done = run_membershipd("migrate", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert mode(data / "membershipd.db") == 0o600


def test_a_data_dir_of_another_user_is_refused(tmp_path):
    """As root, a directory given to uid 65534; as any other user, / (root's) is another user's."""
    if os.geteuid() == 0:
        data, owner = tmp_path / "theirs", OTHER_UID
        data.mkdir(mode=0o700)
        os.chown(data, OTHER_UID, OTHER_UID)
    else:
        data, owner = Path("/"), 0
    before = sorted(data.iterdir())
    line = one_line_refusal(run_membershipd("migrate", "--data-dir", str(data)))
    assert f"belongs to uid {owner}" in line
    assert sorted(data.iterdir()) == before


@needs_root
def test_a_database_another_user_planted_is_refused(tmp_path):
    data = tmp_path / "d"
    data.mkdir(mode=0o700)
    planted = data / "membershipd.db"
    planted.write_bytes(b"")
    os.chown(planted, OTHER_UID, OTHER_UID)
    line = one_line_refusal(run_membershipd("migrate", "--data-dir", str(data)))
    assert "membershipd.db" in line and f"belongs to uid {OTHER_UID}" in line
    assert planted.read_bytes() == b""


def test_a_link_in_place_of_the_database_is_refused(tmp_path):
    data = tmp_path / "d"
    data.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.db"
    elsewhere.write_bytes(b"")
    (data / "membershipd.db").symlink_to(elsewhere)
    line = one_line_refusal(run_membershipd("migrate", "--data-dir", str(data)))
    assert "symbolic link" in line
    assert elsewhere.read_bytes() == b""


def test_a_link_planted_at_the_old_temporary_names_receives_no_secret(tmp_path):
    """0.12 before this change wrote seeds through ``.service.nkey.tmp`` and the config through
    ``.nats.conf.tmp.<pid>``, fixed names opened without O_EXCL: a link planted there got the secret."""
    data = tmp_path / "d"
    make_private_dirs(data, "--data-dir")
    trap = tmp_path / "trap"
    trap.write_bytes(b"")
    for name in (".service.nkey.tmp", f".nats.conf.tmp.{os.getpid()}", ".service.nkey.tmp.0"):
        (data / name).symlink_to(trap)
    seed, public = ensure_service_nkey(data)
    write_config({"authorization": {"password": "route-secret"}}, data / "nats.conf")
    assert trap.read_bytes() == b""
    assert public.startswith("U") and mode(data / "service.nkey") == 0o600
    assert mode(data / "nats.conf") == 0o600 and "route-secret" in (data / "nats.conf").read_text()
    # only what it wrote, and the links it did not use: no temporary file left behind
    assert sorted(p.name for p in data.iterdir() if not p.is_symlink()) == ["nats.conf", "service.nkey"]


def test_a_secret_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "s"
    write_private_file(target, b"old\n")
    os.chmod(target, 0o644)  # a rewrite is 0600 again, from the first byte
    write_private_file(target, b"new\n")
    assert target.read_bytes() == b"new\n" and mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_a_seed_behind_a_link_or_open_to_others_is_refused(tmp_path):
    data = tmp_path / "d"
    make_private_dirs(data, "--data-dir")
    ensure_service_nkey(data)
    real = data / "service.nkey"
    linked = data / "linked.nkey"
    linked.symlink_to(real)
    with pytest.raises(RuntimeFailure, match="symbolic link"):
        read_private_file(linked)
    os.chmod(real, 0o620)
    with pytest.raises(RuntimeFailure, match=rf"\(mode 0620\); run chmod 600 {real}"):
        ensure_service_nkey(data)


@needs_root
def test_a_seed_of_another_user_is_refused(tmp_path):
    data = tmp_path / "d"
    make_private_dirs(data, "--data-dir")
    ensure_service_nkey(data)
    os.chown(data / "service.nkey", OTHER_UID, OTHER_UID)
    with pytest.raises(RuntimeFailure, match=f"belongs to uid {OTHER_UID}"):
        ensure_service_nkey(data)


def test_a_plugin_state_dir_others_may_write_to_is_refused(tmp_path):
    from unibus.pluginstate import state_dir_of

    data = tmp_path / "d"
    state = state_dir_of(data, "someplugin")
    assert mode(state) == mode(state.parent) == 0o700
    os.chmod(state, 0o777)
    with pytest.raises(ConfigError, match="chmod 700"):
        state_dir_of(data, "someplugin")


def test_a_file_in_place_of_the_data_dir_is_refused(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_private_dir(tmp_path / "f", "--data-dir")


async def test_a_nats_url_password_is_in_no_error_and_no_log(tmp_path, caplog):
    """--nats-url may carry user:pass@ (an external nats-server): logs and errors show it without them."""
    bus = Bus("nats://alice:S3cretPW@127.0.0.1:1")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RuntimeFailure) as failed:
        await bus.connect(timeout=1)
    assert "S3cretPW" not in str(failed.value) and "nats://127.0.0.1:1" in str(failed.value)
    assert "S3cretPW" not in caplog.text
    done = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), "--nats-url", "nats://alice:S3cretPW@10.9.9.9:4222")
    line = one_line_refusal(done)
    assert "S3cretPW" not in done.stderr and "nats://10.9.9.9:4222" in line


@needs_root
def test_a_link_of_another_user_on_the_way_to_the_data_dir_is_refused(tmp_path):
    """A red team: in a sticky directory (/tmp) another user's link to a directory of ours passed
    every check, since a link is followed; its owner then pointed it at a directory of theirs,
    and the restarted nats-server read their nats.conf (their user logged in, the monitor on
    every interface). A link on the way, or a link's own link, must be root's or ours."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    theirs = sticky / "data"
    theirs.symlink_to(real)
    os.lchown(theirs, OTHER_UID, OTHER_UID)
    line = one_line_refusal(run_membershipd("migrate", "--data-dir", str(theirs)))
    assert f"{theirs} on the way to {theirs} is a symbolic link of uid {OTHER_UID}" in line and str(real) in line
    assert list(real.iterdir()) == []
    # through a link of ours that names theirs
    ours = tmp_path / "ours"
    ours.symlink_to(theirs)
    with pytest.raises(ConfigError, match=f"{theirs} on the way to {ours} is a symbolic link of uid {OTHER_UID}"):
        check_private_dir(ours, "--data-dir")
    # a component above, relative targets and "..", as the kernel takes them
    (real / "sub").mkdir(mode=0o700)
    above = tmp_path / "above"
    above.symlink_to("tmp/../tmp/data")
    with pytest.raises(ConfigError, match=f"{theirs} on the way"):
        check_private_dir(above / "sub", "--data-dir")
    # links of ours (or root's) are followed as before
    os.lchown(theirs, 0, 0)
    check_private_dir(ours, "--data-dir")
    done = run_membershipd("migrate", "--data-dir", str(ours))
    assert done.returncode == 0, done.stderr


def test_the_links_followed_are_found_as_the_kernel_follows_them(tmp_path):
    from unibus.privatefiles import links_followed

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "l1").symlink_to("a")
    (tmp_path / "a" / "l2").symlink_to(tmp_path / "l1" / "b")
    found = [str(p) for p, _ in links_followed(tmp_path / "a" / "l2" / ".." / "b" / "missing" / "x")]
    assert found == [str(tmp_path / "a" / "l2"), str(tmp_path / "l1")]
    assert links_followed(tmp_path / "a" / "b") == []
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(ConfigError, match="too many levels"):
        links_followed(tmp_path / "loop")


@needs_root
def test_who_could_replace_a_link_decides_not_who_owns_it(tmp_path):
    """A review of the check above: a link of ours in a directory others may write to, further up
    the path, passed (they rename it and put theirs there), and so did a `..` after a link, taken
    as text; another user's link in a directory only root may write to was refused, though its
    owner cannot replace it."""
    from unibus.privatefiles import check_ancestors

    real = tmp_path / "real"
    (real / "data").mkdir(parents=True, mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit
    (shared / "lnk").symlink_to(real)
    with pytest.raises(ConfigError, match=f"chmod go-w {shared}"):
        check_ancestors(shared / "lnk" / "data", "--data-dir")
    # `..` after a link is the kernel's: the parent of where the link leads, here a 0777 directory
    wide = tmp_path / "w"
    (wide / "t").mkdir(parents=True)
    os.chmod(wide, 0o777)
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o700)
    (safe / "l").symlink_to(wide / "t")
    (wide / "data").mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=f"chmod go-w {wide}"):
        check_ancestors(Path(str(safe / "l") + "/../data"), "--data-dir")
    # another user's link in a directory of root's that only root may write to: kept
    rooted = tmp_path / "rooted"
    rooted.mkdir(mode=0o755)
    theirs = rooted / "link"
    theirs.symlink_to(real / "data")
    os.lchown(theirs, OTHER_UID, OTHER_UID)
    check_ancestors(theirs, "--data-dir")


@needs_root
def test_a_directory_left_by_dotdot_is_on_the_way_too(tmp_path):
    """A second review: in `THEIRS/../data`, THEIRS (another user's, in a sticky directory) was
    walked through and never checked; its owner then made it a link, and the same path led to a
    directory of theirs."""
    from unibus.privatefiles import check_ancestors, resolution

    sticky = tmp_path / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (sticky / "data").mkdir(mode=0o700)
    theirs = sticky / "evil"
    theirs.mkdir()
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError, match=f"{theirs} above .* belongs to uid {OTHER_UID}"):
        check_ancestors(Path(str(theirs) + "/../data"), "--data-dir")
    walk = resolution(Path(str(theirs) + "/../data"))
    assert walk.resolved == sticky / "data" and theirs in [d for d, _ in walk.directories]
    check_ancestors(sticky / "data", "--data-dir")  # the same directory, named without it


def test_a_path_too_long_to_look_at_is_refused_not_skipped(tmp_path, monkeypatch):
    """A third review: the walk took any error of lstat for "missing" and checked nothing past it;
    past 4,095 characters lstat fails (ENAMETOOLONG) on the absolute name, while the kernel
    resolves the shorter one given, so a link of another user there was never looked at."""
    from unibus.privatefiles import check_ancestors

    deep = tmp_path
    monkeypatch.chdir(tmp_path)
    for _ in range(17):  # 17 x 251 characters: past PATH_MAX once joined to the cwd
        os.mkdir("d" * 250, 0o700)
        os.chdir("d" * 250)
        deep = deep / ("d" * 250)
    os.mkdir("data", 0o700)
    with pytest.raises(ConfigError, match="--data-dir: cannot look at .* on the way to data"):
        check_ancestors(Path("data"), "--data-dir")


def test_the_padding_of_a_kept_body_is_counted_only_in_json():
    """A third review: the pattern of JSON strings, run on `\\"` repeated without an end, took
    0.8 s of the event loop for 16 KiB (quadratic); it now runs only on a body that is JSON."""
    import unibus.api.common as common

    class Counting:
        calls = 0

        def sub(self, *args):
            Counting.calls += 1
            return common.re.compile(rb'"(?:[^"\\]|\\.)*"').sub(*args)

    original = common._JSON_STRING
    common._JSON_STRING = Counting()
    try:
        assert not common._padded(b'\\"' * 8190)  # not JSON: the handler refuses it
        assert Counting.calls == 0
        assert common._padded(b'{"name": "a\\"b"' + b" " * 257 + b"}")
        assert not common._padded(b'{"name": "a\\"b' + b" " * 300 + b'"}')  # spaces inside the string
        assert Counting.calls == 2
    finally:
        common._JSON_STRING = original
