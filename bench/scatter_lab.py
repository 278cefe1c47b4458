"""The scattered change on a plain btrfs, without network, LUKS or guest: bytes written to the
block device by one run's file-system work, in seconds, for trying mkfs and mount options.

    sudo python3 -m bench.scatter_lab --files 100000                 # cryptsnap's options
    sudo python3 -m bench.scatter_lab --files 100000 --mkfs='-n 16384' --no-snapshot

A btrfs on a loop device over a sparse file under --dir, a tree of FILES files of FILE_KB
(100 a directory), then RUNS runs of: a writable snapshot of the last one (as a backup makes
it), CHANGED files rewritten as CHANGED_KB of random data, a sync. Prints the bytes written
per run divided by the changed bytes. dm-crypt maps sectors one to one and the sync is a
run's own commit, so this is the upload of the guest benchmark's `syncing` step without the
SFTP framing (docs/performance.md: 1.79x at 100,000 files there, 1.79x here).
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import subprocess
import tempfile
from pathlib import Path

from cryptsnap import commands
from tests.support.loopfs import device_written


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def measure(args: argparse.Namespace) -> list[int]:
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        image, mnt = Path(work) / "image", Path(work) / "mnt"
        mnt.mkdir()
        with open(image, "wb") as f:
            f.truncate(args.image_gb << 30)
        device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
        try:
            mkfs = list(commands.mkfs("btrfs", device))
            run(*mkfs[:-1], *shlex.split(args.mkfs), device)
            mount = list(commands.mount(device, str(mnt), "btrfs", readonly=False))
            options = mount[mount.index("-o") + 1] + ("," + args.mount if args.mount else "")
            run("mount", "-t", "btrfs", "-o", options, device, str(mnt))
            try:
                return _runs(args, mnt, device)
            finally:
                subprocess.run(["umount", str(mnt)], capture_output=True)
        finally:
            subprocess.run(["losetup", "-d", device], check=True)


def _runs(args: argparse.Namespace, mnt: Path, device: str) -> list[int]:
    run("btrfs", "-q", "subvolume", "create", str(mnt / "s0"))
    content = os.urandom(args.file_kb << 10)
    for i in range(args.files):
        directory = mnt / "s0" / f"d{i // 100}"
        if i % 100 == 0:
            directory.mkdir()
        (directory / f"f{i}").write_bytes(content[:-8] + i.to_bytes(8, "little"))
    run("btrfs", "filesystem", "sync", str(mnt))
    rng, written, last = random.Random(args.seed), [], "s0"
    for n in range(1, args.runs + 1):
        if args.snapshot:
            run("btrfs", "property", "set", "-ts", str(mnt / last), "ro", "true")
        run("btrfs", "filesystem", "sync", str(mnt))
        before = device_written(device)
        if args.snapshot:
            run("btrfs", "-q", "subvolume", "snapshot", str(mnt / last), str(mnt / f"s{n}"))
            last = f"s{n}"
        for i in rng.sample(range(args.files), args.changed):
            (mnt / last / f"d{i // 100}" / f"f{i}").write_bytes(os.urandom(args.changed_kb << 10))
        run("btrfs", "filesystem", "sync", str(mnt))
        written.append(device_written(device) - before)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.scatter_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--file-kb", type=int, default=4)
    parser.add_argument("--changed", type=int, default=30)
    parser.add_argument("--changed-kb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mkfs", default="", help="more mkfs.btrfs options, after cryptsnap's (they win)")
    parser.add_argument("--mount", default="", help="more mount options, after cryptsnap's")
    parser.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                        help="change the files in place: what snapshots add")
    parser.add_argument("--image-gb", type=int, default=4)
    parser.add_argument("--dir", default="/var/tmp", help="where the sparse image goes")
    args = parser.parse_args(argv)
    changed = args.changed * (args.changed_kb << 10)
    for n, written in enumerate(measure(args), 1):
        print(f"run {n}: {written:,} bytes written for {changed:,} changed: {written / changed:.3f}x")


if __name__ == "__main__":
    main()
