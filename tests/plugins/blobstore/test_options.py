"""--blob-max-bytes, --blob-max-uploads and --blob-max-downloads: validation, defaults, and a blocked plugin's flags (no daemon started)."""

from __future__ import annotations

import pytest
from unibus.plugins import blobstore
from unibus.plugins.blobstore.limits import DEFAULT_MAX_DOWNLOADS, DEFAULT_MAX_UPLOADS
from unibus.settings import Option
from unibus.testing import run_membershipd

FLAGS = ["--blob-max-bytes", "--blob-max-uploads", "--blob-max-downloads"]


def test_option_declarations():
    size, uploads, downloads = blobstore.cli_options()
    assert isinstance(size, Option) and isinstance(uploads, Option) and isinstance(downloads, Option)
    assert size.flag == "--blob-max-bytes" and size.name == "blob_max_bytes"
    assert size.default == 104857600 == blobstore.DEFAULT_MAX_BYTES
    assert uploads.flag == "--blob-max-uploads" and uploads.name == "blob_max_uploads"
    assert uploads.default == 16 == DEFAULT_MAX_UPLOADS
    assert downloads.flag == "--blob-max-downloads" and downloads.name == "blob_max_downloads"
    assert downloads.default == 64 == DEFAULT_MAX_DOWNLOADS
    assert size.convert("1") == 1 and uploads.convert("1") == 1 and downloads.convert("1") == 1


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("value, message", [("0", "must be at least 1"), ("-5", "must be at least 1"),
                                            ("12x", "is not a whole number"), ("", "is not a whole number")])
def test_bad_values_exit_2_naming_the_flag(flag, value, message):
    proc = run_membershipd("posture", f"{flag}={value}")
    assert proc.returncode == 2
    assert f"{flag}: " in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", FLAGS)
def test_blocked_plugin_refuses_its_flags(flag):
    proc = run_membershipd("posture", "--disable-plugin", "blobstore", flag, "5")
    assert proc.returncode == 2
    assert flag in proc.stderr and "blobstore" in proc.stderr


def test_help_documents_the_flags():
    proc = run_membershipd("serve", "--help")
    assert proc.returncode == 0
    assert "--blob-max-bytes N" in proc.stdout and "104857600" in proc.stdout
    assert "--blob-max-uploads N" in proc.stdout and "(default 16)" in proc.stdout
    assert "--blob-max-downloads N" in proc.stdout and "(default 64)" in proc.stdout
