"""Assertions shared by host and guest tests: nothing left behind, CLI runs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import psutil

from cryptsnap.layers import dm_exists
from cryptsnap.mounts import mount_points
from tests.support.targets import Setup


def cryptsnap(setup: Setup, *args: str, expect: int | None = 0, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real `cryptsnap` command (python -m cryptsnap) against the setup's config."""
    result = subprocess.run([sys.executable, "-m", "cryptsnap", *setup.cli_args(*args)],
                            capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if expect is not None:
        assert result.returncode == expect, (
            f"cryptsnap {' '.join(args)} exited {result.returncode}, expected {expect}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def leftovers(setup: Setup) -> list[str]:
    """Mounts, loop and nbd devices, mappings and sshfs processes of this target that still exist."""
    found = []
    runtime = str(setup.runtime_dir)
    for point, fstype in mount_points():
        if point.startswith(runtime + "/") and setup.name in point:
            found.append(f"mount {point} ({fstype})")
    loops = json.loads(subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                                      capture_output=True, text=True).stdout or "{}")  # fmt: skip
    for loop in loops.get("loopdevices", []):
        if setup.name in (loop.get("back-file") or ""):
            found.append(f"loop {loop['name']} -> {loop['back-file']}")
    if dm_exists(f"cryptsnap-{setup.name}"):  # with a table or not: /dev/mapper/NAME shows only the first
        found.append(f"mapping cryptsnap-{setup.name}")
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] in ("sshfs", "rsync", "ssh", "cryptsetup") and f"cryptsnap-{setup.name}" in cmdline:
            found.append(f"process {proc.pid}: {cmdline}")
        if "cryptsnap.nbd" in cmdline and str(setup.state_dir / setup.name) in cmdline:
            found.append(f"block device server {proc.pid}: {cmdline}")
    for pid_file in Path("/sys/block").glob("nbd*/pid"):  # anyone's: served by no one, it hangs what waits on it
        with contextlib.suppress(OSError, ValueError):
            if not psutil.pid_exists(int(pid_file.read_text())):
                found.append(f"nbd device /dev/{pid_file.parent.name} whose server is gone")
    for record in ("nbd", "loop"):
        if (setup.runtime_dir / setup.name / record).exists():
            found.append(f"{record} record " + (setup.runtime_dir / setup.name / record).read_text())
    return found


def assert_nothing_left(setup: Setup, log: str = "") -> None:
    """log: what the run said, shown with the leftovers to tell why they were left."""
    left = leftovers(setup)
    assert not left, "left behind:\n" + "\n".join(left) + (f"\nlog:\n{log}" if log else "")
