"""A process moved out of the unit that started it, into a transient systemd scope of its own.

Why (docs/reliability.md: kill 41 of the cryptsnapd series): systemd kills a killed
service's whole cgroup at once. The kernel side of a block device (cryptsnap.nbd's NBD_DO_IT
process) must outlive its server by a moment to fail the requests the server left
unanswered; killed together, it may not (a race lost twice in 180 daemon kills), and whatever
waits on those requests stays in the kernel, and with it in the service's cgroup, until
ExecStopPost= after TimeoutStopSec. In a scope of its own it is not killed with the service:
it sees its server's end close, fails what is left and exits, and the scope goes with it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SYSTEMD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")


def unit_of(cgroup: str) -> str | None:
    """The unit a process runs in, from the text of /proc/PID/cgroup (the unified `0::/…` line)."""
    for line in cgroup.splitlines():
        if line.startswith("0::"):
            name = line[3:].rstrip("/").rpartition("/")[2]
            return name if name.endswith((".service", ".scope")) else None
    return None


def start_scope(name: str, pid: int, description: str, before: str | None) -> tuple[str, ...]:
    """busctl's call of StartTransientUnit: `pid` into the scope `name`, which is removed once
    empty and, when `before` is a unit, stopped only after it (at shutdown the unit's unwinding
    still needs the device)."""
    properties = [("PIDs", "au", "1", str(pid)), ("Description", "s", description),
                  ("CollectMode", "s", "inactive-or-failed")]  # fmt: skip
    if before:
        properties.append(("Before", "as", "1", before))
    flat = [word for prop in properties for word in prop]
    return ("busctl", "call", "--quiet", *SYSTEMD, "StartTransientUnit", "ssa(sv)a(sa(sv))",
            name, "fail", str(len(properties)), *flat, "0")  # fmt: skip


def move_to_own_scope(pid: int, name: str, description: str) -> str | None:
    """Move `pid` into a scope of its own; None when done or when systemd does not run this
    machine (nothing kills a unit's cgroup then), else why not."""
    if not Path("/run/systemd/system").is_dir():
        return None
    unit = unit_of(Path("/proc/self/cgroup").read_text())
    before = unit if unit and unit.endswith(".service") else None
    try:
        done = subprocess.run(start_scope(name, pid, description, before), capture_output=True, text=True,
                              timeout=30, check=False)  # fmt: skip
    except FileNotFoundError:
        return "busctl is missing (package systemd)"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"busctl: {exc}"
    if done.returncode:
        return done.stderr.strip() or f"busctl exited with {done.returncode}"
    return None
