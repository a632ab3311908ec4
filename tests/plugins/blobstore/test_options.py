"""--blob-max-bytes: its validation, its default, and a blocked plugin's flag (no daemon started)."""

from __future__ import annotations

import pytest
from unibus.plugins import blobstore
from unibus.settings import Option
from unibus.testing import run_membershipd


def test_option_declaration():
    (opt,) = blobstore.cli_options()
    assert isinstance(opt, Option)
    assert opt.flag == "--blob-max-bytes" and opt.name == "blob_max_bytes"
    assert opt.default == 104857600 == blobstore.DEFAULT_MAX_BYTES
    assert opt.convert("1") == 1


@pytest.mark.parametrize("value, message", [("0", "must be at least 1"), ("-5", "must be at least 1"),
                                            ("12x", "is not a whole number"), ("", "is not a whole number")])
def test_bad_values_exit_2_naming_the_flag(value, message):
    proc = run_membershipd("posture", f"--blob-max-bytes={value}")
    assert proc.returncode == 2
    assert "--blob-max-bytes: " in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_blocked_plugin_refuses_its_flag():
    proc = run_membershipd("posture", "--disable-plugin", "blobstore", "--blob-max-bytes", "5")
    assert proc.returncode == 2
    assert "--blob-max-bytes" in proc.stderr and "blobstore" in proc.stderr


def test_help_documents_the_flag():
    proc = run_membershipd("serve", "--help")
    assert proc.returncode == 0
    assert "--blob-max-bytes N" in proc.stdout and "104857600" in proc.stdout
