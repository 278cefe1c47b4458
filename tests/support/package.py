"""The Debian package the guest tier installs, as users get it: built on the host before the
guest boots (scripts/build-deb into build/deb, also `make deb`), seen by the guest under
/src/build/deb, installed there with `apt-get install ./cryptsnap_VERSION_all.deb`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEB_DIR = REPO / "build" / "deb"


NEXT_DIR = DEB_DIR / "next"  # the same code as a newer version: what the upgrade test installs over it
NEXT_VERSION = "+next"


def build() -> Path:
    """Build and lint the package on the host, and its "next" version; the package's path.
    RuntimeError says why a build failed."""
    built_now = None
    for out, env in ((DEB_DIR, {}), (NEXT_DIR, {"CRYPTSNAP_DEB_VERSION": _version() + NEXT_VERSION})):
        result = subprocess.run([str(REPO / "scripts" / "build-deb"), str(out)], capture_output=True, text=True,
                                env={**os.environ, **env})  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"building the Debian package failed (scripts/build-deb):\n"
                               f"{result.stdout[-3000:]}{result.stderr[-2000:]}")  # fmt: skip
        built_now = built_now or Path(result.stdout.split()[-1])
    return built_now


def _version() -> str:
    return subprocess.run(["dpkg-parsechangelog", "-l", str(REPO / "debian" / "changelog"), "-S", "Version"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip


def built(directory: Path = DEB_DIR) -> Path:
    debs = sorted(directory.glob("cryptsnap_*_all.deb"))
    if len(debs) != 1:
        raise AssertionError(f"expected one package in {directory}, found {[d.name for d in debs]}: "
                             f"the host builds it before the guest boots (`make deb`)")  # fmt: skip
    return debs[0]


def install(deb: Path | None = None) -> None:
    """apt installs the local package (by default this version's, over any other); every
    dependency is already in the guest's image, so nothing is downloaded (the guest has no
    network): a missing one fails here, by name."""
    deb = deb or built()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "--allow-downgrades", str(deb)],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"apt-get install {deb.name} failed:\n{result.stdout[-3000:]}\n{result.stderr}")


def installed_version() -> str:
    return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "cryptsnap"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
