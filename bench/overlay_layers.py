"""History as overlay layers, for bench.scatter_lab --fs overlay: one file system holds
LAYERS/0 (the oldest kept state, whole) and LAYERS/N for each later run N (what run N
changed, as overlayfs writes an upper directory: changed files whole, their directories
copied up, a deleted name as a whiteout). The state after run N is the overlay of N and every
layer below it, which `mount -t overlay` opens read-only with stock tools:

    cd LAYERS && mount -t overlay overlay -o lowerdir=N:...:2:1:0 /mnt/restore

Dropping a state merges the layer above it into its own by renames (`merge`): no file's
data moves.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

OVERLAY_XATTRS = b"trusted.overlay."
OPAQUE = "trusted.overlay.opaque"


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


def merge(layers: Path, upper: int) -> None:
    """Drop the state of the layer below UPPER (retention): UPPER's entries moved into that
    layer by renames within the file system (no file's data moves), which then holds the state
    UPPER held; UPPER is removed. Into layer 0 a whiteout deletes and is dropped; higher up, a
    whiteout or an opaque directory is kept where a layer further down still holds the name.

    Every kept state reads the same at every step (an entry is moved only after the lower
    layer's own was removed, and UPPER's still shadows it meanwhile), but for the times of the
    directories being merged, which the moves change. So their attributes are written down
    first, in LAYERS/merging-UPPER (renamed into place once whole, then synced), and given to
    the lower layer's directories from there; a merge cut short is finished by calling this
    again (tests/host/test_overlay_merge.py cuts it at every step). A cut loses only the state
    being dropped."""
    source, plan = layers / str(upper), layers / f"merging-{upper}"
    if not source.exists():  # cut after its last step
        plan.unlink(missing_ok=True)
        return
    below = [n for n in stack(layers) if n < upper]
    if plan.exists():
        attributes = json.loads(plan.read_text())
    else:
        attributes = {str(d.relative_to(source)): directory_attributes(d)
                      for d in [source, *source.rglob("*")] if d.is_dir() and not d.is_symlink()}  # fmt: skip
        written = plan.with_name(plan.name + ".new")
        written.write_text(json.dumps(attributes))
        os.rename(written, plan)
        os.sync()  # the plan is on the disk before the first move
    _merge(source, layers / str(below[0]), [layers / str(n) for n in below[1:]], attributes, Path("."))
    plan.unlink()


def _merge(source: Path, into: Path, below: list[Path], attributes: dict[str, list], where: Path) -> None:
    for entry in os.scandir(source):
        moved, target = Path(entry.path), into / entry.name
        if is_whiteout(entry):  # a name deleted
            remove(target)
            if held_below(below, entry.name):  # still hides the name further down
                os.rename(moved, target)
            else:
                moved.unlink()
        elif entry.is_dir(follow_symlinks=False) and not opaque(moved) and target.is_dir() and not target.is_symlink():
            _merge(moved, target, [layer / entry.name for layer in below], attributes, where / entry.name)
        else:  # (its markers taken off while the lower entry, gone, leaves them nothing to hide)
            remove(target)
            strip_overlay_xattrs(moved, keep_opaque=held_below(below, entry.name))
            os.rename(moved, target)
    give_attributes(into, attributes[str(where)])
    source.rmdir()


def held_below(below: list[Path], name: str) -> bool:
    """Whether a layer further down holds NAME (asked only where a marker may be kept: a
    directory merged in place needs no look at up to 500 layers for each of its entries)."""
    return any(os.path.lexists(layer / name) for layer in below)


def own_xattrs(path: Path) -> dict[str, bytes]:
    """PATH's extended attributes (ACLs among them), overlayfs's own left out."""
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in os.listxattr(path, follow_symlinks=False)
            if not name.encode().startswith(OVERLAY_XATTRS)}  # fmt: skip


def directory_attributes(directory: Path) -> list:
    st = directory.lstat()
    xattrs = {name: value.hex() for name, value in own_xattrs(directory).items()}
    return [st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns, xattrs]


def give_attributes(directory: Path, attributes: list) -> None:
    """A directory's owner, mode, extended attributes and times (directory_attributes), onto
    DIRECTORY, the same one in the lower layer; its times last, as the other changes move its
    ctime alone. Only a directory that is not opaque is merged: the lower one's own opaque mark
    (hiding what lies further down) stays as it was."""
    uid, gid, mode, atime_ns, mtime_ns, hexed = attributes
    xattrs = {name: bytes.fromhex(value) for name, value in hexed.items()}
    os.chown(directory, uid, gid, follow_symlinks=False)
    for name in os.listxattr(directory, follow_symlinks=False):
        if name not in xattrs and name != OPAQUE:
            os.removexattr(directory, name, follow_symlinks=False)
    for name, value in xattrs.items():
        os.setxattr(directory, name, value, follow_symlinks=False)
    os.chmod(directory, mode)  # after the ACL, whose mask moves the group bits
    os.utime(directory, ns=(atime_ns, mtime_ns), follow_symlinks=False)


def opaque(directory: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.getxattr(directory, OPAQUE, follow_symlinks=False) == b"y"
    return False


def strip_overlay_xattrs(path: Path, keep_opaque: bool = False) -> None:
    """overlayfs's own attributes (opaque, origin) mean nothing in the bottom layer; higher
    up, an opaque directory still hides what lies further down."""
    for name in os.listxattr(path, follow_symlinks=False):
        if name.encode().startswith(OVERLAY_XATTRS) and not (keep_opaque and name == OPAQUE):
            os.removexattr(path, name, follow_symlinks=False)
