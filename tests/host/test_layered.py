"""History as overlay layers (cryptsnap.overlay) through snapshot.write_snapshot, on a real btrfs
over a loop device, made and mounted as cryptsnap does, with the real rsync and the kernel's
overlayfs: each run's state reads back as the sources were, through the local record's
changes, a whole-tree compare, attributes alone and deletions; retention drops states by
merging layers; a layer a cut left unnamed is no state's and the next run removes it; the
image mounted read-only shows each state at snapshots/NAME, and is unmounted with them."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cryptsnap import changes, commands, config, mounts, overlay, snapshot
from cryptsnap.errors import ToolFailed
from cryptsnap.layers import FsMount
from cryptsnap.state import TargetState
from tests.support import loopfs, trees


def read(fs: Path, name: str, source: Path) -> dict:
    with snapshot.opened(fs, name) as root:
        return trees.across_file_systems(trees.manifest(root / source.relative_to("/")))


def run(fs: Path, target: config.Target, record: Path, generation: int, full_compare: bool = False) -> str:
    known = changes.Record.load(record) if generation else None
    name, scanned = snapshot.write_snapshot(fs, target, known=known, generation=generation, record_to=record,
                                            work_dir=record.parent, full_compare=full_compare)  # fmt: skip
    scanned.commit(generation + 1, name, changes.settings_digest(target))
    return name


def test_each_run_reads_back_as_the_sources_were_and_retention_merges_layers(tmp_path):
    source = tmp_path / "source"
    trees.build(source)
    target = loopfs.target(tmp_path, source)
    # A comma and a colon in the mount's path: overlayfs's options must not split there.
    record, fs = tmp_path / "state" / "files.gz", tmp_path / "fs,a:b"
    record.parent.mkdir()
    layers = fs / "layers"
    with loopfs.btrfs(tmp_path / "image", fs, size=1 << 30) as device:
        snapshot.prepare_filesystem(fs, layered=True)
        assert snapshot.is_layered(fs) and snapshot.list_snapshots(fs) == []
        wanted = {}
        names = [run(fs, target, record, 0)]  # into layer 0, no overlay
        wanted[names[-1]] = trees.across_file_systems(trees.manifest(source))
        trees.mutate(source)  # changes, additions, deletions, a rename, new hard links
        names.append(run(fs, target, record, 1))  # what the record says changed, through the overlay
        wanted[names[-1]] = trees.across_file_systems(trees.manifest(source))
        os.chmod(source / "docs" / "a.txt", 0o600)  # attributes alone
        shutil.rmtree(source / "private")  # a directory with what is in it
        (source / "private").write_text("a file where a directory was\n")
        (source / "docs" / "new.txt").write_text("rewritten in run 3 (both names of a hard link)\n")
        names.append(run(fs, target, record, 2))
        wanted[names[-1]] = trees.across_file_systems(trees.manifest(source))
        (source / "docs" / "deeper").mkdir()
        (source / "docs" / "deeper" / "file").write_text("run 4\n")
        os.unlink(source / "dangling")
        names.append(run(fs, target, record, 3, full_compare=True))  # rsync compares the whole tree
        wanted[names[-1]] = trees.across_file_systems(trees.manifest(source))

        assert snapshot.list_snapshots(fs) == names
        assert overlay.stack(layers) == [3, 2, 1, 0]
        assert not [p for p in (layers / "3").rglob("*") if p.name == "unchanged.bin"], "an unchanged file copied up"
        for name in names:
            assert read(fs, name, source) == wanted[name], name

        # A layer a cut left (written, not named) is no state's: not read, and removed by the next run.
        (layers / "4").mkdir()
        (layers / "4" / "junk").write_text("half a run\n")
        assert read(fs, names[-1], source) == wanted[names[-1]]
        (source / "after-the-cut").write_text("run 5\n")
        names.append(run(fs, target, record, 4))
        wanted[names[-1]] = trees.across_file_systems(trees.manifest(source))
        assert overlay.stack(layers) == [4, 3, 2, 1, 0] and not (layers / "4" / "junk").exists()

        keep_two = dataclasses.replace(target, retention=config.Retention(last=2, daily=0, weekly=0, monthly=0))
        assert snapshot.prune(fs, keep_two) == names[:3]
        assert snapshot.list_snapshots(fs) == names[3:]
        assert overlay.stack(layers) == [4, 0]  # layers 1, 2 and 3 merged into layer 0, one at a time
        for name in names[3:]:
            assert read(fs, name, source) == wanted[name], name
        (source / "docs" / "a.txt").write_text("after the merges\n")
        names.append(run(fs, target, record, 5))  # the record still describes the newest state
        wanted[names[-1]] = trees.across_file_systems(trees.manifest(source))
        assert read(fs, names[-1], source) == wanted[names[-1]]

        # `cryptsnap mount`: the image read-only, each state at snapshots/NAME; unmounted whole.
        subprocess.run(commands.unmount(str(fs)), check=True)
        subprocess.run(commands.mount(device, str(fs), "btrfs", readonly=True), check=True)
        snapshot.show_states(fs)
        assert sorted(os.listdir(fs / "snapshots")) == names[3:]
        for name in names[3:]:  # layer 0 alone (bound), and overlays
            shown = trees.manifest(fs / "snapshots" / name / source.relative_to("/"))
            assert trees.across_file_systems(shown) == wanted[name], name
        assert len(mounts.mounted_under(fs)) == 4
        FsMount.remove_leftovers(fs)
        assert not mounts.is_mountpoint(fs) and not mounts.mounted_under(fs)


def test_overlayfs_markers_in_the_sources_stop_the_run_with_what_to_do_and_nothing_lost(tmp_path):
    source = tmp_path / "source"
    (source / "storage").mkdir(parents=True)
    (source / "kept").write_text("v1\n")
    target = loopfs.target(tmp_path, source)
    record, fs = tmp_path / "state" / "files.gz", tmp_path / "fs"
    record.parent.mkdir()
    with loopfs.btrfs(tmp_path / "image", fs):
        snapshot.prepare_filesystem(fs, layered=True)
        first = run(fs, target, record, 0)
        os.mknod(source / "storage" / "whiteout", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # as container storage
        (source / "kept").write_text("v2\n")
        with pytest.raises(ToolFailed, match=f"overlayfs cannot keep {source}/storage/whiteout in a layer"):
            run(fs, target, record, 1)
        assert snapshot.list_snapshots(fs) == [first] and overlay.unnamed(fs / "layers") == [1]
        assert not mounts.mounted_under(fs), "the overlay is left mounted"
        excluding = dataclasses.replace(target, excludes=(f"{source}/storage",))
        second = run(fs, excluding, record, 1)  # the record was not committed: compared with the image
        assert snapshot.list_snapshots(fs) == [first, second] and overlay.unnamed(fs / "layers") == []
        with snapshot.opened(fs, second) as root:
            assert (root / source.relative_to("/") / "kept").read_text() == "v2\n"
            assert not (root / source.relative_to("/") / "storage").exists()


def test_a_try_that_lost_its_connection_is_gone_on_from_in_its_unnamed_layer(tmp_path, monkeypatch, caplog):
    source = tmp_path / "source"
    source.mkdir()
    (source / "small").write_text("first\n")
    target = loopfs.target(tmp_path, source)
    record, fs = tmp_path / "state" / "files.gz", tmp_path / "fs"
    record.parent.mkdir()
    unfinished = snapshot.Unfinished(TargetState(target))
    with loopfs.btrfs(tmp_path / "image", fs, size=1 << 30):
        snapshot.prepare_filesystem(fs, layered=True)
        first = run(fs, target, record, 0)
        for i in range(3):  # past RESUMABLE_FROM: the try is noted, flushoncommit on
            (source / f"big-{i}").write_bytes(os.urandom(24 << 20))
        real_copy = snapshot._copy

        def copy_then_lose_the_connection(*args, **kwargs):
            real_copy(*args, **kwargs)
            raise ToolFailed("rsync failed: the connection was lost (as if)")

        monkeypatch.setattr(snapshot, "_copy", copy_then_lose_the_connection)
        with pytest.raises(ToolFailed, match="as if"):
            snapshot.write_snapshot(fs, target, known=changes.Record.load(record), generation=1, record_to=record,
                                    work_dir=record.parent, unfinished=unfinished)  # fmt: skip
        assert snapshot.list_snapshots(fs) == [first] and overlay.unnamed(fs / "layers") == [1]
        assert unfinished.state.unfinished()["partial"] == "1"
        monkeypatch.setattr(snapshot, "_copy", real_copy)
        caplog.set_level("INFO")
        name, scanned = snapshot.write_snapshot(fs, target, known=changes.Record.load(record), generation=1,
                                                record_to=record, work_dir=record.parent, unfinished=unfinished)  # fmt: skip
        scanned.commit(2, name, changes.settings_digest(target))
        assert "going on from the unfinished layer 1 of the last try" in caplog.text
        assert snapshot.list_snapshots(fs) == [first, name] and overlay.stack(fs / "layers") == [1, 0]
        assert read(fs, name, source) == trees.across_file_systems(trees.manifest(source))
