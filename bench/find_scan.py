"""A lab for issue 13's item 3 (not cryptsnap's record): what a nothing-changed run's local scan
would cost with no Python per unchanged entry.

The run's scan (scan.scan_sources) spends about 3 µs of Python per entry on this host
and 50–80 s for 10^6 entries in the emulated guest, over the 24 s that `du` takes there
(docs/performance.md). This lab measures the other way that the docs name: C walks and
sorts, and Python only compares blocks.

- the walk: `find TREE -xdev -printf '%y %m %U %G %s %T@ %C@ %P\\0'`, every field the record
  keeps, one NUL-terminated line an entry;
- the order: `tr` swaps '/' and \\001 in the stream, so that `sort -z -t ' ' -k8` (C locale)
  orders the lines by path components (a directory right before everything under it, as
  the record's order_key does); the fields hold neither byte;
- the compare: this walk's stream against the last run's, a MiB at a time. Where the bytes
  are equal, whole entries are copied to the new record and their digests (16 bytes each,
  in a stream of their own, in the same order) along with them; where they differ, an entry
  waits by path until the other side brings the same path. That needs no sorted order, only
  the same one for what did not change, so `--order find` leaves out tr and sort: find's own
  order (each directory's) is the same between two walks of a directory whose entries did
  not change.

The first record's digests are markers (each entry's own hash), so that check() can tell
that every unchanged entry's digest went where its entry went; a changed file's digest is
zeros here, not taken. What is not prototyped: rsync's exclude rules (find would need them
as -regex ... -prune predicates), several sources, the record's safety checks. Measured in
the guest it gained 1.14x in find's order and lost in the sorted one (docs/performance.md,
"A C walk instead").

    python3 -m bench.find_scan TREE PREVIOUS_DIR   # the first time: makes PREVIOUS_DIR's record
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

FIELDS = r"%y %m %U %G %s %T@ %C@ %P\0"
BLOCK = 1 << 20
DIGEST = 16  # bytes of a digest; zeros: unknown
SORT_MEMORY = "64M"  # sort spills to files in the work directory beyond this


def sorted_walk(tree: Path, work: Path, order: str) -> subprocess.Popen:
    """find | tr | sort: the tree's entries in record order, as a stream (the last process);
    order "find": find alone, the directories' own order."""
    env = {**os.environ, "LC_ALL": "C", "TMPDIR": str(work)}
    find = subprocess.Popen(["find", str(tree), "-xdev", "-printf", FIELDS], stdout=subprocess.PIPE, env=env)
    if order == "find":
        return find
    swap = subprocess.Popen(["tr", "/\\001", "\\001/"], stdin=find.stdout, stdout=subprocess.PIPE, env=env)
    find.stdout.close()
    ordered = subprocess.Popen(["sort", "-z", "-t", " ", "-k8", "-S", SORT_MEMORY], stdin=swap.stdout,
                               stdout=subprocess.PIPE, env=env)  # fmt: skip
    swap.stdout.close()
    return ordered


class Entries:
    """A stream of NUL-terminated entries, buffered at least a BLOCK ahead; buf[pos:] is unread."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = b""
        self.pos = 0
        self.eof = False

    def fill(self) -> None:
        if self.eof or len(self.buf) - self.pos >= BLOCK:
            return
        parts = [self.buf[self.pos :]]
        size = len(parts[0])
        while size < BLOCK:
            chunk = self.stream.read(BLOCK)
            if not chunk:
                self.eof = True
                break
            parts.append(chunk)
            size += len(chunk)
        self.buf, self.pos = b"".join(parts), 0

    def take(self, size: int) -> bytes:
        self.pos += size
        return self.buf[self.pos - size : self.pos]

    def next_entry(self) -> bytes | None:
        end = self.buf.find(b"\0", self.pos)
        return None if end < 0 else self.take(end + 1 - self.pos)

    def __iter__(self) -> Iterator[bytes]:
        """The entries left, one at a time."""
        while True:
            self.fill()
            if (entry := self.next_entry()) is None:
                return
            yield entry

    def whole_entries_within(self, size: int) -> int:
        """The bytes of the whole entries among the next `size`."""
        end = self.buf.rfind(b"\0", self.pos, self.pos + size)
        return 0 if end < 0 else end + 1 - self.pos


def equal_prefix(a: Entries, b: Entries) -> int:
    """How many next bytes a and b have in common: slices compared in C, growing while they
    are equal, then halving; the cost follows the equal part's length, not the buffer's."""
    n = min(len(a.buf) - a.pos, len(b.buf) - b.pos)
    same = lambda start, end: a.buf[a.pos + start : a.pos + end] == b.buf[b.pos + start : b.pos + end]  # noqa: E731
    lo, step = 0, 256
    while lo < n:
        hi = min(n, lo + step)
        if not same(lo, hi):
            break
        lo, step = hi, step * 2
    else:
        return n
    while hi - lo > 1:  # a's and b's first lo bytes are equal, their first hi are not
        mid = (lo + hi) // 2
        if same(lo, mid):
            lo = mid
        else:
            hi = mid
    return lo


def path_of(entry: bytes) -> bytes:
    return entry.split(b" ", 7)[7]


def compare(old, old_digests, new, out, out_digests) -> tuple[int, int]:
    """Merge the last run's entries with this walk's; write the new record (the walk, as it
    came) and its digests. (entries, entries new, changed or deleted.)

    Where the two streams are equal, whole entries are copied a block at a time, digests along.
    Where they differ, an entry waits by path (an old one with its digest) until the other side
    brings the same path; the new record's digests wait from the first new entry waiting. So
    the order need not be sorted, only the same for what did not change: find's own order
    (each directory's) is, for a directory whose entries did not change. What waits at the end
    is deleted (old) or new."""
    previous, current = Entries(old), Entries(new)
    waiting_old: dict[bytes, tuple[bytes, bytes]] = {}  # path: (entry, digest)
    waiting_new: dict[bytes, tuple[int, bytes]] = {}  # path: (its place in `slots`, the entry)
    slots: list[bytes | None] = []  # the new digests from the first waiting new entry on
    entries = differing = 0

    def digests(value: bytes) -> None:
        if slots:
            slots.append(value)
        else:
            out_digests.write(value)

    while True:
        previous.fill()
        current.fill()
        cut = previous.whole_entries_within(equal_prefix(previous, current))
        if cut:
            count = previous.buf.count(b"\0", previous.pos, previous.pos + cut)
            out.write(current.take(cut))
            previous.take(cut)
            digests(old_digests.read(DIGEST * count))
            entries += count
            continue
        before, now = previous.next_entry(), current.next_entry()
        if before is None and now is None:
            break
        if before is not None:
            digest, path = old_digests.read(DIGEST), path_of(before)
            if path in waiting_new:
                place, waiting = waiting_new.pop(path)
                unchanged = waiting == before
                differing += not unchanged
                slots[place] = digest if unchanged else bytes(DIGEST)
            else:
                waiting_old[path] = (before, digest)
        if now is not None:
            out.write(now)
            entries += 1
            path = path_of(now)
            if path in waiting_old:
                was, digest = waiting_old.pop(path)
                differing += was != now
                digests(digest if was == now else bytes(DIGEST))
            else:
                waiting_new[path] = (len(slots), now)
                slots.append(None)
        if not waiting_new and slots:
            out_digests.write(b"".join(slots))
            slots.clear()
    differing += len(waiting_new) + len(waiting_old)
    out_digests.write(b"".join(value or bytes(DIGEST) for value in slots))
    return entries, differing


def scan(tree: Path, previous: Path, work: Path, order: str, replace: bool = True) -> tuple[int, int]:
    """One scan of `tree` against the record in `previous`, the new record in `work`, then in
    `previous`'s place if `replace`; (entries, differing)."""
    walk = sorted_walk(tree, work, order)
    with (gzip.open(previous / "entries.gz", "rb") as old, open(previous / "digests", "rb") as old_digests,
          gzip.open(work / "entries.gz", "wb", compresslevel=1) as out,
          open(work / "digests", "wb") as out_digests):  # fmt: skip
        found = compare(old, old_digests, walk.stdout, out, out_digests)
    if walk.wait() != 0:
        raise RuntimeError(f"the walk failed (exit {walk.returncode})")
    for name in ("entries.gz", "digests") if replace else ():
        os.replace(work / name, previous / name)
    return found


def marker(entry: bytes) -> bytes:
    """The first record's digest of an entry: its own, so that check() can tell where each went."""
    return hashlib.blake2b(entry, digest_size=DIGEST).digest()


def first(tree: Path, previous: Path, order: str) -> int:
    """The first record: every entry, with marker() as its digest."""
    previous.mkdir(parents=True, exist_ok=True)
    walk = sorted_walk(tree, previous, order)
    with gzip.open(previous / "entries.gz", "wb", compresslevel=1) as out, open(previous / "digests", "wb") as digests:
        count = 0
        for entry in Entries(walk.stdout):
            out.write(entry)
            digests.write(marker(entry))
            count += 1
    if walk.wait() != 0:
        raise RuntimeError(f"the walk failed (exit {walk.returncode})")
    return count


def check(previous: Path) -> tuple[int, int]:
    """Whether every entry of the record carries its first record's digest (copied along
    while unchanged) or zeros (changed or new since): (entries carried, entries zeroed);
    AssertionError when any other digest is found beside an entry."""
    carried = zeroed = 0
    with gzip.open(previous / "entries.gz", "rb") as out, open(previous / "digests", "rb") as digests:
        for entry in Entries(out):
            digest = digests.read(DIGEST)
            if digest == marker(entry):
                carried += 1
            else:
                assert digest == bytes(DIGEST), f"{entry!r} carries another entry's digest"
                zeroed += 1
        assert not digests.read(), "more digests than entries"
    return carried, zeroed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.find_scan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("tree", type=Path)
    parser.add_argument("previous", type=Path, help="the last record's directory (made when missing)")
    parser.add_argument("--order", choices=("sorted", "find"), default="sorted",
                        help="sorted: find | tr | sort (record order); find: find's own, no sort")  # fmt: skip
    args = parser.parse_args(argv)
    started = time.monotonic()
    if not (args.previous / "digests").exists():
        count = first(args.tree, args.previous, args.order)
        print(f"first record: {count:,} entries in {time.monotonic() - started:.1f} s")
        return 0
    work = args.previous / "next"
    work.mkdir(exist_ok=True)
    entries, differing = scan(args.tree, args.previous, work, args.order)
    child, own = (resource.getrusage(who).ru_maxrss >> 10 for who in (resource.RUSAGE_CHILDREN, resource.RUSAGE_SELF))
    print(
        f"scan: {entries:,} entries, {differing} differing, {time.monotonic() - started:.1f} s; "
        f"largest child {child} MiB, this process {own} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
