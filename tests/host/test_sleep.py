"""Sleep and shutdown: cryptsnapd holds a logind delay inhibitor exactly while a job runs; when
logind announces sleep (or shutdown) it cancels the run, which unwinds, releases the inhibitor
within logind's delay, and starts the backup again when the machine wakes. logind is a stand-in
on the private bus (tests/support/logind_standin.py) that sends the real descriptor and signals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cryptsnap.bus import target_path
from tests.host.test_conditions import start, until
from tests.host.test_daemon import Daemon, bus  # noqa: F401  (fixture)
from tests.host.test_daemon_faults import wait_connecting
from tests.support.checks import assert_nothing_left

TARGET = "org.cryptsnap1.Target"
LOGIND = ("org.freedesktop.login1", "/org/freedesktop/login1")


@pytest.fixture
def logind(bus):  # noqa: F811
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.logind_standin", bus.address],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()


def inhibitors(daemon) -> list:
    out = daemon.bus.busctl("--json=short", "call", *LOGIND, "org.freedesktop.login1.Manager", "ListInhibitors").stdout
    return json.loads(out)["data"][0]


def announce(daemon, what: str, starting: bool) -> None:
    daemon.bus.busctl("call", *LOGIND, "org.cryptsnap.test.Logind", "Announce", "sb", what, str(starting).lower())


def test_sleep_cancels_the_run_releases_the_inhibitor_and_the_backup_starts_again_on_wake(
        setup, bus, tarpit, logind):  # noqa: F811  # fmt: skip
    setup.point_at_silent_server(tarpit)  # a started job hangs in connecting: there to be seen
    daemon = Daemon(setup, bus).ready()
    path = target_path(setup.name)
    try:
        assert inhibitors(daemon) == [], "an inhibitor while idle"
        assert start(daemon, setup) != "/"
        wait_connecting(setup)
        held = until(daemon, lambda: inhibitors(daemon), what="the inhibitor")
        assert [(i[0], i[1], i[3], i[5]) for i in held] == [("sleep:shutdown", "cryptsnap", "delay",
                                                              daemon.process.pid)]  # fmt: skip

        announce(daemon, "sleep", True)
        until(daemon, lambda: daemon.get(path, TARGET, "State") == "idle", 30, "the run to be canceled")
        assert inhibitors(daemon) == [], "the inhibitor outlived the run"
        assert daemon.get(path, TARGET, "LastResult") == "canceled"
        error = daemon.get(path, TARGET, "LastError")
        assert "the machine was going to sleep; the backup starts again when the machine is back" in error, error
        assert daemon.get(path, TARGET, "Deferred") == "the machine is going to sleep"
        assert_nothing_left(setup)
        assert start(daemon, setup, "ignore-conditions", "b", "true") == "/", "started while going to sleep"
        assert inhibitors(daemon) == []

        announce(daemon, "sleep", False)  # awake: it starts by itself, and holds the inhibitor again
        until(daemon, lambda: daemon.get(path, TARGET, "Job") != "/", what="the backup to start again")
        assert daemon.get(path, TARGET, "Deferred") == ""
        until(daemon, lambda: inhibitors(daemon), what="the inhibitor again")
        wait_connecting(setup)

        announce(daemon, "shutdown", True)  # the same for a shutdown; systemd stops cryptsnapd next
        until(daemon, lambda: daemon.get(path, TARGET, "State") == "idle", 30, "the run to be canceled")
        assert "the machine was shutting down" in daemon.get(path, TARGET, "LastError")
        assert inhibitors(daemon) == []
    finally:
        err = daemon.stop()
    assert "the machine is going to sleep: canceling it" in err, err
    assert_nothing_left(setup)


def test_a_wake_before_the_canceled_run_has_closed_starts_the_backup_once_it_has(setup, bus, tarpit, logind):  # noqa: F811
    """logind waits for the inhibitor only InhibitDelayMaxSec (5 s): a slow unwind may see the
    wake come first. The backup must still start again, once the target is free."""
    setup.point_at_silent_server(tarpit)
    daemon = Daemon(setup, bus).ready()
    path = target_path(setup.name)
    try:
        first = start(daemon, setup)
        wait_connecting(setup)
        announce(daemon, "nap", True)
        until(daemon, lambda: daemon.get(path, TARGET, "Job") not in ("/", first), 30, "the backup to start again")
        assert "the machine was going to sleep" in daemon.get(path, TARGET, "LastError")
        wait_connecting(setup)
        daemon.bus.busctl("call", "org.cryptsnap1", path, TARGET, "Cancel")
        until(daemon, lambda: daemon.get(path, TARGET, "State") == "idle", 60, "the cancel")
    finally:
        daemon.stop()
    assert_nothing_left(setup)


def test_without_logind_backups_run_as_before(setup, bus, tarpit):  # noqa: F811
    setup.point_at_silent_server(tarpit)
    daemon = Daemon(setup, bus).ready()
    path = target_path(setup.name)
    try:
        assert start(daemon, setup) != "/"
        wait_connecting(setup)
        daemon.bus.busctl("call", "org.cryptsnap1", path, TARGET, "Cancel")
        until(daemon, lambda: daemon.get(path, TARGET, "State") == "idle", 60, "the cancel")
    finally:
        daemon.stop()
