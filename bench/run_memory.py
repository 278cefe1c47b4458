"""Peak memory of a whole run at scale: every process a cryptsnap backup starts (the run itself
with its block device server's threads, rsync's three, sshfs, ssh), sampled together while a
first backup of a large tree runs, then a second one with one file touched and a third with
nothing changed (`skip_unchanged: true`: no snapshot; the fixed cost of a run at that size).
Each run also says where the processor time went, process by process (bench.cpu).

Runs in the test guest (a run needs dm-crypt), as root; the tree comes from a disk the host
made with bench.scan_cache (a million files take the emulated guest longer to make than to
back up):

    sudo .venv/bin/python -m bench.scan_cache make build/scan-1m.img --files 1000000
    sudo .venv/bin/python -m tests.harness run --timeout 10800 --disk build/scan-1m.img \\
        -- python3 -m bench.run_memory --device /dev/vdb

or, with a tree of its own: `python3 -m bench.run_memory --files 100000`. The untrusted
host's processes (its sshd and sftp-server) are not counted: they are the server's. Resident
memory is summed over processes, so pages they share (the interpreter's libraries) count
once per process: the figure is an upper bound.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench import link, scan_cache
from bench.cpu import CpuSampler
from bench.record_scale import make_tree
from bench.run import cryptsnap
from cryptsnap import meter
from cryptsnap.stack import Paths
from tests.support import udev
from tests.support.targets import make_setup


class Sampler:
    """Samples, twice a second, the resident memory of every process started since it began,
    except the untrusted host's (its user's and sshd): the peak of their sum, and each
    process name's own peak."""

    def __init__(self, server_user: str, log: Path | None = None):
        self.server_user = server_user
        self.log = log  # the summary so far, rewritten every minute: a run too long to wait for
        self.peak = 0
        self.by_name: dict[str, int] = collections.Counter()
        self.by_pid: dict[int, int] = collections.Counter()
        self.done = threading.Event()

    def __enter__(self) -> Sampler:
        # Known by pid and start time: psutil's start times can be a second off the clock.
        self.before = {(p.pid, p.info["create_time"]) for p in psutil.process_iter(["create_time"])}
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        mine, samples = os.getpid(), 0
        while not self.done.wait(0.5):
            samples += 1
            if self.log and samples % 120 == 0:
                self.log.write_text(f"after {samples // 2} s: {self.summary()}\n")
            total = 0
            for process in psutil.process_iter(["pid", "name", "username", "create_time", "memory_info"]):
                info = process.info
                if ((info["pid"], info["create_time"]) in self.before or info["pid"] == mine
                        or info["memory_info"] is None or info["name"] == "sshd"
                        or info["username"] == self.server_user):  # fmt: skip
                    continue
                total += info["memory_info"].rss
                self.by_name[info["name"]] = max(self.by_name[info["name"]], info["memory_info"].rss)
                self.by_pid[info["pid"]] = max(self.by_pid[info["pid"]], info["memory_info"].rss)
            self.peak = max(self.peak, total)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def summary(self) -> str:
        names = ", ".join(f"{name} {rss >> 20}" for name, rss in sorted(self.by_name.items(), key=lambda i: -i[1])
                          if rss >= 1 << 20)  # (not the kernel's threads: they have none of their own)
        return f"peak {self.peak >> 20} MiB together; each process's own peak (MiB): {names}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.run_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--device", help="a disk made by `bench.scan_cache make`: its tree/ is backed up")
    source.add_argument("--files", type=int, help="make a tree of this many files of a byte, 1,000 a directory")
    parser.add_argument("--log", type=Path, help="write the peaks so far to this file every minute")
    parser.add_argument("--no-sampling", action="store_true",
                        help="time the runs alone: sampling every process costs the emulated guest about "
                             "40%% of a processor, which a run that uses both then lacks")  # fmt: skip
    parser.add_argument("--image-gb", type=float, default=0,
                        help="size of the image (default: 2 GiB and 2 KiB a file)")  # fmt: skip
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cryptsnap-run-memory-", dir="/var/tmp"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        if args.device:
            tree = stack.enter_context(scan_cache.mounted(args.device)) / "tree"
        else:
            tree = work / "tree"
            make_tree(tree, args.files)
        files = sum(len(names) for _, _, names in os.walk(tree))
        udev.install_rule()
        server = stack.enter_context(link.untrusted_host(0.0, 0.0))
        size_mib = int(args.image_gb * 1024) or 2048 + files * 2 // 1024
        setup = make_setup(work / "cryptsnap", server, size=f"{size_mib}M", sources=[str(tree)], skip_unchanged=True)
        counter = Paths.of(setup.load()).traffic
        cryptsnap(setup, "init", setup.name)
        print(f"{files:,} files; image {size_mib} MiB", flush=True)
        for name in ("first backup", "second backup, one file touched", "third backup, nothing changed"):
            if name.startswith("second"):
                os.utime(next(tree.glob("d0/*")))
            started = time.monotonic()
            if args.no_sampling:
                cryptsnap(setup, "backup", setup.name)
                sampled = "not sampled"
            else:
                with Sampler(server.user, args.log) as sampler, CpuSampler(interval=2.0) as cpu:
                    cryptsnap(setup, "backup", setup.name)
            wall = time.monotonic() - started
            if not args.no_sampling:
                sampled = f"{sampler.summary()}\n    {cpu.summary(wall)}"
            traffic = meter.read(counter)
            print(f"{name}: {wall:.1f} s, up {traffic.up:,} B, down {traffic.down:,} B; {sampled}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
