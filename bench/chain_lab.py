"""A first backup's and a full restore's chain on the host's own processors, beside sftp: what
the guest's two emulated processors hide (docs/performance.md, "The chain on real processors").

    sudo python3 -m bench.chain_lab --mib 2048 --file-mib 256

A throwaway sshd on 127.0.0.1 and a tree of incompressible files under --dir. sftp copies the
tree up and back (`put -r`, `get -r`: the ceiling). The chain does what a run does below
dm-crypt: sshfs with cryptsnap's options, an image file on it attached as cryptsnap attaches
it (a direct-I/O loop device), a btrfs made and mounted with cryptsnap's options, cryptsnap's
rsync of the tree into it and a sync; then the image attached read-only, nothing cached, and
cryptsnap's restore rsync out of it. Left out, because these machines have neither: dm-crypt
(no device mapper; its cipher's rate is `openssl speed -evp aes-256-xts` on the same
processors) and the block device server, which a backup puts where the loop device is here
(no nbd module; `bench.nbd_lab` measures its processor time per MiB). Every restore is
compared with the tree. Prints each transfer's seconds, MB/s, its share of sftp's rate, and
where the processor time went (bench.cpu).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.cpu import CpuSampler
from bench.throughput import CHUNK, make_large, same_tree
from cryptsnap import commands
from tests.support import sshd


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def timed(what: str, action: Callable[[], None], mib: int, ceiling: float | None) -> float:
    """Run ACTION, print its line, return its seconds."""
    with CpuSampler() as cpu:
        start = time.monotonic()
        action()
        seconds = time.monotonic() - start
    rate = mib * CHUNK / seconds / 1e6
    share = f", {ceiling / seconds:.2f} of sftp's rate" if ceiling else ""
    print(f"{what}: {seconds:.1f} s, {rate:.1f} MB/s{share}; {cpu.summary(seconds)}")
    return seconds


@contextlib.contextmanager
def served(work: Path) -> Iterator[tuple[sshd.UntrustedHost, Path]]:
    """A throwaway sshd and an ssh_config naming it "lab", as cryptsnap writes one (OpenSSH's
    default cipher)."""
    host = sshd.start()
    try:
        known = work / "known_hosts"
        known.write_text(host.host_key_line + "\n")
        config = work / "ssh_config"
        config.write_text(f"Host lab\n HostName 127.0.0.1\n Port {host.port}\n User {host.user}\n"
                          f" IdentityFile {host.identity}\n IdentitiesOnly yes\n BatchMode yes\n"
                          f" UserKnownHostsFile {known}\n")  # fmt: skip
        yield host, config
    finally:
        sshd.stop(host)


@contextlib.contextmanager
def attached(config: Path, remote: str, work: Path, readonly: bool, dirty_limit: int = 0) -> Iterator[Path]:
    """sshfs (cryptsnap's options), the image on a direct-I/O loop device, the btrfs mounted
    with cryptsnap's options; its mountpoint. The unmount at the end is timed with the run that
    uses it, as a run's own unmount is part of it."""
    mounted, fs = work / "sshfs", work / "fs"
    mounted.mkdir(exist_ok=True)
    fs.mkdir(exist_ok=True)
    options = "idmap=none,nodev,nosuid,noexec,cache=no"  # commands.sshfs's
    run("sshfs", "-F", str(config), f"lab:{remote}", str(mounted), "-o", options)
    try:
        device = run(*commands.loop_attach(str(mounted / "image"), readonly=readonly)).strip()
        try:
            if not readonly:
                run(*commands.mkfs("btrfs", device))
            run(*commands.mount(device, str(fs), "btrfs", readonly=readonly))
            if dirty_limit and not readonly:
                limit_dirty(fs, dirty_limit)
            try:
                yield fs
            finally:
                run("umount", str(fs))
        finally:
            run(*commands.loop_detach(device))
    finally:
        subprocess.run(["fusermount3", "-u", str(mounted)], capture_output=True)


def limit_dirty(fs: Path, mib: int) -> None:
    """The btrfs's own share of dirty pages held to MIB, strictly (the kernel's per-device
    knobs, Linux 6.2 and later): its writeback starts once that much is dirty, not once the
    whole machine's background threshold (10% of its memory) is."""
    uuid = run("findmnt", "-n", "-o", "UUID", str(fs)).strip()
    bdi = Path(f"/sys/fs/btrfs/{uuid}/bdi")
    (bdi / "strict_limit").write_text("1\n")
    (bdi / "max_bytes").write_text(f"{mib << 20}\n")


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(prog="python3 -m bench.chain_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--mib", type=int, default=1024, help="the tree's size (default 1024)")
    parser.add_argument("--file-mib", type=int, default=256, help="its files' size (default 256)")
    parser.add_argument("--rounds", type=int, default=1, help="sftp and the chain, alternating (default 1)")
    parser.add_argument("--dir", default="/var/tmp", help="where the tree, the image and the copies go")
    parser.add_argument("--dirty-limit-mib", default="0", metavar="N,...",
                        help="the chain once for each: the btrfs's dirty pages held to N MiB (0: the kernel's "
                             "defaults; default 0)")  # fmt: skip
    args = parser.parse_args(argv)
    limits = [int(n) for n in args.dirty_limit_mib.split(",")]
    work = Path(tempfile.mkdtemp(prefix="chain-lab-", dir=args.dir))
    try:
        tree = work / "tree"
        make_large(tree, args.mib, args.file_mib)
        with served(work) as (host, config):
            account = pwd.getpwnam(host.user)
            remote = Path(host.remote_dir)
            remote.mkdir(exist_ok=True)
            os.chown(remote, account.pw_uid, account.pw_gid)
            for n in range(1, args.rounds + 1):
                print(f"round {n}:")
                ceiling = sftp_round(config, tree, remote, work, args.mib)
                for limit in limits:
                    chain_round(config, tree, remote, work, args.mib, account, ceiling, limit)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def sftp_round(config: Path, tree: Path, remote: Path, work: Path, mib: int) -> tuple[float, float]:
    restored = work / "restored"
    (work / "up").write_text(f"put -r {tree} {remote}/raw\n")
    (work / "down").write_text(f"get -r {remote}/raw {restored}\n")
    sftp = ["sftp", "-q", "-F", str(config), "-b"]
    up = timed("  sftp up", lambda: run(*sftp, str(work / "up"), "lab"), mib, None)
    down = timed("  sftp down", lambda: run(*sftp, str(work / "down"), "lab"), mib, None)
    same_tree(tree, restored)
    shutil.rmtree(restored)
    shutil.rmtree(remote / "raw")
    return up, down


def chain_round(config: Path, tree: Path, remote: Path, work: Path, mib: int, account: pwd.struct_passwd,
                ceiling: tuple[float, float], dirty_limit: int) -> None:  # fmt: skip
    image = remote / "image"
    with open(image, "wb") as f:
        f.truncate(mib * CHUNK * 3 // 2 + (1 << 30))
    os.chown(image, account.pw_uid, account.pw_gid)

    def backup() -> None:
        with attached(config, str(remote), work, readonly=False, dirty_limit=dirty_limit) as fs:
            run("btrfs", "-q", "subvolume", "create", str(fs / "snapshot"))
            run(*commands.rsync([str(tree)], str(fs / "snapshot"), inplace=True, exact_times=True, progress=False))
            run("btrfs", "filesystem", "sync", str(fs))

    restored = work / "restored"

    def restore() -> None:
        with attached(config, str(remote), work, readonly=True) as fs:
            run(*commands.rsync_restore(f"{fs / 'snapshot'}{tree}/", f"{restored}/"))

    held = f", dirty pages held to {dirty_limit} MiB" if dirty_limit else ""
    timed(f"  the chain up (sshfs, loop, btrfs, rsync{held})", backup, mib, ceiling[0])
    timed(f"  the chain down{held and ' (after that upload)'}", restore, mib, ceiling[1])
    same_tree(tree, restored)
    shutil.rmtree(restored)
    image.unlink()


if __name__ == "__main__":
    sys.exit(main())
