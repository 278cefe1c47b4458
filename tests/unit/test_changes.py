"""The local change finder: its exclude rules against rsync's own, the compare, the record file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cryptsnap import changes

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


def test_the_record_round_trips_odd_names_and_rejects_damage(tmp_path):
    entries = {b"etc/fstab": (0o100644, 0, 0, 12, 1, 2), b"a\nb\xff c": (0o40755, 1000, 1000, 4096, 3, 4)}
    record = changes.Record(7, "2026-11-30T080000Z", "digest", entries)
    path = tmp_path / "files.gz"
    record.save(path)
    assert changes.Record.load(path) == record
    assert changes.Record.load(tmp_path / "missing.gz") is None
    path.write_bytes(path.read_bytes()[:-8])  # truncated
    assert changes.Record.load(path) is None
