"""What changed since the last snapshot, found on the local disk instead of in the image.

rsync decides what to copy by comparing each source file with its copy in the snapshot,
which means reading every inode and directory of the image through the network, every run.
Instead, after each run cryptsnap keeps a record of what it backed up (path, type, owner,
size, mtime, ctime of every entry) next to the generation counter of the image it went into.
The next run walks the sources locally, compares them with the record, and gives rsync only
the entries that differ (--files-from); it deletes the vanished ones itself. The image is
read only where something changed.

The record is trusted only for the image and snapshot it describes: if the image's
generation or its newest snapshot is not the one recorded, or the sources or excludes
changed, the run falls back to rsync's full compare and writes a new record.

The walk must select exactly what rsync selects. It applies the target's excludes with
rsync's rules (see Filter); patterns outside the subset handled here turn the record off
(full compare every run) instead of guessing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# (st_mode, st_uid, st_gid, st_size, st_mtime_ns, st_ctime_ns). ctime changes with every
# chmod, chown, xattr or ACL change, rename and new hard link, none of which touch mtime.
Stat = tuple[int, int, int, int, int, int]
FORMAT = 1


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


def scan(sources: Iterable[str], excludes: Iterable[str], one_file_system: bool) -> dict[bytes, Stat]:
    """Every entry rsync would send for these sources: relative path (bytes) -> Stat.

    Includes the directories above each source, which rsync --relative sends as well.
    """
    rules = Filter(excludes)
    entries: dict[bytes, Stat] = {}
    for source in sources:
        root = os.fsencode(os.path.abspath(source)).rstrip(b"/") or b"/"
        parts = [p for p in root.split(b"/") if p]
        for depth in range(1, len(parts)):
            above = b"/" + b"/".join(parts[:depth])
            entries[above[1:]] = _stat(os.lstat(above))
        try:
            top = os.lstat(root)
        except FileNotFoundError:
            continue  # rsync reports it; the full compare path will fail loudly on it
        relative = root[1:]
        if relative and rules.excluded(os.fsdecode(relative), stat.S_ISDIR(top.st_mode)):
            continue
        if relative:
            entries[relative] = _stat(top)
        if stat.S_ISDIR(top.st_mode):
            entries.update(_walk(root, top.st_dev, rules, one_file_system))
    return entries


def _walk(directory: bytes, device: int, rules: Filter, one_file_system: bool) -> Iterator[tuple[bytes, Stat]]:
    stack = [directory]
    while stack:
        current = stack.pop()
        try:
            listing = list(os.scandir(current))
        except (PermissionError, FileNotFoundError) as exc:
            log.warning("cannot read %s: %s", os.fsdecode(current), exc)
            continue
        for entry in listing:
            path = entry.path
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # vanished while we looked
            is_dir = stat.S_ISDIR(st.st_mode)
            relative = path[1:]
            if rules.excluded(os.fsdecode(relative), is_dir):
                continue
            yield relative, _stat(st)
            if is_dir and (not one_file_system or st.st_dev == device):
                stack.append(path)


@dataclass
class Difference:
    changed: list[bytes]  # new or different: rsync copies these (sorted, parents first)
    deleted: list[bytes]  # gone, or changed type: removed from the snapshot first

    @property
    def empty(self) -> bool:
        return not self.changed and not self.deleted


def compare(old: dict[bytes, Stat], new: dict[bytes, Stat]) -> Difference:
    changed, deleted = [], []
    for path, now in new.items():
        before = old.get(path)
        if before != now:
            changed.append(path)
            if before is not None and stat.S_IFMT(before[0]) != stat.S_IFMT(now[0]):
                deleted.append(path)  # a file that became a directory (or the reverse)
    deleted.extend(path for path in old if path not in new)
    return Difference(sorted(changed), sorted(deleted))


def settings_digest(target) -> str:
    """What the record depends on besides the files: other sources or excludes mean another tree."""
    text = json.dumps([list(target.sources), list(target.excludes), target.one_file_system])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Record:
    """The files of one snapshot, stored locally: state_dir/TARGET/files.gz."""

    generation: int  # the image's generation counter after the run that wrote `snapshot`
    snapshot: str
    settings: str  # settings_digest of the target when the record was made
    entries: dict[bytes, Stat]

    def save(self, path: Path) -> None:
        header = json.dumps({"format": FORMAT, "generation": self.generation, "snapshot": self.snapshot,
                             "settings": self.settings, "count": len(self.entries)})  # fmt: skip
        tmp = path.with_name(path.name + ".tmp")
        # NUL-separated: file names may hold any byte but NUL. level 1: it is rewritten every run.
        with gzip.open(tmp, "wb", compresslevel=1) as out:
            out.write(header.encode() + b"\n")
            for name, st in self.entries.items():
                out.write(name + b"\0" + " ".join(map(str, st)).encode() + b"\0")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Record | None:
        """The saved record, or None when there is none or it cannot be read (then: full compare)."""
        try:
            with gzip.open(path, "rb") as source:
                header = json.loads(source.readline())
                fields = source.read().split(b"\0")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as exc:
            log.warning("ignoring the unreadable file record %s (%s); this run compares everything", path, exc)
            return None
        if header.get("format") != FORMAT:
            return None
        entries = {}
        for i in range(0, len(fields) - 1, 2):
            entries[fields[i]] = tuple(int(x) for x in fields[i + 1].split())
        if len(entries) != header.get("count"):
            log.warning("the file record %s is incomplete; this run compares everything", path)
            return None
        return cls(header["generation"], header["snapshot"], header["settings"], entries)
