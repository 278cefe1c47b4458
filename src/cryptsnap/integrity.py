"""`cryptsnap check`: a routine integrity check that downloads a small, bounded part of the image.

Each check, within a download budget (1% of the image by default, the whole run counted):

- the image's LUKS header (both metadata copies and the key slot areas) must equal the
  local header backup: restoring with stock tools needs the server's copy intact;
- the image's generation counter must not be behind this machine's (no rollback);
- the server's copy of the next slice of the blocks this machine's metadata cache holds
  (cryptsnap.blockcache) must equal the cache's: backups read metadata from the cache, so
  without this, damage the server did to metadata would be seen only by a restore from the
  server alone. `--repair` writes this machine's copy back;
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

from . import changes, snapshot
from .blockcache import BLOCK, Store
from .errors import IntegrityError
from .layers import luks_metadata, open_image
from .state import TargetState

log = logging.getLogger(__name__)

CHUNK = 128 << 10
# A chunk read through btrfs, dm-crypt, the loop device and sshfs costs a little more than its
# size on the wire (SFTP and ssh framing, the odd metadata block): keep this much in hand.
CHUNK_COST = CHUNK * 5 // 4
CLOSE_ALLOWANCE = 64 << 10  # what unmounting and closing download after the check (measured ~4 KB)


@dataclass
class CheckReport:
    image_size: int = 0
    header_bytes: int = 0
    generation: int = 0
    snapshot: str = ""
    files_read: int = 0
    bytes_read: int = 0
    first: str = ""
    last: str = ""
    wrapped: bool = False  # the cursor went past the last file and started over
    cache_blocks: int = 0  # metadata blocks compared with the server's copy
    cache_note: str = ""  # why none were, or what was repaired
    problems: list[str] = field(default_factory=list)


def header_ranges(header_backup: Path) -> list[tuple[int, int]]:
    """(offset, length) of every used part of the LUKS2 header area: both metadata copies, key slots."""
    dump = luks_metadata(header_backup)
    metadata = 4096 + int(dump["config"]["json_size"])  # binary header + JSON area, one copy
    ranges = [(0, 2 * metadata)]
    for slot in dump["keyslots"].values():
        ranges.append((int(slot["area"]["offset"]), int(slot["area"]["size"])))
    return ranges


LUKS_BINARY_HEADER = 4096  # magic, version, sizes, UUID and the checksum of the header with its JSON


def primary_header_changed(image: Path, header_backup: Path) -> str:
    """Compare the first 4 KiB of the image with the local header backup ("" when equal).

    Cheap enough for every run: the binary header carries the checksum of the whole first
    metadata copy, so a zeroed or rewritten header shows here. The rest of the header area
    (key slots, the second copy) is compared by `cryptsnap check`.
    """
    fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        remote = os.pread(fd, LUKS_BINARY_HEADER, 0)
    finally:
        os.close(fd)
    with open(header_backup, "rb") as local:
        if local.read(LUKS_BINARY_HEADER) == remote:
            return ""
    state = "zeroed" if not remote.strip(b"\0") else "changed"
    return (f"the LUKS header of the image on the server is {state}: it differs from the local backup made at "
            f"`cryptsnap init`, so a restore from the server alone would fail. This machine still opens the "
            f"image with its local copy; put the header back with `cryptsetup luksHeaderRestore IMAGE "
            f"--header-backup-file {header_backup}` (docs/restore-by-hand.md)")  # fmt: skip


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


def files_in_order(root: Path, record: changes.Record | None, start: bytes) -> Iterator[bytes]:
    """Regular files of a snapshot (paths relative to it), in record order (changes.order_key),
    from `start` on (inclusive). `record` must be whole (Record.verify)."""
    first = changes.order_key(start)
    if record is not None:
        yield from (path for path, st in record.entries() if stat.S_ISREG(st[0]) and changes.order_key(path) >= first)
        return
    yield from _walk_sorted(os.fsencode(root), b"", first)


def _walk_sorted(top: bytes, relative: bytes, first: list[bytes]) -> Iterator[bytes]:
    try:
        names = sorted(os.listdir(os.path.join(top, relative) if relative else top))
    except OSError:
        return
    for name in names:
        path = relative + b"/" + name if relative else name
        key = changes.order_key(path)
        # Skip what comes before `first` without reading it: a directory is entered only if
        # `first` lies inside it or after it.
        if key < first and first[: len(key)] != key:
            continue
        mode = os.lstat(os.path.join(top, path)).st_mode
        if stat.S_ISDIR(mode):
            yield from _walk_sorted(top, path, first)
        elif stat.S_ISREG(mode) and key >= first:
            yield path


def after(path: bytes) -> bytes:
    """The smallest path that comes after `path` in record order (no file name holds a NUL byte)."""
    return path + b"\0"


def read_back(fs: Path, state: TargetState, budget_left: Callable[[], int], report: CheckReport) -> None:
    """Read the next slice of the newest snapshot's files while the budget lasts.

    The cursor (file and byte offset) is kept in STATE_DIR/TARGET/check-cursor.json, so a file
    larger than one check's budget is read across several checks.
    """
    names = snapshot.list_snapshots(fs)
    if not names:
        return
    report.snapshot = newest = names[-1]
    with snapshot.opened(fs, newest) as root:
        _read_back(root, newest, state, budget_left, report)


def _read_back(root: Path, newest: str, state: TargetState, budget_left: Callable[[], int],
               report: CheckReport) -> None:  # fmt: skip
    record = changes.Record.load(state.file_record)
    if record is not None and (record.snapshot != newest or not record.verify()):
        record = None
    cursor_file = state.dir / "check-cursor.json"
    try:
        cursor = json.loads(cursor_file.read_text())
        if cursor["snapshot"] != newest:
            raise ValueError("another snapshot")
        origin, offset = os.fsencode(cursor["next"]), int(cursor["offset"])
    except (OSError, ValueError, KeyError):
        origin, offset = b"", 0
    position = (origin, offset)
    first_pass, wrapped = True, False
    while True:
        start = origin if first_pass else b""
        stopped = False
        for path in files_in_order(root, record, start):
            if not first_pass and changes.order_key(path) >= changes.order_key(origin):
                break
            begin = offset if first_pass and path == origin else 0
            reached = _read_file(root, path, report, budget_left, begin)
            if reached is not None:  # the budget ended inside this file
                position, stopped = (path, reached), True
                break
            position = (after(path), 0)
        if stopped or not first_pass or not origin or budget_left() < CHUNK_COST:
            break
        first_pass, wrapped = False, True  # past the last file: start over, up to where this check began
    report.wrapped = wrapped
    tmp = cursor_file.with_name(cursor_file.name + ".tmp")
    tmp.write_text(json.dumps({"snapshot": newest, "next": os.fsdecode(position[0]), "offset": position[1]}) + "\n")
    os.replace(tmp, cursor_file)


def _read_file(root: Path, path: bytes, report: CheckReport, budget_left: Callable[[], int],
               offset: int = 0) -> int | None:  # fmt: skip
    """Read one file back from `offset`; None when done, else the offset where the budget ended."""
    full = os.path.join(os.fsencode(root), path)
    shown = os.fsdecode(path)
    try:
        with open(full, "rb", buffering=0) as f:
            f.seek(offset)
            while True:
                if budget_left() < CHUNK_COST:
                    return offset
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                offset += len(chunk)
                report.bytes_read += len(chunk)
    except OSError as exc:
        report.problems.append(f"/{shown} in snapshot {report.snapshot} cannot be read back: {exc.strerror} "
                               f"(a damaged block: its checksum does not match, or it is unreadable)")
        log.error("integrity: /%s: %s", shown, exc)
    report.files_read += 1
    report.first = report.first or "/" + shown
    report.last = "/" + shown
    return None


def verify_cached_blocks(image: Path, state: TargetState, budget_left: Callable[[], int], report: CheckReport,
                         repair: bool = False) -> None:  # fmt: skip
    """Compare the server's copy of the blocks the metadata cache holds with the cache's, from
    where the last check stopped, while the budget lasts; with `repair`, write the cache's
    copy over each block that differs.

    The cache is compared only while it is current: its copy of the anchor block (the btrfs
    superblock, rewritten by every commit) equals the server's. Otherwise the image was
    written without it since (a run with `metadata_cache: false`), the next backup empties
    it, and a difference would mean nothing.
    """
    size = state.image()["size"]
    store = Store(state.block_cache, state.cache_identity(), size)
    saved = store.load_saved()
    if isinstance(saved, str):
        report.cache_note = f"no metadata cache to compare with the server ({saved.partition(': ')[2] or saved})"
        return
    cursor_file = state.dir / "check-cache-cursor"
    try:
        start = int(cursor_file.read_text())
    except (OSError, ValueError):
        start = 0
    fd = open_image(image, not repair, size)
    try:
        anchor = store.saved_block(saved["anchor"])
        if anchor is None or _pread(fd, saved["anchor"], BLOCK) != anchor:
            report.cache_note = ("the metadata cache is out of date (the image was written without it since): "
                                 "nothing to compare; the next backup empties it")  # fmt: skip
            return
        position, differ = start, []
        runs = [*store.held_runs(start, CHUNK), *((o, n) for o, n in store.held_runs(0, CHUNK) if o < start)]
        for offset, length in runs:
            if budget_left() < CHUNK_COST:
                break
            server, local = _pread(fd, offset, length), store.saved_block(offset, length)
            differ += [offset + i for i in range(0, length, BLOCK) if server[i : i + BLOCK] != local[i : i + BLOCK]]
            report.cache_blocks += length // BLOCK
            position = offset + length
        if repair and differ:
            for offset in differ:
                os.pwrite(fd, store.saved_block(offset), offset)
            os.fsync(fd)
    finally:
        os.close(fd)
    cursor_file.write_text(f"{position}\n")
    if differ and repair:
        report.cache_note = f"repaired {len(differ)} blocks on the server with this machine's copy"
        log.warning("integrity: wrote this machine's copy over %d damaged blocks of %s", len(differ), image)
    elif differ:
        report.problems.append(
            f"{len(differ)} of the {report.cache_blocks} metadata blocks compared differ on the server from this "
            f"machine's copy (the first at byte {differ[0]} of the image): the server changed them (damage or "
            f"tampering). Backups from this machine read its own copy and are not affected, but a restore from "
            f"the server alone would meet the damage; `cryptsnap check {state.target.name} --repair` writes this "
            f"machine's copy back")  # fmt: skip


def _pread(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise OSError(f"the image ended at byte {offset + len(data)}")
        data += more
    return data


def raise_on_problems(report: CheckReport) -> None:
    if report.problems:
        raise IntegrityError("the check found problems:\n  " + "\n  ".join(report.problems))
