"""Source trees with the awkward cases a backup must keep, and byte/metadata manifests of them."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
from pathlib import Path

MARKER = "CRYPTSNAP-PLAINTEXT-MARKER-7f3a9c"  # must never appear in the remote image
ODD_NAME = b"caf\xe9 \x01 odd\nname"  # not UTF-8, with a control character and a newline


def build(root: Path) -> None:
    """A tree with plain files, a hard-linked pair, a symlink, odd names, a sparse file, xattrs, ACLs."""
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text(f"first file {MARKER}\n" * 50)
    (root / "docs" / "b.txt").write_text("second file\n" * 100)
    (root / "docs" / "unchanged.bin").write_bytes(os.urandom(256 * 1024))
    (root / f"name-{MARKER}.txt").write_text("the name itself is secret\n")
    (root / "linked-1").write_text("hard linked content\n")
    os.link(root / "linked-1", root / "docs" / "linked-2")
    os.symlink("docs/a.txt", root / "link-to-a")
    os.symlink("/nonexistent/absolute/target", root / "dangling")
    with open(os.path.join(os.fsencode(root), ODD_NAME), "wb") as f:
        f.write(b"odd name content\n")
    with open(root / "sparse.img", "wb") as f:
        f.seek(64 * 1024 * 1024)
        f.write(b"end")
    (root / "private").mkdir(mode=0o700)
    (root / "private" / "secret").write_text("0600 file\n")
    os.chmod(root / "private" / "secret", 0o600)
    os.chown(root / "private" / "secret", 1234, 5678)  # ownership by number: no such user here
    os.setxattr(root / "docs" / "b.txt", "user.cryptsnap", b"xattr value \x00\xff")
    subprocess.run(["setfacl", "-m", "u:1234:r", str(root / "docs" / "b.txt")], check=True)
    os.utime(root / "docs" / "b.txt", ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))


def mutate(root: Path) -> None:
    """Modify, add, delete, rename, chmod; break and make hard links; change an xattr."""
    with open(root / "docs" / "a.txt", "a") as f:
        f.write("appended in the second run\n")
    (root / "docs" / "new.txt").write_text("added in the second run\n")
    os.unlink(root / "docs" / "b.txt")
    os.rename(root / "private" / "secret", root / "private" / "renamed-secret")
    os.chmod(root / "private" / "renamed-secret", 0o640)
    os.unlink(root / "docs" / "linked-2")
    os.link(root / "docs" / "new.txt", root / "new-link")
    os.setxattr(root / f"name-{MARKER}.txt", "user.changed", b"now with an xattr")
    os.unlink(root / "link-to-a")
    os.symlink("docs/new.txt", root / "link-to-a")


def churn(directory: Path, stop: threading.Event, pause: float, made: list[int] | None = None) -> None:
    """Create files in `directory` and delete them `pause` seconds later, 40 at a time, until
    stopped, as a busy program does: a scan or an rsync that lists one finds it gone when it
    comes to read it. How many were made is appended to `made`. (Run it in a thread.)"""
    count = 0
    while not stop.is_set():
        batch = [directory / f"tmp{count + i:06}" for i in range(40)]
        for path in batch:
            path.write_bytes(b"x" * 8192)
        count += len(batch)
        stop.wait(pause)
        for path in batch:
            path.unlink()
    if made is not None:
        made.append(count)


def listed_under(listing: Path, root: Path) -> list[bytes]:
    """The paths of a scan's list (NUL-separated, relative to /) at or below ROOT: what it
    found in the tree itself. The record keeps the directories above a source too (rsync
    recreates them), and anything else on the machine may change /tmp meanwhile."""
    prefix = os.fsencode(root).lstrip(b"/")
    return [p for p in listing.read_bytes().split(b"\0") if p == prefix or p.startswith(prefix + b"/")]


def _xattrs(path: bytes) -> dict:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def manifest(root: Path) -> dict:
    """Everything rsync -aHAXS --numeric-ids must keep, keyed by relative path (bytes)."""
    top = os.fsencode(root)
    entries: dict[bytes, tuple] = {}
    inodes: dict[int, list[bytes]] = {}
    for directory, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, top)
            info = os.lstat(path)
            kind = stat.S_IFMT(info.st_mode)
            content = None
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
                if info.st_nlink > 1:
                    inodes.setdefault(info.st_ino, []).append(rel)
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            mtime = info.st_mtime_ns if not stat.S_ISDIR(info.st_mode) else None  # dirs change as we write
            entries[rel] = (kind, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, info.st_size, mtime,
                            content, _xattrs(path))
    # Groups of names of one file inside the tree; a file linked only from outside it (an
    # earlier ext2 snapshot sharing it) is no group.
    links = sorted(sorted(group) for group in inodes.values() if len(group) > 1)
    return {"entries": entries, "hardlinks": links}


def across_file_systems(found: dict) -> dict:
    """A manifest without what differs between file systems for the same tree: directory sizes
    (ext4 counts blocks, btrfs name lengths), to compare a source with a snapshot read in place."""
    entries = {rel: (e[0], e[1], e[2], e[3], None if stat.S_ISDIR(e[0]) else e[4], *e[5:])
               for rel, e in found["entries"].items()}  # fmt: skip
    return {"entries": entries, "hardlinks": found["hardlinks"]}


def sparse_blocks(path: Path) -> int:
    return os.stat(path).st_blocks
