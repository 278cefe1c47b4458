"""logind and the desktop. Sleep and shutdown: cryptsnapd holds a logind delay inhibitor exactly while a job runs; when
logind announces sleep (or shutdown) it cancels the run, which unwinds, releases the inhibitor
within logind's delay, and starts the backup again when the machine wakes. logind is a stand-in
on the private bus (tests/support/logind_standin.py) that sends the real descriptor and signals.
Desktop notifications (notify_desktop): a failed run is shown to each user logind lists at a
graphical session, on that user's own session bus (a dbus-daemon and a notification daemon
stand-in run as a throwaway user)."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from cryptsnap.bus import target_path
from tests.host.test_conditions import cancel, start, until
from tests.host.test_daemon import Daemon, bus  # noqa: F401  (fixture)
from tests.host.test_daemon_faults import wait_connecting
from tests.support import sshd
from tests.support.checks import assert_nothing_left
from tests.support.standins import standin

TARGET = "org.cryptsnap1.Target"
LOGIND = ("org.freedesktop.login1", "/org/freedesktop/login1")
DESKTOP_USER = "csnap-desktop"


@pytest.fixture
def logind(bus):  # noqa: F811
    with standin("logind_standin", bus.address) as proc:
        yield proc


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
        cancel(daemon, path)
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
        cancel(daemon, path)
    finally:
        daemon.stop()


# -- desktop notifications ---------------------------------------------------------------


@pytest.fixture
def desktop_user(tmp_path):
    """A user at a graphical session: their runtime directory, session bus and notification daemon
    (stand-ins, run as that user). Yields (uid, runtime path, notification daemon process)."""
    user = sshd.ensure_user(DESKTOP_USER)
    runtime = Path(tempfile.mkdtemp(prefix="csnap-runtime-", dir="/tmp"))
    os.chown(runtime, user.pw_uid, user.pw_gid)
    runtime.chmod(0o700)
    as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": "/"}
    bus_daemon = subprocess.Popen(["dbus-daemon", "--session", f"--address=unix:path={runtime}/bus", "--nofork",
                                   "--print-address"], stdout=subprocess.PIPE, text=True, **as_user)  # fmt: skip
    assert bus_daemon.stdout.readline().startswith("unix:")
    env = {"DBUS_SESSION_BUS_ADDRESS": f"unix:path={runtime}/bus", "PATH": os.defpath,
           "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    try:
        with standin("notifications_standin", env=env, **as_user) as notifications:
            yield user.pw_uid, runtime, notifications
    finally:
        bus_daemon.kill()
        bus_daemon.wait()
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_failed_backup_is_shown_on_the_desktop_of_each_graphical_session(setup, bus, desktop_user):  # noqa: F811
    uid, runtime, notifications = desktop_user
    with standin("logind_standin", bus.address, f"{uid}:wayland:{runtime}", "0:tty:/nonexistent"):
        _fail_a_run_and_see_it_shown(setup, bus, uid, notifications)


def _fail_a_run_and_see_it_shown(setup, bus, uid, notifications) -> None:  # noqa: F811
    document = yaml.safe_load(setup.config_path.read_text())
    document["targets"][setup.name].update(notify_desktop=True, hooks={"before": ["false"]})  # fails at once
    setup.config_path.write_text(yaml.safe_dump(document))
    daemon = Daemon(setup, bus).ready()
    path = target_path(setup.name)
    try:
        assert start(daemon, setup) != "/"
        until(daemon, lambda: daemon.get(path, TARGET, "State") == "idle", 60, "the run to fail")
        assert daemon.get(path, TARGET, "LastExitCode") == 14
        ready, _, _ = select.select([notifications.stdout], [], [], 30)
        assert ready, "no notification within 30 s"
        shown = json.loads(notifications.stdout.readline())
        assert shown["uid"] == uid and shown["app"] == "cryptsnap" and shown["urgency"] == 2, shown
        assert shown["summary"] == f"Backup of {setup.name} failed", shown
        assert "before hook" in shown["body"] and f"cryptsnap status {setup.name}" in shown["body"], shown
    finally:
        err = daemon.stop()
    assert f"desktop notification to uid {uid}: Backup of {setup.name} failed" in err, err
    assert "uid 0" not in err, "notified a text console's user"
