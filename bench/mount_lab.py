"""What mounting and unmounting the image's btrfs writes when the run writes nothing: the floor
of a run with nothing changed (docs/performance.md, the fixed cost of a run).

    sudo python3 -m bench.mount_lab
    sudo python3 -m tests.harness run -- python3 -m bench.mount_lab     # the guest's kernel

A btrfs made with cryptsnap's options on a loop device over a sparse file under --dir, holding
a snapshot of FILES small files as a backup leaves it (a read-only snapshot, the generation
file), unmounted. Then, each on a fresh mount with cryptsnap's mount options: read-write and
unmounted at once; read-write with what a run with nothing changed does (list the snapshots,
read the generation, syncfs); read-only with the same; and read-only, then `mount -o
remount,rw` and a snapshot (a run that does write). Prints the bytes written to the device
by the mount, the work and the unmount of each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

from bench.scatter_lab import loop, run
from cryptsnap import commands, durable
from tests.support.loopfs import device_written

CASES = {
    "read-write, unmounted at once": (False, None),
    "read-write, a run's reads and a syncfs": (False, "reads"),
    "read-only, a run's reads": (True, "reads"),
    "read-only, then remount,rw and a snapshot": (True, "snapshot"),
}


def prepare(device: str, mountpoint: Path, files: int) -> None:
    run(*commands.mkfs("btrfs", device))
    run(*commands.mount(device, str(mountpoint), "btrfs", readonly=False))
    try:
        snapshots = mountpoint / "snapshots"
        snapshots.mkdir()
        (mountpoint / ".cryptsnap").mkdir()
        (mountpoint / ".cryptsnap" / "generation").write_text("1\n")
        run(*commands.btrfs_subvolume_create(str(snapshots / "first.partial")))
        for i in range(files):
            (snapshots / "first.partial" / f"f{i}").write_bytes(os.urandom(100))
        run(*commands.btrfs_set_readonly(str(snapshots / "first.partial")))
        os.rename(snapshots / "first.partial", snapshots / "first")
    finally:
        run(*commands.unmount(str(mountpoint)))


def measure(device: str, mountpoint: Path, readonly: bool, work: str | None) -> tuple[int, int, int]:
    """Bytes written by the mount, the work, the unmount."""
    start = device_written(device)
    run(*commands.mount(device, str(mountpoint), "btrfs", readonly=readonly))
    mounted = device_written(device)
    try:
        if work:
            sorted(os.listdir(mountpoint / "snapshots"))
            (mountpoint / ".cryptsnap" / "generation").read_text()
            with durable.Syncer(mountpoint, "btrfs") as syncer:
                syncer.sync()
        if work == "snapshot":
            run(*commands.remount_rw(str(mountpoint)))
            run(*commands.btrfs_snapshot(str(mountpoint / "snapshots" / "first"),
                                         str(mountpoint / "snapshots" / "second")))  # fmt: skip
            run(*commands.btrfs_subvolume_delete(str(mountpoint / "snapshots" / "second")))
    finally:
        worked = device_written(device)
        run(*commands.unmount(str(mountpoint)))
    return mounted - start, worked - mounted, device_written(device) - worked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.mount_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--dir", default="/var/tmp", help="where the sparse image goes")
    args = parser.parse_args(argv)
    print(f"kernel {os.uname().release}")
    with tempfile.TemporaryDirectory(dir=args.dir) as work, contextlib.ExitStack() as held:
        image, mountpoint = Path(work) / "image", Path(work) / "mnt"
        with open(image, "wb") as sparse:
            sparse.truncate(1 << 30)
        mountpoint.mkdir()
        device = held.enter_context(loop(image))
        prepare(device, mountpoint, args.files)
        for name, (readonly, what) in CASES.items():
            mount, done, unmount = measure(device, mountpoint, readonly, what)
            print(f"{name}: mount wrote {mount:,} bytes, the work {done:,}, the unmount {unmount:,}")


if __name__ == "__main__":
    main()
