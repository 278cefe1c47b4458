"""The local side of a run at scale: walking the sources into the file record and comparing it
with the last one (cryptsnap.changes), beside `rsync --dry-run` of the same tree against an
up-to-date copy (what rsync does on its own to find nothing changed), and peak memory: of the
record's walk, and of rsync (all its processes together) copying the tree with the options a
first backup uses (cryptsnap.commands.rsync): a btrfs target's, where rsync lists directories as
it goes (incremental recursion), and an ext2/ext4 target's, where it builds the whole file list
first (--no-inc-recursive: there is no walk of cryptsnap's own to count the progress against).

    sudo python3 -m bench.record_scale --files 1000000 --dir /var/tmp

Makes FILES files of one byte (1,000 a directory) under --dir, records them, touches one,
then times a second walk-and-compare (what a nothing-changed run does locally).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil

from cryptsnap import changes, commands, scan
from tests.support import trees


def make_tree(root: Path, files: int) -> None:
    """FILES files of one byte under root, 1,000 a directory (d0/f0, d0/f1...)."""
    for i in range(files):
        if i % 1000 == 0:
            (root / f"d{i // 1000}").mkdir(parents=True)
        (root / f"d{i // 1000}" / f"f{i}").write_bytes(b"x")


def record(tree: Path, to: Path, known: changes.Record | None, parts: int | None = None) -> int:
    """Walk `tree` into a record at `to` as a run's scan does (scan.scan_sources: with
    `known`, the compare with it; without, a content digest of every file, as a first run
    takes them); the number of entries of the tree found changed, new or deleted (all of them
    without).
    parts: processes at most (default: the run's, one per processor)."""
    target = SimpleNamespace(sources=(str(tree),), excludes=(), one_file_system=True)
    writer, found = scan.scan_sources(target, to, known, to.parent, parts=parts)
    writer.commit(1, "s", "x")
    if found is None:
        return writer.count
    with found:
        found.listing.flush()  # (the changed directories above the tree are not the lab's)
        return len(trees.listed_under(Path(found.listing.name), tree)) + found.touched + found.deleted


def peak_rss(argv: list[str]) -> int:
    """Run argv; the largest sum of the resident memory of it and its children, sampled."""
    process = psutil.Popen(argv, stdout=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        with contextlib.suppress(psutil.Error):
            family = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in family if p.is_running()))
        time.sleep(0.1)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, argv)
    return peak


def rsync_rows(tree: Path, copy: Path) -> tuple[float, int, int]:
    """rsync on the same tree: seconds of `rsync --dry-run` against an up-to-date copy with one
    file touched, and the peak MiB of its processes copying it all, as a btrfs target's first
    backup runs it and with the whole file list first (ext2/ext4)."""
    whole_list_peak = peak_rss(list(commands.rsync([str(tree)], str(copy))))
    shutil.rmtree(copy)
    rsync_peak = peak_rss(list(commands.rsync([str(tree)], str(copy), inplace=True, incremental=True)))
    copied = copy / str(tree).lstrip("/")  # (--relative)
    os.utime(tree / "d0" / "f0")
    started = time.monotonic()
    subprocess.run(["rsync", "-a", "--dry-run", f"{tree}/", f"{copied}/"], check=True, capture_output=True)
    rsync_s = time.monotonic() - started
    shutil.rmtree(copy)
    return rsync_s, rsync_peak >> 20, whole_list_peak >> 20


def restic_scan(tree: Path, repository: Path) -> float:
    """Seconds of `restic backup` of the tree with one file touched since its first backup:
    restic's way to find what changed (it compares with the parent snapshot's metadata)."""
    env = {**os.environ, "RESTIC_REPOSITORY": str(repository), "RESTIC_PASSWORD": "bench"}
    quiet = {"env": env, "check": True, "stdout": subprocess.DEVNULL}
    subprocess.run(["restic", "init"], **quiet)
    subprocess.run(["restic", "backup", "--quiet", str(tree)], **quiet)
    os.utime(tree / "d0" / "f0")
    started = time.monotonic()
    subprocess.run(["restic", "backup", "--quiet", str(tree)], **quiet)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.record_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--restic", action="store_true",
                        help="also time restic's own scan of the tree, a second backup into a local repository "
                             "with one file touched (restic reads only the changed file)")  # fmt: skip
    parser.add_argument("--no-rsync", action="store_true",
                        help="only the record's walks: no rsync rows (they copy the tree twice, which a guest's "
                             "disk may not hold at 10^6 files)")  # fmt: skip
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        tree, records = Path(work) / "tree", Path(work) / "records"
        records.mkdir()  # beside the tree: writing there changes nothing the walk sees
        make_tree(tree, args.files)
        first = records / "files.gz"
        started = time.monotonic()
        record(tree, first, None)
        first_s = time.monotonic() - started
        os.utime(tree / "d0" / "f0")
        started = time.monotonic()
        found = record(tree, records / "next.gz", changes.Record.load(first))
        again_s = time.monotonic() - started
        rsync = None if args.no_rsync else rsync_rows(tree, records / "copy")
        restic_s = restic_scan(tree, Path(work) / "restic") if args.restic else None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        print(f"{args.files:,} files: first record {first_s:.1f} s; nothing changed but one file: walk, compare "
              f"and record {again_s:.1f} s ({found} found); "
              f"record {first.stat().st_size:,} bytes; peak RSS {peak} MiB"
              + ("" if rsync is None else "; rsync --dry-run against a copy {:.1f} s; rsync's processes copying it "
                 "all, at most together: {} MiB as a btrfs target's first backup runs it, {} MiB with the whole "
                 "file list (ext2/ext4)".format(*rsync))
              + ("" if restic_s is None else f"; restic's second backup (its scan) {restic_s:.1f} s"))  # fmt: skip


if __name__ == "__main__":
    main()
