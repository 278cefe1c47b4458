"""Runs driven from a test and watched from outside: the phase a run is in (its marker file),
filling a source, a target with one snapshot, what every snapshot holds, the server's side of
ssh killed. Shared by the guest's fault tests."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil

from tests.support import trees
from tests.support.checks import cryptsnap
from tests.support.service import wait_until
from tests.support.targets import init_target, make_setup

PHASES = ("connecting", "attaching", "unlocking", "mounting", "syncing", "finalizing", "unmounting")


def marker(setup) -> dict:
    """The running run's marker (state.py), {} when none runs."""
    try:
        return json.loads((setup.state_dir / setup.name / "running.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def wait_phase(setup, phase: str, timeout: float = 300) -> dict:
    return wait_until(lambda: marker(setup) if marker(setup).get("phase") == phase else None, timeout,
                      f"phase {phase}")  # fmt: skip


def catch_phase(setup, phase: str, timeout: float = 300) -> dict | None:
    """The run's marker the moment it enters `phase`, or None once the run went past it or ended.

    Polled every 5 ms, and only the marker file: mounting or finalizing last a fraction of a
    second, which a poll that also asks the bus (a process per look) misses now and then."""
    order = PHASES.index(phase)
    seen = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = marker(setup)
        at = now.get("phase")
        if at == phase:
            return now
        if at in PHASES and PHASES.index(at) > order:
            return None
        if seen and not now:
            return None
        seen = seen or bool(now)
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout}s waiting for phase {phase}")


def fill(source: Path, megabytes: int, name: str = "big") -> None:
    for i in range(megabytes // 8):
        (source / f"{name}-{i}").write_bytes(os.urandom(8 << 20))


def digests(setup) -> dict[str, dict]:
    """Every snapshot's content, read back through a read-only view."""
    cryptsnap(setup, "mount", setup.name)
    try:
        view = setup.runtime_dir / "restore" / setup.name / "snapshots"
        return {name: trees.manifest(view / name / str(setup.source).lstrip("/")) for name in sorted(os.listdir(view))}
    finally:
        cryptsnap(setup, "umount", setup.name)


def with_one_snapshot(tmp_path, server, **options):
    """An initialized target with one snapshot, and what that snapshot holds."""
    setup = make_setup(tmp_path, server, **options)
    (setup.source / "first").write_text("before the fault\n")
    init_target(setup)
    cryptsnap(setup, "backup", setup.name)
    return setup, digests(setup)


def start_local_backup(setup) -> subprocess.Popen:
    return subprocess.Popen(["python3", "-m", "cryptsnap", *setup.cli_args("backup", setup.name)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def kill_server_sessions(server) -> int:
    """SIGKILL the server's side of every ssh session of the untrusted user (sshd's child)."""
    killed = 0
    for proc in psutil.process_iter(["name", "username", "cmdline"]):
        if proc.info["username"] == server.user and "sshd" in (proc.info["name"] or ""):
            try:
                proc.kill()
                killed += 1
            except psutil.NoSuchProcess:  # went with its parent, killed a moment before
                pass
    return killed
