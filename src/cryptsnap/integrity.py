"""`cryptsnap check`: a routine integrity check that downloads a small, bounded part of the image.

Each check, within a download budget (1% of the image by default, the whole run counted):

- the image's LUKS header (both metadata copies and the key slot areas) must equal the
  local header backup: restoring with stock tools needs the server's copy intact;
- the image's generation counter must not be behind this machine's (no rollback);
- the next slice of the newest snapshot's files is read back. btrfs verifies every data
  block against its checksum as it reads it (a damaged block is an I/O error); ext2/ext4
  can only show blocks that cannot be read. A cursor kept locally makes successive checks
  continue where the last stopped, so about 1/fraction checks cover the whole snapshot.

The files to read come from the local record of the newest snapshot when it matches (no
directory of the image is walked); otherwise the snapshot is walked in sorted order.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import changes, commands, runner, snapshot
from .errors import IntegrityError
from .state import TargetState

log = logging.getLogger(__name__)

CHUNK = 1 << 20
CLOSE_ALLOWANCE = 64 << 10  # what unmounting and closing download after the check (measured ~40 KB)


@dataclass
class CheckReport:
    header_bytes: int = 0
    generation: int = 0
    snapshot: str = ""
    files_read: int = 0
    bytes_read: int = 0
    first: str = ""
    last: str = ""
    wrapped: bool = False  # the cursor went past the last file and started over
    problems: list[str] = field(default_factory=list)


def header_ranges(header_backup: Path) -> list[tuple[int, int]]:
    """(offset, length) of every used part of the LUKS2 header area: both metadata copies, key slots."""
    dump = json.loads(runner.run(commands.luks_metadata(str(header_backup))).stdout)
    metadata = 4096 + int(dump["config"]["json_size"])  # binary header + JSON area, one copy
    ranges = [(0, 2 * metadata)]
    for slot in dump["keyslots"].values():
        ranges.append((int(slot["area"]["offset"]), int(slot["area"]["size"])))
    return ranges


def compare_header(image: Path, header_backup: Path) -> tuple[int, list[str]]:
    """Compare the image's header with the local backup; return (bytes compared, problems)."""
    compared, problems = 0, []
    with open(image, "rb") as remote, open(header_backup, "rb") as local:
        for offset, length in header_ranges(header_backup):
            remote.seek(offset)
            local.seek(offset)
            if remote.read(length) != local.read(length):
                problems.append(f"the image's LUKS header differs from the local backup in bytes "
                                f"{offset}..{offset + length} (restore it: cryptsetup luksHeaderRestore "
                                f"IMAGE --header-backup-file {header_backup})")  # fmt: skip
            compared += length
    return compared, problems


def files_in_order(root: Path, record: changes.Record | None, after: bytes) -> Iterator[bytes]:
    """Regular files of a snapshot (paths relative to it), sorted, from just after `after`."""
    if record is not None:
        yield from sorted(p for p, st in record.entries.items() if stat.S_ISREG(st[0]) and p > after)
        return
    yield from _walk_sorted(os.fsencode(root), b"", after)


def _walk_sorted(top: bytes, relative: bytes, after: bytes) -> Iterator[bytes]:
    try:
        names = sorted(os.listdir(os.path.join(top, relative) if relative else top))
    except OSError:
        return
    for name in names:
        path = relative + b"/" + name if relative else name
        # Skip what sorts before the cursor without reading it: a directory is entered only
        # if the cursor lies inside it or before it.
        if path <= after and not after.startswith(path + b"/"):
            continue
        full = os.path.join(top, path)
        mode = os.lstat(full).st_mode
        if stat.S_ISDIR(mode):
            yield from _walk_sorted(top, path, after)
        elif stat.S_ISREG(mode) and path > after:
            yield path


def read_back(fs: Path, target, state: TargetState, budget_left: Callable[[], int], report: CheckReport) -> None:
    """Read the next slice of the newest snapshot's files while budget_left() stays positive."""
    names = snapshot.list_snapshots(fs)
    if not names:
        return
    report.snapshot = newest = names[-1]
    root = snapshot.snapshots_dir(fs) / newest
    record = changes.Record.load(state.file_record)
    if record is not None and record.snapshot != newest:
        record = None
    cursor_file = state.dir / "check-cursor.json"
    try:
        cursor = json.loads(cursor_file.read_text())
        after = os.fsencode(cursor["after"]) if cursor.get("snapshot") == newest else b""
    except (OSError, ValueError, KeyError):
        after = b""
    start = after
    for attempt in range(2):  # past the end: start over once, up to where this check began
        for path in files_in_order(root, record, after):
            if budget_left() <= 0 or (attempt == 1 and path > start):
                break
            _read_file(root, path, report)
            after = path
        else:
            if attempt == 0 and start and budget_left() > 0:
                report.wrapped, after = True, b""
                continue
        break
    tmp = cursor_file.with_name(cursor_file.name + ".tmp")
    tmp.write_text(json.dumps({"snapshot": newest, "after": os.fsdecode(after)}) + "\n")
    os.replace(tmp, cursor_file)


def _read_file(root: Path, path: bytes, report: CheckReport) -> None:
    full = os.path.join(os.fsencode(root), path)
    shown = os.fsdecode(path)
    try:
        with open(full, "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                report.bytes_read += len(chunk)
    except OSError as exc:
        report.problems.append(f"/{shown} in snapshot {report.snapshot} cannot be read back: {exc.strerror} "
                               f"(a damaged block: its checksum does not match, or it is unreadable)")
        log.error("integrity: /%s: %s", shown, exc)
    report.files_read += 1
    report.first = report.first or "/" + shown
    report.last = "/" + shown


def raise_on_problems(report: CheckReport) -> None:
    if report.problems:
        raise IntegrityError("the check found problems:\n  " + "\n  ".join(report.problems))
