"""cryptsnapd under the guest's real systemd and system bus, installed as a package would be."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import yaml

from cryptsnap.bus import interface_xml, target_path
from tests.host.test_daemon import members
from tests.support.buses import Monitor
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.service import fill, prop, sh, start_backup, wait_idle, wait_until

METRICS = Path("/var/lib/prometheus/node-exporter/cryptsnap.prom")  # metrics_file's default


def test_the_timer_unit_runs_a_backup_through_the_daemon(service):
    name = service.name
    METRICS.parent.mkdir(parents=True, exist_ok=True)  # as prometheus-node-exporter makes it
    after = Path("/run/cryptsnap") / f"after-{name}"  # writable in cryptsnapd's sandbox
    document = yaml.safe_load(service.config_path.read_text())
    document["targets"][name]["hooks"] = {"after": ["sh", "-c", f'echo "$CRYPTSNAP_RESULT $CRYPTSNAP_SNAPSHOT" > {after}']}
    document["targets"][name]["free_space_warning"] = 100  # any image is "low": the warning shows
    service.config_path.write_text(yaml.safe_dump(document))
    sh("systemctl", "enable", "--now", f"cryptsnap-backup@{name}.timer")
    assert prop(target_path(name), "org.cryptsnap1.Target", "NextElapse") > time.time() * 1e6
    sh("systemctl", "start", f"cryptsnap-backup@{name}.service", timeout=900)
    assert sh("systemctl", "show", "-P", "Result", f"cryptsnap-backup@{name}.service").stdout.strip() == "success"
    assert prop(target_path(name), "org.cryptsnap1.Target", "LastResult") == "done"
    assert len(prop(target_path(name), "org.cryptsnap1.Target", "Snapshots")) == 1
    record = json.loads((service.state_dir / name / "last-run.json").read_text())
    assert prop(target_path(name), "org.cryptsnap1.Target", "BytesUploaded") == record["bytes_up"] > 0
    assert prop(target_path(name), "org.cryptsnap1.Target", "BytesDownloaded") == record["bytes_down"] > 0
    status = sh("cryptsnap", "status", name).stdout
    assert f"{name}: idle, last run done" in status
    assert "(LOW: under free_space_warning, 100%)" in status, status
    size, free = (prop(target_path(name), "org.cryptsnap1.Target", key) for key in ("ImageSize", "ImageFree"))
    assert 300 << 20 < size <= 400 << 20 and 0 < free < size, (size, free)  # the 400M image's file system
    journal = sh("journalctl", "-u", "cryptsnapd.service", "--no-pager", "-o", "cat").stdout
    assert f"target {name}: the image has" in journal and "under free_space_warning (100%)" in journal
    snapshots = prop(target_path(name), "org.cryptsnap1.Target", "Snapshots")
    assert after.read_text() == f"done {snapshots[-1]}\n", "the after hook did not run, or not with the run's result"
    document = json.loads(sh("cryptsnap", "status", "--json", name).stdout)
    assert document["source"] == "cryptsnapd" and document["targets"][name]["last_result"] == "done", document
    assert document["targets"][name]["next_run"] > time.time(), document
    assert document["targets"][name]["image_free"] == free, document
    # Monitoring: cryptsnapd (sandboxed: ReadWritePaths) wrote node_exporter's textfile.
    assert f'cryptsnap_last_run_success{{target="{name}"}} 1' in METRICS.read_text(), METRICS.read_text()
    assert f'cryptsnap_image_free_bytes{{target="{name}"}} {free}' in METRICS.read_text(), METRICS.read_text()
    # The weekly check's unit: cryptsnapd runs it as a job; its result is a property.
    sh("systemctl", "start", f"cryptsnap-check@{name}.service", timeout=900)
    assert sh("systemctl", "show", "-P", "Result", f"cryptsnap-check@{name}.service").stdout.strip() == "success"
    assert prop(target_path(name), "org.cryptsnap1.Target", "LastCheck") == "ok"
    assert prop(target_path(name), "org.cryptsnap1.Target", "LastCheckTime") > time.time() * 1e6 - 600e6
    assert prop(target_path(name), "org.cryptsnap1.Target", "LastResult") == "done", "the check counted as a backup"
    # A failing backup fails the unit the same way (OnFailure= hooks see it).
    service.key_file.write_bytes(os.urandom(64))
    failed = sh("systemctl", "start", f"cryptsnap-backup@{name}.service", check=False, timeout=900)
    assert failed.returncode != 0
    assert sh("systemctl", "show", "-P", "Result", f"cryptsnap-backup@{name}.service").stdout.strip() == "exit-code"
    assert sh("systemctl", "show", "-P", "ExecMainStatus", f"cryptsnap-backup@{name}.service").stdout.strip() == "6"
    # OnFailure=: the failure is in the journal at priority err, with its step and reason.
    wait_until(lambda: "unlocking" in sh("journalctl", "-u", f"cryptsnap-failed@{name}.service", "-p", "err",
                                         "--no-pager", "-o", "cat").stdout, 60, "the failure report")  # fmt: skip
    assert prop(target_path(name), "org.cryptsnap1.Target", "LastResult") == "failed"
    assert "unlocking" in prop(target_path(name), "org.cryptsnap1.Target", "LastError")
    assert f'cryptsnap_last_run_exit_code{{target="{name}"}} 6' in METRICS.read_text(), METRICS.read_text()
    assert_nothing_left(service)


def test_bus_api_introspection_busy_access_and_signals(service):
    fill(service, 32)
    path = target_path(service.name)
    sh("systemctl", "start", "cryptsnapd.service")
    exported = {}
    for obj in ("/org/cryptsnap1", path):
        xml = json.loads(sh("busctl", "--json=short", "call", "org.cryptsnap1", obj,
                            "org.freedesktop.DBus.Introspectable", "Introspect").stdout)["data"][0]  # fmt: skip
        exported.update(members(xml))
    contract = members(interface_xml())
    assert exported["org.cryptsnap1.Manager"] == contract["org.cryptsnap1.Manager"]
    assert exported["org.cryptsnap1.Target"] == contract["org.cryptsnap1.Target"]
    monitor = Monitor()
    # busctl monitor has no readiness signal: wait until it sees a call of ours go by.
    wait_until(lambda: sh("busctl", "call", "org.cryptsnap1", "/org/cryptsnap1", "org.freedesktop.DBus.Peer", "Ping")
               and monitor.messages, 30, "busctl monitor to start")  # fmt: skip
    job = start_backup(service)
    job_xml = json.loads(sh("busctl", "--json=short", "call", "org.cryptsnap1", job,
                            "org.freedesktop.DBus.Introspectable", "Introspect").stdout)["data"][0]  # fmt: skip
    assert members(job_xml)["org.cryptsnap1.Job"] == contract["org.cryptsnap1.Job"]
    busy = sh("busctl", "call", "org.cryptsnap1", path, "org.cryptsnap1.Target", "StartBackup", "a{sv}", "0",
              check=False)  # fmt: skip
    assert busy.returncode != 0 and job in busy.stderr
    denied = sh("busctl", "call", "org.cryptsnap1", path, "org.cryptsnap1.Target", "StartBackup", "a{sv}", "0",
                user="outsider", check=False)  # fmt: skip
    assert denied.returncode != 0, denied.stdout
    assert "denied" in denied.stderr.lower() or "not allowed" in denied.stderr, denied.stderr
    readable = sh("busctl", "get-property", "org.cryptsnap1", path, "org.cryptsnap1.Target", "State",
                  user="outsider")  # fmt: skip
    assert readable.stdout.strip() == 's "running"'
    assert wait_idle(service) == "done"
    monitor.wait_for(lambda m: m.get("member") == "JobRemoved")
    monitor.close()
    messages = monitor.messages
    signals = [m for m in messages if m.get("type") == "signal"]
    assert any(m["member"] == "JobNew" and m["payload"]["data"][1] == job for m in signals)
    progress = [m["payload"]["data"][1]["Progress"]["data"] for m in signals
                if m["member"] == "PropertiesChanged" and m["path"] == job and "Progress" in m["payload"]["data"][1]]
    assert len(set(progress)) >= 2 and progress == sorted(progress), progress
    removed = [m["payload"]["data"] for m in signals if m["member"] == "JobRemoved"]
    assert removed and removed[-1][1:] == [job, service.name, "done"]
    errors = [m.get("error_name") or m.get("error") for m in messages if m.get("type") == "error"]
    assert "org.cryptsnap1.Error.Busy" in errors, errors


def test_activation_starts_the_daemon(service):
    sh("systemctl", "stop", "cryptsnapd.service")
    assert sh("systemctl", "is-active", "cryptsnapd.service", check=False).stdout.strip() != "active"
    out = sh("busctl", "--json=short", "call", "org.cryptsnap1", "/org/cryptsnap1", "org.cryptsnap1.Manager",
             "ListTargets").stdout  # fmt: skip
    assert service.name in out
    assert sh("systemctl", "is-active", "cryptsnapd.service").stdout.strip() == "active"


def test_watchdog_restarts_a_hung_daemon(service):
    dropin = Path("/run/systemd/system/cryptsnapd.service.d/watchdog.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nWatchdogSec=3s\nRestartSec=1s\n")
    try:
        sh("systemctl", "daemon-reload")
        sh("systemctl", "restart", "cryptsnapd.service")
        pid = sh("systemctl", "show", "-P", "MainPID", "cryptsnapd.service").stdout.strip()
        restarts = int(sh("systemctl", "show", "-P", "NRestarts", "cryptsnapd.service").stdout)
        os.kill(int(pid), 19)  # SIGSTOP: the main loop stops pinging the watchdog
        wait_until(lambda: int(sh("systemctl", "show", "-P", "NRestarts", "cryptsnapd.service").stdout) > restarts
                   and sh("systemctl", "is-active", "cryptsnapd.service", check=False).stdout.strip() == "active",
                   120, "systemd to restart the hung daemon")  # fmt: skip
        assert sh("systemctl", "show", "-P", "MainPID", "cryptsnapd.service").stdout.strip() != pid
        journal = sh("journalctl", "-u", "cryptsnapd.service", "--no-pager").stdout
        assert "Watchdog timeout" in journal
        done = cryptsnap(service, "backup", "--daemon", service.name)
        assert "complete" in done.stdout
    finally:
        dropin.unlink()
        sh("systemctl", "daemon-reload")
        sh("systemctl", "restart", "cryptsnapd.service")


def test_cancel_and_service_stop_mid_rsync_leave_nothing(service):
    fill(service, 64)
    path = target_path(service.name)
    sh("systemctl", "start", "cryptsnapd.service")
    job = start_backup(service)
    wait_until(lambda: prop(job, "org.cryptsnap1.Job", "Phase") == "syncing", 300, "syncing")
    # The run holds the guest's real logind's delay inhibitor, and releases it with the run.
    # (What cryptsnapd does when logind announces sleep: tests/host/test_sleep.py.)
    listed = sh("systemd-inhibit", "--list", "--no-pager", "--no-legend").stdout
    assert any("cryptsnap" in line and "delay" in line and ("sleep:shutdown" in line or "shutdown:sleep" in line)
               for line in listed.splitlines()), listed  # fmt: skip (logind lists WHAT in its own order)
    sh("busctl", "call", "org.cryptsnap1", job, "org.cryptsnap1.Job", "Cancel")
    assert wait_idle(service) == "canceled"
    wait_until(lambda: "cryptsnap" not in sh("systemd-inhibit", "--list", "--no-pager", "--no-legend").stdout, 10,
               "the inhibitor to go with the run")  # fmt: skip
    assert_nothing_left(service)
    job = start_backup(service)
    wait_until(lambda: prop(job, "org.cryptsnap1.Job", "Phase") == "syncing", 300, "syncing")
    sh("systemctl", "stop", "cryptsnapd.service", timeout=120)
    assert_nothing_left(service)
    journal = sh("journalctl", "-u", "cryptsnapd.service", "--no-pager", "-o", "cat").stdout
    assert f"job {job.rsplit('/', 1)[1]} [{service.name}]: canceled" in journal
    assert cryptsnap(service, "list", service.name).stdout.split() == []
    assert prop(path, "org.cryptsnap1.Target", "LastResult") == "canceled"  # activates the daemon again


def test_restore_unit_opens_read_only_and_holds_the_lock(service):
    name = service.name
    cryptsnap(service, "backup", "--daemon", name)
    (service.source / "file.txt").write_text("version 2\n")
    cryptsnap(service, "backup", "--daemon", name)
    old, new = prop(target_path(name), "org.cryptsnap1.Target", "Snapshots")
    image = Path(service.server.remote_dir) / f"{name}.img"
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    sh("systemctl", "start", f"cryptsnap-restore@{name}.service", timeout=300)
    try:
        view = Path("/run/cryptsnap/restore") / name / "snapshots"
        rel = str(service.source / "file.txt").lstrip("/")
        assert (view / old / rel).read_text() == "version 1\n"
        assert (view / new / rel).read_text() == "version 2\n"
        busy = sh("busctl", "call", "org.cryptsnap1", target_path(name), "org.cryptsnap1.Target", "StartBackup",
                  "a{sv}", "0", check=False)  # fmt: skip
        assert busy.returncode != 0 and "busy" in busy.stderr
    finally:
        sh("systemctl", "stop", f"cryptsnap-restore@{name}.service", timeout=120)
    assert_nothing_left(service)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before, "the read-only view changed the image"
    # and the reverse: while a backup runs, the restore unit cannot open the image
    fill(service, 48)
    start_backup(service)
    wait_until(lambda: prop(target_path(name), "org.cryptsnap1.Target", "State") == "running", 60, "running")
    blocked = sh("systemctl", "start", f"cryptsnap-restore@{name}.service", check=False, timeout=300)
    assert blocked.returncode != 0
    assert wait_idle(service) == "done"
    assert_nothing_left(service)
