"""skip_unchanged: a run whose local record shows nothing changed makes no snapshot and writes
nothing to the image, whatever the tree's size (issue 13, item 3: the fixed cost of a run).
snapshot.write_snapshot on a real btrfs over a loop device with the real rsync."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest

from cryptsnap import changes, commands, runner, snapshot
from tests.support import loopfs


def test_nothing_changed_writes_nothing_a_change_or_the_default_makes_a_snapshot(tmp_path):
    source = tmp_path / "source"
    for i in range(200):
        (source / f"d{i // 50}").mkdir(parents=True, exist_ok=True)
        (source / f"d{i // 50}" / f"f{i}").write_bytes(os.urandom(1000))
    default = loopfs.target(tmp_path, source)
    assert default.skip_unchanged is False
    skipping = dataclasses.replace(default, skip_unchanged=True)
    state = tmp_path / "state"  # not in the source's parents, which the walk records: writing here changes nothing
    state.mkdir()
    record, fs = state / "files.gz", tmp_path / "fs"
    with loopfs.btrfs(state / "image", fs) as device:
        (fs / "snapshots").mkdir()
        first = loopfs.backup(fs, skipping, record, 0, work_dir=record.parent)  # no record yet: a snapshot
        # As the run mounts it (FsMount writable_later): read-only until it has something to write.
        subprocess.run(commands.unmount(str(fs)), check=True)
        subprocess.run(commands.mount(device, str(fs), "btrfs", readonly=True), check=True)
        before, recorded = loopfs.device_written(device), record.read_bytes()
        made_writable = []

        def make_writable() -> None:
            made_writable.append(True)
            runner.run(commands.remount_rw(str(fs)))

        with pytest.raises(snapshot.NothingChanged) as unchanged:
            snapshot.write_snapshot(fs, skipping, known=changes.Record.load(record), generation=1, record_to=record,
                                    work_dir=state, make_writable=make_writable)  # fmt: skip
        subprocess.run(["sync", "-f", str(fs)], check=True)  # anything it left dirty would be written now
        assert unchanged.value.snapshot == first and not made_writable
        assert loopfs.device_written(device) == before, "a run with nothing changed wrote to the image"
        assert snapshot.list_snapshots(fs) == [first]
        assert record.read_bytes() == recorded  # the record of `first` stands
        assert sorted(p.name for p in state.iterdir()) == ["files.gz", "image"], "files left"

        os.chmod(source / "d3" / "f160", 0o600)  # attributes alone are a change too
        name, scanned = snapshot.write_snapshot(fs, skipping, known=changes.Record.load(record), generation=1,
                                                record_to=record, work_dir=state, make_writable=make_writable)  # fmt: skip
        assert made_writable, "wrote without making the file system writable first"
        scanned.commit(2, name, changes.settings_digest(skipping))
        second = name
        assert snapshot.list_snapshots(fs) == [first, second]
        third = loopfs.backup(fs, default, record, 2, work_dir=record.parent)  # the default: a snapshot per run, changed or not
        assert snapshot.list_snapshots(fs) == [first, second, third]
        assert (fs / "snapshots" / third / source.relative_to("/") / "d3" / "f160").stat().st_mode & 0o777 == 0o600
