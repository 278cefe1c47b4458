"""A file the scan found changed and the machine deleted before rsync came to it (a temporary
file, a cache entry): snapshot.write_snapshot on a real btrfs over a loop device with the real
rsync leaves it out of the snapshot and does not fail the run. The deletion is made between
the scan and the copy, where a busy machine makes it by chance (tests/system/test_vanished.py
runs a whole backup beside such a machine)."""

from __future__ import annotations

import shutil
import subprocess

from cryptsnap import snapshot
from tests.support import loopfs


def test_what_is_deleted_between_the_scan_and_the_copy_is_left_out(tmp_path, monkeypatch):
    source = tmp_path / "source"
    (source / "dir").mkdir(parents=True)
    for name in ("kept", "goes", "dir/a", "dir/b"):
        (source / name).write_text(f"{name} v1\n")
    target = loopfs.target(tmp_path, source)
    record, fs = tmp_path / "record.gz", tmp_path / "fs"
    with loopfs.btrfs(tmp_path / "image", fs):
        (fs / "snapshots").mkdir()
        loopfs.backup(fs, target, record, 0)
        for name in ("kept", "goes", "dir/a", "dir/b"):
            (source / name).write_text(f"{name} v2\n")
        (source / "new").write_text("new\n")
        real_scan = snapshot.scan_sources

        def scan_then_delete(*args, **kwargs):
            found = real_scan(*args, **kwargs)
            (source / "goes").unlink()  # listed as changed, gone before rsync reads it
            (source / "new").unlink()  # listed as new, likewise
            shutil.rmtree(source / "dir")  # a changed directory and what is in it
            return found

        monkeypatch.setattr(snapshot, "scan_sources", scan_then_delete)
        second = loopfs.backup(fs, target, record, 1)
        monkeypatch.undo()
        copy = fs / "snapshots" / second / source.relative_to("/")
        assert (copy / "kept").read_text() == "kept v2\n"
        assert not (copy / "goes").exists() and not (copy / "new").exists(), "what was deleted is left out"
        # The directory: rsync found it gone as it went in (exit 24), after its listed entries
        # were deleted from the snapshot; what the snapshot holds of it is empty.
        assert not (copy / "dir").exists() or not any((copy / "dir").iterdir())
        # The next run finds them gone in its record too, and the snapshot is the tree.
        third = loopfs.backup(fs, target, record, 2)
        itemized = subprocess.run(["rsync", "-rlptgoAXnci", "--delete", f"{source}/",
                                   f"{fs / 'snapshots' / third / source.relative_to('/')}/"],
                                  check=True, capture_output=True, text=True).stdout  # fmt: skip
        assert itemized == "", itemized
