"""The traffic meter counts what crosses the ssh connection, checked against an independent relay."""

from __future__ import annotations

import os
import socket
import threading

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
