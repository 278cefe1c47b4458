"""Build and cache the Debian 12 guest image the system tests run in.

The image is made from Debian's packages with mmdebstrap, which takes the host's apt
sources (no mirror is named here), then turned into an ext4 disk with ``mke2fs -d``
without mounting anything. It is cached outside the checkout under a key made from the
package list and this file, so a warm run reuses it and a changed list rebuilds it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PACKAGES_FILE = HERE / "guest-packages.txt"
SUITE = "bookworm"
DISK_SIZE = "8G"  # sparse: costs only what is written

AGENT_PORT = "org.cryptsnap.agent"

# Files laid into the guest's root after mmdebstrap. Part of the cache key.
GUEST_FILES = {
    "etc/hostname": "guest\n",
    "etc/hosts": "127.0.0.1 localhost guest\n::1 localhost\n",
    "etc/fstab": (
        "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"
        # The checkout, read-only, and the results directory the guest writes back to.
        "src /src 9p trans=virtio,version=9p2000.L,ro,msize=262144 0 0\n"
        "results /results 9p trans=virtio,version=9p2000.L,rw,msize=262144 0 0\n"
    ),
    "etc/modules-load.d/cryptsnap-test.conf": "9p\n9pnet_virtio\ndm_crypt\nloop\nfuse\nbtrfs\n",
    "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf": (
        "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM\n"
    ),
    "etc/systemd/system/cryptsnap-test-agent.service": f"""\
[Unit]
Description=cryptsnap test agent (runs commands for the host over virtio-serial)
RequiresMountsFor=/src /results
After=systemd-modules-load.service

[Service]
Environment=PYTHONDONTWRITEBYTECODE=1
ExecStart=/usr/bin/python3 -u /src/tests/harness/agent.py /dev/virtio-ports/{AGENT_PORT}
Restart=on-failure
RestartSec=1

[Install]
WantedBy=multi-user.target
""",
    # Keep the journal in memory: the guest's disk is thrown away after each run anyway.
    "etc/systemd/journald.conf.d/volatile.conf": "[Journal]\nStorage=volatile\n",
}

# Units that only slow the boot down or wake up at random in a throwaway guest.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "ssh.service",
    "ssh.socket",
    "systemd-networkd-wait-online.service",
)


@dataclass(frozen=True)
class GuestImage:
    """A built, cached guest: a raw ext4 root disk and the kernel/initrd that boot it."""

    directory: Path
    disk: Path
    kernel: Path
    initrd: Path
    built_now: bool
    build_seconds: float


def packages() -> list[str]:
    lines = PACKAGES_FILE.read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def cache_key() -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(packages()).encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    if "CRYPTSNAP_VM_CACHE" in os.environ:
        return Path(os.environ["CRYPTSNAP_VM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cryptsnap-vm"


def _run(argv: list[str], **kwargs) -> None:
    log.info("+ %s", " ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{argv[0]} failed with exit code {proc.returncode}:\n{tail}")


def _customize(root: Path) -> None:
    for rel, text in GUEST_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for mountpoint in ("src", "results"):
        (root / mountpoint).mkdir(exist_ok=True)
    _run(["chroot", str(root), "passwd", "-d", "root"])
    _run(["chroot", str(root), "systemctl", "enable", "cryptsnap-test-agent.service"])
    _run(["chroot", str(root), "systemctl", "mask", *MASKED_UNITS])


def _build(work: Path) -> None:
    root = work / "root"
    _run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(packages()),
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            SUITE,
            str(root),
        ]
    )
    _customize(root)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise RuntimeError(f"no kernel or initrd under {root / 'boot'}")
    shutil.copy2(kernels[-1], work / "vmlinuz")
    shutil.copy2(initrds[-1], work / "initrd.img")
    _run(["mke2fs", "-q", "-t", "ext4", "-L", "guestroot", "-d", str(root), str(work / "disk.ext4"), DISK_SIZE])
    shutil.rmtree(root)


def ensure_image() -> GuestImage:
    """Return the cached guest image, building it first when the key changed."""
    top = cache_root()
    top.mkdir(parents=True, exist_ok=True)
    key = cache_key()
    final = top / key
    started = time.monotonic()
    built = False
    with open(top / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs must not build at once
        if not (final / "complete").exists():
            work = top / f"{key}.building"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            log.warning("building the guest image (cold cache) in %s", work)
            _build(work)
            (work / "complete").write_text(" ".join(packages()) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
            built = True
            for stale in top.iterdir():  # images of older package lists are never used again
                if stale.is_dir() and stale != final:
                    shutil.rmtree(stale, ignore_errors=True)
    return GuestImage(
        directory=final,
        disk=final / "disk.ext4",
        kernel=final / "vmlinuz",
        initrd=final / "initrd.img",
        built_now=built,
        build_seconds=time.monotonic() - started,
    )
