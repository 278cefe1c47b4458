"""Count every byte on the ssh connection: a relay that ssh uses as its ProxyCommand.

    ProxyCommand /usr/bin/python3 -m cryptsnap.meter --counter FILE [--up-limit K] [--down-limit K] HOST PORT

ssh talks to this process over stdin/stdout; it connects to HOST:PORT and copies bytes
both ways, adding them to two 64-bit counters kept in FILE (a shared memory map, so a
reader sees them current at any moment). Several connections may share one FILE; each
adds under a lock. What is counted is exactly what crosses the TCP connection: the
encrypted ssh stream, with all SFTP and protocol overhead.

It is also where a target's upload_limit / download_limit (KiB/s) apply: a direction that has
spent its allowance is not read until the allowance has grown again, so TCP's own flow
control slows the sender (ssh, or the server) without anything buffering here.
"""

from __future__ import annotations

# Every ssh connection starts this module as its own process (ProxyCommand), before ssh can
# say a word: so it imports only what Python has loaded anyway or what is cheap (no
# dataclasses, no pathlib: 0.2 s of every connection on an emulated CPU).
import argparse
import collections
import fcntl
import mmap
import os
import selectors
import socket
import struct
import sys
import time

LAYOUT = struct.Struct("<QQ")  # bytes up (client -> server), bytes down
CHUNK = 1 << 16
CLOSE_GRACE = 2.0  # seconds the relay outlives ssh, for the server's last bytes


class Traffic(collections.namedtuple("Traffic", "up down", defaults=(0, 0))):
    __slots__ = ()

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.up - other.up, self.down - other.down)

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.up + other.up, self.down + other.down)


def reset(path: os.PathLike) -> None:
    """Create (or zero) a counter file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(LAYOUT.pack(0, 0))


def read(path: os.PathLike) -> Traffic:
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


class Allowance:
    """A token bucket: `rate` bytes a second, at most a quarter second's worth saved up."""

    def __init__(self, rate: float, clock=time.monotonic):
        self.rate = rate
        self.burst = max(rate / 4, 4096)
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def available(self) -> int:
        self._refill()
        return int(self.tokens)

    def spend(self, n: int) -> None:
        self.tokens -= n

    def wait(self) -> float:
        """Seconds until a useful amount (a chunk, or the whole burst if smaller) is there again."""
        self._refill()
        return max(0.0, (min(CHUNK, self.burst) - self.tokens) / self.rate)


def relay(counter: _Counter, host: str, port: int, stdin: int = 0, stdout: int = 1,
          limits: dict[str, float] | None = None) -> None:  # fmt: skip
    """Copy both ways until both ends closed; limits: "up"/"down" -> bytes a second."""
    upstream = socket.create_connection((host, port), timeout=20)
    upstream.settimeout(None)
    allowances = {way: Allowance(rate) for way, rate in (limits or {}).items() if rate}
    sources = {"up": stdin, "down": upstream}
    selector = selectors.DefaultSelector()
    for way, source in sources.items():
        selector.register(source, selectors.EVENT_READ, way)
    paused: dict[str, float] = {}  # way -> when its allowance allows reading again
    open_ways = 2
    closing = None  # once ssh has ended: how long to wait for the server's last bytes
    while open_ways:
        now = time.monotonic()
        for way, until in list(paused.items()):
            if until <= now:
                del paused[way]
                selector.register(sources[way], selectors.EVENT_READ, way)
        waits = [until - now for until in paused.values()] + ([closing] if closing is not None else [])
        events = selector.select(min(waits) if waits else None)
        if not events and not paused:  # ssh is gone and the server says nothing more (or no longer answers)
            return
        for key, _ in events:
            allowance = allowances.get(key.data)
            size = CHUNK
            if allowance:
                size = min(CHUNK, allowance.available())
                if size <= 0:  # spent: stop reading this way until it has grown again
                    selector.unregister(sources[key.data])
                    paused[key.data] = time.monotonic() + allowance.wait()
                    continue
            if key.data == "up":
                data = os.read(stdin, size)
                if not data:
                    selector.unregister(stdin)
                    upstream.shutdown(socket.SHUT_WR)
                    open_ways -= 1
                    # ssh has ended: what the server still sends has no reader. Wait a moment for
                    # its end, not forever: a server that hangs (or a cut link) would keep us here.
                    closing = CLOSE_GRACE
                    continue
                upstream.sendall(data)
                counter.add(len(data), 0)
            else:
                data = upstream.recv(size)
                if not data:
                    selector.unregister(upstream)
                    os.close(stdout)
                    open_ways -= 1
                    continue
                view = memoryview(data)
                while view:
                    view = view[os.write(stdout, view):]
                counter.add(0, len(data))
            if allowance:
                allowance.spend(len(data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m cryptsnap.meter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counter", required=True, help="counter file (created by the run)")
    parser.add_argument("--up-limit", type=int, default=0, metavar="KIB_S", help="upload limit, KiB/s (0: none)")
    parser.add_argument("--down-limit", type=int, default=0, metavar="KIB_S",
                        help="download limit, KiB/s (0: none)")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    args = parser.parse_args(argv)
    try:
        relay(_Counter(args.counter), args.host, args.port,
              limits={"up": args.up_limit * 1024, "down": args.down_limit * 1024})  # fmt: skip
    except OSError as exc:
        print(f"cryptsnap.meter: {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 255
    return 0


if __name__ == "__main__":
    sys.exit(main())
