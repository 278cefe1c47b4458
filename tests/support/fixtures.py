"""Fixtures shared by the host tier and the guest tier."""

from __future__ import annotations

import pytest

from tests.support import sshd


@pytest.fixture
def untrusted_host():
    """A fresh sshd on 127.0.0.1 with its own keys, for an unprivileged user."""
    server = sshd.start()
    try:
        yield server
    finally:
        sshd.stop(server)


@pytest.fixture
def setup(tmp_path, untrusted_host):
    """A configured target backed up to the untrusted host (btrfs; see make_setup for others)."""
    from tests.support.targets import make_setup

    return make_setup(tmp_path, untrusted_host)
