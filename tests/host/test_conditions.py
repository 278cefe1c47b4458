"""skip_on_battery / skip_on_metered: cryptsnapd puts a requested backup off while UPower says
the machine is on battery or NetworkManager that the connection is metered, says why (the
Deferred property, `cryptsnap backup`), and starts it itself the moment that changes.
UPower and NetworkManager are stand-ins on the private bus (tests/support/power_standin.py)."""

from __future__ import annotations

import json
import time

import pytest

from cryptsnap.bus import target_path
from tests.host.test_daemon import Daemon, bus  # noqa: F401  (fixture)
from tests.host.test_daemon_faults import follow_backup, wait_connecting
from tests.support.checks import assert_nothing_left
from tests.support.standins import standin

TARGET = "org.cryptsnap1.Target"
UPOWER = ("org.freedesktop.UPower", "/org/freedesktop/UPower", "org.freedesktop.UPower")
NM = ("org.freedesktop.NetworkManager", "/org/freedesktop/NetworkManager", "org.freedesktop.NetworkManager")


@pytest.fixture
def power(bus):  # noqa: F811
    with standin("power_standin", bus.address) as proc:
        yield proc


def start(daemon, setup, *options: str) -> str:
    args = ["a{sv}", str(len(options) // 2), *options] if options else ["a{sv}", "0"]
    out = daemon.bus.busctl("--json=short", "call", "org.cryptsnap1", target_path(setup.name), TARGET,
                            "StartBackup", *args).stdout  # fmt: skip
    return json.loads(out)["data"][0]


def cancel(daemon, path: str) -> None:
    """Cancel the target's job and wait until it has unwound."""
    daemon.bus.busctl("call", "org.cryptsnap1", path, TARGET, "Cancel")
    until(daemon, lambda: daemon.get(path, TARGET, "State") == "idle", 60, "the cancel")


def until(daemon, predicate, timeout: float = 15, what: str = ""):
    """Wait, reading cryptsnapd's sd_notify meanwhile (as systemd does: a full queue blocks it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        daemon.notify.receive(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_backup_on_battery_waits_says_why_and_starts_once_on_mains(setup, bus, tarpit, power):  # noqa: F811
    setup.point_at_silent_server(tarpit)  # a started job hangs in connecting: there to be seen
    daemon = Daemon(setup, bus).ready()
    path = target_path(setup.name)
    try:
        assert start(daemon, setup) == "/", "started on battery"
        assert daemon.get(path, TARGET, "Deferred") == "on battery"
        assert daemon.get(path, TARGET, "Job") == "/"
        client = follow_backup(setup, bus)  # `cryptsnap backup --daemon`: says so and exits 0
        _, err = client.communicate(timeout=60)
        assert client.returncode == 0 and "backup put off (on battery)" in err and "--anyway" in err, err

        daemon.bus.busctl("set-property", *NM, "Metered", "u", "1")  # a phone's hotspot as well
        until(daemon, lambda: daemon.get(path, TARGET, "Deferred") == "on battery and on a metered connection", what="both")
        daemon.bus.busctl("set-property", *UPOWER, "OnBattery", "b", "false")
        until(daemon, lambda: daemon.get(path, TARGET, "Deferred") == "on a metered connection", what="metered alone")
        assert daemon.get(path, TARGET, "Job") == "/"
        daemon.bus.busctl("set-property", *NM, "Metered", "u", "2")  # home wifi: it starts by itself
        until(daemon, lambda: daemon.get(path, TARGET, "Job") != "/", what="the put-off backup to start")
        assert daemon.get(path, TARGET, "Deferred") == ""
        wait_connecting(setup)
        cancel(daemon, path)
    finally:
        daemon.stop()
    assert_nothing_left(setup)


def test_anyway_starts_now_and_a_machine_without_upower_never_waits(setup, bus, tarpit, power):  # noqa: F811
    setup.point_at_silent_server(tarpit)
    daemon = Daemon(setup, bus).ready()
    path = target_path(setup.name)
    try:
        assert start(daemon, setup, "ignore-conditions", "b", "true") != "/"  # on battery, but asked to
        assert daemon.get(path, TARGET, "Deferred") == ""
        cancel(daemon, path)
        power.kill()  # no UPower, no NetworkManager (a server): unknown is not a reason to wait
        power.wait()
        assert start(daemon, setup) != "/"
        cancel(daemon, path)
    finally:
        daemon.stop()
    assert_nothing_left(setup)
