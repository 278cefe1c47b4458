"""The scan in parts (cryptsnap.scan): where it cuts a record, and that parts walked in
processes of their own give the record and lists one walk gives."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from cryptsnap import changes, logs, scan

MARKS = [(i * 1000, b"d/%06d" % (i * 1000)) for i in range(100)]  # a record of 100,000 entries


def test_cuts_are_marked_entries_near_the_even_cuts(monkeypatch):
    monkeypatch.setattr(scan, "PART_MIN", 10_000)
    assert scan.cuts(MARKS, 100_000, 2) == [b"d/050000"]
    assert scan.cuts(MARKS, 100_000, 4) == [b"d/025000", b"d/050000", b"d/075000"]
    assert scan.cuts(MARKS[::40], 100_000, 4) == [b"d/040000", b"d/080000"], "fewer marks, fewer parts"
    assert scan.cuts(MARKS, 25_000, 4) == [b"d/012000"], "a part holds PART_MIN entries at least"
    assert scan.cuts(MARKS, 100_000, 1) == []
    assert scan.cuts([(0, b"d/000000")], 100_000, 4) == [], "a record without marks is not cut"
    assert scan.cuts(MARKS[:10], 100_000, 2) == [], "no mark leaves PART_MIN on either side"


def make_tree(root: Path) -> None:
    for d in range(30):
        for f in range(20):
            path = root / f"d{d:02}" / ("sub" if f % 3 else "") / f"f{f}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{d} {f}")
    (root / "a.b").write_text("x")
    os.symlink("d00", root / "link")


def lists(found: scan.Found) -> dict[str, bytes]:
    found.listing.flush(), found.touched_file.flush(), found.deleted_file.flush()
    return {name + "_list": Path(file.name).read_bytes() for name, file in zip(
        scan.LISTS, (found.listing, found.touched_file, found.deleted_file), strict=True)} | found.counts()  # fmt: skip


def entries(path: Path) -> bytes:
    with gzip.open(path, "rb") as record:
        record.readline()
        return record.read()


@pytest.fixture
def small_parts(monkeypatch):
    """Marks and parts at the scale of a test tree (the processes it starts keep the defaults)."""
    monkeypatch.setattr(changes, "MARK", 16)
    monkeypatch.setattr(scan, "PART_MIN", 40)


def test_a_scan_in_parts_finds_and_records_what_one_walk_does(tmp_path, small_parts):
    source, state = tmp_path / "src", tmp_path / "state"
    make_tree(source)
    (source / "d28" / "sub" / "f2").write_bytes(b"2" * (changes.INLINE_MAX + 1))  # its touch is found by digest
    state.mkdir()
    target = SimpleNamespace(sources=(str(source),), excludes=("*/sub/f7",), one_file_system=True)
    first = state / "first.gz"
    writer, _ = scan.scan_sources(target, first, None, state)
    writer.commit(1, "s1", "digest")
    known = changes.Record.load(first)
    cut_at = scan.cuts(known.marks, known.count, 3)
    assert len(cut_at) == 2
    # Changes at and around the cuts: a cut entry gone, the directory above the other gone,
    # a file turned directory, content changed, attributes alone, new files.
    (source / os.fsdecode(cut_at[0]).removeprefix(str(source)[1:] + "/")).unlink()
    shutil.rmtree(source / os.fsdecode(cut_at[1]).removeprefix(str(source)[1:] + "/").split("/")[0])
    (source / "d05" / "f0").unlink()
    (source / "d05" / "f0").mkdir()
    (source / "d05" / "f0" / "new").write_text("new")
    (source / "d01" / "sub" / "f1").write_text("other content")
    os.utime(source / "d28" / "sub" / "f2", (1, 1))
    (source / "d29" / "zz").write_text("new")
    (source / "a.a").write_text("new")

    results = {}
    for parts in (1, 3):
        writer, found = scan.scan_sources(target, state / f"in{parts}.gz", known, state, parts=parts)
        writer.commit(2, "s2", "digest")
        results[parts] = (entries(state / f"in{parts}.gz"), lists(found), changes.Record.load(state / f"in{parts}.gz"))
        found.close()
    assert results[3][0] == results[1][0], "the record differs"
    assert results[3][1] == results[1][1], "what changed differs"
    changed = [p.removeprefix(os.fsencode(source)[1:]) for p in results[1][1]["changed_list"].split(b"\0")]
    assert changed == [b"", b"/a.a", b"/d01/sub/f1", b"/d05", b"/d05/f0", b"/d05/f0/new", b"/d09/sub", b"/d29",
                       b"/d29/zz", b""]  # fmt: skip
    assert results[1][1]["touched_list"] == os.fsencode(source)[1:] + b"/d28/sub/f2\0"
    # The parts were made in processes: their first entries are marks (the processes keep MARK).
    assert {index for index, _ in results[3][2].marks} != {index for index, _ in results[1][2].marks}
    assert sorted(p.name for p in state.iterdir()) == ["first.gz", "in1.gz", "in3.gz"], "part files left behind"
    # And the record written in parts cuts the next scan alike.
    again = results[3][2]
    writer, found = scan.scan_sources(target, state / "again.gz", again, state, parts=3)
    assert found.empty and len(scan.cuts(again.marks, again.count, 3)) == 2
    writer.discard()
    found.close()


def test_a_part_that_fails_means_one_walk_and_a_damaged_record_a_full_compare(tmp_path, small_parts, monkeypatch,
                                                                               caplog):  # fmt: skip
    source, state = tmp_path / "src", tmp_path / "state"
    make_tree(source)
    state.mkdir()
    target = SimpleNamespace(sources=(str(source),), excludes=(), one_file_system=True)
    writer, _ = scan.scan_sources(target, state / "first.gz", None, state)
    writer.commit(1, "s1", "digest")
    known = changes.Record.load(state / "first.gz")
    (source / "d10" / "f0").write_text("changed")

    monkeypatch.setattr(sys, "executable", "/bin/false")  # the part's process ends without a result
    writer, found = scan.scan_sources(target, state / "next.gz", known, state, parts=3)
    assert "a part of the scan failed (exit 1): scanning again in one process" in caplog.text
    assert lists(found)["changed"] == 1, "found in one walk"
    writer.discard()
    found.close()
    monkeypatch.undo()

    monkeypatch.setattr(changes, "MARK", 16)
    monkeypatch.setattr(scan, "PART_MIN", 40)
    damaged = state / "damaged.gz"
    damaged.write_bytes((state / "first.gz").read_bytes()[:-8])  # the last part finds it cut short
    writer, found = scan.scan_sources(target, state / "next.gz", changes.Record.load(damaged), state, parts=3)
    assert found is None and "the local record is damaged" in caplog.text
    writer.discard()
    assert sorted(p.name for p in state.iterdir()) == ["damaged.gz", "first.gz"], "part files left behind"


def test_a_part_logs_as_the_run_does(monkeypatch):
    """A part's warning carries the run's job tag and, into the journal, its priority. The part
    runs as nobody here so that a directory root made private is one it cannot read."""
    base = Path(tempfile.mkdtemp(prefix="cryptsnap-scan-"))  # not tmp_path: private to root
    try:
        os.chmod(base, 0o755)
        source, state = base / "src", base / "state"
        make_tree(source)
        state.mkdir(mode=0o777)
        os.chmod(state, 0o777)
        target = SimpleNamespace(sources=(str(source),), excludes=(), one_file_system=True)
        writer, _ = scan.scan_sources(target, state / "first.gz", None, state)
        writer.commit(1, "s1", "digest")
        os.chmod(state / "first.gz", 0o644)
        os.chmod(source / "d03", 0o700)
        monkeypatch.setattr(logs, "_settings", {"verbosity": 0, "program": "job 7 [home]", "tag": "job 7 [home]: "})
        job = {"sources": [str(source)], "excludes": [], "one_file_system": True, "record": str(state / "first.gz"),
               "touch": False, "start": None, "end": None, "to": str(state / "part"), "log": logs.settings()}  # fmt: skip
        stderr = state / "stderr"
        with open(stderr, "wb") as err:
            info = os.fstat(err.fileno())
            part = subprocess.run([sys.executable, "-m", "cryptsnap.scan"], input=json.dumps(job).encode(),
                                  stdout=subprocess.PIPE, stderr=err, user=65534, group=65534, extra_groups=[],
                                  env=dict(os.environ, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}"))  # fmt: skip
        assert part.returncode == 0, stderr.read_text()
        assert json.loads(part.stdout)["seen"] > 0
        assert f"<4>job 7 [home]: cannot read {source / 'd03'}: Permission denied\n" in stderr.read_text()
    finally:
        shutil.rmtree(base)
