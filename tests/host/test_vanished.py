"""Files the machine deletes while a backup copies them (temporary files, cache entries):
snapshot.write_snapshot on a real btrfs over a loop device with the real rsync leaves them out
and does not fail the run. A file the scan found changed is deleted between the scan and the
copy; a file a whole-tree copy had listed is deleted by a busy program beside it, as by chance
(tests/system/test_vanished.py runs whole backups beside such a program, `make test-long`)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading

from cryptsnap import snapshot
from cryptsnap.errors import ToolFailed
from tests.support import loopfs, trees


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


def test_files_a_whole_tree_copy_finds_gone_are_a_warning_not_a_failure(tmp_path, caplog):
    """rsync's exit 24 ("some files vanished before they could be transferred"). Whether a copy
    meets one is chance: copies are made until one has (each one's failure fails the test)."""
    source = tmp_path / "source"
    for n in range(400):
        (source / f"d{n // 100}").mkdir(parents=True, exist_ok=True)
        (source / f"d{n // 100}" / f"f{n}").write_bytes(os.urandom(4096))
    busy = source / "busy"
    busy.mkdir()
    target = loopfs.target(tmp_path, source)
    fs = tmp_path / "fs"
    caplog.set_level(logging.WARNING, logger="cryptsnap.snapshot")
    with loopfs.btrfs(tmp_path / "image", fs):
        (fs / "snapshots").mkdir()
        stop = threading.Event()
        worker = threading.Thread(target=trees.churn, args=(busy, stop, 0.002))
        worker.start()
        try:
            copies = 0
            while copies < 30 and "while this run copied them (rsync: file has vanished:" not in caplog.text:
                copies += 1
                try:
                    snapshot.write_snapshot(fs, target, full_compare=True)  # the whole tree, rsync listing it
                except ToolFailed as exc:
                    # A file gone between rsync's stat and its read of the ACLs or xattrs is exit
                    # 23, and rsync then skips its deletions: that run must fail, as it does, and
                    # say so in words.
                    errors = [line for line in exc.stderr.splitlines() if line.startswith("rsync: ")]
                    assert exc.returncode == 23 and errors, exc
                    assert all(line.endswith("No such file or directory (2)") for line in errors), exc
                    assert "were deleted on this machine while rsync read their attributes" in str(exc), exc
                    snapshot.remove_partials(fs)
        finally:
            stop.set()
            worker.join()
        assert "while this run copied them (rsync: file has vanished:" in caplog.text, f"none in {copies} copies"
        latest = snapshot.list_snapshots(fs)[-1]
        copy = fs / "snapshots" / latest / source.relative_to("/")
        assert sorted(p.name for p in copy.iterdir()) == ["busy", "d0", "d1", "d2", "d3"]
        assert sum(1 for _ in copy.glob("d*/f*")) == 400
