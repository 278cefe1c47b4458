"""What a content digest saves when every file of a tree gets a new mtime and the same bytes
(a package upgrade, a tarball unpacked anew): bytes a btrfs made and mounted with cryptsnap's
options writes when rsync sets the files' attributes alone (`--size-only`: what a run does for
a file whose recorded digest matches) against when it copies them whole in place (what a run
does for a file without a digest). No network, LUKS or guest: dm-crypt maps sectors one to one,
so the bytes written to the loop device are a run's upload for that step.

    sudo python3 -m bench.touch_lab --files 10000 --sizes 1024,2048,2049,4096

For each size: a tree of FILES files of that many random bytes (100 a directory), copied
into a subvolume by cryptsnap's rsync, a snapshot of it (as a run makes), every source file
given a new mtime, then rsync with cryptsnap's options over all of them into the snapshot in
each mode, and a sync; a fresh file system for each mode. btrfs keeps a file of up to
max_inline bytes (2048 by default) in the leaf that holds its inode (changes.INLINE_MAX).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.scatter_lab import loop, run, write_tree
from cryptsnap import commands
from tests.support.loopfs import device_written

MODES = ("touched", "copied")


def written_by(mode: str, files: int, size: int, under: Path) -> int:
    """Bytes written to the device by one mode's rsync and sync, on a fresh file system."""
    with contextlib.ExitStack() as stack:  # unwound in reverse: unmount, detach, remove
        work = Path(tempfile.mkdtemp(prefix="touch-lab-", dir=under))
        stack.callback(shutil.rmtree, work)
        source, mnt, image = work / "source", work / "fs", work / "image"
        mnt.mkdir()
        source.mkdir()
        write_tree(source, files, size)
        names = [str(p).lstrip("/") for p in sorted(source.rglob("f*"))]
        listing = work / "list"
        listing.write_bytes(b"".join(os.fsencode(name) + b"\0" for name in names))
        run("truncate", "-s", "4G", str(image))
        device = stack.enter_context(loop(image))
        run(*commands.mkfs("btrfs", device))
        run(*commands.mount(device, str(mnt), "btrfs", readonly=False))
        stack.callback(run, *commands.unmount(str(mnt)))
        copy = dict(inplace=True, exact_times=True, progress=False)
        run(*commands.btrfs_subvolume_create(str(mnt / "s1")))
        run(*commands.rsync([str(source)], str(mnt / "s1"), **copy))
        run(*commands.btrfs_snapshot(str(mnt / "s1"), str(mnt / "s2")))
        run(*commands.sync(str(mnt)))
        later = time.time() + 60
        for name in names:
            os.utime("/" + name, (later, later))
        before = device_written(device)
        run(*commands.rsync([str(source)], str(mnt / "s2"), files_from=str(listing), size_only=mode == "touched",
                            **copy))  # fmt: skip
        run(*commands.sync(str(mnt)))
        return device_written(device) - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.touch_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--files", type=int, default=10000, help="files in the tree (default 10000)")
    parser.add_argument("--sizes", default="1024,2048,2049,4096", help="file sizes in bytes, comma-separated")
    parser.add_argument("--rounds", type=int, default=1, help="times to measure each size and mode")
    parser.add_argument("--dir", default="/var/tmp", help="where the trees and images go")
    args = parser.parse_args(argv)
    for size in map(int, args.sizes.split(",")):
        for _ in range(args.rounds):
            got = {mode: written_by(mode, args.files, size, Path(args.dir)) for mode in MODES}
            touched, copied = got["touched"], got["copied"]
            print(f"{args.files} files of {size} bytes: attributes alone {touched:,} bytes written "
                  f"({touched / args.files:.0f} a file), copied whole {copied:,} "
                  f"({copied / args.files:.0f} a file): {copied / touched:.2f}x", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
