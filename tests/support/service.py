"""The installed cryptsnapd under the guest's real systemd: fixtures and helpers of the guest tests."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from cryptsnap.bus import target_path
from tests.support import package, sshd
from tests.support.targets import init_target, make_setup

SRV = "/srv/cryptsnap-test"  # visible to the service (PrivateTmp hides /tmp from it)


def sh(*argv: str, check: bool = True, timeout: float = 600, user: str | None = None) -> subprocess.CompletedProcess:
    if user:
        argv = ("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stdout}\n{result.stderr}")
    return result


def prop(path: str, interface: str, name: str):
    out = sh("busctl", "--json=short", "get-property", "org.cryptsnap1", path, interface, name).stdout
    return json.loads(out)["data"]


def wait_until(predicate, timeout: float = 180, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def installed():
    package.install()  # the .deb the host built, as users install it
    sh("useradd", "--no-create-home", "--shell", "/bin/sh", "outsider", check=False)
    server = sshd.start(base=SRV)
    yield server
    sh("systemctl", "stop", "cryptsnapd.service", check=False)
    sshd.stop(server)


@pytest.fixture
def service(installed):
    """A fresh target in /etc/cryptsnap/config.yaml, initialized, with the daemon reloaded.
    Initialized as a copy of the first such target's init (targets.init_target): these tests
    are not about init, and 18 inits were 6 minutes of the guest tier (twice that on a slow day)."""
    base = Path(SRV) / uuid.uuid4().hex[:8]
    setup = make_setup(base, installed, filesystem="btrfs", size="400M",
                       state_dir=Path("/var/lib/cryptsnap"), runtime_dir=Path("/run/cryptsnap"))  # fmt: skip
    (setup.source / "file.txt").write_text("version 1\n")
    init_target(setup)
    os.makedirs("/etc/cryptsnap", exist_ok=True)
    os.replace(setup.config_path, "/etc/cryptsnap/config.yaml")
    setup.config_path = Path("/etc/cryptsnap/config.yaml")
    if sh("systemctl", "is-active", "cryptsnapd.service", check=False).stdout.strip() == "active":
        sh("systemctl", "reload", "cryptsnapd.service")
    yield setup
    sh("systemctl", "stop", f"cryptsnap-restore@{setup.name}.service", f"cryptsnap-backup@{setup.name}.timer",
       check=False)  # fmt: skip


def fill(setup, megabytes: int) -> None:
    """Enough incompressible data for a job that runs a while under emulation."""
    for i in range(megabytes // 16):
        (setup.source / f"big-{i}").write_bytes(os.urandom(16 << 20))


def start_backup(setup) -> str:
    out = sh("busctl", "--json=short", "call", "org.cryptsnap1", target_path(setup.name), "org.cryptsnap1.Target",
             "StartBackup", "a{sv}", "0").stdout  # fmt: skip
    return json.loads(out)["data"][0]


def wait_idle(setup, timeout: float = 600) -> str:
    path = target_path(setup.name)
    wait_until(lambda: prop(path, "org.cryptsnap1.Target", "State") == "idle", timeout, "the job to end")
    return prop(path, "org.cryptsnap1.Target", "LastResult")
