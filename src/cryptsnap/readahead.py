"""Copy a tree out of an opened snapshot, reading its small files ahead of rsync, many at once.

rsync reads one file at a time. Under a restore each read of a file not yet cached is a round
trip to the server (btrfs -> dm-crypt -> the loop device -> sshfs), so a tree of small files
restores at one file per round trip however fast the link is: 2,000 files of 4 KiB took
26.7 s behind a 10 ms round trip (docs/performance.md). Reading the next files from several
threads keeps that many round trips in flight, and rsync then finds them in the page cache.

Bounded by what rsync has copied (its --info=progress2 byte count), so that a large restore
does not push out of the page cache what was read ahead before rsync gets to it: the reading
stays at most `window` bytes ahead. Large files are left to the kernel's own readahead, which
already keeps the link busy on a file read from start to end. A read that fails is only a
read not done ahead: rsync reads the file itself and reports what is wrong with it.
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


def in_rsync_order(top: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Regular files under `top` in the order rsync copies them: a directory's files by their
    bytes, then each subdirectory's tree, the subdirectories ordered as if their names ended
    in "/" (rsync's sort: "a.b" before "a"). A file with several names comes once: rsync
    copies it once."""
    seen: set[tuple[int, int]] = set()
    for directory, dirs, files in os.walk(top):
        dirs.sort(key=lambda name: os.fsencode(name) + b"/")
        for name in sorted(files, key=os.fsencode):
            path = Path(directory, name)
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            yield path, st


class ReadAhead:
    """Threads reading the small regular files under `top` in rsync's order, staying within
    `window` bytes of the count `copied` is told. A context manager: leaving it stops them."""

    def __init__(self, top: Path | None, threads: int = THREADS, window: int = WINDOW, small: int = SMALL):
        self.window, self.small = window, small
        self.figures = Figures()
        self._files = in_rsync_order(top) if top else iter(())  # None: nothing to read ahead
        self._position = 0  # bytes of every file handed out or passed, in rsync's order
        self._copied = 0
        self._stopped = False
        self._turn = threading.Condition()
        self._threads = [threading.Thread(target=self._read, daemon=True) for _ in range(threads)]

    def __enter__(self) -> ReadAhead:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._turn:
            self._stopped = True
            self._turn.notify_all()
        # Before the stack is unwound, which cannot unmount a file system with files open. A
        # thread ends with its current file; a read on a lost connection fails once ssh's
        # keepalive (the connection watch) has ended sshfs.
        deadline = time.monotonic() + JOIN_LIMIT
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def copied(self, transferred: int) -> None:
        with self._turn:
            self._copied = max(self._copied, transferred)
            self._turn.notify_all()

    def _next(self) -> Path | None:
        """The next small file to read, once it is within the window; None when done or stopped."""
        with self._turn:
            while not self._stopped:
                try:
                    path, st = next(self._files)
                except StopIteration:
                    return None
                start, self._position = self._position, self._position + st.st_size
                if not 0 < st.st_size <= self.small:
                    continue
                self._turn.wait_for(lambda s=start: self._stopped or s - self._copied <= self.window)
                if self._stopped:
                    return None
                if start + st.st_size <= self._copied:  # rsync is past it
                    self.figures.skipped += 1
                    continue
                self.figures.most_ahead = max(self.figures.most_ahead, start + st.st_size - self._copied)
                return path
            return None

    def _read(self) -> None:
        while path := self._next():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                got = 0
                while chunk := os.read(fd, CHUNK):
                    got += len(chunk)
            except OSError:
                continue
            finally:
                os.close(fd)
            with self._turn:
                self.figures.files += 1
                self.figures.bytes += got


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
