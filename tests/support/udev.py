"""cryptsnap's udev rule, made active for tests and benchmarks run from the checkout.

A package installs systemd/56-cryptsnap.rules under /usr/lib/udev/rules.d; runs from the
checkout get the same rule as a runtime rule in /run, which a reboot of the guest clears.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

RULE = Path(__file__).resolve().parents[2] / "systemd" / "56-cryptsnap.rules"


def install_rule() -> None:
    runtime = Path("/run/udev/rules.d")
    if (Path("/usr/lib/udev/rules.d") / RULE.name).exists() or not Path("/run/udev/control").exists():
        return  # installed as a package would, or no udev running (then nothing probes either)
    runtime.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RULE, runtime / RULE.name)
    subprocess.run(["udevadm", "control", "--reload"], check=True)
