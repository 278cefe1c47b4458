"""What changed since the last snapshot, found on the local disk instead of in the image.

rsync decides what to copy by comparing each source file with its copy in the snapshot,
which means reading every inode and directory of the image through the network, every run.
Instead, after each run cryptsnap keeps a record of what it backed up (path, type, owner,
size, mtime, ctime of every entry) next to the generation counter of the image it went into.
The next run walks the sources locally, compares them with the record, and gives rsync only
the entries that differ (--files-from); it deletes the vanished ones itself. The image is
read only where something changed.

The record also holds a digest of each regular file's content, taken from the source when
that file was copied (in a first backup, beside rsync: digests.py), except for files small
enough for btrfs to keep inline, which cost the same copied or touched (INLINE_MAX). A file
whose metadata changed but whose content did not (a package upgrade or a release tarball
unpacked over the tree gives every file a new mtime) then gets only its attributes set in
the snapshot, without its bytes crossing the link again (scan.Found.touched). A digest is
kept only where it is sure to describe what the snapshot holds: taken from a file with one
link, and only if the file did not change between the walk and the end of the run
(RecordWriter.commit); otherwise "-", unknown.

The record is trusted only for the image and snapshot it describes: if the image's
generation or its newest snapshot is not the one recorded, or the sources or excludes
changed, the run falls back to rsync's full compare and writes a new record.

The walk must select exactly what rsync selects. It applies the target's excludes with
rsync's rules (see Filter); patterns outside the subset handled here turn the record off
(full compare every run) instead of guessing.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import heapq
import json
import logging
import operator
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# (st_mode, st_uid, st_gid, st_size, st_mtime_ns, st_ctime_ns). ctime changes with every
# chmod, chown, xattr or ACL change, rename and new hard link, none of which touch mtime.
Stat = tuple[int, int, int, int, int, int]
FORMAT = 3  # 2: entries in record order (order_key), streamed; 3: and a content digest per file
READABLE = (2, 3)  # a format 2 record is read as one without digests
DIGEST_CHUNK = 1 << 20
# btrfs keeps a file of up to max_inline bytes (2048, the default cryptsnap mounts with) in the
# leaf that holds its inode: setting its attributes rewrites that leaf, and so does writing its
# bytes again. A digest of it would save nothing on the wire (3% and 2% more written for trees
# of 1 KiB and 2 KiB files copied whole instead, 9x for 2049 bytes: docs/performance.md), and
# cost a read and a hash of every such file: 16% of a first backup of small files.
INLINE_MAX = 2048


class UnsupportedPattern(ValueError):
    pass


class Filter:
    """rsync's --exclude rules, for the patterns that a backup config uses.

    A pattern starting with / is anchored at the transfer root (here: the file system root,
    because sources are given with --relative); otherwise it matches at the end of the path,
    at a component boundary. One ending in / matches directories only. `*` and `?` stop at
    slashes, `**` does not, `[...]` is a class, `dir/***` is dir and everything under it.
    An excluded directory is not descended into.
    """

    def __init__(self, patterns: Iterable[str]):
        self.rules = [self._compile(p) for p in patterns]

    @staticmethod
    def _compile(pattern: str) -> tuple[re.Pattern, bool]:
        if not pattern or pattern.startswith(("+ ", "- ", "! ", "+,", "-,")) or "\\" in pattern or "[:" in pattern:
            raise UnsupportedPattern(pattern)
        dir_only = pattern.endswith("/") and pattern != "/"
        body = pattern.rstrip("/") if dir_only else pattern
        anchored = body.startswith("/")
        body = body.lstrip("/")
        tail = ""
        if body.endswith("/***"):
            body, tail = body[:-4], "(?:/.*)?"
        elif body == "***":
            body, tail = "", ".*"
        regex, i = [], 0
        while i < len(body):
            c = body[i]
            if body.startswith("**", i):
                regex.append(".*")
                i += 2
                while i < len(body) and body[i] == "*":
                    i += 1
                continue
            if c == "*":
                regex.append("[^/]*")
            elif c == "?":
                regex.append("[^/]")
            elif c == "[":
                end = body.find("]", i + 2 if body[i + 1:i + 2] in ("!", "^") else i + 1)
                if end < 0:
                    raise UnsupportedPattern(pattern)
                inner = body[i + 1:end]
                negate = inner[:1] in ("!", "^")
                inner = inner[1:] if negate else inner
                regex.append("[" + ("^/" if negate else "") + inner.replace("\\", "\\\\") + "]")
                i = end + 1
                continue
            else:
                regex.append(re.escape(c))
            i += 1
        core = "".join(regex) + tail
        # Unanchored: the pattern may start at any component boundary. Without a slash or `**`
        # that is the last component only, since `*` and `?` do not cross slashes.
        compiled = re.compile(core if anchored else r"(?:.*/)?" + core, re.DOTALL)
        return compiled, dir_only

    def excluded(self, relative: str, is_dir: bool) -> bool:
        """relative: the path under the transfer root, without a leading slash."""
        return any(rx.fullmatch(relative) and (is_dir or not dir_only) for rx, dir_only in self.rules)


def _stat(st: os.stat_result) -> Stat:
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def order_key(path: bytes) -> list[bytes]:
    """The record's order: by path components, as a depth-first walk with sorted names goes,
    so a directory comes right before everything under it."""
    return path.split(b"/")


def walk(sources: Iterable[str], excludes: Iterable[str], one_file_system: bool) -> Iterator[tuple[bytes, Stat]]:
    """Every entry rsync would send for these sources, once each, in record order: (relative
    path, Stat). It holds one directory listing per level, not the tree: a record of 10^6
    files is made and compared without keeping it in memory.

    Includes the directories above each source, which rsync --relative sends as well.
    UnsupportedPattern at once, not when first read, for a pattern only rsync can apply.
    """
    batches = walk_batches(sources, excludes, one_file_system)
    return ((relative, _stat(st)) for batch in batches for relative, st in batch)


BATCH = 1024  # entries a batch of the walk holds


def walk_batches(sources: Iterable[str], excludes: Iterable[str], one_file_system: bool, start: bytes | None = None,
                 end: bytes | None = None) -> Iterator[list[tuple[bytes, os.stat_result]]]:  # fmt: skip
    """walk() in lists of up to BATCH entries, each with its os.stat_result as it came. What
    a nothing-changed run spends is this walk and its compare, Python per entry; in lists,
    without a generator's resume per entry and per layer, it costs about half
    (docs/performance.md, the local record in the guest). UnsupportedPattern at once.

    start, end (relative paths): only the entries from `start` (included) to `end` (excluded)
    in record order, one part of a scan made in several processes (cryptsnap.scan). The walk goes
    down to `start` and stops at `end`; it reads no directory outside the part."""
    return _batches(sources, Filter(excludes), one_file_system, Bounds(start, end))


@dataclass
class Bounds:
    """A part of the record order: from `start` (included) to `end` (excluded); None: open."""

    start: bytes | None = None
    end: bytes | None = None
    lo: list[bytes] | None = field(init=False)  # their order keys
    hi: list[bytes] | None = field(init=False)

    def __post_init__(self) -> None:
        self.lo = None if self.start is None else order_key(self.start)
        self.hi = None if self.end is None else order_key(self.end)

    def holds(self, relative: bytes) -> bool:
        key = order_key(relative)
        return (self.lo is None or key >= self.lo) and (self.hi is None or key < self.hi)

    def reaches(self, relative: bytes) -> bool:
        """Does the subtree at `relative` (the directory and all under it) meet the part?"""
        key = _key(relative)
        if self.hi is not None and key >= self.hi:
            return False  # all of it comes after the end
        # Before the start, and the start not under it: all of it comes before the start.
        return self.lo is None or key >= self.lo or self.lo[:len(key)] == key


WHOLE = Bounds()


def _key(relative: bytes) -> list[bytes]:
    """order_key, with the file system root (b"") above everything."""
    return order_key(relative) if relative else []


def _batches(sources: Iterable[str], rules: Filter, one_file_system: bool,
             bounds: Bounds = WHOLE) -> Iterator[list[tuple[bytes, os.stat_result]]]:  # fmt: skip
    roots = sorted({os.fsencode(os.path.abspath(source)).rstrip(b"/") or b"/" for source in sources},
                   key=lambda root: order_key(root[1:]))  # fmt: skip
    if len(roots) == 1:
        yield from _source(roots[0], rules, one_file_system, bounds)
        return
    last: list[bytes] | None = None
    batch: list[tuple[bytes, os.stat_result]] = []
    flat = (heapq.merge(*((entry for batch in _source(root, rules, one_file_system, bounds) for entry in batch)
                          for root in roots), key=lambda entry: order_key(entry[0])))  # fmt: skip
    for relative, st in flat:
        key = order_key(relative)
        if key != last:  # a directory above two sources, or a source inside another
            last = key
            batch.append((relative, st))
            if len(batch) >= BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def scan(sources: Iterable[str], excludes: Iterable[str], one_file_system: bool) -> dict[bytes, Stat]:
    """walk() as a dict: relative path -> Stat (for small trees and tests)."""
    return dict(walk(sources, excludes, one_file_system))


def _source(root: bytes, rules: Filter, one_file_system: bool,
            bounds: Bounds) -> Iterator[list[tuple[bytes, os.stat_result]]]:  # fmt: skip
    parts = [p for p in root.split(b"/") if p]
    paths = [b"/".join(parts[:depth]) for depth in range(1, len(parts))]
    above = [(path, os.lstat(b"/" + path)) for path in paths if bounds.holds(path)]
    try:
        top = os.lstat(root)
    except FileNotFoundError:
        if above:
            yield above
        return  # rsync reports it; the full compare path will fail loudly on it
    relative = root[1:]
    if relative and rules.excluded(os.fsdecode(relative), stat.S_ISDIR(top.st_mode)):
        if above:
            yield above
        return
    if relative and bounds.holds(relative):
        above.append((relative, top))
    if above:
        yield above
    if stat.S_ISDIR(top.st_mode) and bounds.reaches(relative):
        yield from _walk(root, top.st_dev, rules, one_file_system, bounds)


_name = operator.attrgetter("name")


def _listed(directory: bytes) -> list[os.DirEntry]:
    try:
        return sorted(os.scandir(directory), key=_name)
    except (PermissionError, FileNotFoundError) as exc:
        log.warning("cannot read %s: %s", os.fsdecode(directory), exc.strerror)  # exc repeats the path as bytes
        return []


def _descend(entry: os.DirEntry, device: int, rules: Filter,
             one_file_system: bool) -> tuple[os.stat_result, bool] | None:  # fmt: skip
    """An entry's stat and whether the walk goes into it; None: vanished, or excluded. (_walk's
    loop does the same inline: a call per entry would cost the walk's hot path.)"""
    try:
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None  # vanished while we looked
    is_dir = stat.S_ISDIR(st.st_mode)
    if rules.rules and rules.excluded(os.fsdecode(entry.path[1:]), is_dir):
        return None
    return st, is_dir and (not one_file_system or st.st_dev == device)


def _first_levels(directory: bytes, device: int, rules: Filter, one_file_system: bool,
                  lo: list[bytes] | None) -> tuple[list[Iterator[os.DirEntry]], list[list[bytes]]]:  # fmt: skip
    """The walk's stack of listings where the part begins, with each listing's directory as an
    order key: down the directories above `lo`, each listing from `lo`'s name at its depth
    on. Those directories themselves come before `lo`: the part before this one holds them."""
    key = _key(directory[1:])
    listing = _listed(directory)
    levels: list[Iterator[os.DirEntry]] = []
    keys: list[list[bytes]] = []
    while True:
        keys.append(key)
        if lo is None or len(lo) <= len(key) or lo[:len(key)] != key:
            levels.append(iter(listing))  # the part holds all of this directory
            return levels, keys
        name = lo[len(key)]
        i = bisect.bisect_left(listing, name, key=_name)
        if i == len(listing) or listing[i].name != name or len(lo) == len(key) + 1:
            levels.append(iter(listing[i:]))  # from `lo`, or from what follows it where it is gone
            return levels, keys
        levels.append(iter(listing[i + 1:]))  # listing[i] is above `lo`: into it
        seen = _descend(listing[i], device, rules, one_file_system)
        if not seen or not seen[1]:
            return levels, keys  # not a directory the walk enters (any more): on after it
        key = key + [name]
        listing = _listed(listing[i].path)


def _walk(directory: bytes, device: int, rules: Filter, one_file_system: bool,
          bounds: Bounds = WHOLE) -> Iterator[list[tuple[bytes, os.stat_result]]]:  # fmt: skip
    """Depth first, names sorted: record order. Within `bounds` (see walk_batches)."""
    levels, keys = _first_levels(directory, device, rules, one_file_system, bounds.lo)
    # The end: `edge` is the deepest listing whose directory lies above it, `depth` that
    # directory's. Only there can a name reach the end, so only there is a name compared (with
    # the end's name at that depth).
    hi, edge, depth, limit = bounds.hi, -1, 0, b""
    if hi is not None:
        while edge + 1 < len(keys) and len(hi) > len(keys[edge + 1]) and hi[:len(keys[edge + 1])] == keys[edge + 1]:
            edge += 1
        if edge >= 0:
            depth = len(keys[edge])
            limit = hi[depth]
    batch: list[tuple[bytes, os.stat_result]] = []
    excluding = bool(rules.rules)
    while levels:
        for entry in levels[-1]:  # the listing goes on where it was left to descend
            above_end = False
            if len(levels) - 1 == edge and entry.name >= limit:
                if entry.name > limit or len(hi) == depth + 1:
                    levels.clear()  # the end: the next part begins here
                    break
                above_end = True
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # vanished while we looked
            relative = entry.path[1:]
            is_dir = stat.S_ISDIR(st.st_mode)
            if excluding and rules.excluded(os.fsdecode(relative), is_dir):
                continue
            batch.append((relative, st))
            if is_dir and (not one_file_system or st.st_dev == device):
                levels.append(iter(_listed(entry.path)))
                if above_end:  # the end is under it: its listing is the edge now
                    edge, depth = edge + 1, depth + 1
                    limit = hi[depth]
                break
        else:
            levels.pop()
            if len(levels) == edge:  # the edge's directory is done: what follows lies after the end
                levels.clear()
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def file_digest(path: bytes, expected: Stat) -> str | None:
    """The digest of a regular file's content (hex), read from the source; None when it cannot
    stand for the file: unreadable, gone, replaced, or with more than one link (rsync
    --hard-links copies those as a group, and an attribute change through one link would
    reach the others in the snapshot); and None, without reading it, for a file small enough
    to be kept inline (INLINE_MAX): copying it again costs what setting its attributes does."""
    if expected[3] <= INLINE_MAX:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_nlink != 1 or _stat(st) != expected:
            return None
        digest = hashlib.blake2b(digest_size=16)
        with os.fdopen(fd, "rb", closefd=False) as stream:
            while chunk := stream.read(DIGEST_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


class RecordDamaged(ValueError):
    """The record file is cut short, damaged, or out of order: it cannot say what changed."""


CHANGED, DELETED = "changed", "deleted"
READ_CHUNK = 1 << 20  # of a record's entries, decompressed: what reading it holds at a time


def merged(old: Iterable[tuple], new: Iterable[tuple]) -> Iterator[tuple[tuple | None, tuple | None]]:
    """Merge two streams of entries (path, Stat, ...) in record order: (old, new) for a path in
    both, (old, None) for one only in `old`, (None, new) for one only in `new`.

    `new` comes from the walk; `old` from a file, so its order is checked (RecordDamaged): a
    path repeated or out of order would delete from the snapshot what is still there."""
    old, new = iter(old), iter(new)
    o, n = next(old, None), next(new, None)
    previous: bytes | None = None  # the last old path passed
    while o is not None or n is not None:
        if o is not None and n is not None and o[0] == n[0]:  # the common case: no key to compute
            if o[0] == previous:
                raise RecordDamaged(f"the record holds {os.fsdecode(o[0])!r} twice")
            yield o, n
            previous = o[0]
            o, n = next(old, None), next(new, None)
        elif n is None or (o is not None and order_key(o[0]) < order_key(n[0])):
            if previous is not None and order_key(o[0]) <= order_key(previous):
                raise RecordDamaged("the record's entries are out of order")
            yield o, None
            previous = o[0]
            o = next(old, None)
        else:
            yield None, n
            n = next(new, None)


def merged_keeping_unchanged(old_chunks: Iterable[list[bytes]], batches: Iterable[list[tuple[bytes, os.stat_result]]],
                             writer: RecordWriter) -> Iterator[tuple[tuple | None, tuple | None]]:  # fmt: skip
    """merged() of a record read raw (Record.raw_chunks) and the walk in batches (walk_batches),
    as a run's scan needs it: an entry whose Stat is as recorded goes to `writer` as the record
    holds it, its digest included, and is not yielded; the rest come as merged() gives them,
    old as (path, Stat, digest), new as (path, Stat).

    The unchanged entry is the one to make cheap: a nothing-changed run of 10^6 files is 10^6 of
    them. It costs a bytes format and compare, without parsing the record's numbers or a call
    per entry; the order checks of merged() are made where an entry differs (an entry repeated
    or out of order in the record cannot match the walk, which is strictly in order)."""
    chunks = iter(old_chunks)
    chunk: list[bytes] = []  # path, fields, path, fields, ...
    i = 0
    previous: bytes | None = None  # the last old path passed
    kept: list[bytes] = []
    kept_size = 0

    def keep() -> None:  # before anything is yielded: the record stays in order
        nonlocal kept_size
        if kept:
            writer.add_lines(kept, kept_size)
            kept.clear()
            kept_size = 0

    for batch in batches:
        for name, st in batch:
            if i == len(chunk):
                chunk, i = next(chunks, []), 0
            if i < len(chunk) and chunk[i] == name:
                fields = chunk[i + 1]
                if fields.startswith(b"%d %d %d %d %d %d " % (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                                               st.st_mtime_ns, st.st_ctime_ns)):  # fmt: skip
                    kept.append(name + b"\0" + fields + b"\0")
                    if st.st_mode & 0o170000 == 0o100000:
                        kept_size += st.st_size
                    previous = name
                    i += 2
                    continue
            keep()
            new = (name, _stat(st))
            key = order_key(name)
            while True:  # the old entries up to this one: deleted, or this one's, changed
                if i == len(chunk):
                    chunk, i = next(chunks, []), 0
                    if not chunk:
                        yield None, new
                        break
                path = chunk[i]
                if path == name:
                    if path == previous:
                        raise RecordDamaged(f"the record holds {os.fsdecode(path)!r} twice")
                    recorded = parse_fields(chunk[i + 1])
                    if recorded[0] == new[1]:  # as recorded, after entries that are gone
                        kept.append(name + b"\0" + chunk[i + 1] + b"\0")
                        kept_size += st.st_size if st.st_mode & 0o170000 == 0o100000 else 0
                    else:
                        yield (path, *recorded), new
                    previous = path
                    i += 2
                    break
                if order_key(path) > key:
                    yield None, new
                    break
                if previous is not None and order_key(path) <= order_key(previous):
                    raise RecordDamaged("the record's entries are out of order")
                yield (path, *parse_fields(chunk[i + 1])), None
                previous = path
                i += 2
        keep()
    while True:  # what is left of the record: deleted
        if i == len(chunk):
            chunk, i = next(chunks, []), 0
            if not chunk:
                return
        path = chunk[i]
        if previous is not None and order_key(path) <= order_key(previous):
            raise RecordDamaged("the record's entries are out of order")
        yield (path, *parse_fields(chunk[i + 1])), None
        previous = path
        i += 2


def differences(old: Iterable[tuple], new: Iterable[tuple]) -> Iterator[tuple[str, bytes]]:
    """(CHANGED, path) for what is new or differs, which rsync copies; (DELETED, path) for what
    is gone or changed type, removed from the snapshot first. Each kind comes in record order
    (a directory before what is under it)."""
    for o, n in merged(old, new):
        if n is None:
            yield DELETED, o[0]
        elif o is None:
            yield CHANGED, n[0]
        elif o[1] != n[1]:
            if stat.S_IFMT(o[1][0]) != stat.S_IFMT(n[1][0]):
                yield DELETED, o[0]  # a file that became a directory (or the reverse)
            yield CHANGED, n[0]


@dataclass
class Difference:
    changed: list[bytes]  # new or different: rsync copies these (record order: parents first)
    deleted: list[bytes]  # gone, or changed type: removed from the snapshot first

    @property
    def empty(self) -> bool:
        return not self.changed and not self.deleted


def compare(old: dict[bytes, Stat], new: dict[bytes, Stat]) -> Difference:
    """differences() of two small in-memory trees, as lists."""
    found = Difference([], [])
    ordered = lambda entries: sorted(entries.items(), key=lambda entry: order_key(entry[0]))  # noqa: E731
    for kind, path in differences(ordered(old), ordered(new)):
        (found.changed if kind == CHANGED else found.deleted).append(path)
    return found


def settings_digest(target) -> str:
    """What the record depends on besides the files: other sources or excludes mean another tree."""
    text = json.dumps([list(target.sources), list(target.excludes), target.one_file_system])
    return hashlib.sha256(text.encode()).hexdigest()


def raw_chunks(stream) -> Iterator[list[bytes]]:
    """Entries (path NUL fields NUL ...) from a binary stream, READ_CHUNK at a time, unparsed:
    lists of path, fields, path, fields... ValueError when the stream is cut short."""
    rest = b""
    while chunk := stream.read(READ_CHUNK):
        fields = (rest + chunk).split(b"\0")
        rest = fields.pop()
        if len(fields) % 2:
            rest = fields.pop() + b"\0" + rest
        if fields:
            yield fields
    if rest:
        raise ValueError("cut short in the middle of an entry")


def bounded(chunks: Iterable[list[bytes]], bounds: Bounds) -> Iterator[list[bytes]]:
    """raw_chunks() of a record, only the entries within `bounds` (a part of a scan): an order
    key per chunk, and a binary search in the chunk where the part begins or ends."""
    lo, hi = bounds.lo, bounds.hi
    for fields in chunks:
        if lo is not None:
            if order_key(fields[-2]) < lo:
                continue
            fields, lo = fields[_first_at(fields, lo):], None
        if hi is not None and order_key(fields[-2]) >= hi:
            if fields := fields[:_first_at(fields, hi)]:
                yield fields
            return
        yield fields


def _first_at(fields: list[bytes], key: list[bytes]) -> int:
    """Where in a chunk (path, fields, path, ...) the first path at or after `key` is."""
    return 2 * bisect.bisect_left(range(len(fields) // 2), key, key=lambda i: order_key(fields[2 * i]))


def read_entries(stream) -> Iterator[tuple[bytes, Stat, str | None]]:
    """Parse entries (path NUL fields NUL ...) from a binary stream: (path, Stat, digest or None).
    ValueError when the stream is cut short or damaged."""
    for fields in raw_chunks(stream):
        for i in range(0, len(fields), 2):
            yield (fields[i], *parse_fields(fields[i + 1]))


def parse_fields(fields: bytes) -> tuple[Stat, str | None]:
    """An entry's fields: its Stat and its content digest (None: unknown, or a format 2 entry)."""
    values = fields.split()
    if len(values) not in (6, 7):
        raise RecordDamaged(f"an entry with {len(values)} fields")
    try:
        st = tuple(map(int, values[:6]))
    except ValueError:
        raise RecordDamaged("an entry's field is not a number") from None
    return st, values[6].decode() if len(values) == 7 and values[6] != b"-" else None


def entry_line(name: bytes, st: Stat, digest: str | None) -> bytes:
    """One entry as stored: names hold any byte but NUL."""
    return name + b"\0" + (" ".join(map(str, st)) + " " + (digest or "-")).encode() + b"\0"


class Digester(Protocol):
    """Digests being taken for a RecordWriter (digests.Digests)."""

    def wait(self) -> tuple[Path, Path] | None: ...  # entries with digests, the digests taken

    def stop(self) -> None: ...


@dataclass
class Record:
    """The files of one snapshot, stored locally: state_dir/TARGET/files.gz.

    A gzip file: a header line (JSON), then NUL-separated path and Stat of every entry in
    record order. Loading reads the header; entries() streams the rest from the file.
    """

    generation: int  # the image's generation counter after the run that wrote `snapshot`
    snapshot: str
    settings: str  # settings_digest of the target when the record was made
    count: int
    source: Path  # the file its entries are read from
    format: int = FORMAT
    # (index, path) of an entry every MARK or so: where a scan in parts may cut (cryptsnap.scan)
    marks: tuple[tuple[int, bytes], ...] = ()

    def entries(self) -> Iterator[tuple[bytes, Stat]]:
        """The entries, in record order; RecordDamaged when the file is damaged or cut short."""
        for name, st, _ in self.entries_with_digests():
            yield name, st

    def entries_with_digests(self) -> Iterator[tuple[bytes, Stat, str | None]]:
        """(path, Stat, content digest or None), in record order."""
        for fields in self.raw_chunks():
            for i in range(0, len(fields), 2):
                try:
                    st, digest = parse_fields(fields[i + 1])
                except RecordDamaged as exc:
                    raise RecordDamaged(f"{self.source}: {exc}") from None
                yield fields[i], st, digest

    def raw_chunks(self) -> Iterator[list[bytes]]:
        """The entries unparsed, as raw_chunks() reads them, each with seven fields (a format 2
        record's get an unknown digest, "-"); RecordDamaged when the file is damaged or cut short."""
        seen = 0
        try:
            with gzip.open(self.source, "rb") as stream:
                stream.readline()
                for fields in raw_chunks(stream):
                    seen += len(fields) // 2
                    if self.format == 2:
                        fields[1::2] = [value + b" -" for value in fields[1::2]]
                    yield fields
        except (OSError, EOFError, ValueError) as exc:
            raise RecordDamaged(f"{self.source}: {exc}") from exc
        if seen != self.count:
            raise RecordDamaged(f"{self.source} holds {seen} of its {self.count} entries")

    def verify(self) -> bool:
        """Read it through: is it whole? (Used where it is read in place, not merged.)"""
        try:
            for _ in self.entries():
                pass
        except RecordDamaged as exc:
            log.warning("ignoring the damaged file record: %s", exc)
            return False
        return True

    def save(self, path: Path) -> None:
        """Write it (with its header as it is now) to `path`, streaming its entries."""
        writer = RecordWriter(path)
        try:
            for name, st, digest in self.entries_with_digests():
                writer.add(name, st, digest)
        except BaseException:
            writer.discard()
            raise
        writer.commit(self.generation, self.snapshot, self.settings)

    @classmethod
    def load(cls, path: Path) -> Record | None:
        """The saved record's header, or None when there is none or it cannot be read (then: full compare)."""
        try:
            with gzip.open(path, "rb") as source:
                header = json.loads(source.readline())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as exc:
            log.warning("ignoring the unreadable file record %s (%s); this run compares everything", path, exc)
            return None
        if not isinstance(header, dict) or header.get("format") not in READABLE:
            return None
        return cls(header["generation"], header["snapshot"], header["settings"], header["count"], path,
                   header["format"], _marks(header.get("marks")))


def _marks(listed) -> tuple[tuple[int, bytes], ...]:
    """A header's marks; none where they are not as written (the scan is then not cut)."""
    try:
        marks = tuple((int(index), bytes.fromhex(path)) for index, path in listed or ())
    except (TypeError, ValueError):
        return ()
    keys = [order_key(path) for _, path in marks]
    in_order = all(a[0] < b[0] for a, b in pairwise(marks)) and all(a < b for a, b in pairwise(keys))
    return marks if in_order else ()


MARK = 1 << 14  # entries between two marks of a record: a part of a scan is at least this


class RecordWriter:
    """A new record, written as the scan goes (path + ".entries", compressed), and put in
    place by commit() once its snapshot is complete: a header member, then the entries,
    in one gzip file (gzip allows several members, read as one stream).

    Digests taken this run (add(..., taken=True)) are checked at commit: the source file must
    still have the Stat the walk saw, or rsync may have copied other bytes than the digest's."""

    def __init__(self, path: Path):
        self.path = path
        self.entries_file = path.with_name(path.name + ".entries")
        self.count = 0
        self.size = 0  # bytes in regular files: what a copy of everything would transfer
        # level 1: it is rewritten every run.
        self.out = gzip.open(self.entries_file, "wb", compresslevel=1)
        self.pending: list[bytes] = []  # written in batches: a gzip write per entry costs more than the walk
        self.pending_size = 0
        self.taken_file = path.with_name(path.name + ".taken")  # path, Stat of the digests taken this run
        self.taken = None
        self.marks: list[tuple[int, bytes]] = []
        self.mark_every = MARK
        self.later = None  # the digests being taken beside the run (digest_later)

    def add(self, name: bytes, st: Stat, digest: str | None = None, taken: bool = False) -> None:
        line = entry_line(name, st, digest)
        if digest and taken:
            if self.taken is None:
                self.taken = open(self.taken_file, "wb")  # noqa: SIM115 (closed by commit or discard)
            self.taken.write(line)
        self.pending.append(line)
        self.pending_size += len(line)
        if self.count % self.mark_every == 0:
            self.marks.append((self.count, name))
        self.count += 1
        if stat.S_ISREG(st[0]):
            self.size += st[3]
        if self.pending_size >= 1 << 15:
            self._flush()

    def add_lines(self, lines: list[bytes], size: int) -> None:
        """Entries as the last record holds them (entry_line), `size` bytes of regular files in all."""
        self._flush()
        self.out.write(b"".join(lines))
        for i in range(-self.count % self.mark_every, len(lines), self.mark_every):
            self.marks.append((self.count + i, lines[i][:lines[i].index(b"\0")]))
        self.count += len(lines)
        self.size += size

    def finish_part(self) -> dict:
        """Close a part of a scan's record (cryptsnap.scan) for the run to adopt: what adopt() needs
        besides its files."""
        self._flush()
        self.out.close()
        if self.taken is not None:
            self.taken.close()
        return {"count": self.count, "size": self.size, "marks": self._stored_marks()}

    def adopt(self, part: Path, finished: dict) -> None:
        """Append the entries of a part of the scan (a RecordWriter(part) that finish_part()
        closed), in order, with its digests to check at commit."""
        self._flush()
        self.out.close()  # ends this gzip member: the part's are appended as they are
        entries, taken = (part.with_name(part.name + suffix) for suffix in (".entries", ".taken"))
        with open(entries, "rb") as written, open(self.entries_file, "ab") as out:
            shutil.copyfileobj(written, out)
        self.out = gzip.open(self.entries_file, "ab", compresslevel=1)
        if taken.exists():
            if self.taken is None:
                self.taken = open(self.taken_file, "wb")  # noqa: SIM115 (closed by commit or discard)
            with open(taken, "rb") as written:
                shutil.copyfileobj(written, self.taken)
        self.marks += [(self.count + index, path) for index, path in _marks(finished["marks"])]
        self.count += finished["count"]
        self.size += finished["size"]

    def digest_later(self, start: Callable[[Path], Digester]) -> None:
        """The walk is done, its regular files added without digests: close its entries and
        have start(entries file) take them while the run goes on (digests.Digests, a process
        of its own). wait_digests() takes its result in."""
        self._flush()
        self.out.close()
        self.later = start(self.entries_file)

    def wait_digests(self) -> None:
        """The entries with digests, once digest_later's process is done (if it failed, they
        stay without: the next run copies a file whose attributes alone changed)."""
        if self.later is None:
            return
        done, self.later = self.later.wait(), None
        if done:
            entries, taken = done
            os.replace(entries, self.entries_file)
            os.replace(taken, self.taken_file)
            self.taken = open(self.taken_file, "ab")  # noqa: SIM115 (closed by commit or discard)

    def _stored_marks(self) -> list[list]:
        """The marks as the header holds them (read by _marks)."""
        return [[index, path.hex()] for index, path in self.marks]

    def _flush(self) -> None:
        if not self.pending:
            return
        self.out.write(b"".join(self.pending))
        self.pending.clear()
        self.pending_size = 0

    def commit(self, generation: int, snapshot: str, settings: str) -> None:
        self.wait_digests()
        self._flush()
        self.out.close()
        self._forget_unstable_digests()
        header = json.dumps({"format": FORMAT, "generation": generation, "snapshot": snapshot,
                             "settings": settings, "count": self.count,
                             "marks": self._stored_marks()})  # fmt: skip
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            out.write(gzip.compress(header.encode() + b"\n", compresslevel=1))
            with open(self.entries_file, "rb") as entries:
                shutil.copyfileobj(entries, out)
        os.replace(tmp, self.path)
        self.entries_file.unlink()

    def _forget_unstable_digests(self) -> None:
        """Mark unknown the digests of files that changed since the walk (their copy in the
        snapshot may hold other bytes): rewrite the entries when there are any."""
        if self.taken is None:
            return
        self.taken.close()
        changed = set()
        try:
            with open(self.taken_file, "rb") as taken:
                for name, st, _ in read_entries(taken):
                    try:
                        if _stat(os.lstat(b"/" + name)) != st:
                            changed.add(name)
                    except OSError:
                        changed.add(name)
        finally:
            self.taken_file.unlink(missing_ok=True)
        if not changed:
            return
        log.info("%d files changed while they were copied: their content is compared in full next time", len(changed))
        kept = self.entries_file.with_name(self.entries_file.name + ".new")
        with gzip.open(self.entries_file, "rb") as entries, gzip.open(kept, "wb", compresslevel=1) as out:
            for name, st, digest in read_entries(entries):
                out.write(entry_line(name, st, None if name in changed else digest))
        os.replace(kept, self.entries_file)

    def discard(self) -> None:
        if self.later is not None:
            self.later.stop()
            self.later = None
        self.out.close()
        self.entries_file.unlink(missing_ok=True)
        if self.taken is not None:
            self.taken.close()
        self.taken_file.unlink(missing_ok=True)
