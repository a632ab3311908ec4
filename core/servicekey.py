"""membershipd's own NATS identity: an nkey user seed in ``<data-dir>/service.nkey``."""

from __future__ import annotations

import os
from pathlib import Path

import nkeys

from .errors import RuntimeFailure
from .settings import Secret

SERVICE_NKEY_FILE = "service.nkey"
#: A second identity in nats-server's system account (clustered nodes only).
SYSTEM_NKEY_FILE = "system.nkey"


def ensure_service_nkey(data_dir: Path, name: str = SERVICE_NKEY_FILE) -> tuple[Secret, str]:
    """Load or create (mode 0600) a user nkey seed; returns (seed, public key)."""
    path = data_dir / name
    if not path.exists():
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(seed + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return load_nkey_seed(path)


def load_nkey_seed(path: Path) -> tuple[Secret, str]:
    """Read a one-line nkeys user seed (``SU…``) from a file only its owner may read."""
    try:
        if path.stat().st_mode & 0o077:
            raise RuntimeFailure(f"{path} is readable by group or others; run chmod 600 {path}")
        seed = path.read_bytes().strip()
        kp = nkeys.from_seed(bytearray(seed))
        public = kp.public_key.decode()
    except RuntimeFailure:
        raise
    except OSError as e:
        raise RuntimeFailure(f"cannot read nkey seed {path}: {e.strerror}") from e
    except Exception:
        raise RuntimeFailure(f"{path} does not hold an nkeys user seed (one line, SU...)") from None
    if not public.startswith("U"):
        raise RuntimeFailure(f"{path} holds a seed that is not a user nkey (SU...)")
    return Secret(seed.decode()), public
