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
import filecmp
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptsnap import commands, readahead
from tests.support import sshd
from tests.support.loopfs import btrfs


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


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
    size = (args.files * max(args.file_kb, 4) * 3 + args.large * args.large_mb * 1024 * 2 + 256 * 1024) << 10
    host = sshd.start()
    work = Path(tempfile.mkdtemp(prefix="readahead-lab-", dir=args.dir))
    delay = None
    try:
        account = pwd.getpwnam(host.user)
        remote = Path(host.remote_dir)
        remote.mkdir()
        image = remote / "image"
        with btrfs(image, work / "fs", size=size):
            make_tree(work / "fs" / "tree", args.files, args.file_kb, args.large, args.large_mb)
        os.chown(remote, account.pw_uid, account.pw_gid)
        os.chown(image, account.pw_uid, account.pw_gid)
        port = sshd.free_port()
        delay = subprocess.Popen([sys.executable, "-m", "bench.delayline", str(port), str(host.port),
                                  str(args.rtt_ms / 2000)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert delay.stdout.readline().strip() == "ready"
        config = work / "ssh_config"
        known = work / "known_hosts"
        known.write_text(host.host_key_line + "\n")
        config.write_text(f"Host lab\n HostName 127.0.0.1\n Port {port}\n User {host.user}\n"
                          f" IdentityFile {host.identity}\n IdentitiesOnly yes\n BatchMode yes\n"
                          f" HostKeyAlias [127.0.0.1]:{host.port}\n UserKnownHostsFile {known}\n")  # fmt: skip
        mounted, fs = work / "sshfs", work / "fs"
        mounted.mkdir()
        seconds = {}
        print(f"{args.files} files of {args.file_kb} KiB, {args.large} of {args.large_mb} MiB, "
              f"round trip {args.rtt_ms:g} ms")  # fmt: skip
        for threads in counts:
            run("sshfs", "-F", str(config), f"lab:{remote}", str(mounted), "-o", "idmap=none,cache=no")
            device = run(*commands.loop_attach(str(mounted / "image"), readonly=True)).strip()
            try:
                run(*commands.mount(device, str(fs), "btrfs", readonly=True))
                copy = work / f"copy-{threads}"
                try:
                    started = time.monotonic()
                    figures = readahead.copy_out(fs / "tree", str(copy), threads)
                    seconds[threads] = time.monotonic() - started
                    same_tree(fs / "tree", copy)
                finally:
                    run("umount", str(fs))
                    shutil.rmtree(copy, ignore_errors=True)
            finally:
                run(*commands.loop_detach(device))
                run("fusermount3", "-u", str(mounted))
            ratio = f"{seconds[counts[0]] / seconds[threads]:.2f}x as fast as {counts[0]} threads"
            print(f"{threads:3} threads: {seconds[threads]:7.2f} s, {ratio}; read ahead {figures.files} files "
                  f"({figures.bytes} bytes), at most {figures.most_ahead} bytes ahead of rsync")  # fmt: skip
    finally:
        if delay:
            delay.kill()
        sshd.stop(host)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
