"""cryptsnapd on a private dbus-daemon, driven by busctl, with sd_notify read from a test socket.

The jobs here run the real worker and pipeline. The host has no device-mapper, so a
job gets as far as the untrusted host lets it; the guest tier runs complete backups.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import psutil
import pytest
import yaml

from cryptsnap.bus import interface_xml, target_path
from cryptsnap.errors import Busy
from cryptsnap.layers import LocalLock
from tests.support.buses import Monitor, NotifySocket, PrivateBus
from tests.support.checks import assert_nothing_left


@pytest.fixture
def bus():
    private = PrivateBus()
    yield private
    private.close()


class Daemon:
    def __init__(self, setup, bus, env=None):
        self.notify = NotifySocket()
        self.bus = bus
        environment = dict(os.environ, NOTIFY_SOCKET=str(self.notify.path), WATCHDOG_USEC="1000000", **(env or {}))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cryptsnap.daemon", "--config", str(setup.config_path),
             "--bus-address", bus.address],
            env=environment, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def ready(self) -> Daemon:
        self.notify.wait_for(lambda m: "READY=1" in m, timeout=60)
        return self

    def get(self, path: str, interface: str, prop: str):
        out = self.bus.busctl("--json=short", "get-property", "org.cryptsnap1", path, interface, prop).stdout
        return json.loads(out)["data"]

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        # Keep reading sd_notify while it stops: a full datagram queue blocks its sender, as it
        # would under a systemd that stopped reading.
        deadline = time.monotonic() + 120
        while self.process.poll() is None and time.monotonic() < deadline:
            self.notify.receive(0.1)
        try:
            _, err = self.process.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
            raise AssertionError(f"cryptsnapd did not stop within 120 s:\n{err}") from None
        finally:
            while self.notify.receive(0.05) is not None:  # keep what it sent until the end
                pass
            self.notify.close()
        return err


def members(xml_text: str) -> dict:
    """interface -> sorted (kind, name, signature) of its members."""
    found = {}
    for interface in ET.fromstring(xml_text).iter("interface"):
        name = interface.get("name")
        if not name.startswith("org.cryptsnap1"):
            continue
        items = set()
        for member in interface:
            sig = "".join(f"{a.get('direction', '')}{a.get('type')}" for a in member.iter("arg"))
            items.add((member.tag, member.get("name"), member.get("type") or sig, member.get("access", "")))
        found[name] = sorted(items)
    return found


def test_ready_and_introspection_match_the_xml_contract(setup, bus):
    daemon = Daemon(setup, bus).ready()
    try:
        assert daemon.notify.wait_for(lambda m: m.startswith("STATUS="), timeout=10) == "STATUS=idle"
        daemon.notify.wait_for(lambda m: m == "WATCHDOG=1", timeout=10)
        contract = members(interface_xml())
        exported = {}
        for path in ("/org/cryptsnap1", target_path(setup.name)):
            xml = bus.busctl("call", "org.cryptsnap1", path, "org.freedesktop.DBus.Introspectable",
                             "Introspect", "--json=short").stdout  # fmt: skip
            exported.update(members(json.loads(xml)["data"][0]))
        assert exported["org.cryptsnap1.Manager"] == contract["org.cryptsnap1.Manager"]
        assert exported["org.cryptsnap1.Target"] == contract["org.cryptsnap1.Target"]
        targets = json.loads(bus.busctl("--json=short", "call", "org.cryptsnap1", "/org/cryptsnap1",
                                        "org.cryptsnap1.Manager", "ListTargets").stdout)["data"][0]  # fmt: skip
        assert targets == [[setup.name, target_path(setup.name), "idle"]]
        assert daemon.get(target_path(setup.name), "org.cryptsnap1.Target", "State") == "idle"
        assert daemon.get(target_path(setup.name), "org.cryptsnap1.Target", "LastResult") == ""
        unknown = bus.busctl("call", "org.cryptsnap1", "/org/cryptsnap1", "org.cryptsnap1.Manager", "GetTarget",
                             "s", "nope", check=False)  # fmt: skip
        assert unknown.returncode != 0 and "no target named 'nope'" in unknown.stderr
    finally:
        daemon.stop()


def test_a_job_is_announced_reports_phases_fails_with_its_step_and_is_removed(setup, bus):
    daemon = Daemon(setup, bus).ready()
    monitor = Monitor(bus.address)
    try:
        while not monitor.messages:  # busctl monitor has no readiness signal: ping until it sees one
            bus.busctl("call", "org.cryptsnap1", "/org/cryptsnap1", "org.freedesktop.DBus.Peer", "Ping")
        mark = daemon.notify.mark()
        out = bus.busctl("--json=short", "call", "org.cryptsnap1", target_path(setup.name), "org.cryptsnap1.Target",
                         "StartBackup", "a{sv}", "0").stdout  # fmt: skip
        job_path = json.loads(out)["data"][0]
        assert re.fullmatch(r"/org/cryptsnap1/job/\d+", job_path)
        daemon.notify.wait_for(lambda m: m.startswith(f"STATUS={setup.name}: "), since=mark)
        daemon.notify.wait_for(lambda m: m == "STATUS=idle", since=mark + 1)
        # Never initialized here: the job fails and says why.
        assert daemon.get(target_path(setup.name), "org.cryptsnap1.Target", "LastResult") == "failed"
        error = daemon.get(target_path(setup.name), "org.cryptsnap1.Target", "LastError")
        assert "has not been initialized" in error
        assert daemon.get(target_path(setup.name), "org.cryptsnap1.Target", "LastExitCode") == 2
        assert daemon.get(target_path(setup.name), "org.cryptsnap1.Target", "LastAttempt") > 0
        monitor.wait_for(lambda m: m.get("member") == "JobRemoved")
    finally:
        daemon.stop()
        monitor.close()
    signals = monitor.messages
    names = [(s.get("member"), s.get("path")) for s in signals if s.get("type") == "signal"]
    assert ("JobNew", "/org/cryptsnap1") in names
    removed = [s for s in signals if s.get("member") == "JobRemoved"]
    assert removed and removed[0]["payload"]["data"][1:] == [job_path, setup.name, "failed"]
    assert ("PropertiesChanged", target_path(setup.name)) in names


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # gone since it was listed
        return []


def test_busy_access_denied_cancel_and_stop(setup, bus, tarpit):
    setup.point_at_silent_server(tarpit)  # a long job: ssh connects, then hangs
    daemon = Daemon(setup, bus).ready()
    path = target_path(setup.name)
    try:
        start = ("call", "org.cryptsnap1", path, "org.cryptsnap1.Target", "StartBackup", "a{sv}", "0")
        job_path = json.loads(bus.busctl("--json=short", *start).stdout)["data"][0]
        # From the moment the job exists it holds the target (before its worker is even up),
        # so a `cryptsnap mount` or the restore unit cannot slip in.
        with pytest.raises(Busy, match="backup job 1 of cryptsnapd"):
            with LocalLock(setup.load().runtime_dir, "a view"):
                pass
        busy = bus.busctl(*start, check=False)
        assert busy.returncode != 0 and job_path in busy.stderr and "busy" in busy.stderr
        denied = bus.busctl("call", "org.cryptsnap1", job_path, "org.cryptsnap1.Job", "Cancel", user="nobody",
                            check=False)  # fmt: skip
        assert denied.returncode != 0 and "may not start or cancel" in denied.stderr
        assert daemon.get(path, "org.cryptsnap1.Target", "State") == "running"  # reading is open to all
        assert bus.busctl("get-property", "org.cryptsnap1", job_path, "org.cryptsnap1.Job", "Phase",
                          user="nobody").stdout.strip() in ('s "starting"', 's "connecting"')  # fmt: skip
        mark = daemon.notify.mark()
        bus.busctl("call", "org.cryptsnap1", path, "org.cryptsnap1.Target", "Cancel")
        daemon.notify.wait_for(lambda m: m == "STATUS=idle", since=mark)
        assert daemon.get(path, "org.cryptsnap1.Target", "LastResult") == "canceled"
        assert_nothing_left(setup)
        # Stopping the service cancels a running job and unwinds it before exiting. (This job
        # also shows that StartBackup's options reach the worker.)
        mark = daemon.notify.mark()  # the first job's own "connecting" may have come after the last mark
        bus.busctl(*start[:-1], "1", "full-compare", "b", "true")
        daemon.notify.wait_for(lambda m: m.startswith(f"STATUS={setup.name}: connecting"), since=mark)
        # The daemon's own children: a command the worker starts shows the worker's command line
        # between fork and exec (CI once counted two "workers" that way).
        workers = [cmdline for cmdline in map(_cmdline, psutil.Process(daemon.process.pid).children())
                   if "cryptsnap.worker" in cmdline and setup.name in cmdline]  # fmt: skip
        assert len(workers) == 1 and "--full-compare" in workers[0] and "--lock-fd" in workers[0], workers
    finally:
        err = daemon.stop()
    assert daemon.process.returncode == 0, err
    assert "STOPPING=1" in daemon.notify.messages
    assert "canceled" in err
    assert_nothing_left(setup, err)


def test_reload_adds_targets_and_a_bad_config_fails_the_start(setup, bus):
    daemon = Daemon(setup, bus).ready()
    try:
        document = yaml.safe_load(setup.config_path.read_text())
        document["targets"]["second"] = dict(document["targets"][setup.name], image="second.img")
        setup.config_path.write_text(yaml.safe_dump(document))
        mark = daemon.notify.mark()
        daemon.process.send_signal(signal.SIGHUP)
        daemon.notify.wait_for(lambda m: m.startswith("RELOADING=1"), since=mark)
        daemon.notify.wait_for(lambda m: m == "READY=1", since=mark)
        assert daemon.get(target_path("second"), "org.cryptsnap1.Target", "Name") == "second"
        setup.config_path.write_text(setup.config_path.read_text() + "bogus: 1\n")
        daemon.process.send_signal(signal.SIGHUP)  # a broken config is reported and not taken
        daemon.notify.wait_for(lambda m: m == "READY=1", since=mark + 2)
        assert daemon.get(target_path("second"), "org.cryptsnap1.Target", "Name") == "second"
    finally:
        err = daemon.stop()
    assert "configuration not reloaded" in err and "bogus: unknown option" in err
    broken = Daemon(setup, bus)
    broken.process.wait(timeout=60)  # exits by itself
    err = broken.stop()
    assert broken.process.returncode == 3
    assert f"{setup.config_path}:" in err and "bogus: unknown option" in err


def test_a_target_added_to_the_file_is_found_without_a_reload(setup, bus):
    """Edit the configuration, `init`, back up (the quickstart's order): cryptsnapd, started
    before the edit, is asked for a target it does not know and reads the changed file again."""
    daemon = Daemon(setup, bus).ready()
    manager = ("org.cryptsnap1", "/org/cryptsnap1", "org.cryptsnap1.Manager")
    try:
        missing = daemon.bus.busctl("call", *manager, "GetTarget", "s", "added", check=False)
        assert missing.returncode != 0 and "added" in missing.stderr, missing
        document = yaml.safe_load(setup.config_path.read_text())
        document["targets"]["added"] = dict(document["targets"][setup.name], image="added.img")
        setup.config_path.write_text(yaml.safe_dump(document))
        found = daemon.bus.busctl("--json=short", "call", *manager, "GetTarget", "s", "added").stdout
        assert json.loads(found)["data"] == [target_path("added")]
        assert daemon.get(target_path("added"), "org.cryptsnap1.Target", "Name") == "added"
        still = daemon.bus.busctl("call", *manager, "GetTarget", "s", "never", check=False)  # unchanged file: no reread
        assert still.returncode != 0
    finally:
        err = daemon.stop()
    assert err.count("reloading") == 1, err


def test_jobs_of_two_targets_run_side_by_side_and_survive_a_reload(setup, bus, tarpit):
    document = yaml.safe_load(setup.config_path.read_text())
    first = document["targets"][setup.name]
    first["port"] = tarpit  # jobs that hang in "connecting" until canceled
    document["targets"]["second"] = dict(first, image="second.img")
    setup.config_path.write_text(yaml.safe_dump(document))
    for name in (setup.name, "second"):
        state = setup.state_dir / name
        state.mkdir(parents=True, exist_ok=True)
        (state / "image.json").write_text(json.dumps({"size": 1 << 20, "luks_uuid": "x"}))
        (state / "known_hosts").write_text("")
    # A member of the group cryptsnap may start jobs; reading needs no group.
    subprocess.run(["groupadd", "-f", "cryptsnap"], check=True)
    subprocess.run(["useradd", "--no-create-home", "-G", "cryptsnap", "csnap-operator"], check=False)
    daemon = Daemon(setup, bus).ready()
    try:
        start = ("call", "org.cryptsnap1", target_path(setup.name), "org.cryptsnap1.Target", "StartBackup",
                 "a{sv}", "0")  # fmt: skip
        account = __import__("pwd").getpwnam("csnap-operator")
        as_member = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups",
                     "busctl", f"--address={bus.address}", "--json=short", *start]  # fmt: skip
        first_job = json.loads(subprocess.run(as_member, capture_output=True, text=True, check=True).stdout)["data"][0]
        second_job = json.loads(bus.busctl("--json=short", "call", "org.cryptsnap1", target_path("second"),
                                           "org.cryptsnap1.Target", "StartBackup", "a{sv}", "0").stdout)["data"][0]
        jobs = lambda: sorted(j[3] for j in json.loads(bus.busctl(  # noqa: E731
            "--json=short", "call", "org.cryptsnap1", "/org/cryptsnap1", "org.cryptsnap1.Manager", "ListJobs").stdout
        )["data"][0])
        assert jobs() == sorted([first_job, second_job])
        mark = daemon.notify.mark()
        daemon.process.send_signal(signal.SIGHUP)
        daemon.notify.wait_for(lambda m: m == "READY=1", since=mark)
        assert jobs() == sorted([first_job, second_job]), "a reload must not drop running jobs"
        for job in (first_job, second_job):
            bus.busctl("call", "org.cryptsnap1", job, "org.cryptsnap1.Job", "Cancel")
        daemon.notify.wait_for(lambda m: m == "STATUS=idle", since=mark)
        assert jobs() == []
        none_running = bus.busctl("call", "org.cryptsnap1", target_path("second"), "org.cryptsnap1.Target",
                                  "Cancel", check=False)  # fmt: skip
        assert none_running.returncode != 0 and "no job is running" in none_running.stderr
        # The CLI through the daemon: --no-wait returns once the job is started.
        cli = subprocess.run([sys.executable, "-m", "cryptsnap", "--config", str(setup.config_path), "backup",
                              "--daemon", "--no-wait", "second"], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, CRYPTSNAP_BUS_ADDRESS=bus.address))  # fmt: skip
        assert cli.returncode == 0 and "started job /org/cryptsnap1/job/" in cli.stderr, cli.stderr
        assert len(jobs()) == 1
        # The mark before the Cancel: a worker still starting dies at once, and its STATUS=idle
        # may come before the busctl call has returned.
        mark = daemon.notify.mark()
        bus.busctl("call", "org.cryptsnap1", target_path("second"), "org.cryptsnap1.Target", "Cancel")
        daemon.notify.wait_for(lambda m: m == "STATUS=idle", since=mark)
    finally:
        daemon.stop()
    assert_nothing_left(setup)


def test_jobs_leave_no_file_descriptors_behind(setup, bus):
    """A daemon left running for years runs thousands of jobs: each worker's pipe is closed
    once read to the end (it was kept open, one descriptor per job, until the limit broke it)."""
    daemon = Daemon(setup, bus).ready()
    try:
        fds = []
        for _ in range(12):
            bus.busctl("call", "org.cryptsnap1", target_path(setup.name), "org.cryptsnap1.Target", "StartBackup",
                       "a{sv}", "0")  # fmt: skip
            while daemon.get(target_path(setup.name), "org.cryptsnap1.Target", "State") != "idle":
                daemon.notify.receive(0.1)
            time.sleep(0.2)  # the end of the worker's output may arrive after its exit is reported
            fds.append(psutil.Process(daemon.process.pid).num_fds())
        assert fds[-1] <= fds[1], f"open descriptors after each job: {fds}"
    finally:
        daemon.stop()


def test_bus_calls_leave_no_memory_behind(setup, bus):
    """Monitors read cryptsnapd's properties every few seconds for years: a call must not leave
    memory behind (each left its GDBusMethodInvocation, about 2 KiB, before bus.py released it:
    6 MiB over these 3,000 calls)."""
    import pydbus

    daemon = Daemon(setup, bus).ready()
    try:
        client = pydbus.connect(bus.address)
        manager = client.get("org.cryptsnap1", "/org/cryptsnap1")
        target = client.get("org.cryptsnap1", target_path(setup.name))

        def calls(count: int) -> int:
            for number in range(count):
                assert target.State == "idle" and setup.name in [name for name, _, _ in manager.ListTargets()]
                if number % 50 == 0:
                    while daemon.notify.receive(0.001):  # read sd_notify as systemd would: a full queue blocks cryptsnapd
                        pass
            return psutil.Process(daemon.process.pid).memory_info().rss

        warm = calls(250)  # (caches and the allocator's first pools)
        grown = calls(1500) - warm  # a property read and a method call each
        assert grown < (1 << 20), f"cryptsnapd's RSS grew {grown / 1024:.0f} KiB over 3,000 calls"
    finally:
        daemon.stop()


def test_an_unregistered_object_is_let_go(bus):
    """Every job's object is registered and unregistered: once unregistered, nothing may keep
    it (and what it holds) alive. PyGObject never frees the method closure, which held it."""
    import gc
    import weakref

    import pydbus

    import cryptsnap.bus  # noqa: F401  (its workarounds apply to pydbus when it is imported)

    class Thing:
        """<node><interface name="t.Thing"><method name="Ping"/></interface></node>"""

        def Ping(self):  # noqa: N802  (a D-Bus method's name)
            pass

    connection = pydbus.connect(bus.address)
    thing = Thing()
    alive = weakref.ref(thing)
    connection.register_object("/t", thing, None).unregister()
    del thing
    gc.collect()
    assert alive() is None, "the unregistered object is still referenced"


def test_a_check_runs_as_a_job_and_its_result_is_a_property_not_a_backup(setup, bus):
    """StartCheck (cryptsnap-check@.timer's way): a job under the target's lock, its result in
    LastCheck*. Here it fails at unlocking (no device-mapper on this machine): it is recorded as
    the check's result, never as a backup's."""
    from tests.host.test_layers import prepare

    prepare(setup)
    daemon = Daemon(setup, bus).ready()
    path = target_path(setup.name)
    try:
        out = daemon.bus.busctl("--json=short", "call", "org.cryptsnap1", path, "org.cryptsnap1.Target",
                                "StartCheck", "a{sv}", "0").stdout  # fmt: skip
        assert json.loads(out)["data"][0].startswith("/org/cryptsnap1/job/")
        deadline = time.monotonic() + 60
        while daemon.get(path, "org.cryptsnap1.Target", "LastCheck") == "" and time.monotonic() < deadline:
            daemon.notify.receive(0.1)  # read sd_notify as systemd would: a full queue blocks cryptsnapd
        assert daemon.get(path, "org.cryptsnap1.Target", "LastCheck") == "failed"
        assert daemon.get(path, "org.cryptsnap1.Target", "LastCheckError").startswith("unlocking:")
        assert daemon.get(path, "org.cryptsnap1.Target", "LastCheckExitCode") == 8
        assert daemon.get(path, "org.cryptsnap1.Target", "LastResult") == "", "a check was recorded as a backup"
        assert not (setup.state_dir / setup.name / "last-run.json").exists()
        client = subprocess.Popen([sys.executable, "-m", "cryptsnap", "--config", str(setup.config_path), "check",
                                   "--daemon", setup.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, CRYPTSNAP_BUS_ADDRESS=bus.address))  # fmt: skip
        while client.poll() is None and time.monotonic() < deadline:
            daemon.notify.receive(0.1)
        err = client.communicate(timeout=10)[1]
        assert client.returncode == 8 and "error: unlocking:" in err, err
    finally:
        daemon.stop()
    assert_nothing_left(setup)
