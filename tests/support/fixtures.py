"""Fixtures shared by the host tier and the guest tier."""

from __future__ import annotations

import socket
import threading

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


@pytest.fixture
def tarpit():
    """A TCP port that accepts connections and never says anything: an ssh server that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()
