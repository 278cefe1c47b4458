"""History as overlay layers, for bench.scatter_lab --fs overlay: one file system holds
LAYERS/0 (the oldest kept state, whole) and LAYERS/N for each later run N (what run N
changed, as overlayfs writes an upper directory: changed files whole, their directories
copied up, a deleted name as a whiteout). The state after run N is the overlay of N and every
layer below it, which `mount -t overlay` opens read-only with stock tools:

    cd LAYERS && mount -t overlay overlay -o lowerdir=N:...:2:1:0 /mnt/restore

Dropping the oldest state merges the layer above it into 0 by renames: no file's data moves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

OVERLAY_XATTRS = b"trusted.overlay."


def stack(layers: Path, top: int | None = None) -> list[int]:
    """The layers, newest first (up to TOP)."""
    numbers = sorted((int(p.name) for p in layers.iterdir() if p.name.isdigit()), reverse=True)
    return [n for n in numbers if top is None or n <= top]


@contextlib.contextmanager
def writable(layers: Path, work: Path, merged: Path, n: int) -> Iterator[Path]:
    """Run N's layer created and mounted over the layers below it at MERGED (WORK: overlayfs's
    work directory, on the same file system). Layers are named relative to LAYERS, as a
    restore would, to keep the options short: the kernel takes at most a page of them."""
    lower = ":".join(str(k) for k in stack(layers))
    (layers / str(n)).mkdir()
    work.mkdir(exist_ok=True)
    merged.mkdir(exist_ok=True)
    with mounted(layers, f"lowerdir={lower},upperdir={n},workdir={work}", merged):
        yield merged


@contextlib.contextmanager
def read_only(layers: Path, n: int, where: Path) -> Iterator[Path]:
    """The state after run N, mounted read-only at WHERE (the restore's mount); the oldest
    state is layer 0 itself (overlayfs mounts two layers at least)."""
    below = stack(layers, n)
    if below == [0]:
        yield layers / "0"
        return
    where.mkdir(exist_ok=True)
    lower = ":".join(map(str, below))
    with mounted(layers, f"ro,lowerdir={lower}", where):
        yield where


@contextlib.contextmanager
def mounted(layers: Path, options: str, where: Path) -> Iterator[None]:
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(where)], cwd=layers, check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(where)], check=True)


def is_whiteout(entry: os.DirEntry) -> bool:
    st = entry.stat(follow_symlinks=False)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def merge_into(upper: Path, base: Path) -> None:
    """UPPER's entries applied to BASE, the bottom layer, by renames within the file system;
    UPPER is left empty and removed. What the layers show is the same at every step but for
    the times of the directories being merged (an entry is moved only after BASE's own was
    removed, and UPPER's still shadows it meanwhile), so a merge cut short is finished by
    running it again (tests/host/test_overlay_merge.py cuts it at every step); only BASE's own
    older state is lost, which is the one being dropped. A directory's own attributes are
    taken before its entries move (the moves change its times) and given to BASE's at its
    end; after a cut, the directories the merge had begun keep the times of the cut."""
    before = upper.lstat()
    xattrs = own_xattrs(upper)
    for entry in os.scandir(upper):
        source, target = Path(entry.path), base / entry.name
        if is_whiteout(entry):  # a name deleted: nothing below BASE to hide any more
            remove(target)
            source.unlink()
        elif entry.is_dir(follow_symlinks=False) and not opaque(source) and target.is_dir() and not target.is_symlink():
            merge_into(source, target)
        else:  # (its markers taken off while BASE's entry, gone, leaves them nothing to hide)
            remove(target)
            strip_overlay_xattrs(source)
            os.rename(source, target)
    give_attributes(base, before, xattrs)
    upper.rmdir()


def own_xattrs(path: Path) -> dict[str, bytes]:
    """PATH's extended attributes (ACLs among them), overlayfs's own left out."""
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in os.listxattr(path, follow_symlinks=False)
            if not name.encode().startswith(OVERLAY_XATTRS)}  # fmt: skip


def give_attributes(directory: Path, st: os.stat_result, xattrs: dict[str, bytes]) -> None:
    """A copied-up directory's owner, mode, extended attributes and times, onto DIRECTORY
    (the same in BASE); its times last, as the other changes move its ctime alone."""
    os.chown(directory, st.st_uid, st.st_gid, follow_symlinks=False)
    for name in os.listxattr(directory, follow_symlinks=False):
        if name not in xattrs:
            os.removexattr(directory, name, follow_symlinks=False)
    for name, value in xattrs.items():
        os.setxattr(directory, name, value, follow_symlinks=False)
    os.chmod(directory, stat.S_IMODE(st.st_mode))  # after the ACL, whose mask moves the group bits
    os.utime(directory, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def opaque(directory: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.getxattr(directory, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    return False


def strip_overlay_xattrs(path: Path) -> None:
    """overlayfs's own attributes (opaque, origin) mean nothing in the bottom layer."""
    for name in os.listxattr(path, follow_symlinks=False):
        if name.encode().startswith(OVERLAY_XATTRS):
            os.removexattr(path, name, follow_symlinks=False)
