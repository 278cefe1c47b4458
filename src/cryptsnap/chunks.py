"""Where a mounted btrfs keeps its metadata on the device, for the block cache.

The chunk tree maps the file system's address space to the device; metadata and system
chunks hold every tree node. It is read with BTRFS_IOC_TREE_SEARCH on the mounted file
system: from memory, without a process and without a byte from the server. A run can
allocate new metadata chunks (a first backup does), so `Watch` asks again every few
seconds while the file system is mounted and once more before the unmount; each change is
passed on (layers.CachedDevice.cover), so the next commit's writes there are kept too.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

TREE_SEARCH = 0xD0009411  # _IOWR(0x94, 17, struct btrfs_ioctl_search_args), 4096 bytes
SEARCH_KEY = struct.Struct("=7Q4I4Q")  # tree, objectid min/max, offset min/max, transid min/max, type min/max, nr
SEARCH_HEADER = struct.Struct("=3Q2I")  # transid, objectid, offset, type, len
CHUNK = struct.Struct("<4Q3I2H")  # length, owner, stripe_len, type, io_align, io_width, sector_size, stripes, sub
STRIPE = struct.Struct("<2Q16s")  # devid, offset, device uuid
CHUNK_TREE, FIRST_CHUNK_TREE_OBJECTID, CHUNK_ITEM = 3, 256, 228
GROUP_SYSTEM, GROUP_METADATA = 2, 4

Ranges = list[tuple[int, int]]


def parse_search_result(buf: bytes, count: int) -> tuple[Ranges, int | None]:
    """The metadata and system stripes [start, end) in one TREE_SEARCH result; and the last key offset."""
    ranges, at, last = [], SEARCH_KEY.size, None
    for _ in range(count):
        _, _, offset, kind, length = SEARCH_HEADER.unpack_from(buf, at)
        at += SEARCH_HEADER.size
        last = offset
        if kind == CHUNK_ITEM:
            size, _, _, flags, _, _, _, stripes, _ = CHUNK.unpack_from(buf, at)
            if flags & (GROUP_SYSTEM | GROUP_METADATA):
                for i in range(stripes):  # single: one stripe; dup: two copies of the same length
                    _, physical, _ = STRIPE.unpack_from(buf, at + CHUNK.size + i * STRIPE.size)
                    ranges.append((physical, physical + size))
        at += length
    return ranges, last


def metadata_ranges(fs: Path) -> Ranges:
    """Device byte ranges of every metadata and system chunk of the btrfs mounted at `fs`."""
    ranges: Ranges = []
    start = 0
    fd = os.open(fs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            key = SEARCH_KEY.pack(CHUNK_TREE, FIRST_CHUNK_TREE_OBJECTID, FIRST_CHUNK_TREE_OBJECTID, start,
                                  2**64 - 1, 0, 2**64 - 1, CHUNK_ITEM, CHUNK_ITEM, 4096, 0, 0, 0, 0, 0)  # fmt: skip
            args = array.array("B", key + bytes(4096 - SEARCH_KEY.size))
            fcntl.ioctl(fd, TREE_SEARCH, args)
            buf = args.tobytes()
            count = SEARCH_KEY.unpack_from(buf)[9]  # nr_items: how many the kernel returned
            if not count:
                return ranges
            found, last = parse_search_result(buf, count)
            ranges += found
            if last is None or last == 2**64 - 1:
                return ranges
            start = last + 1
    finally:
        os.close(fd)


class Watch:
    """Pass the metadata ranges on while the file system is mounted: now, when they change, and at the end."""

    def __init__(self, fs: Path, on_ranges: Callable[[Ranges], None], interval: float = 5.0):
        self.fs = fs
        self.on_ranges = on_ranges
        self.interval = interval
        self.known: Ranges | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="chunk-watch", daemon=True)

    def __enter__(self) -> Watch:
        self._look()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        # Stopped before the unmount (an open directory would keep the file system busy);
        # one last look first, for the chunks the unmount's commit will write into.
        self.stop.set()
        self.thread.join()
        self._look()

    def _poll(self) -> None:
        while not self.stop.wait(self.interval):
            self._look()

    def _look(self) -> None:
        try:
            ranges = sorted(metadata_ranges(self.fs))
        except OSError as exc:
            log.warning("could not read the btrfs chunk tree at %s (%s); new metadata is not cached", self.fs, exc)
            return
        if ranges != self.known:
            self.known = ranges
            self.on_ranges(ranges)
