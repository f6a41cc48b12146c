"""Shared fixtures.

`privileged` tests need root, BPF, nftables and network namespaces. A user without them
gets a clear skip; in CI (CI=true) a missing capability is a failure, never a skip.
"""
from __future__ import annotations

import os
import shutil

import pytest

from swarmlab.lab import Lab

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing_privileges() -> str | None:
    if os.geteuid() != 0:
        return "needs root (BPF, nftables and network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command (run install.sh)"
    return None


def require_privileges() -> None:
    reason = _missing_privileges()
    if reason:
        if IN_CI:
            pytest.fail(f"CI must run privileged tests, but: {reason}")
        pytest.skip(reason)


def skip_unsupported(reason: str) -> None:
    """Skip for something this host does not support; in CI that is a failure."""
    if IN_CI:
        pytest.fail(f"unsupported in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def setpriv() -> None:
    """Tests that run a process as another user need setpriv (util-linux)."""
    if shutil.which("setpriv") is None:
        skip_unsupported("needs setpriv (util-linux)")


def pytest_configure(config):
    """The in-process probes attach tracepoints, which need tracefs at /sys/kernel/tracing.
    systemd mounts it on a normal host; a bare one (a container, a fresh VM) may lack it,
    and the agent only mounts it in its own mount namespace: mount it here, as root."""
    if os.geteuid() == 0:
        from agent.sources.capability import ensure_tracefs

        ensure_tracefs()     # what still fails is said by the skips (failures in CI)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("privileged"):
            item.fixturenames.insert(0, "_privileged")


@pytest.fixture
def _privileged():
    require_privileges()


@pytest.fixture
def lab():
    """An attacker and a victim namespace joined by veth (see swarmlab.lab.Lab); removed after
    the test, with every process left inside them."""
    require_privileges()
    with Lab() as built:
        yield built
