"""A first backup's content digests are taken in a process of its own beside rsync
(cryptsnap.digests), and the record committed holds what taking them in the walk gave."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from cryptsnap import changes, scan


def first_scan(tmp_path: Path):
    source, state = tmp_path / "src", tmp_path / "state"
    for d in range(5):
        (source / f"d{d}").mkdir(parents=True)
        for f in range(30):
            (source / f"d{d}" / f"f{f}").write_bytes(b"%d %d " % (d, f) * (f * 100))
    os.symlink("d0", source / "link")
    state.mkdir()
    target = SimpleNamespace(sources=(str(source),), excludes=(), one_file_system=True)
    writer, found = scan.scan_sources(target, state / "files.gz", None, state)
    assert found is None
    return source, state, writer


def recorded(path: Path) -> dict[bytes, tuple[changes.Stat, str | None]]:
    return {name: (st, digest) for name, st, digest in changes.Record.load(path).entries_with_digests()}


def test_a_first_scans_digests_are_taken_by_a_process_of_its_own_and_checked_at_commit(tmp_path):
    source, state, writer = first_scan(tmp_path)
    assert writer.later is not None and writer.later.process.pid != os.getpid()
    writer.later.process.wait()  # digested: only the commit's check can tell it changed since
    (source / "d3" / "f7").write_bytes(b"changed after the walk")  # rsync may have copied either
    writer.commit(1, "s1", "settings")
    entries = recorded(state / "files.gz")
    assert sum(stat.S_ISREG(st[0]) for st, _ in entries.values()) == 150
    for name, (_, digest) in entries.items():
        path = b"/" + name
        if name.endswith(b"d3/f7"):
            assert digest is None, "a file changed since the walk has no digest"
        elif name.startswith(os.fsencode(source)[1:] + b"/d") and b"/f" in name:
            st = changes._stat(os.lstat(path))
            if st[3] <= changes.INLINE_MAX:
                assert digest is None, "kept inline by btrfs: copied whole when touched, never read for a digest"
            else:
                assert digest is not None and digest == changes.file_digest(path, st)
        else:
            assert digest is None, name  # directories and the symlink
    assert sorted(p.name for p in state.iterdir()) == ["files.gz"], "temporary files left"


def test_digests_that_cannot_be_taken_leave_a_record_without_them(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the digests' process ends at once
    _, state, writer = first_scan(tmp_path)
    writer.commit(1, "s1", "settings")
    assert "the content digests could not be taken (exit 1)" in caplog.text
    entries = recorded(state / "files.gz")
    assert sum(stat.S_ISREG(st[0]) for st, _ in entries.values()) == 150
    assert all(digest is None for _, digest in entries.values())
    assert sorted(p.name for p in state.iterdir()) == ["files.gz"], "temporary files left"


def test_a_discarded_scan_stops_its_digests_and_leaves_nothing(tmp_path, monkeypatch):
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(slow))
    _, state, writer = first_scan(tmp_path)
    process = writer.later.process
    started = time.monotonic()
    writer.discard()
    assert process.poll() is not None and time.monotonic() - started < 10
    assert list(state.iterdir()) == [], "files left"
