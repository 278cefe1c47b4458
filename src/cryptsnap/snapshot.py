"""Snapshots inside the mounted image: write one, list them, prune them, guard the generation.

Layout inside the image's file system:

    snapshots/2026-11-30T052645Z/etc/fstab    a complete snapshot (sources keep full paths)
    snapshots/2026-11-30T060000Z.partial/     being written; never listed, removed next run
    .cryptsnap/generation                     bumped by every run that writes

ext2/ext4: rsync --link-dest to the previous snapshot (unchanged files are hard links).
btrfs: a writable snapshot of the previous subvolume, rsync --inplace into it, then
read-only (unchanged files share extents).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from . import commands, naming, retention, runner
from .config import Target
from .errors import IntegrityError
from .state import TargetState

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, int], None]  # (fraction 0..1, bytes so far)
PROGRESS = re.compile(r"^\s*([\d,]+)\s+(\d+)%")
BTRFS_SUBVOLUME_INODE = 256


def snapshots_dir(fs: Path) -> Path:
    return fs / "snapshots"


def list_snapshots(fs: Path) -> list[str]:
    """Complete snapshots, oldest first; partial ones are never listed."""
    try:
        return naming.complete_snapshots(os.listdir(snapshots_dir(fs)))
    except FileNotFoundError:
        return []


def prepare_filesystem(fs: Path) -> None:
    """The layout of a freshly made file system (`cryptsnap init`)."""
    snapshots_dir(fs).mkdir(mode=0o700)
    (fs / ".cryptsnap").mkdir(mode=0o700)
    (fs / ".cryptsnap" / "generation").write_text("0\n")


def image_generation(fs: Path) -> int:
    try:
        return int((fs / ".cryptsnap" / "generation").read_text())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"the image has no readable generation counter ({exc}); "
                             f"it was not made by `cryptsnap init` or was damaged") from None


def check_generation(fs: Path, state: TargetState) -> int:
    """Refuse an image older than what this machine last wrote: the server rolled it back."""
    inside, local = image_generation(fs), state.generation()
    if inside < local:
        raise IntegrityError(
            f"the image is at generation {inside} but this machine last wrote generation {local}: "
            f"the remote side rolled the image back to an older copy. Nothing was written."
        )
    if inside > local:
        log.warning("the image is at generation %d, newer than this machine's %d (written from elsewhere?)",
                    inside, local)
    return inside


def bump_generation(fs: Path, state: TargetState, current: int) -> None:
    path = fs / ".cryptsnap" / "generation"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{current + 1}\n")
    os.replace(tmp, path)
    runner.run(commands.sync(str(fs)))
    state.set_generation(current + 1)


def _is_subvolume(path: Path) -> bool:
    return os.lstat(path).st_ino == BTRFS_SUBVOLUME_INODE


def _remove(path: Path) -> None:
    if _is_subvolume(path):
        runner.run(commands.btrfs_subvolume_delete(str(path)))
    else:
        shutil.rmtree(path)


def remove_partials(fs: Path) -> None:
    directory = snapshots_dir(fs)
    for name in os.listdir(directory):
        if naming.is_partial(name):
            log.warning("removing unfinished snapshot %s of an interrupted run", name)
            _remove(directory / name)


def write_snapshot(fs: Path, target: Target, on_progress: ProgressCallback = lambda f, b: None) -> str:
    """rsync the target's sources into a new snapshot; return its name once complete."""
    directory = snapshots_dir(fs)
    remove_partials(fs)
    existing = list_snapshots(fs)
    previous = existing[-1] if existing else None
    name = naming.next_name(existing)
    partial = directory / (name + naming.PARTIAL_SUFFIX)
    btrfs = target.filesystem == "btrfs"
    if btrfs:
        if previous:
            runner.run(commands.btrfs_snapshot(str(directory / previous), str(partial)))
        else:
            runner.run(commands.btrfs_subvolume_create(str(partial)))
    else:
        partial.mkdir(mode=0o755)
    argv = commands.rsync(
        target.sources,
        str(partial),
        excludes=target.excludes,
        one_file_system=target.one_file_system,
        link_dest=str(directory / previous) if previous and not btrfs else None,
        inplace=btrfs,
    )

    def progress(line: str) -> None:
        match = PROGRESS.match(line)
        if match:
            on_progress(int(match.group(2)) / 100, int(match.group(1).replace(",", "")))

    runner.stream(argv, progress)
    runner.run(commands.sync(str(partial)))
    if btrfs:
        runner.run(commands.btrfs_set_readonly(str(partial)))
    os.rename(partial, directory / name)
    runner.run(commands.sync(str(directory)))
    return name


def prune(fs: Path, target: Target) -> list[str]:
    """Delete the snapshots the retention rules do not keep; return their names."""
    doomed = retention.to_prune(list_snapshots(fs), target.retention)
    for name in doomed:
        log.info("pruning snapshot %s", name)
        _remove(snapshots_dir(fs) / name)
    if doomed:
        runner.run(commands.sync(str(fs)))
    return doomed


def resolve(fs: Path, name: str) -> str:
    """A snapshot name from what the user typed: a full name, 'latest', or a unique prefix."""
    names = list_snapshots(fs)
    if not names:
        raise FileNotFoundError("the image holds no snapshot yet")
    if name in ("", "latest"):
        return names[-1]
    matches = [n for n in names if n.startswith(name)]
    if len(matches) != 1:
        shown = ", ".join(names[-5:])
        raise FileNotFoundError(f"no single snapshot matches {name!r} (newest: {shown})")
    return matches[0]
