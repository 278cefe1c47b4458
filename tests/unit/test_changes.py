"""The local change finder: its exclude rules against rsync's own, the compare, the record file."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cryptsnap import changes, config, scan
from cryptsnap.snapshot import _record_unusable
from tests.unit.test_config import GOOD

PATTERNS = [
    "*.o", "cache/", "/{root}/logs/*.log", "b/c/*.txt", "d1/**/n", "tmp.d?", "[t]op.*", "[!a-z]*.bak",
    "/{root}/keep/***", "**/deep/*.tmp", "lnk", "x/*/y/", "/{root}/a/b", "c/", "Z/cache", "deep",
]  # fmt: skip


def make_tree(root: Path) -> None:
    for d in ("a/b/c/tmp.d2", "cache", ".cache", "x/cache/y", "x/z/y", "logs/old", "d1/d2", "keep/in",
              "deep/deep", "Z"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    for f in ("a/f.o", "a/b/g.o", "a/b/c/h.txt", "a/b/h.txt", "cache/k", ".cache/z", "x/cache/y/q", "logs/1.log",
              "logs/old/2.log", "d1/d2/n", "d1/n", "top.tmp", "a/top.x", "a/b/c/tmp.d", "sp ace", "1.bak", "b.bak",
              "keep/in/f", "deep/deep/a.tmp", "deep/a.tmp", "x/z/y/w", "Z/cache"):  # fmt: skip
        (root / f).write_text(f)
    os.symlink("a", root / "lnk")
    os.symlink("nowhere", root / "a" / "lnk")


def rsync_selection(source: Path, patterns: list[str]) -> set[bytes]:
    listing = subprocess.run(["rsync", "-r", "-R", "-l", "--list-only", *(f"--exclude={p}" for p in patterns),
                              str(source)], capture_output=True, check=True).stdout  # fmt: skip
    names = (line.split(maxsplit=4)[4] for line in listing.splitlines())
    return {name.split(b" -> ")[0] for name in names}  # symlinks are listed with their target


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_walk_selects_what_rsync_selects(tmp_path, pattern):
    source = tmp_path / "src"
    make_tree(source)
    patterns = [pattern.format(root=str(source).strip("/"))]
    assert set(changes.scan([str(source)], patterns, True)) == rsync_selection(source, patterns)


def test_all_patterns_at_once_and_two_sources(tmp_path):
    make_tree(tmp_path / "src")
    make_tree(tmp_path / "other")
    patterns = [p.format(root=str(tmp_path / "src").strip("/")) for p in PATTERNS]
    ours = changes.scan([str(tmp_path / "src"), str(tmp_path / "other")], patterns, True)
    assert set(ours) == rsync_selection(tmp_path / "src", patterns) | rsync_selection(tmp_path / "other", patterns)


def test_a_walk_in_parts_is_the_whole_walk_for_any_boundary(tmp_path, monkeypatch):
    """Each part of a scan in processes (cryptsnap.scan) walks from its start to its end: cut at
    any path (an entry, an excluded one, one that does not exist, a directory above sources),
    the parts together are the whole walk, once each and in order. A part lists no directory
    that lies wholly before its start."""
    make_tree(tmp_path / "src")
    make_tree(tmp_path / "other")
    patterns = [p.format(root=str(tmp_path / "src").strip("/")) for p in PATTERNS]
    sources = [str(tmp_path / "src"), str(tmp_path / "other"), str(tmp_path / "other" / "a")]
    part = lambda start, end: [p for batch in changes.walk_batches(sources, patterns, True, start, end)  # noqa: E731
                               for p, _ in batch]  # fmt: skip
    whole = part(None, None)
    assert whole == [p for p, _ in changes.walk(sources, patterns, True)]
    src = os.fsencode(tmp_path / "src")[1:]
    cuts = {b"", b"tmp", src, src + b"/cache", src + b"/cache/k", src + b"/x/cache/y/q"}  # the last three excluded
    for path in whole:
        cuts |= {path, path + b"0", path + b"/0", path + b"/~", path[:-1]}
    listed: list[bytes] = []
    listing = changes._listed
    monkeypatch.setattr(changes, "_listed", lambda directory: listed.append(directory) or listing(directory))
    for cut in sorted(cuts, key=changes.order_key):
        listed.clear()
        after = part(cut, None)
        key = changes.order_key(cut)
        before = [d[1:].split(b"/") for d in listed if changes.order_key(d[1:]) < key]
        assert [d for d in before if key[:len(d)] != d] == [], cut  # not above the cut: wholly before it
        assert part(None, cut) + after == whole, cut
    ordered = sorted(cuts, key=changes.order_key)
    for first, second in zip(ordered[::7], ordered[3::7], strict=False):
        assert part(None, first) + part(first, second) + part(second, None) == whole, (first, second)


def test_patterns_outside_the_subset_are_refused_not_guessed():
    for pattern in ("+ keep", "- drop", "a\\*b", "[[:digit:]]"):
        with pytest.raises(changes.UnsupportedPattern):
            changes.Filter([pattern])


def test_compare_finds_new_changed_retyped_and_deleted_entries(tmp_path):
    source = tmp_path / "src"
    make_tree(source)
    before = changes.scan([str(source)], [], True)
    assert changes.compare(before, before).empty
    (source / "a" / "f.o").write_text("changed")  # content
    os.chmod(source / "a" / "b" / "h.txt", 0o600)  # metadata only: ctime
    (source / "new").write_text("new")
    (source / "top.tmp").unlink()
    (source / "sp ace").unlink()
    (source / "sp ace").mkdir()  # a file became a directory
    os.rename(source / "logs" / "old", source / "logs" / "older")
    diff = changes.compare(before, changes.scan([str(source)], [], True))
    rel = os.fsencode(str(source))[1:]
    assert set(diff.changed) >= {rel + p for p in (b"/a/f.o", b"/a/b/h.txt", b"/new", b"/sp ace", b"/logs/older",
                                                   b"/logs/older/2.log", b"/logs")}  # fmt: skip
    assert rel + b"/a/b/c/h.txt" not in diff.changed
    assert set(diff.deleted) == {rel + p for p in (b"/top.tmp", b"/sp ace", b"/logs/old", b"/logs/old/2.log")}


def record_of(path: Path, entries: dict, generation: int = 7) -> changes.Record:
    writer = changes.RecordWriter(path)
    for name, st in sorted(entries.items(), key=lambda entry: changes.order_key(entry[0])):
        writer.add(name, st)
    writer.commit(generation, "2026-11-30T080000Z", "digest")
    return changes.Record.load(path)


def test_the_record_writer_adds_up_the_bytes_of_regular_files(tmp_path):
    writer = changes.RecordWriter(tmp_path / "files.gz")
    for name, st in ((b"d", (0o40755, 0, 0, 4096, 1, 1)), (b"d/a", (0o100644, 0, 0, 12, 1, 1)),
                     (b"d/l", (0o120777, 0, 0, 7, 1, 1)), (b"d/z", (0o100600, 0, 0, 30, 1, 1))):  # fmt: skip
        writer.add(name, st)
    assert (writer.count, writer.size) == (4, 42)  # a progress total: directories and links carry no data
    writer.discard()


def test_the_record_round_trips_odd_names_and_rejects_damage(tmp_path):
    entries = {b"etc/fstab": (0o100644, 0, 0, 12, 1, 2), b"a\nb\xff c": (0o40755, 1000, 1000, 4096, 3, 4)}
    path = tmp_path / "files.gz"
    record = record_of(path, entries)
    assert (record.generation, record.snapshot, record.settings, record.count) == (7, "2026-11-30T080000Z", "digest", 2)
    assert dict(record.entries()) == entries and record.verify()
    assert not (tmp_path / "files.gz.entries").exists()
    record.generation = 8
    record.save(path)  # onto its own file, streaming from it
    assert changes.Record.load(path).generation == 8 and dict(changes.Record.load(path).entries()) == entries
    assert changes.Record.load(tmp_path / "missing.gz") is None
    path.write_bytes(path.read_bytes()[:-8])  # truncated
    damaged = changes.Record.load(path)
    assert damaged is not None and not damaged.verify()
    with pytest.raises(changes.RecordDamaged):
        list(damaged.entries())


def test_a_record_of_the_old_format_is_not_used(tmp_path):
    import gzip
    import json

    with gzip.open(tmp_path / "files.gz", "wb") as out:
        out.write(json.dumps({"format": 1, "generation": 1, "snapshot": "s", "settings": "x", "count": 0}).encode())
    assert changes.Record.load(tmp_path / "files.gz") is None


def test_a_record_of_format_2_is_read_as_one_without_digests(tmp_path):
    import gzip
    import json

    with gzip.open(tmp_path / "files.gz", "wb") as out:
        out.write(json.dumps({"format": 2, "generation": 1, "snapshot": "s", "settings": "x", "count": 1}).encode())
        out.write(b"\n" + b"etc/fstab\0" + b"33188 0 0 12 1 2\0")
    record = changes.Record.load(tmp_path / "files.gz")
    assert list(record.entries_with_digests()) == [(b"etc/fstab", (33188, 0, 0, 12, 1, 2), None)]
    assert list(record.raw_chunks()) == [[b"etc/fstab", b"33188 0 0 12 1 2 -"]]  # as the scan reads it


def test_digests_round_trip_and_a_file_changed_during_the_run_loses_its_digest(tmp_path):
    """A digest taken this run stands for the snapshot's copy only if the file kept the Stat the
    walk saw until the end of the run: otherwise rsync may have copied other bytes."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("kept", "edited", "linked", "gone"):
        (source / name).write_bytes(name.encode() * 1000)
    os.link(source / "linked", tmp_path / "second-link")
    entries = list(changes.walk([str(source)], [], True))
    writer = changes.RecordWriter(tmp_path / "files.gz")
    for name, st in entries:
        digest = changes.file_digest(b"/" + name, st) if name.startswith(os.fsencode(source)[1:] + b"/") else None
        writer.add(name, st, digest, taken=True)
    (source / "edited").write_bytes(b"other bytes")  # after the walk: rsync may have copied either
    (source / "gone").unlink()
    writer.commit(1, "s", "x")
    digests = {os.fsdecode(os.path.basename(name)): digest for name, _, digest in
               changes.Record.load(tmp_path / "files.gz").entries_with_digests()}  # fmt: skip
    assert digests["kept"] and len(digests["kept"]) == 32
    assert digests["edited"] is None and digests["gone"] is None
    assert digests["linked"] is None  # two links: copied as a group, never touched alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files.gz", "second-link", "src"], "temporary files left"
    # Carried over as they are by save (a record rewritten for a new generation).
    record = changes.Record.load(tmp_path / "files.gz")
    record.save(tmp_path / "again.gz")
    assert list(changes.Record.load(tmp_path / "again.gz").entries_with_digests()) == list(record.entries_with_digests())


def test_a_digest_is_of_the_content_and_only_of_the_file_the_walk_saw(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"same bytes" * 300)  # past INLINE_MAX: the next test
    b.write_bytes(b"same bytes" * 300)
    os.utime(b, ns=(1, 1))
    st_a, st_b = (changes._stat(os.lstat(p)) for p in (a, b))
    assert changes.file_digest(os.fsencode(a), st_a) == changes.file_digest(os.fsencode(b), st_b)
    assert changes.file_digest(os.fsencode(a), st_b) is None  # replaced since the walk
    b.write_bytes(b"other byte" * 300)
    assert changes.file_digest(os.fsencode(b), changes._stat(os.lstat(b))) != changes.file_digest(os.fsencode(a), st_a)
    os.symlink(a, tmp_path / "l")
    assert changes.file_digest(os.fsencode(tmp_path / "l"), st_a) is None  # not followed


def test_a_file_btrfs_keeps_inline_gets_no_digest(tmp_path):
    """Its attributes alone cost the snapshot what a copy does (changes.INLINE_MAX): no digest,
    so a run copies it whenever its attributes change."""
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"s" * changes.INLINE_MAX)
    large.write_bytes(b"l" * (changes.INLINE_MAX + 1))
    st_small, st_large = (changes._stat(os.lstat(p)) for p in (small, large))
    assert changes.file_digest(os.fsencode(small), st_small) is None
    assert changes.file_digest(os.fsencode(large), st_large) is not None


def test_the_walk_is_in_record_order_and_the_streamed_compare_matches_the_sets(tmp_path):
    """Names that sort before and after "/" ("a.b", "a-b", "a0") around a directory "a"."""
    source = tmp_path / "src"
    for d in ("a/x", "a.b", "a0/y", "b"):
        (source / d).mkdir(parents=True)
    for f in ("a/x/1", "a/2", "a-b", "a.b/3", "a0/y/4", "b/5", "c"):
        (source / f).write_text(f)
    walked = [path for path, _ in changes.walk([str(source), str(source / "a")], [], True)]  # a source inside another
    assert walked == sorted(set(walked), key=changes.order_key), "not in record order, or twice"
    before = changes.scan([str(source)], [], True)
    old = record_of(tmp_path / "files.gz", before)
    (source / "a" / "2").write_text("changed")
    (source / "a.b" / "3").unlink()
    (source / "a0" / "new").write_text("new")
    after = changes.scan([str(source)], [], True)
    streamed = list(changes.differences(old.entries(), changes.walk([str(source)], [], True)))
    expected = changes.compare(before, after)
    assert [p for kind, p in streamed if kind == changes.CHANGED] == expected.changed
    assert [p for kind, p in streamed if kind == changes.DELETED] == expected.deleted
    assert {p for p, st in after.items() if before.get(p) != st} == set(expected.changed)
    assert set(before) - set(after) == set(expected.deleted)


def test_an_out_of_order_record_is_damaged_not_believed():
    old = [(b"b", (0o100644, 0, 0, 1, 1, 1)), (b"a", (0o100644, 0, 0, 1, 1, 1))]
    with pytest.raises(changes.RecordDamaged):
        list(changes.differences(old, []))


def test_the_scan_keeps_unchanged_entries_as_recorded_and_yields_what_merged_yields(tmp_path, monkeypatch):
    """merged_keeping_unchanged (the run's scan: the record read raw, the walk in batches) against
    merged() of the parsed record and walk: the same pairs for what differs, and the same new
    record, digests of unchanged files carried over. Chunks and batches are made tiny so that
    every entry falls near a boundary of one or the other."""
    monkeypatch.setattr(changes, "READ_CHUNK", 97)
    monkeypatch.setattr(changes, "BATCH", 3)
    source = tmp_path / "src"
    make_tree(source)
    for i in range(40):
        (source / "many" / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (source / "many" / f"d{i % 4}" / f"f{i}").write_text(f"{i}\n" * 1100)  # past INLINE_MAX: digested
    records = tmp_path / "records"
    records.mkdir()
    writer = changes.RecordWriter(records / "old.gz")
    for name, st in changes.walk([str(source)], [], True):
        writer.add(name, st, changes.file_digest(b"/" + name, st) if stat.S_ISREG(st[0]) else None)
    writer.commit(1, "s", "x")
    old = changes.Record.load(records / "old.gz")
    (source / "a" / "f.o").write_text("changed")
    os.chmod(source / "a" / "b" / "h.txt", 0o600)
    (source / "many" / "d2" / "new").write_text("new")
    (source / "many" / "d3" / "f7").unlink()
    shutil.rmtree(source / "many" / "d1")
    (source / "sp ace").unlink()
    (source / "sp ace").mkdir()  # a file became a directory
    (source / "zz").write_text("after everything recorded")

    def run(pairs, writer) -> list:
        differing = []
        for o, n in pairs:
            if o is not None and n is not None and o[1] == n[1]:
                writer.add(n[0], n[1], o[2])
            else:
                differing.append((o, n))
                if n is not None:
                    writer.add(n[0], n[1])
        return differing

    expected_writer = changes.RecordWriter(records / "expected.gz")
    expected = run(changes.merged(old.entries_with_digests(), changes.walk([str(source)], [], True)), expected_writer)
    scan_writer = changes.RecordWriter(records / "scanned.gz")
    batches = changes.walk_batches([str(source)], [], True)
    scanned = run(changes.merged_keeping_unchanged(old.raw_chunks(), batches, scan_writer), scan_writer)
    assert scanned == expected
    assert len(expected) > 10 and any(n is None for _, n in expected) and any(o is None for o, _ in expected)
    assert (scan_writer.count, scan_writer.size) == (expected_writer.count, expected_writer.size)
    for w in (expected_writer, scan_writer):
        w.commit(2, "s", "x")
    new_record = list(changes.Record.load(records / "scanned.gz").entries_with_digests())
    assert new_record == list(changes.Record.load(records / "expected.gz").entries_with_digests())
    # many/'s 40 files less d1's 10 and f7, carried over as recorded
    assert sum(1 for _, st, digest in new_record if digest) == 29


@pytest.mark.parametrize(("recorded", "walked"), [
    ("a a", "a"),  # repeated where the walk has it once
    ("a a", "a b"),
    ("b a", "a b"),  # out of order: each path found by the walk
    ("a c b d", "a b c d"),
    ("a c b", "a"),  # out of order after the walk's end
    ("c b", ""),
])  # fmt: skip
def test_the_scan_finds_a_record_out_of_order_even_where_it_matches_the_walk(tmp_path, recorded, walked):
    """A path repeated or out of order in the record would delete from the snapshot what is still
    there: the scan's fast path for unchanged entries must not let one pass."""
    st = os.lstat(tmp_path)
    fields = b"%d %d %d %d %d %d -" % changes._stat(st)
    chunk = [field for name in recorded.split() for field in (name.encode(), fields)]
    batches = [[(name.encode(), st) for name in walked.split()]]
    writer = changes.RecordWriter(tmp_path / "files.gz")
    with pytest.raises(changes.RecordDamaged):
        list(changes.merged_keeping_unchanged([c for c in (chunk[:4], chunk[4:]) if c], batches, writer))
    writer.discard()


def test_scanning_and_comparing_holds_a_directory_at_a_time_not_the_tree(tmp_path, monkeypatch):
    """Peak memory of walking a tree into a record and comparing it with the last one: ten times
    the files (in ten times the directories) must not take ten times the memory. (The record is
    read READ_CHUNK at a time, 1 MiB: here 16 KiB, so that both trees are larger than that.)"""
    import tracemalloc

    monkeypatch.setattr(changes, "READ_CHUNK", 1 << 14)

    records = tmp_path / "records"  # not in the tree's parents: writing there changes none of them
    records.mkdir()

    def peak(files: int) -> int:
        source = tmp_path / f"tree{files}"
        for i in range(files):
            directory = source / f"d{i // 100}"
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"f{i}").write_bytes(b"x")
        record = records / f"files{files}.gz"
        writer = changes.RecordWriter(record)
        for entry in changes.walk([str(source)], [], True):
            writer.add(*entry)
        writer.commit(1, "s", "x")
        tracemalloc.start()
        writer = changes.RecordWriter(records / f"next{files}.gz")

        def recorded():
            for entry in changes.walk([str(source)], [], True):
                writer.add(*entry)
                yield entry

        assert not list(changes.differences(changes.Record.load(record).entries(), recorded()))
        writer.commit(2, "s", "x")
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(1_000), peak(10_000)
    assert large < 2 * small, (small, large)


def test_a_damaged_record_found_during_the_scan_means_a_full_compare_and_a_whole_new_record(tmp_path, caplog):
    """The damage shows only once the compare reaches it: the half-made lists and record are
    dropped, and the walk starts again without the old record."""
    from types import SimpleNamespace

    source = tmp_path / "src"
    make_tree(source)
    target = SimpleNamespace(sources=(str(source),), excludes=(), one_file_system=True)
    state = tmp_path / "state"  # apart from the sources: its files must not change what is walked
    state.mkdir()
    old = state / "old.gz"
    writer, found = scan.scan_sources(target, old, None, state)
    assert found is None
    writer.commit(1, "s1", "digest")
    whole = list(changes.Record.load(old).entries())
    old.write_bytes(old.read_bytes()[:-8])  # cut short: the header reads, the entries do not
    new = state / "new.gz"
    writer, found = scan.scan_sources(target, new, changes.Record.load(old), state)
    assert found is None, "a damaged record must not say what changed"
    assert "the local record is damaged" in caplog.text
    writer.commit(2, "s2", "digest")
    assert list(changes.Record.load(new).entries()) == whole
    assert sorted(p.name for p in state.iterdir()) == ["new.gz", "old.gz"], "temporary files left"


def test_an_exclude_only_rsync_can_apply_means_no_record_not_a_failed_run(tmp_path, caplog):
    """The walk cannot select what rsync selects with such a pattern: the run goes on without a
    record (rsync compares every file), it does not fail."""
    from types import SimpleNamespace

    source = tmp_path / "src"
    make_tree(source)
    for pattern in ("[[:digit:]]*", "- cache", "a\\*b"):
        target = SimpleNamespace(sources=(str(source),), excludes=("*.o", pattern), one_file_system=True)
        with caplog.at_level("INFO"):
            assert scan.scan_sources(target, tmp_path / "files.gz", None, tmp_path) == (None, None)
        assert "one only rsync can apply" in caplog.text
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "files left behind"


def test_the_record_stands_down_unless_it_describes_the_images_newest_snapshot(tmp_path):
    """The decision behind "found from the local record" or a full compare, one reason each
    (the guest's test_the_local_record_… runs them through real backups, in make test-long)."""
    target = config.parse(GOOD, "c.yaml").target("home")
    writer = changes.RecordWriter(tmp_path / "files.gz")
    writer.commit(7, "2026-11-30T080000Z", changes.settings_digest(target))
    record = changes.Record.load(tmp_path / "files.gz")

    assert _record_unusable(record, "2026-11-30T080000Z", 7, target) == ""
    assert "no local record" in _record_unusable(None, "2026-11-30T080000Z", 7, target)
    assert "describes snapshot 2026-11-30T080000Z" in _record_unusable(record, "2026-12-01T080000Z", 7, target)
    assert "is of image generation 7, the image is at 8" in _record_unusable(record, "2026-11-30T080000Z", 8, target)
    other = dataclasses.replace(target, excludes=(*target.excludes, "*.cache"))
    assert "sources or excludes changed" in _record_unusable(record, "2026-11-30T080000Z", 7, other)


def test_going_on_from_a_canceled_try_copies_every_changed_file(tmp_path):
    """A try canceled mid-rsync may leave a file half rewritten in place, with its old size
    and new mtime unset: the next try must not take it for the recorded content."""
    from types import SimpleNamespace

    source = tmp_path / "source"
    source.mkdir()
    (source / "a").write_bytes(b"x" * 5000)
    (source / "b").write_bytes(b"y" * 5000)
    target = SimpleNamespace(sources=(str(source),), excludes=(), one_file_system=True)
    state = tmp_path / "state"
    state.mkdir()
    scanned, _ = scan.scan_sources(target, state / "r1.gz", None, state)
    scanned.commit(1, "s1", "x")
    for name, data in (("a", b"x" * 5000), ("b", b"z" * 5000)):  # made again, as tar does
        (source / name).unlink()
        (source / name).write_bytes(data)
    scanned, found = scan.scan_sources(target, state / "r2.gz", changes.Record.load(state / "r1.gz"), state,
                                           touch=True)
    assert (found.changed, found.touched) == (1 + 1, 1)  # b and the directory; a touched
    found.close()
    scanned.discard()
    scanned, found = scan.scan_sources(target, state / "r2.gz", changes.Record.load(state / "r1.gz"), state,
                                           touch=False)
    assert (found.changed, found.touched) == (3, 0)
    found.close()
    scanned.discard()
