"""A slow link to the untrusted host: a network namespace behind a veth pair shaped with tc.

The server side runs in its own network namespace, so only that namespace's traffic is
shaped (and nothing leaves the machine). netem on each end of the veth pair limits the rate
in its direction and adds half the round-trip delay.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

NETNS = "cryptsnap-bench"
HOST_SIDE, SERVER_SIDE = "csbench0", "csbench1"
HOST_ADDRESS, SERVER_ADDRESS = "10.211.0.1", "10.211.0.2"


def _ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, *args], check=True, capture_output=True)


def _shape(device: str, mbit: float, delay_ms: float, netns: str | None = None) -> None:
    _ip("tc", "qdisc", "replace", "dev", device, "root", "netem", "rate", f"{mbit}mbit", "delay", f"{delay_ms}ms",
        "limit", "10000", netns=netns)  # fmt: skip


@contextlib.contextmanager
def shaped_link(mbit: float, rtt_ms: float = 20.0) -> Iterator[str]:
    """Yield the address of a network namespace reachable at `mbit` Mbit/s each way."""
    remove()
    try:
        _ip("ip", "netns", "add", NETNS)
        _ip("ip", "link", "add", HOST_SIDE, "type", "veth", "peer", "name", SERVER_SIDE)
        _ip("ip", "link", "set", SERVER_SIDE, "netns", NETNS)
        _ip("ip", "addr", "add", f"{HOST_ADDRESS}/30", "dev", HOST_SIDE)
        _ip("ip", "link", "set", HOST_SIDE, "up")
        _ip("ip", "addr", "add", f"{SERVER_ADDRESS}/30", "dev", SERVER_SIDE, netns=NETNS)
        _ip("ip", "link", "set", SERVER_SIDE, "up", netns=NETNS)
        _ip("ip", "link", "set", "lo", "up", netns=NETNS)
        _shape(HOST_SIDE, mbit, rtt_ms / 2)  # upload
        _shape(SERVER_SIDE, mbit, rtt_ms / 2, netns=NETNS)  # download
        yield SERVER_ADDRESS
    finally:
        remove()


def add_arguments(parser, mbit: float) -> None:
    """--link-mbit (default `mbit`) and --rtt-ms, as every benchmark takes them."""
    parser.add_argument("--link-mbit", type=float, default=mbit,
                        help=f"server behind a link of this speed each way, in a network namespace "
                             f"(0: loopback; default {mbit:g})")  # fmt: skip
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip time of that link")


@contextlib.contextmanager
def untrusted_host(mbit: float, rtt_ms: float) -> Iterator:
    """A test sshd (tests.support.sshd) on loopback, or behind a shaped link when mbit > 0."""
    from tests.support import sshd

    with contextlib.ExitStack() as stack:
        address, netns = "127.0.0.1", None
        if mbit:
            address, netns = stack.enter_context(shaped_link(mbit, rtt_ms)), NETNS
        server = sshd.start(address=address, netns=netns)
        stack.callback(sshd.stop, server)
        yield server


def remove() -> None:
    subprocess.run(["ip", "link", "del", HOST_SIDE], capture_output=True)
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
