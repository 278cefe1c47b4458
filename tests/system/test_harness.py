"""The guest harness is real: dm-crypt, PID-1 systemd, the system bus and sshd work in it."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kwargs)


def test_runs_inside_the_guest():
    assert os.environ.get("CRYPTSNAP_IN_GUEST") == "1"
    assert open("/proc/1/comm").read().strip() == "systemd"


def test_cryptsetup_opens_a_luks2_image_on_a_loop_device(tmp_path):
    image = tmp_path / "disk.img"
    name = "harness-" + uuid.uuid4().hex[:8]
    key = tmp_path / "key"
    key.write_bytes(os.urandom(64))
    run("truncate", "-s", "64M", str(image))
    run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", str(key), str(image))
    loop = run("losetup", "--find", "--show", str(image)).stdout.strip()
    try:
        run("cryptsetup", "open", "--key-file", str(key), loop, name)
        try:
            run("mkfs.ext4", "-q", f"/dev/mapper/{name}")
            mnt = tmp_path / "mnt"
            mnt.mkdir()
            run("mount", f"/dev/mapper/{name}", str(mnt))
            (mnt / "hello").write_text("inside dm-crypt\n")
            run("umount", str(mnt))
        finally:
            run("cryptsetup", "close", name)
    finally:
        run("losetup", "-d", loop)
    # The plaintext never reached the backing file.
    assert b"inside dm-crypt" not in image.read_bytes()


def test_systemd_reaches_running_or_degraded():
    state = subprocess.run(["systemctl", "is-system-running", "--wait"], capture_output=True,
                           text=True, timeout=300).stdout.strip()
    if state == "degraded":
        failed = run("systemctl", "--failed", "--no-legend").stdout
        print("failed units:", failed)
    assert state in ("running", "degraded")


def test_busctl_lists_systemd_on_the_system_bus():
    names = run("busctl", "list", "--no-legend", "--acquired").stdout
    assert "org.freedesktop.systemd1" in names


def test_sshd_on_loopback_accepts_key_login_for_unprivileged_user(untrusted_host):
    result = untrusted_host.ssh("id", "-un")
    assert result.stdout.strip() == untrusted_host.user
    assert untrusted_host.user != "root"


@pytest.mark.skipif(os.environ.get("CRYPTSNAP_DEMO_GUEST_FAILURE") != "1",
                    reason="set CRYPTSNAP_DEMO_GUEST_FAILURE=1 to see a guest failure fail the host run")
def test_deliberate_guest_failure():
    kernel = open("/proc/sys/kernel/osrelease").read().strip()
    assert kernel == "not-this-kernel", f"deliberate failure inside the guest (kernel {kernel})"
