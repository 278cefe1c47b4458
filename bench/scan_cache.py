"""A nothing-changed run's local scan at 10^6 files beside the machine's own floor: how long
`du` (C, one lstat per file), the run's scan (cryptsnap.scan.scan_sources, one file
touched) and `rsync --dry-run` against an up-to-date copy take on the same tree, each with
the kernel's caches dropped first (cold) and again at once (warm). Where the warm figures stay
near the cold ones the machine's memory does not hold the tree's inodes and dentries, and
every tool reads them from disk again: that is the floor, not cryptsnap's Python. Two more
rows time bench.find_scan's lab (a C walk compared in blocks, sorted or in find's order);
`--only du,scan` picks the rows.

Making a million files in the emulated guest takes longer than measuring them, so the host
makes the tree once, in an image the guest gets as a disk (its writes thrown away):

    sudo .venv/bin/python -m bench.scan_cache make build/scan-1m.img --files 1000000
    sudo CRYPTSNAP_VM_MEMORY=2048 .venv/bin/python -m tests.harness run --disk build/scan-1m.img \\
        -- python3 -m bench.scan_cache measure /dev/vdb

`make` puts on a fresh file system (ext4 by default, as a Debian machine's sources are; -N
sized for the files): tree/ with FILES files of one byte, 1,000 a directory (as
bench.record_scale makes them), copy/ made by `cp -a`, and records/files.gz, the tree's
first record with content digests, as a first run leaves it. Both steps mount the image at
the same place, since the record names the tree by its path.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import find_scan
from bench.record_scale import make_tree, record
from bench.scatter_lab import drop_caches, loop, run
from cryptsnap import changes

MOUNTPOINT = Path("/mnt/cryptsnap-scan-cache")


@contextlib.contextmanager
def mounted(device: str) -> Iterator[Path]:
    """The image's file system at MOUNTPOINT (the place the record names the tree by)."""
    MOUNTPOINT.mkdir(exist_ok=True)
    run("mount", "-o", "noatime", device, str(MOUNTPOINT))
    try:
        yield MOUNTPOINT
    finally:
        run("umount", str(MOUNTPOINT))


def make(image: Path, files: int, filesystem: str) -> None:
    image.unlink(missing_ok=True)
    with image.open("wb") as sparse:
        sparse.truncate((files * 1024 * 3) + (2 << 30))  # two trees of inodes, with room
    with loop(image) as device:
        if filesystem == "ext4":
            # inline_data: a file of a byte lives in its inode, not a block of its own
            run("mkfs.ext4", "-q", "-F", "-O", "inline_data", "-N", str(files * 2 + 100_000), device)
        else:
            run("mkfs.btrfs", "-q", "-f", "-m", "single", device)
        with mounted(device) as top:
            tree, records = top / "tree", top / "records"
            records.mkdir()
            make_tree(tree, files)
            run("cp", "-a", str(tree), str(top / "copy"))
            record(tree, records / "files.gz", None)


def timed(cold: bool, work) -> float:
    if cold:
        drop_caches()
    started = time.monotonic()
    work()
    return time.monotonic() - started


def memory() -> dict[str, int]:
    """MiB of /proc/meminfo: all of it, the page cache, and the slab (inodes and dentries)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {name: int(fields[name].split()[0]) >> 10 for name in ("MemTotal", "Cached", "Slab")}


TOOLS = ("du", "scan", "scan-1", "rsync", "find-sorted", "find")
LAB_ORDERS = {"find-sorted": "sorted", "find": "find"}  # bench.find_scan's tools: their --order


def measure(device: str, only: tuple[str, ...] = TOOLS) -> None:
    with mounted(device) as top, tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        tree, copy, work = top / "tree", top / "copy", Path(scratch)
        known = changes.Record.load(top / "records" / "files.gz")
        # bench.find_scan's first records, of the tree as `make` left it (not timed)
        for name in set(only) & set(LAB_ORDERS):
            find_scan.first(tree, work / LAB_ORDERS[name], LAB_ORDERS[name])
        os.utime(tree / "d0" / "f0")  # one file touched: the scan finds it, rsync would copy it
        found, found_by_find = [], []

        def prototype(order: str) -> None:
            (work / order / "next").mkdir(exist_ok=True)
            # against the first record each time, as the run's scan is
            found_by_find.append(find_scan.scan(tree, work / order, work / order / "next", order, replace=False)[1])

        tools = {
            "du": ("du -s (lstat of every file, C)", lambda: run("du", "-s", str(tree))),
            "scan": ("the run's scan (walk, compare, new record; in parts, one process per processor)",
                     lambda: found.append(record(tree, work / f"next{len(found)}.gz", known))),
            "scan-1": ("the run's scan in one process", lambda: found.append(
                record(tree, work / f"next{len(found)}.gz", known, parts=1))),
            "rsync": ("rsync -a --dry-run against the copy",
                      lambda: run("rsync", "-a", "--dry-run", f"{tree}/", f"{copy}/")),
            "find-sorted": ("lab: find | tr | sort, compared a block at a time (bench.find_scan)",
                            lambda: prototype("sorted")),
            "find": ("lab: find in its own order, compared a block at a time (bench.find_scan --order find)",
                     lambda: prototype("find")),
        }  # fmt: skip
        tools = dict(tools[name] for name in only)
        print(f"memory {memory()['MemTotal']} MiB")
        print("| | cold | warm | page cache, slab after |\n|---|---|---|---|")
        for name, work_of in tools.items():
            cold, warm = timed(True, work_of), timed(False, work_of)
            after = memory()
            print(f"| {name} | {cold:.1f} s | {warm:.1f} s | {after['Cached']} MiB, {after['Slab']} MiB |", flush=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        print(f"the scan found {found} changed entries, the lab's {found_by_find}; peak RSS of this process {peak} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.scan_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="action", required=True)
    made = sub.add_parser("make", help="make the image: tree, copy, first record (on the host)")
    made.add_argument("image", type=Path)
    made.add_argument("--files", type=int, default=1_000_000)
    made.add_argument("--fs", choices=("ext4", "btrfs"), default="ext4")
    measured = sub.add_parser("measure", help="mount the image's device and time the walks")
    measured.add_argument("device")
    measured.add_argument("--only", default=",".join(TOOLS), help=f"which of {', '.join(TOOLS)} (default: all)")
    args = parser.parse_args(argv)
    if args.action == "make":
        make(args.image, args.files, args.fs)
    else:
        only = tuple(args.only.split(","))
        if unknown := set(only) - set(TOOLS):
            parser.error(f"--only: no tool {', '.join(sorted(unknown))}; the tools are {', '.join(TOOLS)}")
        measure(args.device, only)


if __name__ == "__main__":
    main()
