"""A first backup's content digests, taken beside rsync instead of before it.

Without a record to compare with (a first backup, a full compare) rsync copies the whole tree,
and every regular file needs a digest in the new record only for later runs (a file whose
attributes alone change: scan.TOUCHED). Nothing in this run reads them, and the commit checks
each against the file's state at the walk anyway (changes.RecordWriter.commit: a file that
changed since gets "unknown"). So the walk writes its entries without them, and this process,
started as rsync starts, reads those entries and writes them again with the digests: the
local reading and hashing of the whole tree, which came before the upload, runs beside it on
what rsync and the link leave idle (docs/performance.md, "A first backup's digests").
Run as `python3 -m cryptsnap.digests ENTRIES INTO TAKEN`.
"""

from __future__ import annotations

import gzip
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

from . import changes, runner

log = logging.getLogger(__name__)


class Digests:
    """The digests of a walk's entries (its `entries` file, closed) being taken in a process
    of its own, into files next to them; a cancel stops it with the run's other commands."""

    def __init__(self, entries: Path):
        self.into = entries.with_name(entries.name + ".digested")
        self.taken = entries.with_name(entries.name + ".digested-taken")
        self.process = runner.start([sys.executable, "-m", "cryptsnap.digests", str(entries), str(self.into),
                                     str(self.taken)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip

    def wait(self) -> tuple[Path, Path] | None:
        """The entries with their digests and the digests taken (for the commit's check);
        None when they could not be taken: the record then holds no digests this time."""
        if self.process.poll() is None:
            log.info("the copy is done; waiting for the content digests of the new record")
        code = self.process.wait()
        runner.stop(self.process)
        if code == 0:
            return self.into, self.taken
        log.warning("the content digests could not be taken (exit %d): a file whose attributes alone change "
                    "before the next run is copied whole then", code)  # fmt: skip
        self.remove()
        return None

    def stop(self) -> None:
        runner.stop(self.process)
        self.remove()

    def remove(self) -> None:
        self.into.unlink(missing_ok=True)
        self.taken.unlink(missing_ok=True)


def digest_entries(entries: Path, into: Path, taken: Path) -> None:
    """Write `entries` again into `into` with a digest for each regular file (where one can be
    taken: changes.file_digest), and the entries of the digests taken into `taken`."""
    with (gzip.open(entries, "rb") as walked, gzip.open(into, "wb", compresslevel=1) as out,
          open(taken, "wb") as took):  # fmt: skip
        lines: list[bytes] = []
        took_lines: list[bytes] = []
        for name, st, digest in changes.read_entries(walked):
            if stat.S_ISREG(st[0]):
                digest = changes.file_digest(b"/" + name, st)
            line = changes.entry_line(name, st, digest)
            lines.append(line)
            if digest:
                took_lines.append(line)
            if len(lines) >= 1024:  # a write per entry costs more than the entry
                out.write(b"".join(lines))
                took.write(b"".join(took_lines))
                lines.clear()
                took_lines.clear()
        out.write(b"".join(lines))
        took.write(b"".join(took_lines))


def main() -> int:
    entries, into, taken = map(Path, sys.argv[1:4])
    os.nice(10)  # the copy comes first: this takes what rsync, ssh and dm-crypt leave idle
    digest_entries(entries, into, taken)
    return 0


if __name__ == "__main__":
    sys.exit(main())
