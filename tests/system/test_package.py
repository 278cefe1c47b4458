"""The Debian package in the guest, as users get it: an upgrade while a backup runs, and purge.

The `installed` fixture has installed the package the host built (tests/support/package.py);
the host also built the same code as a newer version, which the upgrade installs over it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cryptsnap.bus import target_path
from tests.support import package
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.service import fill, prop, sh, start_backup, wait_idle, wait_until


def main_pid() -> int:
    return int(sh("systemctl", "show", "-P", "MainPID", "cryptsnapd.service").stdout)


def test_an_upgrade_while_a_backup_runs_neither_stops_nor_restarts_it(service):
    before = package.installed_version()
    fill(service, 48)
    sh("systemctl", "start", "cryptsnapd.service")
    job = start_backup(service)
    wait_until(lambda: prop(job, "org.cryptsnap1.Job", "Phase") == "syncing", 300, "syncing")
    daemon = main_pid()
    try:
        package.install(package.built(package.NEXT_DIR))
        assert package.installed_version() == before + package.NEXT_VERSION
        assert main_pid() == daemon, "the upgrade restarted cryptsnapd under a running backup"
        # The job (syncing when the upgrade began) ends as it would have without it.
        assert wait_idle(service) == "done", prop(target_path(service.name), "org.cryptsnap1.Target", "LastError")
        assert sh("systemctl", "is-enabled", "cryptsnapd.service", check=False).stdout.strip() != "enabled"
        sh("systemctl", "restart", "cryptsnapd.service")  # the new version, once idle
        start_backup(service)
        assert wait_idle(service) == "done"
        assert len(cryptsnap(service, "list", service.name).stdout.split()) == 2
    finally:
        package.install()  # back to this version for the tests after this one
    assert_nothing_left(service)


def test_purge_removes_the_group_and_runtime_files_but_keeps_the_state_unless_asked(service):
    cryptsnap(service, "backup", service.name)
    header = Path("/var/lib/cryptsnap") / service.name / "luks-header.img"
    assert header.is_file()
    try:
        sh("dpkg", "--purge", "cryptsnap")
        assert not Path("/usr/bin/cryptsnap").exists()
        assert sh("getent", "group", "cryptsnap", check=False).returncode != 0, "purge kept the group"
        assert not Path("/run/cryptsnap").exists()
        assert sh("systemctl", "is-active", "cryptsnapd.service", check=False).stdout.strip() != "active"
        assert header.is_file(), "purge removed the LUKS header backup without being asked"
        sh("modprobe", "-r", "nbd")  # as on a machine that has not booted since the install
        package.install()
        assert Path("/sys/module/nbd").exists(), "installing did not load nbd: no metadata cache until a reboot"
        assert sh("getent", "group", "cryptsnap", check=False).returncode == 0, "reinstalling did not make the group"
        env = {**os.environ, "CRYPTSNAP_PURGE_STATE": "yes"}
        subprocess.run(["dpkg", "--purge", "cryptsnap"], check=True, env=env, capture_output=True)
        assert not Path("/var/lib/cryptsnap").exists(), "CRYPTSNAP_PURGE_STATE=yes kept the state"
    finally:
        package.install()
    assert Path("/var/lib/cryptsnap").is_dir() and Path("/run/cryptsnap").is_dir()  # tmpfiles made them again
