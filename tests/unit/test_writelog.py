"""The dm-log-writes replay the lost-writes test relies on, on a log built here byte by byte."""

from __future__ import annotations

import os

import pytest

from tests.support import writelog
from tests.support.writelog import DISCARD, FLUSH, FUA, MARK

BLOCK = 512


def log_of(*records: tuple[int, int, int, bytes | str]) -> bytes:
    """records: (sector, sectors, flags, data or a mark's name), as dm-log-writes writes them."""
    out = bytearray(writelog.SUPER.pack(writelog.MAGIC, writelog.VERSION, len(records), BLOCK).ljust(BLOCK, b"\0"))
    for sector, sectors, flags, payload in records:
        name = payload.encode() if flags & MARK else b""
        out += (writelog.ENTRY.pack(sector, sectors, flags, len(name)) + name).ljust(BLOCK, b"\0")
        if not flags & (MARK | DISCARD):
            out += payload
    return bytes(out)


def test_each_durable_point_holds_what_was_written_before_it_and_answers_for_the_marks_until_the_next(tmp_path):
    log = log_of(
        (0, 1, 0, b"a" * BLOCK),
        (0, 0, FLUSH, b""),
        (0, 0, MARK, "first run returned"),
        (1, 1, 0, b"b" * BLOCK),
        (0, 0, FLUSH, b""),  # nothing new since the last point but b: a point
        (0, 0, FLUSH, b""),  # nothing new at all: the same state, not a point
        (2, 1, FUA, b"c" * BLOCK),
        (0, 0, MARK, "second run returned"),
        (0, 1, DISCARD, b""),
        (3, 1, 0, b"d" * BLOCK),  # never flushed: no power cut keeps it for sure
    )
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(4 * BLOCK))
    fd = os.open(disk, os.O_RDWR)
    try:
        seen = [(entry.index, marks, os.pread(fd, 4 * BLOCK, 0)) for entry, marks in writelog.checkpoints(log, fd)]
    finally:
        os.close(fd)
    empty = bytes(BLOCK)
    assert seen == [
        (1, ["first run returned"], b"a" * BLOCK + empty * 3),
        (4, ["first run returned"], b"a" * BLOCK + b"b" * BLOCK + empty * 2),
        (6, ["first run returned", "second run returned"], b"a" * BLOCK + b"b" * BLOCK + b"c" * BLOCK + empty),
    ]


def test_what_is_not_a_log_is_refused():
    with pytest.raises(ValueError, match="not a dm-log-writes log"):
        list(writelog.entries(bytes(BLOCK)))
