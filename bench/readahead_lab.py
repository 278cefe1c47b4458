"""A restore behind a round trip's latency, with and without reading ahead (cryptsnap.readahead).

    sudo python3 -m bench.readahead_lab --files 2000 --rtt-ms 10 --threads 0,4,16,32

The host half of a restore's stack, without dm-crypt (the host has no device mapper): a btrfs
made with cryptsnap's options in an image on a throwaway sshd's account, reached through
sshfs with cryptsnap's options, a read-only loop device with direct I/O and a read-only mount,
as `cryptsnap restore` opens it. Between sshfs and sshd, bench/delayline.py adds the round
trip (the host kernel has no netem). The tree: FILES files of FILE_KB in directories of 100,
and LARGE files of LARGE_MB. For each thread count, a fresh mount (nothing cached) and
`readahead.copy_out` of the tree, the copy compared with the tree; prints seconds and the
ratio to rsync alone (0 threads), measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import chain_lab
from cryptsnap import readahead
from tests.support import sshd
from tests.support.loopfs import btrfs


def make_tree(top: Path, files: int, file_kb: int, large: int, large_mb: int) -> None:
    rng = random.Random(1)
    for n in range(files):
        directory = top / f"d{n // 100:05}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{n:07}").write_bytes(rng.randbytes(file_kb << 10))
    for n in range(large):
        (top / f"large{n}").write_bytes(rng.randbytes(large_mb << 20))


def same_tree(tree: Path, copy: Path) -> None:
    want = sorted(p.relative_to(tree) for p in tree.rglob("*"))
    got = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    if want != got:
        raise AssertionError(f"{copy} has {len(got)} entries, {tree} {len(want)}")
    for rel in want[:: max(1, len(want) // 50)]:
        if (tree / rel).is_file() and not filecmp.cmp(tree / rel, copy / rel, shallow=False):
            raise AssertionError(f"{copy / rel} differs from {tree / rel}")


@dataclass
class Served:
    """The image on a throwaway sshd, behind a delay line: what `opened` mounts."""

    host: sshd.UntrustedHost
    remote: Path  # the directory with the image, on the server
    config: Path  # ssh_config with the host "lab": the delay line's port
    work: Path


@contextlib.contextmanager
def served(files: int, file_kb: int = 4, large: int = 0, large_mb: int = 32, rtt_ms: float = 10,
           where: str | None = None) -> Iterator[Served]:  # fmt: skip
    """A btrfs made with cryptsnap's options holding the tree under /tree, in an image on a
    throwaway sshd's account, reached through a delay line of `rtt_ms` round trip."""
    size = (files * max(file_kb, 4) * 3 + large * large_mb * 1024 * 2 + 256 * 1024) << 10
    host = sshd.start()
    work = Path(tempfile.mkdtemp(prefix="readahead-lab-", dir=where))
    delay = None
    try:
        account = pwd.getpwnam(host.user)
        remote = Path(host.remote_dir)
        remote.mkdir()
        image = remote / "image"
        with btrfs(image, work / "fs", size=size):
            make_tree(work / "fs" / "tree", files, file_kb, large, large_mb)
        os.chown(remote, account.pw_uid, account.pw_gid)
        os.chown(image, account.pw_uid, account.pw_gid)
        port = sshd.free_port()
        delay = subprocess.Popen([sys.executable, "-m", "bench.delayline", str(port), str(host.port),
                                  str(rtt_ms / 2000)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert delay.stdout.readline().strip() == "ready"
        config = work / "ssh_config"
        known = work / "known_hosts"
        known.write_text(host.host_key_line + "\n")
        config.write_text(f"Host lab\n HostName 127.0.0.1\n Port {port}\n User {host.user}\n"
                          f" IdentityFile {host.identity}\n IdentitiesOnly yes\n BatchMode yes\n"
                          " ServerAliveInterval 1\n ServerAliveCountMax 3\n"  # as cryptsnap's: a cut is noticed
                          f" HostKeyAlias [127.0.0.1]:{host.port}\n UserKnownHostsFile {known}\n")  # fmt: skip
        yield Served(host, remote, config, work)
    finally:
        if delay:
            delay.kill()
        sshd.stop(host)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def opened(served: Served) -> Iterator[Path]:
    """The file system mounted as a restore opens it (sshfs, read-only direct-I/O loop device,
    read-only mount; cryptsnap's options), nothing of it cached; its mountpoint."""
    with chain_lab.attached(served.config, str(served.remote), served.work, readonly=True) as fs:
        yield fs


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--file-kb", type=int, default=4)
    parser.add_argument("--large", type=int, default=0, metavar="N", help="large files besides (default 0)")
    parser.add_argument("--large-mb", type=int, default=32)
    parser.add_argument("--rtt-ms", type=float, default=10)
    parser.add_argument("--threads", default="0,4,16,32", help="thread counts to compare (0: rsync alone)")
    parser.add_argument("--dir", default=None, help="where the tree, the mounts and the copies go")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.threads.split(",")]
    seconds = {}
    print(f"{args.files} files of {args.file_kb} KiB, {args.large} of {args.large_mb} MiB, "
          f"round trip {args.rtt_ms:g} ms")  # fmt: skip
    with served(args.files, args.file_kb, args.large, args.large_mb, args.rtt_ms, args.dir) as lab:
        for threads in counts:
            copy = lab.work / f"copy-{threads}"
            with opened(lab) as fs:
                started, processor = time.monotonic(), time.process_time()
                figures = readahead.copy_out(fs / "tree", str(copy), threads)
                seconds[threads] = time.monotonic() - started
                processor = time.process_time() - processor  # this process's threads; rsync apart
                same_tree(fs / "tree", copy)
            shutil.rmtree(copy)
            ratio = f"{seconds[counts[0]] / seconds[threads]:.2f}x as fast as {counts[0]} threads"
            print(f"{threads:3} threads: {seconds[threads]:7.2f} s ({processor:.2f} processor-s), {ratio}; "
                  f"read ahead {figures.files} files "
                  f"({figures.bytes} bytes), at most {figures.most_ahead} bytes ahead of rsync")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
