"""cryptsnap.nbd's side of the NBD transmission protocol, spoken to by a client written from
the protocol's definition (the kernel is the client in use; the guest tier runs it for real)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

import pytest

from cryptsnap import nbd
from cryptsnap.blockcache import BLOCK, Store

SIZE = 2 * 1024 * 1024


class Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.handle = 0

    def request(self, command: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0):
        self.handle += 1
        header = struct.pack(">IIQQI", 0x25609513, flags | command, self.handle, offset, length)
        self.sock.sendall(header + data)
        if command == nbd.CMD_DISC:
            return None, b""
        magic, error, handle = struct.unpack(">IIQ", nbd._recv_exact(self.sock, 16))
        assert (magic, handle) == (0x67446698, self.handle)
        payload = nbd._recv_exact(self.sock, length) if command == nbd.CMD_READ and not error else b""
        return error, payload


@pytest.fixture
def served(tmp_path):
    image = tmp_path / "image"
    image.write_bytes(os.urandom(SIZE))
    fd = os.open(image, os.O_RDWR)
    remote = nbd.RemoteImage(fd)
    store = Store(tmp_path / "cache", "id", SIZE)
    store.open(64 * 1024, remote.read)
    ours, theirs = socket.socketpair()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("orderly", nbd.serve(ours, remote, store,
                                                                                    threading.Lock())))  # fmt: skip
    thread.start()
    yield Client(theirs), image, store, remote, result, thread
    theirs.close()
    thread.join(5)
    os.close(fd)


def test_reads_writes_flushes_and_an_orderly_disconnect(served):
    client, image, store, remote, result, thread = served
    before = image.read_bytes()
    error, data = client.request(nbd.CMD_READ, 3 * BLOCK, 2 * BLOCK)
    assert error == 0 and data == before[3 * BLOCK : 5 * BLOCK]
    assert store.has(3 * BLOCK)  # reads are kept
    new = os.urandom(4 * BLOCK)
    assert client.request(nbd.CMD_WRITE, 1024 * 1024, len(new), new, flags=nbd.CMD_FLAG_FUA) == (0, b"")
    assert client.request(nbd.CMD_FLUSH) == (0, b"")
    assert image.read_bytes()[1024 * 1024 : 1024 * 1024 + len(new)] == new  # write-through
    assert not store.has(1024 * 1024)  # outside the metadata ranges: not kept
    assert client.request(nbd.CMD_READ, 1024 * 1024, BLOCK)[1] == new[:BLOCK]
    assert client.request(99)[0] == errno.EINVAL
    client.request(nbd.CMD_DISC)
    thread.join(5)
    assert result["orderly"] is True and not remote.failed


def test_a_failed_write_is_reported_and_forgotten(served):
    client, image, store, remote, result, thread = served
    client.request(nbd.CMD_READ, 0, BLOCK)
    assert store.has(0)
    os.chmod(image, 0o400)
    remote.fd, good = os.open(image, os.O_RDONLY), remote.fd
    try:
        error, _ = client.request(nbd.CMD_WRITE, 0, BLOCK, b"x" * BLOCK)
    finally:
        os.close(remote.fd)
        remote.fd = good
    assert error == errno.EIO and remote.failed
    assert not store.has(0)  # the server's copy is unknown now: the cache holds none
    client.sock.close()
    thread.join(5)
    assert result["orderly"] is False  # the connection ended without a disconnect request


def test_a_failing_local_cache_is_dropped_and_the_server_still_gets_every_write(served):
    client, image, store, remote, result, thread = served
    store.cover([(0, SIZE)])
    os.close(store.fd)
    store.fd = os.open(image.parent / "cache" / "blocks", os.O_RDONLY)  # writes to it now fail, as on a full disk
    new = os.urandom(2 * BLOCK)
    assert client.request(nbd.CMD_WRITE, 8 * BLOCK, len(new), new) == (0, b"")
    assert image.read_bytes()[8 * BLOCK : 10 * BLOCK] == new
    assert store.failed and not remote.failed
    assert client.request(nbd.CMD_READ, 8 * BLOCK, len(new)) == (0, new)  # from the server now
    client.request(nbd.CMD_DISC)
    thread.join(5)
    assert result["orderly"] is True
    store.close()


def test_writes_of_every_size_in_turn_land_whole(served):
    """The server receives each write into one buffer it grows for a larger request: a smaller
    request after a larger one, and a larger after that, must each land whole and alone."""
    client, image, store, remote, result, thread = served
    client.sock.settimeout(10)  # a server that died on a request must fail this, not hang it
    expected = bytearray(image.read_bytes())
    for blocks, at in ((1, 0), (3, 16), (1, 40), (8, 64), (2, 100), (8, 200)):
        data = os.urandom(blocks * BLOCK)
        assert client.request(nbd.CMD_WRITE, at * BLOCK, len(data), data) == (0, b"")
        expected[at * BLOCK : at * BLOCK + len(data)] = data
    assert image.read_bytes() == bytes(expected)
    client.request(nbd.CMD_DISC)
    thread.join(5)
    assert result["orderly"] is True and not remote.failed
