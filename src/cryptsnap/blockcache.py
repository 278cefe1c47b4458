"""A local copy of the image's metadata blocks, as stored: ciphertext, below dm-crypt.

Every btrfs run reads the tree nodes above what it changes, and the mount reads the roots
of every tree: with the image on the server, each such node is a download (docs/performance.md,
"where the bytes go"). cryptsnap.nbd serves the image to the kernel and answers those reads
from this cache; writes go to the server first and then here (write-through), so the cache
only ever holds what the server holds.

What is kept: every block read (a backup reads metadata, never file data: rsync copies
whole files) and every block written inside the ranges the file system uses for metadata
(`cover`, from cryptsnap.chunks), which run N+1 reads again.

When it is trusted: the cache is saved "clean" only after an orderly disconnect, together
with the image's identity (LUKS UUID and size). At the next start the server reads one
block from the server, the anchor (the btrfs superblock, rewritten by every commit), and
compares it with the cached copy. Any other writer (another machine, a rollback of the
image, a run that crashed before saving) changes that block or leaves no clean cache: the
cache is then emptied and refills as it is used. Reads never trust a block that was not
written or read through this cache.

Files in the cache directory:
    blocks     sparse file, same offsets as the image
    present    zlib-compressed bitmap: which 4 KiB blocks of `blocks` are valid
    state.json identity, anchor, covered ranges; "clean" when present and blocks match
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

BLOCK = 4096
# Before the file system is mounted, its metadata ranges are unknown on a cold cache:
# these are kept from the start (LUKS header area and the btrfs superblock area).
FIRST_MIB = (0, 1024 * 1024)
_NONZERO = re.compile(rb"[^\x00]")


class Ranges:
    """Sorted, merged [start, end) byte ranges; `covers(offset)` by bisection."""

    def __init__(self, ranges=()):
        merged: list[list[int]] = []
        for start, end in sorted((int(s), int(e)) for s, e in ranges if int(e) > int(s)):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]

    def covers(self, offset: int) -> bool:
        i = bisect.bisect_right(self.starts, offset) - 1
        return i >= 0 and offset < self.ends[i]

    def as_list(self) -> list[list[int]]:
        return [[s, e] for s, e in zip(self.starts, self.ends, strict=True)]


class CacheFailed(Exception):
    """The local cache could not be read or written (a full disk, say). The run goes on
    without it; it is not saved as clean, so the next run starts empty."""


class Store:
    """The cache directory of one target. Not thread-safe: cryptsnap.nbd serves one request at a time."""

    def __init__(self, directory: Path, identity: str, size: int):
        self.dir = directory
        self.identity = identity
        self.size = size
        self.blocks_path = directory / "blocks"
        self.present_path = directory / "present"
        self.state_path = directory / "state.json"
        self.present = bytearray((size // BLOCK + 7) // 8)
        self.ranges = Ranges([FIRST_MIB])
        self.fd: int | None = None
        self.hits = self.misses = 0
        self.failed = False  # set by cryptsnap.nbd after a CacheFailed: not used, not saved

    # --- opening and saving -------------------------------------------------------------

    def open(self, anchor: int, read_remote) -> str:
        """Load the cache if it matches the image; else start empty. Returns why, for the log.

        `read_remote(offset, length)` reads from the server (one 4 KiB block, the anchor).
        From here until save(), the cache on disk is not marked clean: a crash empties it.
        Raises CacheFailed when the cache directory cannot be used (the run can go on
        without it); an OSError from read_remote is the server's and passes through.
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            cached = self._load(anchor)
        except OSError as exc:
            raise CacheFailed(f"the block cache in {self.dir} cannot be used: {exc}") from exc
        if isinstance(cached, str):
            verdict = cached
        elif read_remote(anchor, BLOCK) == cached:
            verdict = f"kept: {self.count()} blocks"
        else:
            verdict = "emptied: the image was written by someone else since (its superblock differs)"
        try:
            if not verdict.startswith("kept"):
                self.present = bytearray(len(self.present))
                self.ranges = Ranges([FIRST_MIB])
                if self.blocks_path.exists():
                    self.blocks_path.unlink()
            # Marked not clean before the first write: only save() marks it clean again.
            self._write_state(clean=False, anchor=anchor)
            self.fd = os.open(self.blocks_path, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            raise CacheFailed(f"the block cache in {self.dir} cannot be used: {exc}") from exc
        return verdict

    def _load(self, anchor: int) -> str | bytes:
        """Why the cache cannot be kept; or, if it may be, its copy of the anchor block to compare."""
        state = self.load_saved()
        if isinstance(state, str):
            return state
        if state.get("anchor") != anchor:
            return "emptied: the anchor block moved"
        try:
            cached = self.saved_block(anchor)
        except OSError as exc:
            return f"emptied: unreadable ({exc})"
        if cached is None:
            return "emptied: it does not hold the anchor block"
        self.ranges = Ranges(state.get("ranges", [FIRST_MIB]))
        return cached

    def load_saved(self) -> str | dict:
        """Load the bitmap of a cache saved clean for this image: its state, or why it cannot be used.
        (Read-only: `cryptsnap check` uses this to compare the cache with the server's copy.)"""
        try:
            state = json.loads(self.state_path.read_text())
            if not state.get("clean"):
                return "emptied: the last run did not close it cleanly"
            present = bytearray(zlib.decompress(self.present_path.read_bytes()))
        except FileNotFoundError:
            return "empty: no cache yet"
        except (OSError, ValueError, zlib.error) as exc:
            return f"emptied: unreadable ({exc})"
        if state.get("identity") != self.identity or len(present) != len(self.present):
            return "emptied: it belongs to another image (cryptsnap init ran again?)"
        self.present = present
        return state

    def saved_block(self, offset: int, length: int = BLOCK) -> bytes | None:
        """The saved cache's copy of [offset, offset+length), if it holds all of it."""
        if not all(self.has(at) for at in range(offset, offset + length, BLOCK)):
            return None
        with open(self.blocks_path, "rb") as blocks:
            return os.pread(blocks.fileno(), length, offset)

    def held_runs(self, start: int, longest: int):
        """(offset, length) of the runs of held blocks from `start` on, each at most `longest` bytes."""
        block, last = start // BLOCK, self.size // BLOCK
        while block < last:
            if not self.present[block >> 3]:  # eight blocks not held: find the next held one in C
                found = _NONZERO.search(self.present, (block >> 3) + 1)
                if not found:
                    return
                block = found.start() * 8
                continue
            if not self.has(block * BLOCK):
                block += 1
                continue
            first = block
            while block < last and (block - first) * BLOCK < longest and self.has(block * BLOCK):
                block += 1
            yield first * BLOCK, (block - first) * BLOCK

    def save(self, anchor: int) -> None:
        """After an orderly disconnect: everything the server acknowledged is in the cache."""
        os.fsync(self.fd)
        tmp = self.present_path.with_suffix(".tmp")
        tmp.write_bytes(zlib.compress(bytes(self.present), 1))
        os.replace(tmp, self.present_path)
        self._write_state(clean=True, anchor=anchor)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _write_state(self, clean: bool, anchor: int) -> None:
        state = {"identity": self.identity, "anchor": anchor, "clean": clean, "ranges": self.ranges.as_list()}
        tmp = self.state_path.with_suffix(".tmp")
        with open(tmp, "w") as out:
            json.dump(state, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.state_path)

    # --- blocks -------------------------------------------------------------------------

    def cover(self, ranges) -> None:
        """Keep written blocks in these byte ranges from now on (and in the next runs)."""
        self.ranges = Ranges([FIRST_MIB, *ranges])

    def has(self, offset: int) -> bool:
        block = offset // BLOCK
        return bool(self.present[block >> 3] & (1 << (block & 7)))

    def _mark(self, offset: int) -> None:
        block = offset // BLOCK
        self.present[block >> 3] |= 1 << (block & 7)

    def count(self) -> int:
        return int.from_bytes(self.present, "little").bit_count()

    def read(self, offset: int, length: int, read_remote) -> bytes:
        """Read [offset, offset+length) (block aligned): cached runs locally, the rest remotely."""
        out = bytearray()
        end = offset + length
        at = offset
        while at < end:
            cached = self.has(at)
            run = at
            while run < end and self.has(run) == cached:
                run += BLOCK
            if cached:
                out += self._local(os.pread, self.fd, run - at, at)
                self.hits += (run - at) // BLOCK
            else:
                data = read_remote(at, run - at)
                self._local(os.pwrite, self.fd, data, at)
                for block in range(at, run, BLOCK):
                    self._mark(block)
                self.misses += (run - at) // BLOCK
                out += data
            at = run
        return bytes(out)

    def written(self, offset: int, data: bytes) -> None:
        """The server acknowledged this write: keep the blocks that are metadata or already held."""
        for at in range(offset, offset + len(data), BLOCK):
            if self.ranges.covers(at) or self.has(at):
                self._local(os.pwrite, self.fd, data[at - offset : at - offset + BLOCK], at)
                self._mark(at)

    @staticmethod
    def _local(call, *args):
        try:
            return call(*args)
        except OSError as exc:
            raise CacheFailed(f"the block cache failed: {exc}") from exc

    def forget(self, offset: int, length: int) -> None:
        """A write that failed half-way: the server's copy is unknown, so the cache holds none."""
        for at in range(offset, offset + length, BLOCK):
            block = at // BLOCK
            self.present[block >> 3] &= ~(1 << (block & 7)) & 0xFF
