"""snapshot.write_snapshot on a real btrfs over a loop device, with the real rsync: a first
backup of a large tree lets rsync list directories as it goes (its memory stays small at
10^6 files: docs/performance.md), and the progress it reports still only rises."""

from __future__ import annotations

import os
import subprocess

from cryptsnap import runner, snapshot
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
