"""membershipd's own NATS identity: an nkey user seed in ``<data-dir>/service.nkey``."""

from __future__ import annotations

import os
from pathlib import Path

import nkeys

from .errors import RuntimeFailure
from .privatefiles import read_private_file, write_private_file
from .settings import Secret

SERVICE_NKEY_FILE = "service.nkey"
#: A second identity in nats-server's system account (clustered nodes only).
SYSTEM_NKEY_FILE = "system.nkey"


def ensure_service_nkey(data_dir: Path, name: str = SERVICE_NKEY_FILE) -> tuple[Secret, str]:
    """Load or create (mode 0600) a user nkey seed; returns (seed, public key)."""
    path = data_dir / name
    if not os.path.lexists(path):
        write_private_file(path, nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER) + b"\n")
    return load_nkey_seed(path)


def load_nkey_seed(path: Path) -> tuple[Secret, str]:
    """Read a one-line nkeys user seed (``SU…``) from a file only its owner may read."""
    seed = read_private_file(path).strip()
    try:
        kp = nkeys.from_seed(bytearray(seed))
        public = kp.public_key.decode()
    except Exception:
        raise RuntimeFailure(f"{path} does not hold an nkeys user seed (one line, SU...)") from None
    if not public.startswith("U"):
        raise RuntimeFailure(f"{path} holds a seed that is not a user nkey (SU...)")
    return Secret(seed.decode()), public
