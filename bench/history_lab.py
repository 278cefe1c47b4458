"""The scattered change through cryptsnap's own run, both ways of keeping history, on the host:
bytes written to the image's block device per changed byte (docs/performance.md, "The layered
mode: history: layers").

    sudo python3 -m bench.history_lab --files 100000

For each history (snapshots, layers): a btrfs made and mounted as cryptsnap does, on a loop
device over a sparse file under --dir, laid out as `cryptsnap init` lays it out; a first
backup of a tree of FILES files of FILE_KB (50 directories) by `snapshot.write_snapshot` with
its local record; then RUNS runs of CHANGED scattered files rewritten as CHANGED_KB of random
data, each backed up as a run does (the record's compare, rsync of what changed, the new
snapshot or layer named) and committed. What the loop device took per run, divided by the
changed bytes, is what such a run uploads without dm-crypt (which maps sectors one to one)
and SFTP's framing (about 1%); the guest's bench.run measures the whole run. With --keep K,
retention keeps K states, so that runs past the K-th each drop one (a merge, for layers).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.run import change, make_tree
from cryptsnap import config, durable, snapshot
from tests.support import loopfs


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(prog="python3 -m bench.history_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--files", type=int, default=10000, help="files in the tree (default 10000)")
    parser.add_argument("--file-kb", type=int, default=4, help="size of each in KiB (default 4)")
    parser.add_argument("--changed", type=int, default=30, help="files rewritten a run (default 30)")
    parser.add_argument("--changed-kb", type=int, default=100, help="their new size in KiB (default 100)")
    parser.add_argument("--runs", type=int, default=3, help="runs after the first backup (default 3)")
    parser.add_argument("--keep", type=int, default=0, help="states retention keeps (default 0: all)")
    parser.add_argument("--history", default="snapshots,layers", help="which ways, in order (default both)")
    parser.add_argument("--dir", default="/var/tmp", help="where the tree and the image go")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="history-lab-", dir=args.dir))
    try:
        tree = work / "tree"
        paths = make_tree(tree, args.files, args.file_kb << 10, compressible=False)
        for history in args.history.split(","):
            measure(args, work / history, tree, [p.relative_to(tree) for p in paths], history == "layers")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def measure(args: argparse.Namespace, work: Path, tree: Path, relative: list[Path], layered: bool) -> None:
    work.mkdir()
    source = work / "source"
    shutil.copytree(tree, source)
    target = loopfs.target(work, source)
    if args.keep:
        target = dataclasses.replace(target, retention=config.Retention(last=args.keep, daily=0, weekly=0, monthly=0))
    record, fs = work / "state" / "files.gz", work / "fs"
    record.parent.mkdir()
    size = args.files * (args.file_kb << 10) * 3 + (args.runs * args.changed * args.changed_kb << 10) + (512 << 20)
    name = "layers" if layered else "snapshots"
    with loopfs.btrfs(work / "image", fs, size=size) as device:
        snapshot.prepare_filesystem(fs, layered=layered)
        started = time.monotonic()
        loopfs.backup(fs, target, record, 0, work_dir=record.parent)
        commit(fs)
        print(f"{name}: first backup of {args.files:,} files in {time.monotonic() - started:.1f} s")
        for n in range(1, args.runs + 1):
            changed = change([source / r for r in relative], args.changed, args.changed_kb << 10, False, n)
            before, started = loopfs.device_written(device), time.monotonic()
            loopfs.backup(fs, target, record, n, work_dir=record.parent)
            dropped = snapshot.prune(fs, target)
            commit(fs)
            written = loopfs.device_written(device) - before
            also = f", {len(dropped)} state dropped" if dropped else ""
            print(f"{name}: run {n}{also}: {written:,} bytes written for {changed:,} changed: "
                  f"{written / changed:.2f}x ({time.monotonic() - started:.1f} s)")  # fmt: skip
        assert len(snapshot.list_snapshots(fs)) == (min(args.keep, args.runs + 1) if args.keep else args.runs + 1)


def commit(fs: Path) -> None:
    """A run's last commit, as bump_generation's sync makes it."""
    with durable.Syncer(fs, "btrfs") as syncer:
        syncer.sync()


if __name__ == "__main__":
    sys.exit(main())
