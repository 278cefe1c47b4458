"""Count every byte on the ssh connection: a relay that ssh uses as its ProxyCommand.

    ProxyCommand /usr/bin/python3 -m cryptsnap.meter --counter FILE HOST PORT

ssh talks to this process over stdin/stdout; it connects to HOST:PORT and copies bytes
both ways, adding them to two 64-bit counters kept in FILE (a shared memory map, so a
reader sees them current at any moment). Several connections may share one FILE; each
adds under a lock. What is counted is exactly what crosses the TCP connection: the
encrypted ssh stream, with all SFTP and protocol overhead.
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import selectors
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

LAYOUT = struct.Struct("<QQ")  # bytes up (client -> server), bytes down
CHUNK = 1 << 16
CLOSE_GRACE = 2.0  # seconds the relay outlives ssh, for the server's last bytes


@dataclass(frozen=True)
class Traffic:
    up: int = 0
    down: int = 0

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.up - other.up, self.down - other.down)

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.up + other.up, self.down + other.down)


def reset(path: Path) -> None:
    """Create (or zero) a counter file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(LAYOUT.pack(0, 0))


def read(path: Path) -> Traffic:
    try:
        with open(path, "rb") as f:
            data = f.read(LAYOUT.size)
    except FileNotFoundError:
        return Traffic()
    return Traffic(*LAYOUT.unpack(data)) if len(data) == LAYOUT.size else Traffic()


class _Counter:
    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, LAYOUT.size)

    def add(self, up: int, down: int) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # other connections of the same run add too
        try:
            old_up, old_down = LAYOUT.unpack_from(self.map)
            LAYOUT.pack_into(self.map, 0, old_up + up, old_down + down)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


def relay(counter: _Counter, host: str, port: int, stdin: int = 0, stdout: int = 1) -> None:
    upstream = socket.create_connection((host, port), timeout=20)
    upstream.settimeout(None)
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ, "up")
    selector.register(upstream, selectors.EVENT_READ, "down")
    open_ways = 2
    timeout = None
    while open_ways:
        events = selector.select(timeout)
        if not events:  # ssh is gone and the server says nothing more (or no longer answers)
            return
        for key, _ in events:
            if key.data == "up":
                data = os.read(stdin, CHUNK)
                if not data:
                    selector.unregister(stdin)
                    upstream.shutdown(socket.SHUT_WR)
                    open_ways -= 1
                    # ssh has ended: what the server still sends has no reader. Wait a moment for
                    # its end, not forever: a server that hangs (or a cut link) would keep us here.
                    timeout = CLOSE_GRACE
                    continue
                upstream.sendall(data)
                counter.add(len(data), 0)
            else:
                data = upstream.recv(CHUNK)
                if not data:
                    selector.unregister(upstream)
                    os.close(stdout)
                    open_ways -= 1
                    continue
                view = memoryview(data)
                while view:
                    view = view[os.write(stdout, view):]
                counter.add(0, len(data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m cryptsnap.meter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counter", required=True, help="counter file (created by the run)")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    args = parser.parse_args(argv)
    try:
        relay(_Counter(args.counter), args.host, args.port)
    except OSError as exc:
        print(f"cryptsnap.meter: {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 255
    return 0


if __name__ == "__main__":
    sys.exit(main())
