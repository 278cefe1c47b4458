"""The traffic meter counts what crosses the ssh connection, checked against an independent relay."""

from __future__ import annotations

import os
import socket
import threading
import time

import yaml

from cryptsnap import meter
from cryptsnap.layers import SshfsMount
from cryptsnap.pipeline import MeteredReporter, Reporter
from cryptsnap.stack import Paths
from cryptsnap.state import TargetState
from tests.host.test_layers import prepare
from tests.support.checks import assert_nothing_left


class CountingRelay:
    """A TCP relay in front of sshd that counts bytes each way: the reference count."""

    def __init__(self, port: int):
        self.target = ("127.0.0.1", port)
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.up = self.down = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, source, sink, direction):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                with self.lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self):
        self.server.close()


def test_meter_counts_exactly_what_an_independent_relay_counts(setup):
    target, state, paths = prepare(setup, luks=False)
    relay = CountingRelay(setup.server.port)
    document = yaml.safe_load(setup.config_path.read_text())
    document["targets"][setup.name]["port"] = relay.port
    setup.config_path.write_text(yaml.safe_dump(document))
    target = setup.load()
    state = TargetState(target)
    counter = Paths.of(target).traffic
    meter.reset(counter)
    payload = os.urandom(3 << 20)
    try:
        with SshfsMount(target, state.write_ssh_config(counter), paths.remote):
            (paths.remote / "payload").write_bytes(payload)
            os.sync()
        with SshfsMount(target, state.write_ssh_config(counter), paths.remote):
            assert (paths.remote / "payload").read_bytes() == payload
    finally:
        relay.close()
    counted = meter.read(counter)
    assert counted.up > len(payload) and counted.down > len(payload)  # the data went both ways
    assert abs(counted.up - relay.up) <= relay.up * 0.01, (counted, relay.up)
    assert abs(counted.down - relay.down) <= relay.down * 0.01, (counted, relay.down)
    assert_nothing_left(setup)


def test_traffic_is_charged_to_the_phase_it_happened_in():
    readings = iter([meter.Traffic(0, 0), meter.Traffic(10, 20), meter.Traffic(15, 25), meter.Traffic(115, 26),
                     meter.Traffic(120, 30), meter.Traffic(121, 31)])  # fmt: skip
    seen = []

    class Inner(Reporter):
        def phase(self, name):
            seen.append(name)

    reporter = MeteredReporter(Inner(), lambda: next(readings))
    for phase in ("connecting", "attaching", "syncing", "finalizing", "unmounting"):
        reporter.phase(phase)
    total = reporter.finish()
    assert seen == ["connecting", "attaching", "syncing", "finalizing", "unmounting"]
    assert reporter.by_phase == {
        "connect": meter.Traffic(10, 20),
        "open": meter.Traffic(5, 5),
        "sync": meter.Traffic(100, 1),
        "close": meter.Traffic(6, 5),
    }
    assert total == meter.Traffic(121, 31)


def test_the_meter_ends_soon_after_ssh_even_when_the_server_never_closes(tmp_path, tarpit):
    """ssh gone, server silent (hung, or the link cut): the relay must not stay forever, holding
    what ssh gave it (sshfs's /dev/fuse among them) and keeping a dead mount alive."""
    import subprocess
    import sys
    import time

    counter = tmp_path / "traffic"
    meter.reset(counter)
    relay = subprocess.Popen([sys.executable, "-m", "cryptsnap.meter", "--counter", str(counter), "127.0.0.1",
                              str(tarpit)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    relay.stdin.write(b"SSH-2.0-test\r\n")
    relay.stdin.flush()
    time.sleep(0.5)
    started = time.monotonic()
    relay.stdin.close()  # ssh exits
    relay.wait(timeout=meter.CLOSE_GRACE + 10)
    assert time.monotonic() - started < meter.CLOSE_GRACE + 5
    assert meter.read(counter).up == len(b"SSH-2.0-test\r\n")


def test_upload_and_download_limits_hold_the_connection_to_their_rate(setup):
    """upload_limit / download_limit, applied by the relay: what crossed, over how long it took,
    is never more than the limit (plus the quarter second the allowance may save up). How close
    to the limit it comes is reported, not asserted (machines are noisy): docs/performance.md."""
    prepare(setup, luks=False)
    document = yaml.safe_load(setup.config_path.read_text())
    document["targets"][setup.name].update(upload_limit=1024, download_limit=2048)
    setup.config_path.write_text(yaml.safe_dump(document))
    target = setup.load()
    state, paths = TargetState(target), Paths.of(target)
    counter = paths.traffic
    payload = os.urandom(4 << 20)
    rates = {}
    for way, limit in (("up", 1024 << 10), ("down", 2048 << 10)):
        meter.reset(counter)
        started = time.monotonic()
        with SshfsMount(target, state.write_ssh_config(counter), paths.remote):
            if way == "up":
                (paths.remote / "payload").write_bytes(payload)
                os.sync()
            else:
                assert (paths.remote / "payload").read_bytes() == payload
        took = time.monotonic() - started
        crossed = getattr(meter.read(counter), way)
        assert crossed > len(payload)
        assert crossed - limit / 4 <= limit * took, f"{way}: {crossed:,} bytes in {took:.2f} s, limit {limit:,}/s"
        rates[way] = round(crossed / took / limit, 3)
    print(f"bandwidth limits: achieved/limit up {rates['up']}, down {rates['down']}")
    assert_nothing_left(setup)
