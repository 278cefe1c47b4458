"""The server loses its power: writes it had not flushed are gone. Every snapshot a run reported
done must survive that, so a run must not return before its writes reached the server's disk
(the block device's flushes travel as fsync@openssh.com to the server, which fsyncs).

The server's disk is a dm-log-writes device, so every write that reached it is logged in
order with its FLUSH/FUA flags, and a mark is logged each time a run returns. The log is then
replayed onto a fresh disk and stopped at every durable point (tests/support/writelog.py): at
each, the server's file system mounts, the image opens with its own header and the key, and
every snapshot of a run that had returned by then holds what its source held.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pwd
import random
import re
from pathlib import Path

import pytest

from tests.support import figures, trees, writelog
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.service import sh
from tests.support.targets import make_setup

MIB = 1 << 20
DISK, LOG, COW = 256 * MIB, 512 * MIB, 64 * MIB
LOGGED, STATE, UNLOCKED = "csnap-logged", "csnap-replayed", "csnap-replayed-fs"


def loop_device(stack: contextlib.ExitStack, path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    device = sh("losetup", "--find", "--show", str(path)).stdout.strip()
    stack.callback(sh, "losetup", "--detach", device, check=False)
    return device


@contextlib.contextmanager
def state_of_the_disk(replayed: str, cow: str, image_path: str, key: Path, mountpoints: Path):
    """The replayed disk as the server would find it after the power came back: its file
    system mounted (the journal replayed, into a throwaway copy-on-write layer), and the image
    in it opened read-only by stock tools, with its own LUKS header. Yields the image's file system."""
    server, image_fs = mountpoints / "server", mountpoints / "image"
    server.mkdir(exist_ok=True)
    image_fs.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        sh("dmsetup", "create", STATE, "--table", f"0 {DISK // 512} snapshot {replayed} {cow} N 8")
        stack.callback(sh, "dmsetup", "remove", STATE, check=False)
        sh("mount", f"/dev/mapper/{STATE}", str(server))
        stack.callback(sh, "umount", str(server), check=False)
        image = server / image_path
        assert image.exists(), f"no image; the server's directory holds {sorted(os.listdir(image.parent))}"
        assert image.stat().st_size == 160 * MIB, f"the image is {image.stat().st_size} bytes"
        loop = sh("losetup", "--find", "--show", "--read-only", str(image)).stdout.strip()
        stack.callback(sh, "losetup", "--detach", loop, check=False)
        sh("cryptsetup", "open", "--readonly", "--key-file", str(key), loop, UNLOCKED)
        stack.callback(sh, "cryptsetup", "close", UNLOCKED, check=False)
        sh("mount", "-o", "ro", f"/dev/mapper/{UNLOCKED}", str(image_fs))
        stack.callback(sh, "umount", str(image_fs), check=False)
        yield image_fs


@pytest.mark.parametrize("filesystem", ["btrfs", pytest.param("ext2", marks=pytest.mark.long)])  # ext2: make test-long (docs/testing.md)
def test_a_power_cut_of_the_server_keeps_every_snapshot_a_run_reported_done(tmp_path, untrusted_host, filesystem):
    sh("modprobe", "dm-log-writes")
    sh("modprobe", "dm-snapshot")
    held: dict[str, dict] = {}  # snapshot -> what its source held
    with contextlib.ExitStack() as devices:
        disk = loop_device(devices, tmp_path / "disk.img", DISK)
        log = loop_device(devices, tmp_path / "log.img", LOG)
        replayed = loop_device(devices, tmp_path / "replayed.img", DISK)
        cow = loop_device(devices, tmp_path / "cow.img", COW)

        with contextlib.ExitStack() as server:
            sh("dmsetup", "create", LOGGED, "--table", f"0 {DISK // 512} log-writes {disk} {log}")
            server.callback(sh, "dmsetup", "remove", LOGGED, check=False)
            sh("mkfs.ext4", "-q", "-E", "nodiscard", f"/dev/mapper/{LOGGED}")
            remote = Path(untrusted_host.remote_dir)
            remote.mkdir(exist_ok=True)
            owner = pwd.getpwnam(untrusted_host.user)
            # commit=300: the server's file system makes nothing durable on its own within a
            # run, only when asked (fsync), so a run that returned before its flushes did shows.
            sh("mount", "-o", "commit=300", f"/dev/mapper/{LOGGED}", str(remote))
            server.callback(sh, "umount", str(remote), check=False)
            os.chown(remote, owner.pw_uid, owner.pw_gid)

            setup = make_setup(tmp_path, untrusted_host, size="160M", filesystem=filesystem)
            rng = random.Random(482)
            (setup.source / "first").write_text("before the power cut\n")
            cryptsnap(setup, "init", setup.name)
            sh("dmsetup", "message", LOGGED, "0", "mark", "init-returned")
            for run in range(3):
                for i in range(rng.randint(2, 5)):
                    (setup.source / f"run{run}-{i}").write_bytes(rng.randbytes(rng.randint(1, 2 * MIB)))
                out = cryptsnap(setup, "backup", setup.name).stdout
                name = re.search(r": snapshot (\S+) complete", out)[1]
                held[name] = trees.manifest(setup.source)
                sh("dmsetup", "message", LOGGED, "0", "mark", f"returned:{name}")
            assert_nothing_left(setup)
        # The server's disk is now logged from its first write (mkfs) to its last (unmount).

        image_path = f"{setup.name}.img"  # the server's file system is mounted at the remote directory itself
        source_in_image = str(setup.source).lstrip("/")
        checked = 0
        with open(tmp_path / "log.img", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as logged:
            target = os.open(replayed, os.O_RDWR)
            try:
                for entry, marks in writelog.checkpoints(logged, target):
                    if "init-returned" not in marks:
                        continue  # nothing was promised yet
                    promised = [mark.split(":", 1)[1] for mark in marks if mark.startswith("returned:")]
                    where = f"log entry {entry.index} (runs returned: {promised})"
                    print(where, f"flags {entry.flags}", flush=True)
                    with state_of_the_disk(replayed, cow, image_path, setup.key_file, tmp_path) as image_fs:
                        present = {n for n in os.listdir(image_fs / "snapshots") if not n.endswith(".partial")}
                        assert set(promised) <= present, f"{where}: a run returned, its snapshot is not on disk"
                        for name in present:  # a run may have finished its snapshot before returning
                            assert name in held, f"{where}: unknown snapshot {name}"
                            got = trees.manifest(image_fs / "snapshots" / name / source_in_image)
                            assert got == held[name], f"{where}: snapshot {name} does not hold what its source held"
                    checked += 1
            finally:
                os.close(target)
        figures.record(f"server power cut (dm-log-writes replay), {filesystem}", runs=len(held),
                       durable_points_checked=checked)  # fmt: skip
        assert checked >= len(held), f"only {checked} durable points after init"
