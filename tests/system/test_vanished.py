"""Files deleted on the machine while a backup copies them (temporary files, caches) are not
a failed run: a live machine's backups must not depend on nothing being deleted meanwhile.
(`make test-long`: tests/host/test_vanished.py covers both ways a file goes missing in
`make test`, on the host's btrfs with the real rsync.)"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.support import trees
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.targets import init_target, make_setup


def backup_beside(setup, busy: Path) -> str:
    """A backup while a program creates and deletes files in `busy`; its log. A file gone
    between rsync's stat and its read of the ACLs or xattrs fails the run (rsync's exit 23,
    after which it skips its deletions): such a run is tried again, as the next timer would."""
    for _ in range(3):
        stop = threading.Event()
        made: list[int] = []
        busy.mkdir()
        worker = threading.Thread(target=trees.churn, args=(busy, stop, 0.01, made))
        worker.start()
        try:
            result = cryptsnap(setup, "-v", "backup", setup.name, expect=None)
        finally:
            stop.set()
            worker.join()
        busy.rmdir()
        assert made[0] > 100, "the churn ran beside the backup"
        if result.returncode == 0:
            return result.stderr
        assert result.returncode == 8, result.stderr
        assert "were deleted on this machine while rsync read their attributes" in result.stderr, result.stderr
        assert "No such file or directory (2)" in result.stderr, result.stderr
    raise AssertionError(f"three backups failed: {result.stderr}")


@pytest.mark.long  # about 2 min of guest time
def test_files_deleted_during_a_run_are_left_out_not_a_failure(tmp_path, untrusted_host):
    setup = make_setup(tmp_path, untrusted_host)
    trees.build(setup.source)
    for n in range(300):  # rsync takes a while over these: the churn goes on meanwhile
        (setup.source / "many" / f"{n // 50}").mkdir(parents=True, exist_ok=True)
        (setup.source / "many" / f"{n // 50}" / f"f{n}").write_bytes(os.urandom(20_000))
    init_target(setup)
    busy = setup.source / "zz-busy"
    said = []
    for run in ("first", "second"):  # the whole tree, then only what the local record says changed
        if run == "second":
            trees.mutate(setup.source)
        said.append(backup_beside(setup, busy))
    assert_nothing_left(setup)
    # What the runs left out, the next one does not bring back: the latest snapshot is the tree.
    cryptsnap(setup, "backup", setup.name)
    restored = tmp_path / "restored"
    cryptsnap(setup, "restore", f"{setup.name}@latest:{setup.source}", "--to", str(restored))
    assert trees.manifest(restored) == trees.manifest(setup.source), said
