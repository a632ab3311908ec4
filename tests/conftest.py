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


#: The files that take longest (``make test PYTEST_ARGS="-n 4 --dist loadfile --durations=60"``),
#: longest first. With ``--no-loadscope-reorder`` (the Makefile), ``--dist loadfile`` hands
#: files to the workers in collection order; without it, pytest-xdist 3.8 hands out the files
#: with the most tests first, and a long file with few tests (the fault test's) could start
#: late and run alone at the end while the other workers idled (README.md).
LONGEST_FIRST = (
    "core/test_connection_limits.py",
    "e2e/test_client_e2e.py",
    "e2e/test_cluster_faults.py",
    "core/test_store_contract.py",
    "e2e/test_cluster.py",
    "core/test_cli.py",
    "core/test_attack_stop_r2.py",
    "core/test_daemon_stop.py",
    "client/test_client_cli.py",
    "e2e/test_client_reconnect.py",
    "e2e/test_attack_reads.py",
    "core/test_daemon.py",
    "plugins/auth_enforce/test_login_limit.py",
    "client/test_client_replica.py",
    "e2e/test_attack_e2e_r5.py",
    "core/test_tls_listeners.py",
    "core/test_durability.py",
    "core/test_testing_kit.py",
    "core/test_private_files.py",
    "core/test_attack_stop_r1.py",
    "e2e/test_backup_cluster.py",
    "core/test_api_fuzz.py",
    "deploy/test_deploy.py",
    "plugins/blobstore/test_memory.py",
)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Collect the longest files first (a stable sort: every xdist worker gets the same order)."""
    here = session.config.rootpath / "tests"

    def rank(item: pytest.Item) -> int:
        try:
            return LONGEST_FIRST.index(item.path.relative_to(here).as_posix())
        except ValueError:
            return len(LONGEST_FIRST)

    items.sort(key=rank)
