"""Finding what changed since the last snapshot: the sources walked against the local record
(changes), into a new record and the lists rsync works from (Found).

With a large record the walk is cut into parts of the record order, one per processor, and
each part is walked and compared in a process of its own (`python3 -m cryptsnap.scan`, a
job in JSON on stdin); the run's own process takes the first. A nothing-changed scan of 10^6
files is the walk's system calls and a little Python per entry, both of which the parts
share out (docs/performance.md, "The scan in parts"). The parts' records and lists are
appended in order, so the result is the one a single walk gives. The cuts are entries the
last record marked (changes.MARK): a record without marks is scanned in one process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import changes, digests, logs, runner
from .config import Target
from .errors import SourceMissing

log = logging.getLogger(__name__)

TOUCHED = "touched"  # a file whose attributes changed, not its content
LISTS = ("changed", "touched", "deleted")
MAX_PARTS = 4  # processes of a scan at most
PART_MIN = 2 * changes.MARK  # entries of a part at least: fewer are not worth a process


class Found:
    """What changed since the record, as the scan found it: the paths rsync is to copy (NUL-
    separated, for --files-from), the files whose attributes alone changed (`touched`: same
    size and content digest as recorded), and those to delete first, in temporary files
    (10^6 changed paths need not fit in memory). part: the lists of one part of a scan, in
    files named after it (PART.changed...), kept for the run to adopt."""

    def __init__(self, work_dir: Path | None, part: Path | None = None):
        if part is None:
            self.listing, self.touched_file, self.deleted_file = (
                tempfile.NamedTemporaryFile(dir=work_dir, prefix=f"{name}.") for name in LISTS)  # fmt: skip
        else:
            self.listing, self.touched_file, self.deleted_file = (
                open(f"{part}.{name}", "w+b") for name in LISTS)  # noqa: SIM115 (closed by close())  # fmt: skip
        self.changed = self.touched = self.deleted = self.changed_bytes = 0

    @property
    def empty(self) -> bool:
        return not (self.changed or self.touched or self.deleted)

    def add(self, kind: str, path: bytes, st: changes.Stat | None = None) -> None:
        if kind == TOUCHED:
            self.touched_file.write(path + b"\0")
            self.touched += 1
        elif kind == changes.CHANGED:
            self.listing.write(path + b"\0")
            self.changed += 1
            self.changed_bytes += st[3] if st and stat.S_ISREG(st[0]) else 0
        else:
            self.deleted_file.write(path + b"\0")
            self.deleted += 1

    def counts(self) -> dict[str, int]:
        return {"changed": self.changed, "touched": self.touched, "deleted": self.deleted,
                "changed_bytes": self.changed_bytes}  # fmt: skip

    def adopt(self, part: Path, counts: dict[str, int]) -> None:
        """Append a part's lists (the files Found(..., part) wrote) after what is here."""
        for name, into in zip(LISTS, (self.listing, self.touched_file, self.deleted_file), strict=True):
            with open(f"{part}.{name}", "rb") as listed:
                shutil.copyfileobj(listed, into)
        self.changed += counts["changed"]
        self.touched += counts["touched"]
        self.deleted += counts["deleted"]
        self.changed_bytes += counts["changed_bytes"]

    def deleted_paths(self) -> Iterator[bytes]:
        self.deleted_file.flush()
        rest = b""
        with open(self.deleted_file.name, "rb") as paths:
            while chunk := paths.read(1 << 20):
                *complete, rest = (rest + chunk).split(b"\0")
                yield from complete

    def __enter__(self) -> Found:
        self.listing.flush()
        self.touched_file.flush()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.listing.close()
        self.touched_file.close()
        self.deleted_file.close()


def scan_sources(target: Target, record_to: Path | None, known: changes.Record | None, work_dir: Path | None,
                 touch: bool = True,
                 parts: int | None = None) -> tuple[changes.RecordWriter | None, Found | None]:  # fmt: skip
    """Walk the sources into a new record (at record_to, once committed); with `known`, the
    record of the previous snapshot, find what changed since, as the walk goes. touch: a file
    whose content is as recorded may get its attributes alone (Found.touched). parts: how
    many processes at most (default: one per processor, up to MAX_PARTS)."""
    if record_to is None:
        return None, None
    try:
        return _scan(target, record_to, known, work_dir, touch, parts)
    except PartFailed as exc:
        log.warning("%s: scanning again in one process", exc)
        return _scan(target, record_to, known, work_dir, touch, 1)
    except changes.RecordDamaged as exc:
        log.warning("the local record is damaged (%s): comparing every file with the image", exc)
        return _scan(target, record_to, None, work_dir, touch, 1)


def check_sources(target: Target) -> None:
    """SourceMissing unless every source exists. A source that is gone would be backed up as
    nothing: rsync fails on it only where it copies the whole tree, and a run by the local
    record finds all its entries deleted and leaves them out of the new snapshot; retention
    would in time prune the last snapshots that hold them."""
    missing = [source for source in target.sources if not os.path.lexists(source)]
    if missing:
        raise SourceMissing(f"{', '.join(missing)}: no such file or directory, in the sources of target "
                            f"{target.name}. Nothing was backed up; the snapshots so far are as they were. If it "
                            f"is on a disk, mount it; if it is gone for good, remove it from "
                            f"targets.{target.name}.sources in the configuration")  # fmt: skip


def cuts(marks: Iterable[tuple[int, bytes]], count: int, parts: int) -> list[bytes]:
    """Where to cut a record of `count` entries into up to `parts` parts of about equal size:
    the marked entries nearest to the even cuts, each part at least PART_MIN entries."""
    parts = min(parts, count // PART_MIN)
    marked = [(index, path) for index, path in marks if PART_MIN <= index <= count - PART_MIN]
    chosen: list[tuple[int, bytes]] = []
    for j in range(1, parts):
        if not marked:
            break
        index, path = min(marked, key=lambda mark: abs(mark[0] - j * count / parts))
        if not chosen or index - chosen[-1][0] >= PART_MIN:
            chosen.append((index, path))
        marked = [mark for mark in marked if mark[0] > index]
    return [path for _, path in chosen]


def _processors() -> int:
    return min(len(os.sched_getaffinity(0)), MAX_PARTS)


def _scan(target: Target, record_to: Path, known: changes.Record | None, work_dir: Path | None, touch: bool,
          parts: int | None) -> tuple[changes.RecordWriter | None, Found | None]:  # fmt: skip
    try:
        changes.Filter(target.excludes)
    except changes.UnsupportedPattern as exc:
        log.info("the exclude pattern %r is one only rsync can apply; every run compares every file", str(exc))
        return None, None
    at = cuts(known.marks, known.count, parts or _processors()) if known else []
    writer = changes.RecordWriter(record_to)
    found = None
    try:
        found = Found(work_dir) if known else None
        if at:
            _in_parts(target, record_to, known, touch, at, writer, found)
        else:
            _compare(target, known, changes.WHOLE, touch, writer, found)
        if found is None:  # rsync copies everything: the digests are for the next run
            writer.digest_later(digests.Digests)
        return writer, found
    except BaseException:  # nothing half-made is kept: neither the new record nor the lists
        writer.discard()
        if found:
            found.close()
        raise


def _compare(target: Target | Selection, known: changes.Record | None, bounds: changes.Bounds, touch: bool,
             writer: changes.RecordWriter, found: Found | None) -> int:  # fmt: skip
    """Walk the sources within `bounds` against the record's entries there, into `writer` and
    `found`; the number of the record's entries read."""
    walk = changes.walk_batches(target.sources, target.excludes, target.one_file_system, bounds.start, bounds.end)
    seen = 0

    def counted(chunks: Iterable[list[bytes]]) -> Iterator[list[bytes]]:
        nonlocal seen
        for chunk in chunks:
            seen += len(chunk) // 2
            yield chunk

    old = counted(changes.bounded(known.raw_chunks(), bounds)) if known else ()
    # Unchanged entries go to the new record as recorded: their copy in the snapshot is the one
    # recorded. What comes here is new, changed or deleted.
    for old_entry, new in changes.merged_keeping_unchanged(old, walk, writer):
        if new is None:
            found.add(changes.DELETED, old_entry[0])
            continue
        name, st = new
        if found is None:  # every file, without a record to compare with: digested beside rsync
            writer.add(name, st)
            continue
        # New or changed: its digest now, for this run and the record.
        digest = changes.file_digest(b"/" + name, st) if stat.S_ISREG(st[0]) else None
        writer.add(name, st, digest, taken=True)
        if old_entry is not None and stat.S_IFMT(old_entry[1][0]) != stat.S_IFMT(st[0]):
            found.add(changes.DELETED, old_entry[0])  # a file that became a directory (or the reverse)
        # Only regular files have digests, and the same content has the same size (which is
        # all `--size-only` compares): equal digests say all that is needed.
        same_content = touch and digest is not None and old_entry is not None and old_entry[2] == digest
        found.add(TOUCHED if same_content else changes.CHANGED, name, st)
    return seen


def _in_parts(target: Target, record_to: Path, known: changes.Record, touch: bool, at: list[bytes],
              writer: changes.RecordWriter, found: Found) -> None:  # fmt: skip
    """The scan cut at `at`: the first part here, the others each in a process of its own,
    their records and lists appended in order. RecordDamaged when a part finds the record
    damaged, or the parts together did not read all of it."""
    for stale in record_to.parent.glob(record_to.name + ".parts.*"):  # a killed run's
        shutil.rmtree(stale, ignore_errors=True)
    directory = Path(tempfile.mkdtemp(dir=record_to.parent, prefix=record_to.name + ".parts."))
    bounds = [changes.Bounds(start, end) for start, end in zip([None, *at], [*at, None], strict=True)]
    jobs = [{"sources": list(target.sources), "excludes": list(target.excludes),
             "one_file_system": target.one_file_system, "record": str(known.source), "touch": touch,
             "start": part.start.hex() if part.start is not None else None,
             "end": part.end.hex() if part.end is not None else None, "to": str(directory / f"part{i}"),
             "log": logs.settings()}
            for i, part in enumerate(bounds)]  # fmt: skip
    children: list[subprocess.Popen] = []
    try:
        for job in jobs[1:]:
            child = runner.start([sys.executable, "-m", "cryptsnap.scan"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE)  # fmt: skip
            children.append(child)
            try:
                child.stdin.write(json.dumps(job).encode())
                child.stdin.close()
            except BrokenPipeError:
                pass  # it ended at once: its exit status says so below
        results = [_part(jobs[0], known)]
        for child in children:
            out = child.stdout.read()
            try:
                if child.wait() != 0:
                    raise ValueError
                results.append(json.loads(out))
            except ValueError:
                raise PartFailed(f"a part of the scan failed (exit {child.returncode})") from None
        for result in results:
            if "damaged" in result:
                raise changes.RecordDamaged(result["damaged"])
        if sum(result["seen"] for result in results) != known.count:
            raise changes.RecordDamaged(f"the parts of the scan read {sum(r['seen'] for r in results)} "
                                        f"of its {known.count} entries")  # fmt: skip
        for job, result in zip(jobs, results, strict=True):
            writer.adopt(Path(job["to"]), result["record"])
            found.adopt(Path(job["to"]), result["found"])
    finally:
        for child in children:
            runner.stop(child)
        shutil.rmtree(directory, ignore_errors=True)


class PartFailed(Exception):
    """A part's process ended without its result: the scan is made again in one process."""


@dataclass(frozen=True)
class Selection:
    """What the walk selects: a target's sources, excludes and one_file_system (a part's job)."""

    sources: tuple[str, ...]
    excludes: tuple[str, ...]
    one_file_system: bool


def _part(job: dict, known: changes.Record | None = None) -> dict:
    """One part of a scan (see _in_parts), its record and lists at job["to"]: what the run
    needs to adopt them, or {"damaged": why}."""
    known = known or changes.Record.load(Path(job["record"]))
    if known is None:
        return {"damaged": f"{job['record']} cannot be read"}
    selection = Selection(tuple(job["sources"]), tuple(job["excludes"]), job["one_file_system"])
    bounds = changes.Bounds(*(bytes.fromhex(job[key]) if job[key] is not None else None for key in ("start", "end")))
    to = Path(job["to"])
    writer = changes.RecordWriter(to)
    found = Found(None, to)
    try:
        seen = _compare(selection, known, bounds, job["touch"], writer, found)
    except changes.RecordDamaged as exc:
        writer.discard()
        return {"damaged": str(exc)}
    finally:
        found.close()
    return {"seen": seen, "record": writer.finish_part(), "found": found.counts()}


def main() -> None:
    """A part of a scan in its own process: the job (JSON) on stdin, the result on stdout."""
    job = json.load(sys.stdin)
    logs.setup(**job["log"])  # the run's: its job tag, the journal's priorities
    json.dump(_part(job), sys.stdout)


if __name__ == "__main__":
    main()
