"""The Debian package the guest tier installs, as users get it: built on the host before the
guest boots (scripts/build-deb into build/deb, also `make deb`), seen by the guest under
/src/build/deb, installed there with `apt-get install ./cryptsnap_VERSION_all.deb`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEB_DIR = REPO / "build" / "deb"


def build() -> Path:
    """Build and lint the package on the host; its path. RuntimeError says why it failed."""
    result = subprocess.run([str(REPO / "scripts" / "build-deb"), str(DEB_DIR)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the Debian package failed (scripts/build-deb):\n"
                           f"{result.stdout[-3000:]}{result.stderr[-2000:]}")  # fmt: skip
    return Path(result.stdout.split()[-1])


def built() -> Path:
    debs = sorted(DEB_DIR.glob("cryptsnap_*_all.deb"))
    if len(debs) != 1:
        raise AssertionError(f"expected one package in {DEB_DIR}, found {[d.name for d in debs]}: "
                             f"the host builds it before the guest boots (`make deb`)")  # fmt: skip
    return debs[0]


def install() -> None:
    """apt installs the local package; every dependency is already in the guest's image, so
    nothing is downloaded (the guest has no network): a missing one fails here, by name."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", str(built())],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"apt-get install {built().name} failed:\n{result.stdout[-3000:]}\n{result.stderr}")
