"""Settings: every bad value is a ConfigError naming its flag."""

from __future__ import annotations

import os

import argparse
from pathlib import Path

import pytest

from unibus.errors import ConfigError
from unibus.settings import (
    HostPort,
    Option,
    Secret,
    add_core_arguments,
    build_settings,
    child_environment,
    parse_bool_env,
    parse_host_port,
)


def settings_from(argv, env=None, plugin_options=()):
    parser = argparse.ArgumentParser()
    add_core_arguments(parser)
    from unibus.settings import add_plugin_arguments

    add_plugin_arguments(parser, plugin_options)
    return build_settings(parser.parse_args(argv), env or {}, plugin_options)


def test_defaults_follow_the_spec():
    s = settings_from([])
    assert s.data_dir == Path("local_files")
    assert s.http_addr == HostPort("127.0.0.1", 8470)
    assert s.nats_addr == HostPort("127.0.0.1", 4250)
    assert s.cluster_addr == HostPort("0.0.0.0", 6250)
    assert (s.bus_auth, s.kv_replicas, s.auth_skew, s.nats_url) == ("enforce", 1, 60, None)
    assert not s.clustered and s.embedded
    assert s.nats_client_url == "nats://127.0.0.1:4250"


def test_env_data_dir_and_flag_precedence(tmp_path):
    assert settings_from([], {"UNIBUS_DATA_DIR": str(tmp_path)}).data_dir == tmp_path
    assert settings_from(["--data-dir", "x"], {"UNIBUS_DATA_DIR": str(tmp_path)}).data_dir == Path("x")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--http-addr", "nonsense"], "--http-addr"),
        (["--http-addr", "127.0.0.1:70000"], "--http-addr"),
        (["--http-addr", ":8470"], "--http-addr"),
        (["--nats-addr", "bad host:4250"], "--nats-addr"),
        (["--nats-addr", "127.0.0.1:0"], "--nats-addr"),
        (["--bus-auth", "maybe"], "--bus-auth"),
        (["--kv-replicas", "2"], "--kv-replicas"),
        (["--kv-replicas", "three"], "--kv-replicas"),
        (["--kv-replicas", "3"], "--kv-replicas"),
        (["--server-name", "has space"], "--server-name"),
        (["--auth-skew", "-5"], "--auth-skew"),
        (["--auth-skew", "soon"], "--auth-skew"),
        (["--auth-skew", "601"], "--auth-skew: 601 is too large; use 1 to 600"),
        (["--nats-url", "http://x"], "--nats-url"),
        (["--routes", "nats://user:pw@127.0.0.2:6250", "--cluster-name", "c"], "--routes"),
        (["--routes", "http://127.0.0.2:6250", "--cluster-name", "c"], "--routes"),
        (["--routes", "nats://127.0.0.2:6250"], "--routes"),
        (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], "--tls-cert"),
        (["--tls-key", "/nonexistent/key.pem"], "--tls-cert"),
        (["--cluster-pass-file", "/nonexistent/pass", "--cluster-name", "c"], "--cluster-pass-file"),
    ],
)
def test_bad_values_name_their_flag(argv, flag):
    with pytest.raises(ConfigError) as e:
        settings_from(argv)
    assert e.value.exit_code == 2
    assert flag in str(e.value)
    assert "\n" not in str(e.value)


def test_a_cluster_node_needs_a_route_password():
    """Checked after the cluster gate (serve and posture call it), not with the other flags:
    ``posture`` reports cluster flags that the gate refuses as such (exit 1), password or not."""
    from unibus.settings import require_route_password

    settings = settings_from(["--cluster-name", "c"])
    with pytest.raises(ConfigError) as e:
        require_route_password(settings)
    assert e.value.exit_code == 2 and str(e.value).startswith("--cluster-name needs a route password")
    require_route_password(settings_from([]))  # a single node needs none


@pytest.mark.parametrize("argv", [
    ["--cluster-name", "c", "--routes", "nats://route:hunter2secret@127.0.0.2:6250"],
    # a scheme that is refused, or none at all: the credentials are still never echoed
    ["--cluster-name", "c", "--routes", "tls://route:hunter2secret@127.0.0.2:6250"],
    ["--cluster-name", "c", "--routes", "route:hunter2secret@127.0.0.2:6250"],
    ["--nats-url", "http://user:hunter2secret@127.0.0.1:4222"],
    ["--nats-url", "user:hunter2secret@127.0.0.1:4222"],
    # a password with a / ? # moves the @ out of urlsplit's netloc (a red team's finding)
    ["--nats-url", "nats://u:hunter2/secret@10.0.0.1:4222"],
    ["--nats-url", "nats://u:hunter2secret#@10.0.0.1:4222"],
    ["--nats-url", "nats://u:hunter2secret?x@10.0.0.1:4222"],
    # a comma in a route password: the flag is split on commas
    ["--cluster-name", "c", "--routes", "nats://u:hunter2,secret@127.0.0.2:6250"],
])
def test_a_password_in_a_url_is_never_in_the_error(argv):
    with pytest.raises(ConfigError) as e:
        settings_from(argv)
    assert "hunter2" not in str(e.value) and "secret" not in str(e.value) and argv[-2] in str(e.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("nats://u:p@h:4222", "nats://h:4222"),
    ("nats://u:p/w@h:4222", "nats://h:4222"),
    ("tls://u:p?q#@[::1]:4222", "tls://[::1]:4222"),
    ("u:p@h:4222", "h:4222"),
    ("nats://h:4222", "nats://h:4222"),
])
def test_redact_url_drops_everything_up_to_the_last_at(url, shown):
    from unibus.settings import redact_text, redact_url

    assert redact_url(url) == shown
    assert redact_text(f"unrecognized arguments: {url} 'x'") == f"unrecognized arguments: {shown} 'x'"


@pytest.mark.parametrize("stray", ["nats://u:hunter2secret@127.0.0.3:6250", "nats://u:hunter2 secret@127.0.0.3:6250"])
def test_a_stray_route_url_is_not_echoed_by_argparse(stray):
    """A second route given after a space, not a comma: argparse quotes it as an unrecognized
    argument (a password with a space is two words of that message)."""
    from unibus.testing import run_membershipd

    proc = run_membershipd("posture", "--cluster-name", "c", "--routes", "nats://127.0.0.2:6250", stray)
    assert proc.returncode == 2 and "unrecognized arguments: nats://127.0.0.3:6250" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout and "secret" not in proc.stderr + proc.stdout


def test_an_unknown_command_that_is_a_url_is_not_echoed_with_its_password():
    from unibus.testing import run_membershipd

    proc = run_membershipd("nats://u:hunter2secret@127.0.0.3:4222")
    assert proc.returncode == 2 and "unknown command 'nats://127.0.0.3:4222'" in proc.stderr
    assert "hunter2secret" not in proc.stderr


@pytest.mark.parametrize("url", ["http://user:hunter2secret@127.0.0.1:4222", "user:hunter2secret@127.0.0.1:4222",
                                 "nats://u:hunter2/secret@127.0.0.1:4222", "nats://u:hunter2secret@[::1:4222",
                                 "nats://[::1:4222"])
def test_an_operator_commands_nats_url_password_is_never_in_the_error(tmp_path, url):
    from unibus.testing import run_membershipd

    for command in ("migrate-to-kv", "backup"):
        args = ["--out", str(tmp_path / "b.tar")] if command == "backup" else []
        proc = run_membershipd(command, "--data-dir", str(tmp_path), "--nats-url", url, *args)
        assert proc.returncode == 2 and "--nats-url" in proc.stderr, proc.stderr
        assert "hunter2" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_cluster_pass_file_must_be_private(tmp_path):
    f = tmp_path / "pass"
    f.write_text("s3cret-route-pass\n")
    f.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        settings_from(["--cluster-name", "c", "--cluster-pass-file", str(f)])
    f.chmod(0o600)
    s = settings_from(["--cluster-name", "c", "--cluster-pass-file", str(f), "--routes", "nats://127.0.0.2:6250"])
    assert s.cluster_pass == Secret("s3cret-route-pass")
    assert "s3cret" not in repr(s) and "s3cret" not in repr(s.cluster_pass)
    assert s.for_plugins().cluster_pass is None
    assert s.clustered and s.routes == ("nats://127.0.0.2:6250",)


def test_a_huge_cluster_pass_file_is_refused_as_a_password_file(tmp_path):
    f = tmp_path / "pass"
    with f.open("wb") as out:
        out.truncate(4 * 1024 * 1024 + 1)  # sparse: nothing written
    f.chmod(0o600)
    with pytest.raises(ConfigError, match=r"--cluster-pass-file: .* bytes: not a password file$"):
        settings_from(["--cluster-name", "c", "--cluster-pass-file", str(f)])


def test_a_cluster_pass_file_of_another_user_or_a_fifo_is_refused_at_once(tmp_path):
    """Checked on the very file read: a FIFO in its place is refused, not waited on (a red team:
    the check and the read opened the path apart), and another user's file is refused."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        settings_from(["--cluster-name", "c", "--cluster-pass-file", str(fifo)])
    if os.geteuid() == 0:  # giving a file away needs root (CI runs as root)
        f = tmp_path / "theirs"
        f.write_text("s3cret-route-pass\n")
        f.chmod(0o600)
        os.chown(f, 65534, 65534)
        with pytest.raises(ConfigError, match="belongs to uid 65534"):
            settings_from(["--cluster-name", "c", "--cluster-pass-file", str(f)])


def test_cluster_pass_from_env_and_child_env_strips_it():
    s = settings_from(["--cluster-name", "c"], {"UNIBUS_CLUSTER_PASS": "from-env"})
    assert s.cluster_pass == Secret("from-env")
    assert "UNIBUS_CLUSTER_PASS" not in child_environment({"UNIBUS_CLUSTER_PASS": "x", "PATH": "/bin"})


def test_nats_url_refuses_cluster_flags():
    with pytest.raises(ConfigError, match="--nats-url"):
        settings_from(["--nats-url", "nats://127.0.0.1:4222", "--cluster-name", "c"], {"UNIBUS_CLUSTER_PASS": "p"})


def test_plugin_options_are_converted_and_named():
    opt = Option("--widget-count", help="widgets", default=3, convert=int)
    s = settings_from(["--widget-count", "7"], plugin_options=[("widgets", opt)])
    assert s.option("widget_count") == 7
    assert settings_from([], plugin_options=[("widgets", opt)]).option("widget_count") == 3
    with pytest.raises(ConfigError, match="--widget-count"):
        settings_from(["--widget-count", "many"], plugin_options=[("widgets", opt)])


def test_plugin_option_env():
    opt = Option("--widget-count", help="widgets", default=3, convert=int, env="WIDGETS")
    assert settings_from([], {"WIDGETS": "9"}, plugin_options=[("w", opt)]).option("widget_count") == 9
    with pytest.raises(ConfigError, match="WIDGETS"):
        settings_from([], {"WIDGETS": "x"}, plugin_options=[("w", opt)])


@pytest.mark.parametrize("raw, value", [("1", True), ("TRUE", True), (" yes ", True), ("On", True),
                                        ("0", False), ("false", False), ("NO", False), ("off", False),
                                        ("", False), (None, False)])
def test_bool_spellings(raw, value):
    assert parse_bool_env(raw) is value


@pytest.mark.parametrize("raw", ["2", "enable", "y", "truee"])
def test_bool_bad_spellings(raw):
    with pytest.raises(ValueError):
        parse_bool_env(raw)


def test_host_port_forms():
    assert parse_host_port("0.0.0.0:8470").connect_host == "127.0.0.1"
    assert parse_host_port("[::1]:8470") == HostPort("::1", 8470)
    assert str(parse_host_port("[::1]:8470")) == "[::1]:8470"
    assert parse_host_port("localhost:1").host == "localhost"
