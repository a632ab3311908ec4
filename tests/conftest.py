"""Shared fixtures of unibus's own tests (the generic ones come from unibus.testing)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from unibus.client.keys import Identity, generate_identity
from unibus.testing import MembershipdProcess, bootstrap_member


@pytest.fixture
def alice() -> Identity:
    return generate_identity("alice")


@pytest.fixture
def daemon_with_admin(tmp_path, membershipd_factory, alice) -> Callable[..., MembershipdProcess]:
    """Factory: a running membershipd whose store already holds ``alice`` as admin."""

    def start(*args: str, env: dict[str, str] | None = None) -> MembershipdProcess:
        data_dir = tmp_path / "daemon"
        bootstrap_member(data_dir, alice, "admin")
        return membershipd_factory(*args, env=env, data_dir=data_dir)

    return start
