"""A tree unpacked anew over itself (a release tarball, a package upgrade): every file gets a
new mtime, few get new bytes. snapshot.write_snapshot on a real btrfs over a loop device with
the real rsync: the files whose content is as recorded get their attributes set and share
their data with the previous snapshot; only the changed bytes are written (issue 13, item 4:
docs/performance.md, the realistic workload)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cryptsnap import changes, runner
from tests.support import loopfs

FILES, SIZE = 300, 64 << 10


SECOND = 1_700_000_000 * 10**9


def _unpack_anew(source: Path, contents: dict[str, bytes], mtime_ns: int) -> None:
    """As tar does: each file made again (new inode, new mtime), with the bytes it is given."""
    for name, data in contents.items():
        path = source / name
        path.unlink(missing_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(mtime_ns, mtime_ns))


def _extents(path: Path) -> list[str]:
    """The physical extents of a file (filefrag): equal for two files that share their data."""
    lines = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split(":")[2].strip() for line in lines.splitlines() if line.strip()[:1].isdigit()]


def test_files_unpacked_anew_with_the_same_bytes_get_their_attributes_not_a_copy(tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    contents = {f"f{i:03d}": os.urandom(SIZE) for i in range(FILES)}
    _unpack_anew(source, contents, SECOND + 100)
    target = loopfs.target(tmp_path, source)
    record = tmp_path / "record.gz"
    fs = tmp_path / "fs"
    argvs = []
    for name in ("run", "stream"):
        real = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda argv, *a, _real=real, **k: (argvs.append(argv), _real(argv, *a, **k))[1])
    with loopfs.btrfs(tmp_path / "image", fs) as device:
        (fs / "snapshots").mkdir()
        first = loopfs.backup(fs, target, record, 0)
        # The next version: every file made again, 3 with other bytes, 1 with another mode and
        # an xattr (attributes rsync sets for a file it does not copy), 1 new. Their mtimes in
        # the same second as before: rsync's quick check alone would take them for unchanged.
        changed = {name: os.urandom(SIZE) for name in ("f010", "f100", "f200")}
        _unpack_anew(source, {**contents, **changed, "new": b"new file"}, SECOND + 200)
        os.chmod(source / "f050", 0o600)
        os.setxattr(source / "f050", "user.tag", b"v2")
        argvs.clear()
        before = loopfs.device_written(device)
        second = loopfs.backup(fs, target, record, 1)
        written = loopfs.device_written(device) - before

        old, new = (fs / "snapshots" / name / source.relative_to("/") for name in (first, second))
        itemized = subprocess.run(["rsync", "-rlptgoAXnci", "--delete", f"{source}/", f"{new}/"], check=True,
                                  capture_output=True, text=True).stdout  # fmt: skip
        assert itemized == "", f"the snapshot differs from the source (content or attributes):\n{itemized}"
        assert os.getxattr(new / "f050", "user.tag") == b"v2" and (new / "f050").stat().st_mode & 0o777 == 0o600
        for name in contents:
            shared = _extents(old / name) == _extents(new / name)
            assert shared == (name not in changed), f"{name}: shares its data with the last snapshot: {shared}"
    copies = [argv for argv in argvs if argv[0] == "rsync" and "--size-only" not in argv]
    touches = [argv for argv in argvs if argv[0] == "rsync" and "--size-only" in argv]
    assert len(copies) == 1 and len(touches) == 1, argvs
    # What was written: the 3 changed files and metadata, not the 300 files made again (19 MiB).
    assert written < len(changed) * SIZE + (4 << 20), f"{written:,} bytes written for {len(changed) * SIZE:,} changed"
    digests = {os.path.basename(name): d for name, st, d in changes.Record.load(record).entries_with_digests()
               if st[0] & 0o100000}  # fmt: skip
    assert len(digests) == FILES + 1 and all(digests[os.fsencode(name)] for name in contents)
    assert digests[b"new"] is None  # 8 bytes, kept inline: copied again when touched (changes.INLINE_MAX)

