"""The Debian package in the guest, as users get it: an upgrade while a backup runs, and purge.

The `installed` fixture has installed the package the host built (tests/support/package.py);
the host also built the same code as a newer version, which the upgrade installs over it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from cryptsnap.bus import target_path
from tests.support import docs, figures, package
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.service import SRV, fill, prop, sh, start_backup, wait_idle, wait_until
from tests.support.targets import Setup


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
        # The job (syncing when the upgrade began) ends as it would have without it (a restart
        # under it would have interrupted it), and then the old daemon exits by itself: it saw
        # its files replaced. Watched through systemd, not the bus: a property read may meet
        # the old daemon just as it exits. (The job may end while apt still works, on this CPU.)
        wait_until(lambda: main_pid() != daemon, 600, "the job to end and the old cryptsnapd to exit once idle")
        assert prop(target_path(service.name), "org.cryptsnap1.Target", "LastResult") == "done", \
            prop(target_path(service.name), "org.cryptsnap1.Target", "LastError")  # fmt: skip
        assert sh("systemctl", "is-enabled", "cryptsnapd.service", check=False).stdout.strip() != "enabled"
        journal = sh("journalctl", "-u", "cryptsnapd.service", "--no-pager", "-o", "cat").stdout
        exited = ("cryptsnap was upgraded and no job runs now: exiting",  # waited for the job
                  "cryptsnap was upgraded: exiting now (no job runs)")  # the job had ended already
        assert any(line in journal for line in exited), journal[-2000:]
        start_backup(service)
        assert main_pid() not in (0, daemon)
        assert wait_idle(service) == "done"
        assert len(cryptsnap(service, "list", service.name).stdout.split()) == 2
    finally:
        package.install()  # back to this version for the tests after this one
        # ...which the idle daemon answers by exiting within seconds: let it, before the next test.
        idle = main_pid()
        if idle:
            with contextlib.suppress(AssertionError):  # not replaced (the test failed before): it stays
                wait_until(lambda: main_pid() != idle, 30, "cryptsnapd to exit after the downgrade")
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


def test_the_restore_by_hand_page_works_with_cryptsnap_removed(service):
    """docs/restore-by-hand.md's commands, as written, on a machine without cryptsnap: what is
    left is the key, the pinned host key (kept in /var/lib/cryptsnap) and stock tools."""
    wanted = service.source / "restore-by-hand.txt"
    wanted.write_text("read back with stock tools\n")
    cryptsnap(service, "backup", service.name)
    snapshot = cryptsnap(service, "list", service.name).stdout.split()[-1]
    target, server = service.load(), service.server
    script = docs.with_values(docs.block("restore-by-hand.md", "restore-by-hand"), {
        "TARGET": service.name, "REMOTE": f"{server.user}@{server.host}:{target.remote_dir}",
        "PORT": str(server.port), "SSH_KEY": str(server.identity),
        "KNOWN_HOSTS": f"/var/lib/cryptsnap/{service.name}/known_hosts", "IMAGE": target.image,
        "KEY": str(service.key_file), "SNAPSHOT": snapshot, "FILE": str(wanted),
    })  # fmt: skip
    restored = Path("/tmp") / wanted.name
    restored.unlink(missing_ok=True)
    try:
        sh("apt-get", "remove", "--yes", "cryptsnap")
        assert shutil.which("cryptsnap") is None
        gone = subprocess.run(["/usr/bin/python3", "-c", "import cryptsnap.cli"], capture_output=True, cwd="/",
                              env={"PATH": os.environ["PATH"]})  # not the checkout the tests import  # fmt: skip
        assert gone.returncode != 0, "cryptsnap's code is still importable after its removal"
        left = sorted(str(p) for p in Path("/usr/lib/python3/dist-packages/cryptsnap").rglob("*"))
        figures.record("files left by apt-get remove", files=left[:20])
        ran = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert snapshot in ran.stdout.split(), ran.stdout  # what `ls` listed
        assert restored.read_text() == "read back with stock tools\n"
    finally:  # a failure halfway leaves what the page opened: close it as its last line would
        for argv in (["umount", "/mnt/backup"], ["cryptsetup", "close", "cryptsnap-restore"],
                     ["fusermount3", "-u", "/mnt/remote"]):  # fmt: skip
            sh(*argv, check=False)
        for loop in sh("losetup", "--associated", f"/mnt/remote/{target.image}", check=False).stdout.splitlines():
            sh("losetup", "--detach", loop.split(":")[0], check=False)
        package.install()
    assert_nothing_left(service)


@pytest.mark.long  # its steps are each in make test (init, the timer, a backup); the page as a whole here
def test_the_quickstart_page_from_nothing_to_a_daily_timer(installed):
    """docs/quickstart.md's block as written, its first line filled in with the test server's
    values: the key, the configuration, init, the daily timer, a first backup through
    cryptsnapd (running since earlier tests: it must pick up the new target by itself). The
    key derivation is left at its default (argon2id), as a user's is."""
    server = installed
    source = Path(SRV) / uuid.uuid4().hex[:8] / "home"
    source.mkdir(parents=True)
    (source / "hello").write_text("from the quickstart\n")
    config = Path("/etc/cryptsnap/config.yaml")
    saved = config.read_bytes() if config.exists() else None
    identity = Path("/etc/cryptsnap/id_ed25519")
    shutil.copy(server.identity, identity)  # step 2 of the page, with the key the server accepts
    identity.chmod(0o600)
    script = docs.with_values(docs.block("quickstart.md", "quickstart"), {
        "HOST": server.host, "PORT": str(server.port), "ACCOUNT": server.user, "SOURCES": str(source),
        "SIZE": "200M",
    })  # fmt: skip
    setup = Setup("home", config, source, Path("/etc/cryptsnap/home.key"), Path("/var/lib/cryptsnap"),
                  Path("/run/cryptsnap"), server)  # fmt: skip
    try:
        ran = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=900)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert sh("systemctl", "is-enabled", "cryptsnap-backup@home.timer").stdout.strip() == "enabled"
        assert "cryptsnap-backup@home.timer" in ran.stdout, ran.stdout  # list-timers
        assert len(cryptsnap(setup, "list", "home").stdout.split()) == 1
        cryptsnap(setup, "restore", f"home@latest:{source}/hello", "--to", str(source.parent / "back"))
        assert (source.parent / "back").read_text() == "from the quickstart\n"
        assert_nothing_left(setup)
    finally:
        sh("systemctl", "disable", "--now", "cryptsnap-backup@home.timer", check=False)
        if saved is not None:
            config.write_bytes(saved)
        for path in (identity, Path("/etc/cryptsnap/home.key")):
            path.unlink(missing_ok=True)
        shutil.rmtree("/var/lib/cryptsnap/home", ignore_errors=True)
        shutil.rmtree(Path(pwd.getpwnam(server.user).pw_dir) / "cryptsnap", ignore_errors=True)
