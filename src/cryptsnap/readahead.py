"""Copy a tree out of an opened snapshot, reading its small files ahead of rsync, many at once.

rsync reads one file at a time. Under a restore each read of a file not yet cached is a round
trip to the server (btrfs -> dm-crypt -> the loop device -> sshfs), so a tree of small files
restores at one file per round trip however fast the link is: 2,000 files of 4 KiB took
26.7 s behind a 10 ms round trip (docs/performance.md). Reading the next files from several
threads keeps that many round trips in flight, and rsync then finds them in the page cache.

The walk hands out names only, from the directories' entries: the threads open and stat the
files. A stat is a round trip too, and for a file btrfs keeps inline in its metadata it is the
one that fetches the file's bytes, so a walk that stats each file itself is one round trip
after another, as rsync is (20,000 files of 1 KiB behind 1 ms: 25-26 s stating in the walk,
7-9 s stating in the threads; in the guest 117 -> 202 files/s; docs/performance.md).

Bounded by what rsync has copied (its --info=progress2 byte count), so that a large restore
does not push out of the page cache what was read ahead before rsync gets to it: a file is read
only when it starts at most `window` bytes ahead. Where a file starts is known once every file
before it has been stated, so a thread states its file, then waits for its turn. Large files
are left to the kernel's own readahead, which already keeps the link busy on a file read from
start to end. A read that fails is only a read not done ahead: rsync reads the file itself and
reports what is wrong with it.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import commands, runner
from .snapshot import progress_reader

THREADS = 16  # round trips in flight: 8 and 32 were 6.4x and 7.3x as fast as 1 behind 10 ms
WINDOW = 64 << 20
SMALL = 256 << 10  # larger files: the kernel's readahead on rsync's own reads
CHUNK = 256 << 10
JOIN_LIMIT = 120  # seconds: beyond any keepalive limit of a lost connection


@dataclass
class Figures:
    files: int = 0  # files read ahead
    bytes: int = 0
    skipped: int = 0  # small files rsync had copied before the reading got to them
    most_ahead: int = 0  # the furthest the reading got ahead of rsync, in bytes


def in_rsync_order(top: str | Path) -> Iterator[str]:
    """The regular files under `top`, by the types in the directories' entries (no stat), in
    the order rsync copies them: a directory's files by their bytes, then each subdirectory's
    tree, the subdirectories ordered as if their names ended in "/" (rsync's sort: "a.b"
    before "a")."""
    directories = [os.fspath(top)]
    while directories:
        directory = directories.pop()
        files, subdirectories = [], []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subdirectories.append(entry.name)
                        elif entry.is_file(follow_symlinks=False):
                            files.append(entry.path)
                    except OSError:  # an entry without a type, whose stat failed: rsync's to report
                        continue
        except OSError:
            continue
        yield from sorted(files, key=os.fsencode)
        subdirectories.sort(key=lambda name: os.fsencode(name) + b"/", reverse=True)  # popped last first
        directories.extend(os.path.join(directory, name) for name in subdirectories)


class ReadAhead:
    """Threads reading the small regular files under `top` in rsync's order, staying within
    `window` bytes of the count `copied` is told. A context manager: leaving it stops them."""

    def __init__(self, top: Path | None, threads: int = THREADS, window: int = WINDOW, small: int = SMALL):
        self.window, self.small = window, small
        self.figures = Figures()
        self._files = enumerate(in_rsync_order(top) if top else ())  # None: nothing to read ahead
        # Each file handed out is numbered; its start in rsync's byte count is known once every
        # file before it has been stated. `_found` holds what the threads found, by number,
        # until the files before are known too; `_starts` the start of each known file that a
        # thread waits to read.
        self._found: dict[int, tuple[int, tuple[int, int] | None, bool]] = {}
        self._starts: dict[int, int] = {}
        self._known = 0  # files numbered below this have a start
        self._position = 0  # bytes of the files before `_known`, in rsync's order
        self._linked: set[tuple[int, int]] = set()  # files with several names: rsync copies them once
        self._copied = 0
        self._stopped = False
        self._lock = threading.Lock()
        # Threads waiting for their file's turn, by file number: each is woken only when its
        # own turn comes (waking all of them at every file cost more than the reading did).
        self._waiting: dict[int, threading.Condition] = {}
        self._threads = [threading.Thread(target=self._read, daemon=True) for _ in range(threads)]

    def __enter__(self) -> ReadAhead:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._stopped = True
            self._wake()
        # Before the stack is unwound, which cannot unmount a file system with files open. A
        # thread ends with its current file; a read on a lost connection fails once ssh's
        # keepalive (the connection watch) has ended sshfs.
        deadline = time.monotonic() + JOIN_LIMIT
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def copied(self, transferred: int) -> None:
        with self._lock:
            self._copied = max(self._copied, transferred)
            self._wake()

    def _take(self) -> tuple[int, str] | None:
        with self._lock:
            if self._stopped:
                return None
            return next(self._files, None)

    def _stated(self, number: int, st: os.stat_result | None) -> bool:
        """Note what the thread with file `number` found (None: it could not tell); whether the
        file is small enough to read ahead."""
        small = st is not None and stat.S_ISREG(st.st_mode) and 0 < st.st_size <= self.small
        linked = (st.st_dev, st.st_ino) if st is not None and st.st_nlink > 1 else None
        with self._lock:
            self._found[number] = st.st_size if st else 0, linked, small
            advanced = False
            while self._known in self._found:
                size, linked, reading = self._found.pop(self._known)
                if linked in self._linked:  # counted once, under its first name
                    size, reading = 0, False
                elif linked:
                    self._linked.add(linked)
                if reading:
                    self._starts[self._known] = self._position
                self._position += size
                self._known += 1
                advanced = True
            if advanced:
                self._wake()
        return small

    def _wanted(self, number: int, size: int, turn: threading.Condition) -> bool:
        """Wait on `turn` (the thread's own) until small file `number` is within the window;
        whether to read it."""
        with self._lock:
            self._waiting[number] = turn
            turn.wait_for(lambda: self._stopped or self._within(number))
            del self._waiting[number]
            start = self._starts.pop(number, None)
            if self._stopped or start is None:
                return False
            if start + size <= self._copied:  # rsync is past it
                self.figures.skipped += 1
                return False
            self.figures.most_ahead = max(self.figures.most_ahead, start + size - self._copied)
            return True

    def _wake(self) -> None:
        """Wake the threads whose turn has come (all of them once stopped). Under the lock."""
        for number, turn in self._waiting.items():
            if self._stopped or self._within(number):
                turn.notify()

    def _within(self, number: int) -> bool:
        """Whether file `number`'s start is known and within the window (or it is not to be read)."""
        if self._known <= number:
            return False
        start = self._starts.get(number)
        return start is None or start - self._copied <= self.window

    def _read(self) -> None:
        buffer = bytearray(CHUNK)
        turn = threading.Condition(self._lock)
        while taken := self._take():
            number, path = taken
            fd, st = self._open(path)
            # Every number handed out is stated, whatever happened, or the files after it wait.
            small = self._stated(number, st)
            if fd is None:
                continue
            try:
                if not (small and self._wanted(number, st.st_size, turn)):
                    continue
                got = 0
                while n := os.readv(fd, [buffer]):
                    got += n
            except OSError:
                continue
            finally:
                os.close(fd)
            with self._lock:
                self.figures.files += 1
                self.figures.bytes += got

    @staticmethod
    def _open(path: str) -> tuple[int | None, os.stat_result | None]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None, None
        try:
            return fd, os.fstat(fd)
        except OSError:
            os.close(fd)
            return None, None


def copy_out(source: Path, destination: str, threads: int = THREADS) -> Figures:
    """rsync `source` (a directory's contents, or a file) to `destination`, read ahead by
    `threads` threads (0: rsync alone). What was read ahead, for the benchmark."""
    tree = source.is_dir() and not source.is_symlink()  # a symlink is copied as one, not followed
    if tree:
        Path(destination).mkdir(parents=True, exist_ok=True)
        argv = commands.rsync_restore(str(source) + "/", destination.rstrip("/") + "/", progress=True)
    else:
        argv = commands.rsync_restore(str(source), destination, progress=True)
    with ReadAhead(source if tree else None, threads) as ahead:
        runner.stream(argv, progress_reader(lambda fraction, transferred: ahead.copied(transferred)))
    return ahead.figures
