"""A restore whose connection is lost while threads read ahead of rsync (cryptsnap.readahead):
it fails with rsync's error, no thread is left reading, and the file system then unmounts
(a mount with files open would hold up the unwinding). The host half of a restore's stack:
sshfs, a read-only direct-I/O loop device, btrfs (bench/readahead_lab.py), 10 ms round trip."""

from __future__ import annotations

import threading
import time

from bench.readahead_lab import opened, served
from cryptsnap import readahead
from cryptsnap.errors import ToolFailed
from tests.support.runs import kill_server_sessions


def test_a_connection_lost_mid_restore_fails_it_and_leaves_no_reader(tmp_path):
    copy = tmp_path / "copy"
    with served(3000, rtt_ms=10) as lab:
        with opened(lab) as fs:  # leaving unmounts, loop device and sshfs: it fails if anything is busy
            before = set(threading.enumerate())
            failed: list[BaseException] = []

            def restore() -> None:
                try:
                    readahead.copy_out(fs / "tree", str(copy))
                except BaseException as exc:  # noqa: BLE001 (checked below)
                    failed.append(exc)

            restoring = threading.Thread(target=restore)
            restoring.start()
            deadline = time.monotonic() + 60
            while not (copy.is_dir() and sum(1 for _ in copy.rglob("f*")) > 100):
                assert time.monotonic() < deadline and restoring.is_alive(), "the restore did not get going"
                time.sleep(0.05)
            assert kill_server_sessions(lab.host) > 0
            restoring.join(timeout=150)
            assert not restoring.is_alive(), "the restore did not end after the connection was lost"
            assert len(failed) == 1 and isinstance(failed[0], ToolFailed), failed
            assert set(threading.enumerate()) - before == set(), "a reading thread outlived the restore"
    assert sum(1 for _ in copy.rglob("f*")) < 3000
