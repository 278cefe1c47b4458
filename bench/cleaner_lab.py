"""What nilfs2's cleaner costs a backup that keeps its last KEEP snapshots: every byte read and
written on the block device over many runs, the cleaner's moves included, per changed byte.

    python3 -m bench.cleaner_lab --files 2000 --file-kb 100 --image-mb 320 --runs 60 --keep 10   # in the guest

bench.scatter_lab measured nilfs2 without its cleaner: 1.20x up at 100,000 files, but the log
only grows. Here the log has to be reclaimed, as in a backup image of fixed size that is used
for years. A nilfs2 on a loop device over a sparse file of IMAGE_MB, a tree of FILES files of
FILE_KB (bench.scatter_lab's), a snapshot (`mkcp -s`); then RUNS runs of: the page cache
dropped (a run starts with nothing cached), CHANGED files rewritten as CHANGED_KB of random
data, a sync, a snapshot, and the oldest snapshot beyond the last KEEP made a plain checkpoint
again (`chcp cp`), which the cleaner may then reclaim. `nilfs_cleanerd` runs throughout with
Debian's configuration but no protection period (checkpoints are reclaimable at once, as they
would be when the next run comes a day later), so it cleans when fewer than MIN_CLEAN% of the
segments are free, until MAX_CLEAN% are.

The changed files keep their size (CHANGED_KB defaults to FILE_KB): the live data stays the
same, as in a steady state, so every segment the runs fill must be given back by the cleaner.
(Files that grow fill any image, cleaner or not: 4 KiB files rewritten as 100 KiB add 2.9 MB
of live data a run.)

The cleaner runs in the background; its moves land in whichever run it is in, so the figures
are given per window of runs, with the free space at the window's end. Through cryptsnap every
byte read is a download and every byte written an upload (dm-crypt maps sectors one to one); a
cleaner's move is both. Needs nilfs-tools and the kernel's nilfs2 module (the guest's kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.loopfs import device_read, device_written

from .scatter_lab import change, drop_caches, loop, run, write_tree

CONF = """protection_period 0
min_clean_segments {min_clean}%
max_clean_segments {max_clean}%
clean_check_interval 2
selection_policy timestamp
nsegments_per_clean 2
mc_nsegments_per_clean 4
cleaning_interval 1
mc_cleaning_interval 1
retry_interval 5
min_reclaimable_blocks 10%
mc_min_reclaimable_blocks 1%
use_set_suinfo
use_mmap
log_priority info
"""


def snapshot(device: str) -> int:
    """A checkpoint of what is synced, made a snapshot; its number."""
    return int(subprocess.run(["mkcp", "-s", "-p", device], capture_output=True, text=True, check=True).stdout)


def free_mb(mnt: Path) -> float:
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize / 2**20


def start_cleaner(conf: Path, device: str, mnt: Path, out: Path) -> int:
    """nilfs_cleanerd on the mounted file system; its pid. It forks into the background (a file,
    not a pipe, takes its output: the daemon may keep it open), so the pid is looked up."""
    with open(out, "w") as f:
        proc = subprocess.Popen(["nilfs_cleanerd", "-c", str(conf), device, str(mnt)], stdout=f, stderr=f)
    try:
        if proc.wait(timeout=10) != 0:
            raise RuntimeError(f"nilfs_cleanerd failed: {out.read_text().strip()}")
    except subprocess.TimeoutExpired:
        return proc.pid  # it stayed in the foreground
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"nilfs_cleanerd") and device.encode() in argv:
                return int(entry.name)
    raise RuntimeError(f"nilfs_cleanerd is not running: {out.read_text().strip()}")


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)


def measure(args: argparse.Namespace) -> list[tuple[int, int, float]]:
    """(bytes written, bytes read, free MiB after) per run."""
    with tempfile.TemporaryDirectory(dir=args.dir) as work, contextlib.ExitStack() as stack:
        image, mnt, conf = Path(work) / "image", Path(work) / "mnt", Path(work) / "cleanerd.conf"
        mnt.mkdir()
        conf.write_text(CONF.format(min_clean=args.min_clean, max_clean=args.max_clean))
        with open(image, "wb") as f:
            f.truncate(args.image_mb << 20)
        device = stack.enter_context(loop(image))
        run("mkfs.nilfs2", "-q", "-f", "-b", "4096", "-B", str(args.segment_blocks), device)
        run("mount", "-i", "-t", "nilfs2", device, str(mnt))  # -i: no helper, so no cleaner of its own
        stack.callback(subprocess.run, ["umount", str(mnt)], capture_output=True)
        write_tree(mnt, args.files, args.file_kb << 10)
        run("sync", "-f", str(mnt))
        print(f"tree of {args.files:,} files written; {free_mb(mnt):.0f} MiB free of {args.image_mb}", flush=True)
        kept = [snapshot(device)]
        stack.callback(stop, start_cleaner(conf, device, mnt, Path(work) / "cleanerd.out"))
        return _runs(args, mnt, device, kept)


def _runs(args: argparse.Namespace, mnt: Path, device: str, kept: list[int]) -> list[tuple[int, int, float]]:
    rng, figures = random.Random(args.seed), []
    for _ in range(args.runs):
        drop_caches()
        before = device_written(device), device_read(device)
        change(mnt, rng, args)
        run("sync", "-f", str(mnt))
        kept.append(snapshot(device))
        while len(kept) > args.keep:
            run("chcp", "cp", device, str(kept.pop(0)))  # released: its blocks are the cleaner's
        time.sleep(args.pause)  # the time between runs in which the cleaner works (it is mounted)
        figures.append((device_written(device) - before[0], device_read(device) - before[1], free_mb(mnt)))
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.cleaner_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--file-kb", type=int, default=100)
    parser.add_argument("--changed", type=int, default=30)
    parser.add_argument("--changed-kb", type=int, help="size of a changed file (default FILE_KB)")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--keep", type=int, default=10, help="snapshots kept (default 10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--image-mb", type=int, default=320)
    parser.add_argument("--segment-blocks", type=int, default=512, help="blocks of 4 KiB a segment (default 512)")
    parser.add_argument("--min-clean", type=int, default=10, help="%% of segments free below which it cleans")
    parser.add_argument("--max-clean", type=int, default=20, help="%% of segments free at which it stops")
    parser.add_argument("--pause", type=float, default=5, help="seconds after each run (default 5)")
    parser.add_argument("--window", type=int, default=10, help="runs a line of figures (default 10)")
    parser.add_argument("--dir", default="/var/tmp", help="where the sparse image goes")
    args = parser.parse_args(argv)
    args.changed_kb = args.changed_kb or args.file_kb
    changed = args.changed * (args.changed_kb << 10)
    figures = measure(args)

    def ratios(runs: list[tuple[int, int, float]]) -> str:
        up, down = (sum(f[i] for f in runs) / (changed * len(runs)) for i in (0, 1))
        return f"written {up:.3f}x, read {down:.3f}x of the changed bytes"

    for start in range(0, len(figures), args.window):
        window = figures[start : start + args.window]
        print(f"runs {start + 1}-{start + len(window)}: {ratios(window)}; {window[-1][2]:.0f} MiB free")
    print(f"all {len(figures)} runs: {ratios(figures)}")

if __name__ == "__main__":
    main()
