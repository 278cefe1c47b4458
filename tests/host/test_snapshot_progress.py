"""snapshot.write_snapshot on a real btrfs over a loop device, with the real rsync: a first
backup of a large tree lets rsync list directories as it goes (its memory stays small at
10^6 files: docs/performance.md), and the progress it reports still only rises. And on ext2,
the order in which the unfinished snapshot reaches the device."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

from cryptsnap import runner, snapshot
from cryptsnap.layers import FsMount
from tests.support import loopfs


def test_a_first_backup_lists_directories_as_it_goes_and_its_progress_only_rises(tmp_path, monkeypatch):
    source = tmp_path / "source"
    for i in range(3000):  # a directory of 20 per rsync file-list chunk: many chunks
        path = source / f"d{i // 20:03d}" / f"f{i:04d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(16384 + i))
    target = loopfs.target(tmp_path, source)
    argvs = []
    stream = runner.stream
    monkeypatch.setattr(runner, "stream", lambda argv, on_line: (argvs.append(argv), stream(argv, on_line))[1])
    seen: list[tuple[float, int]] = []
    with loopfs.btrfs(tmp_path / "image", tmp_path / "fs"):
        (tmp_path / "fs" / "snapshots").mkdir()
        name, scanned = snapshot.write_snapshot(tmp_path / "fs", target, lambda f, b: seen.append((f, b)),
                                                record_to=tmp_path / "record.gz")  # fmt: skip
        copy = tmp_path / "fs" / "snapshots" / name / source.relative_to("/")
        subprocess.run(["diff", "-r", "-q", str(source), str(copy)], check=True)
    (rsync,) = [argv for argv in argvs if argv[0] == "rsync"]
    assert "--info=progress2" in rsync and "--no-inc-recursive" not in rsync, rsync
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and max(fractions[:-1]) < 1.0, fractions
    assert scanned.size == sum(16384 + i for i in range(3000)) and scanned.count >= 3000 + 150
    assert max(b for _, b in seen) == scanned.size  # every byte of it was sent, and counted
    scanned.discard()


def test_on_ext2_the_unfinished_snapshots_entry_is_on_the_device_before_rsync_writes_into_it(tmp_path, monkeypatch):
    """ext2 has no journal: a cut left the unfinished snapshot's inode on the server without its
    entry in /snapshots, which e2fsck -p does not repair. rsync (a wrapper here) starts only
    once the device holds the entry: debugfs reads the image file, not the mounted file system."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "file").write_text("content")
    image = tmp_path / "ext2.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext2", "-q", str(image)], check=True)
    tools, seen = tmp_path / "bin", tmp_path / "seen"
    tools.mkdir()
    (tools / "rsync").write_text(f'#!/bin/sh\ndebugfs -R "ls -p /snapshots" {image} > {seen} 2>/dev/null\n'
                                 f'exec {shutil.which("rsync")} "$@"\n')  # fmt: skip
    (tools / "rsync").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    target = dataclasses.replace(loopfs.target(tmp_path, source), filesystem="ext2")
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    fs = tmp_path / "fs"
    try:
        with FsMount(device, fs, "ext2", readonly=False):
            (fs / "snapshots").mkdir()
            os.sync()  # /snapshots itself is there before the run, as init leaves it
            name, _ = snapshot.write_snapshot(fs, target)
            assert (fs / "snapshots" / name / source.relative_to("/") / "file").read_text() == "content"
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
    assert f"{name}.partial" in seen.read_text(), seen.read_text()
