"""The check's read-back slice: order, cursor, budget and wrap-around, on a local directory."""

from __future__ import annotations

import os
from types import SimpleNamespace

from cryptsnap import integrity


def snapshot_tree(tmp_path):
    fs = tmp_path / "fs"
    root = fs / "snapshots" / "2026-11-30T080000Z"
    for name in ("b/2", "a/1", "a/3", "c", "b/sub/4"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * 1000)
    os.symlink("c", root / "link")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    return fs, root, SimpleNamespace(dir=state_dir, file_record=state_dir / "files.gz")


def test_files_come_sorted_and_resume_after_the_cursor(tmp_path):
    _, root, _ = snapshot_tree(tmp_path)
    assert list(integrity.files_in_order(root, None, b"")) == [b"a/1", b"a/3", b"b/2", b"b/sub/4", b"c"]
    assert list(integrity.files_in_order(root, None, integrity.after(b"a/3"))) == [b"b/2", b"b/sub/4", b"c"]
    assert list(integrity.files_in_order(root, None, b"b/sub/4")) == [b"b/sub/4", b"c"]


def test_each_check_reads_the_next_slice_within_its_budget_then_wraps(tmp_path):
    fs, _, state = snapshot_tree(tmp_path)

    def run(files_allowed: int) -> integrity.CheckReport:
        report = integrity.CheckReport()
        budget = lambda: (files_allowed - report.files_read) * integrity.CHUNK_COST  # noqa: E731
        integrity.read_back(fs, state, budget, report)
        return report

    first = run(2)
    assert (first.first, first.last, first.bytes_read) == ("/a/1", "/a/3", 2000)
    second = run(2)
    assert (second.first, second.last, second.wrapped) == ("/b/2", "/b/sub/4", False)
    third = run(10)  # the rest, then from the start up to where it began: every file once
    assert third.files_read == 5 and third.wrapped and third.last == "/b/sub/4"
    assert not first.problems and not third.problems


def test_a_file_larger_than_one_budget_is_read_across_checks(tmp_path):
    fs, root, state = snapshot_tree(tmp_path)
    (root / "a" / "1").write_bytes(b"y" * (5 * integrity.CHUNK + 100))

    def run(chunks_allowed: int) -> integrity.CheckReport:
        report = integrity.CheckReport()
        budget = lambda: (chunks_allowed - report.bytes_read // integrity.CHUNK) * integrity.CHUNK_COST  # noqa: E731
        integrity.read_back(fs, state, budget, report)
        return report

    first = run(2)
    assert first.files_read == 0 and first.bytes_read == 2 * integrity.CHUNK
    second = run(3)  # the next 3 chunks: the rest but 100 bytes
    assert second.files_read == 0 and second.bytes_read == 3 * integrity.CHUNK
    third = run(1)  # its last 100 bytes, then the small files
    assert (third.first, third.files_read, third.bytes_read) == ("/a/1", 5, 100 + 4 * 1000)
