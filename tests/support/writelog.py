"""Replaying a dm-log-writes log: the states a disk can be left in by a power cut.

dm-log-writes (drivers/md/dm-log-writes.c) records every write that reaches a device, in the
order it completed, with FLUSH/FUA flags and named marks (`dmsetup message DEV 0 mark NAME`).
A power cut keeps what was written before the last flush (and each FUA write), so the states
worth checking are the log replayed up to each FLUSH or FUA entry: the method of xfstests'
generic/482, with the replay written here rather than taken from xfstests' `replay-log`.

Log layout: block 0 holds the super (magic, version, entry count, block size); each entry is
one block (its header, then for a mark its name), followed by its data unless it is a discard.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC, VERSION = 0x6A736677736872, 1
FLUSH, FUA, DISCARD, MARK = 1 << 0, 1 << 1, 1 << 2, 1 << 3
SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")


@dataclass(frozen=True)
class Entry:
    index: int
    sector: int
    sectors: int
    flags: int
    mark: str  # a mark's name, else ""
    data_offset: int  # where its data is in the log

    @property
    def durable_point(self) -> bool:
        """After this entry, everything logged so far survives a power cut."""
        return bool(self.flags & (FLUSH | FUA))


def entries(log: bytes | memoryview) -> Iterator[Entry]:
    magic, version, count, block = SUPER.unpack_from(log, 0)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"not a dm-log-writes log (magic {magic:#x}, version {version})")
    offset = block
    for index in range(count):
        sector, sectors, flags, data_len = ENTRY.unpack_from(log, offset)
        mark = bytes(log[offset + ENTRY.size : offset + ENTRY.size + data_len]).rstrip(b"\0").decode() if flags & MARK else ""
        yield Entry(index, sector, sectors, flags, mark, offset + block)
        offset += block + (0 if flags & DISCARD else sectors * block)


def block_size(log: bytes | memoryview) -> int:
    return SUPER.unpack_from(log, 0)[3]


class Replay:
    """Applies a log's entries, in order, to a device or file opened read-write."""

    def __init__(self, log: bytes | memoryview, fd: int):
        self.log, self.fd, self.block = log, fd, block_size(log)

    def apply(self, entry: Entry) -> bool:
        """Write the entry's data (zeros for a discard); whether it changed anything."""
        if not entry.sectors:
            return False
        size = entry.sectors * self.block
        if entry.flags & DISCARD:
            data = bytes(size)
        else:
            data = self.log[entry.data_offset : entry.data_offset + size]
        os.pwrite(self.fd, data, entry.sector * self.block)
        return True


def checkpoints(log: bytes | memoryview, fd: int) -> Iterator[tuple[Entry, list[str]]]:
    """Replay the log onto fd, stopping at each durable point that differs from the one before.

    Yields that entry and the marks whose durable state it is: every mark logged before the
    next such point. A mark says an event happened (a run returned); a power cut right after
    it leaves the disk as at the last durable point before it, so that state must already
    hold what the event promised.
    """
    logged = list(entries(log))
    points, changed = [], False
    for entry in logged:
        changed |= entry.sectors > 0
        if entry.durable_point and changed:
            points.append(entry.index)
            changed = False
    marks = [(entry.index, entry.mark) for entry in logged if entry.mark]
    replay = Replay(log, fd)
    for entry in logged:
        replay.apply(entry)
        if points and entry.index == points[0]:
            points.pop(0)
            until = points[0] if points else len(logged)
            os.fsync(fd)
            yield entry, [mark for index, mark in marks if index < until]
