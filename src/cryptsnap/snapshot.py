"""Snapshots inside the mounted image: write one, list them, prune them, guard the generation.

Layout inside the image's file system:

    snapshots/2026-11-30T052645Z/etc/fstab    a complete snapshot (sources keep full paths)
    snapshots/2026-11-30T060000Z.partial/     being written; never listed; removed next run,
                                              or gone on from after a lost connection (Unfinished)
    .cryptsnap/generation                     bumped by every run that writes

ext2/ext4: rsync --link-dest to the previous snapshot (unchanged files are hard links).
btrfs: a writable snapshot of the previous subvolume, rsync --inplace into it, then
read-only (unchanged files share extents). With a matching local record of the previous
snapshot's files, rsync gets only what changed (cryptsnap.changes).

Or, on a btrfs `cryptsnap init` made with `layers/` (a target's `history: layers`), history as
overlay layers (cryptsnap.overlay): a run writes through an overlay of the kept states' layers
into a new layer, named in `layers/names` once complete (no snapshot's shared tree nodes are
copied, no reference counted: docs/performance.md). The image's layout decides, not the
configuration: an image keeps what it was made with.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from . import changes, commands, durable, naming, overlay, retention, runner
from .config import Target
from .errors import ImageFull, IntegrityError, ToolFailed
from .scan import Found, scan_sources
from .state import TargetState

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, int], None]  # (fraction 0..1, bytes so far)
PROGRESS = re.compile(r"^\s*([\d,]+)\s+(\d+)%")
BTRFS_SUBVOLUME_INODE = 256


def snapshots_dir(fs: Path) -> Path:
    return fs / "snapshots"


def layers_dir(fs: Path) -> Path:
    return fs / "layers"


def is_layered(fs: Path) -> bool:
    """Whether the image keeps its history as overlay layers (cryptsnap.overlay)."""
    return layers_dir(fs).is_dir()


OVERLAY_MOUNT = ".cryptsnap/overlay"  # where a layered run mounts its overlay: the image is the run's own


def list_snapshots(fs: Path) -> list[str]:
    """Complete snapshots, oldest first; partial ones are never listed."""
    if is_layered(fs):
        return [name for _, name in overlay.read_names(layers_dir(fs))]
    try:
        return naming.complete_snapshots(os.listdir(snapshots_dir(fs)))
    except FileNotFoundError:
        return []


def prepare_filesystem(fs: Path, layered: bool = False) -> None:
    """The layout of a freshly made file system (`cryptsnap init`)."""
    (layers_dir(fs) if layered else snapshots_dir(fs)).mkdir(mode=0o700)
    (fs / ".cryptsnap").mkdir(mode=0o700)
    (fs / ".cryptsnap" / "generation").write_text("0\n")
    if layered:  # made now: a restore's mount of the image is read-only
        (fs / OVERLAY_MOUNT).mkdir(mode=0o700)
        snapshots_dir(fs).mkdir(mode=0o700)  # where `cryptsnap mount` shows each state (show_states)


def show_states(fs: Path) -> None:
    """A layered image's states where `cryptsnap mount` shows snapshots, each read-only at
    snapshots/NAME: a small tmpfs over the image's empty snapshots/ holds their mount points.
    Unmounted with the image (FsMount, innermost first)."""
    runner.run(commands.mount_tmpfs(str(snapshots_dir(fs))))
    for name in list_snapshots(fs):
        where = snapshots_dir(fs) / name
        where.mkdir()
        overlay.mount_view(layers_dir(fs), name, where)


def opened(fs: Path, name: str) -> contextlib.AbstractContextManager[Path]:
    """The snapshot NAME's root, to read (a layered image's overlay of its layers, mounted
    read-only at OVERLAY_MOUNT till the block ends: one at a time)."""
    if is_layered(fs):
        return overlay.view(layers_dir(fs), name, fs / OVERLAY_MOUNT)
    return contextlib.nullcontext(snapshots_dir(fs) / name)


def image_generation(fs: Path) -> int:
    try:
        return int((fs / ".cryptsnap" / "generation").read_text())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"the image has no readable generation counter ({exc}); "
                             f"it was not made by `cryptsnap init` or was damaged") from None


def check_generation(fs: Path, state: TargetState, accept_rollback: bool = False) -> int:
    """Refuse an image older than what this machine last wrote: the server rolled it back.

    accept_rollback: the user put an older copy back on purpose; go on from its generation.
    """
    inside, local = image_generation(fs), state.generation()
    if inside < local and accept_rollback:
        log.warning("the image is at generation %d, older than this machine's %d: accepted as asked "
                    "(--accept-rollback); going on from %d", inside, local, inside)  # fmt: skip
        state.set_generation(inside)
    elif inside < local:
        name = state.target.name
        raise IntegrityError(
            f"the image is at generation {inside} but this machine last wrote generation {local}: "
            f"the remote side rolled the image back to an older copy (snapshots made since are gone from it). "
            f"Nothing was written. If you put that older copy back yourself, accept it with "
            f"`cryptsnap backup --accept-rollback {name}` (D-Bus: StartBackup option accept-rollback)"
        )
    if inside > local:
        log.warning("the image is at generation %d, newer than this machine's %d (written from elsewhere?)",
                    inside, local)
    return inside


def bump_generation(fs: Path, state: TargetState, current: int) -> None:
    """Count one more write into the image, and sync everything done before it."""
    path = fs / ".cryptsnap" / "generation"
    tmp = path.with_suffix(".tmp")
    with durable.Syncer(fs, state.target.filesystem) as syncer:
        tmp.write_text(f"{current + 1}\n")
        os.replace(tmp, path)
        syncer.sync()
    state.set_generation(current + 1)


def _is_subvolume(path: Path) -> bool:
    return os.lstat(path).st_ino == BTRFS_SUBVOLUME_INODE


def _remove(path: Path) -> None:
    if _is_subvolume(path):
        runner.run(commands.btrfs_subvolume_delete(str(path)))
    else:
        shutil.rmtree(path)


def remove_partials(fs: Path, keep: str | None = None) -> None:
    if is_layered(fs):
        for n in overlay.unnamed(layers_dir(fs)):
            if str(n) != keep:
                log.warning("removing unfinished layer %d of an interrupted run", n)
                shutil.rmtree(layers_dir(fs) / str(n))
        return
    directory = snapshots_dir(fs)
    for name in os.listdir(directory):
        if naming.is_partial(name) and name != keep:
            log.warning("removing unfinished snapshot %s of an interrupted run", name)
            _remove(directory / name)


def _partials(fs: Path) -> list[str]:
    """What interrupted runs left unfinished: snapshots, or layers no state names."""
    if is_layered(fs):
        return [str(n) for n in overlay.unnamed(layers_dir(fs))]
    return [entry for entry in os.listdir(snapshots_dir(fs)) if naming.is_partial(entry)]


def _drop(fs: Path, name: str) -> None:
    """Delete the snapshot NAME (any but the newest, in a layered image)."""
    if is_layered(fs):
        overlay.drop(layers_dir(fs), name)
    else:
        _remove(snapshots_dir(fs) / name)


class Unfinished:
    """The local note (unfinished.json in the target's state) of the unfinished snapshot a run was
    writing when it lost its connection, so that the next try goes on from it instead of
    uploading again what it had written. btrfs only: its commits are atomic, and mounted with
    flushoncommit each shows the data written before it (cryptsnap.commands.mount); the
    snapshot stays unfinished until rsync has gone over every file again. It is trusted only
    while nothing else was written since: the same newest snapshot and image generation."""

    def __init__(self, state: TargetState):
        self.state = state

    def note(self, partial: str, previous: str | None, generation: int | None) -> None:
        self.state.note_unfinished({"partial": partial, "previous": previous, "generation": generation})

    def resumable(self, directory: Path, previous: str | None, generation: int | None,
                  layered: bool = False) -> str | None:  # fmt: skip
        """The name of the unfinished snapshot (or layer, in the layers DIRECTORY) to go on
        from, if there is one to trust."""
        noted = self.state.unfinished()
        name = noted.get("partial")
        if not (isinstance(name, str) and noted.get("previous") == previous and noted.get("generation") == generation):
            return None
        if not (name.isdigit() and int(name) in overlay.unnamed(directory) if layered else naming.is_partial(name)):
            return None
        partial = directory / name
        # Made read-only, it was complete but not yet renamed: start afresh rather than undo that.
        return name if partial.is_dir() and os.access(partial, os.W_OK) else None

    def clear(self) -> None:
        self.state.note_unfinished(None)


def write_snapshot(fs: Path, target: Target, on_progress: ProgressCallback = lambda f, b: None,
                   known: changes.Record | None = None, generation: int | None = None,
                   work_dir: Path | None = None, full_compare: bool = False,
                   unfinished: Unfinished | None = None, made_room: list[str] | None = None,
                   record_to: Path | None = None, make_writable: Callable[[], None] = lambda: None,
                   ) -> tuple[str, changes.RecordWriter | None]:  # fmt: skip
    """rsync the target's sources into a new snapshot; return its name once complete.

    btrfs: with `known`, the file record of the previous snapshot at this image generation,
    only what changed since is copied (cryptsnap.changes). Also returns the record of what the
    sources held, to be committed to `record_to` by the caller once the snapshot is durable
    (or None where no record can be kept: ext2, ext4, no record_to). With `unfinished`, an
    unfinished snapshot noted there by a try that lost its connection is gone on from. The
    snapshots retention.make_room deleted for room are appended to `made_room`. NothingChanged
    (nothing written) when the target skips unchanged runs and the record shows nothing changed;
    make_writable() is called before anything is written (a file system mounted read-only till then).
    """
    written = [0]

    def progress(fraction: float, transferred: int) -> None:
        written[0] = max(written[0], transferred)
        on_progress(fraction, transferred)

    made_room = made_room if made_room is not None else []
    with durable.Syncer(fs, target.filesystem) as syncer:  # before the first write: hears every failed one
        while True:
            try:
                return _write_snapshot(fs, target, syncer, progress, known, generation, work_dir, full_compare,
                                       unfinished, record_to, make_writable)  # fmt: skip
            except (ToolFailed, OSError) as exc:
                said = getattr(exc, "stderr", "") or str(exc)
                if "No space left on device" not in said and getattr(exc, "errno", None) != errno.ENOSPC:
                    raise
                full = _image_full(fs, written[0], made_room)
            written[0] = 0
            try:
                remove_partials(fs)  # gives the room back now; the earlier snapshots are as they were
                syncer.sync()
                oldest = _oldest_to_drop(fs, target)
                if oldest is None:
                    raise full
                log.warning("the image is full: deleting the oldest snapshot, %s, to make room (retention: "
                            "make_room), then trying again", oldest)  # fmt: skip
                _drop(fs, oldest)
                if target.filesystem == "btrfs" and not is_layered(fs):
                    runner.run(commands.btrfs_subvolume_sync(str(fs)))
                syncer.sync()
                made_room.append(oldest)
            except (ToolFailed, OSError) as exc:
                log.warning("could not make room (the unfinished snapshot may stay until the next run "
                            "removes it): %s", exc)  # fmt: skip
                raise full from exc


def _oldest_to_drop(fs: Path, target: Target) -> str | None:
    """With retention.make_room, the snapshot to delete for room: the oldest, never the newest."""
    names = list_snapshots(fs)
    return names[0] if target.retention.make_room and len(names) > 1 else None


def space(fs: Path) -> tuple[int, int]:
    """The mounted image file system's size and free bytes (what a non-root writer could use)."""
    info = os.statvfs(fs)
    return info.f_blocks * info.f_frsize, info.f_bavail * info.f_frsize


def _image_full(fs: Path, written: int, made_room: list[str]) -> ImageFull:
    size, free = space(fs)
    mib = lambda n: f"{n / (1 << 20):,.0f} MiB"  # noqa: E731
    deleted = (f" (retention.make_room had deleted {len(made_room)} older snapshot(s) for room: "
               f"{', '.join(made_room)}; only the newest is left)") if made_room else ""  # fmt: skip
    return ImageFull(f"the image is full: its file system holds {mib(size)}, {mib(free)} free, and this run "
                     f"had copied {mib(written)} when it ran out{deleted}. The unfinished snapshot was removed; "
                     f"earlier ones are intact. Make room: keep fewer snapshots (retention, then `cryptsnap "
                     f"prune`), exclude what need not be kept, or grow the image")  # fmt: skip


def _write_snapshot(fs: Path, target: Target, syncer: durable.Syncer, on_progress: ProgressCallback,
                    known: changes.Record | None, generation: int | None, work_dir: Path | None,
                    full_compare: bool, unfinished: Unfinished | None, record_to: Path | None,
                    make_writable: Callable[[], None]) -> tuple[str, changes.RecordWriter | None]:  # fmt: skip
    layered = is_layered(fs)
    directory = layers_dir(fs) if layered else snapshots_dir(fs)
    existing = list_snapshots(fs)
    previous = existing[-1] if existing else None
    btrfs = target.filesystem == "btrfs"
    resumed = unfinished.resumable(directory, previous, generation, layered) if unfinished and btrfs else None
    leftovers = [entry for entry in _partials(fs) if entry != resumed]
    name = naming.next_name(existing)  # named when it completes, whenever it was begun
    new = str(overlay.next_layer(directory)) if layered else name + naming.PARTIAL_SUFFIX
    partial = directory / (resumed or new)
    scanned = found = None
    if btrfs:
        # Scanned before rsync reads anything: a file that changes during the run differs
        # from its recorded state next time and is copied again.
        why_not = "a full compare was asked for" if full_compare else _record_unusable(
            known, previous, generation, target) if previous else "there is no snapshot to compare with"
        if previous and why_not:
            log.info("comparing every file with the image: %s", why_not)
        # Going on from a canceled try, a file there may be half rewritten in place with its old
        # size: only a copy puts it right, so no file gets its attributes alone.
        scanned, found = scan_sources(target, record_to, None if why_not else known, work_dir, touch=not resumed)
        if target.skip_unchanged and found is not None and found.empty and not resumed and not leftovers:
            found.close()
            scanned.discard()  # the record of `previous` stands as it is
            raise NothingChanged(previous)
    try:
        make_writable()  # from here on the run writes
        if leftovers:
            remove_partials(fs, keep=resumed)
        if btrfs and (resumed or (unfinished and (found is None or found.changed_bytes >= RESUMABLE_FROM))):
            # What the periodic commits of a long sync show must be whole, for a next try to
            # trust it: every commit takes the data written before it along. (Not for short
            # syncs, which a next try repeats: this costs 150-250 KB more upload a run.)
            runner.run(commands.remount_flushoncommit(str(fs)))
        elif btrfs:
            unfinished = None  # too little to go on from: a next try starts afresh
        # A whole-tree rsync after a walk lists directories as it goes: the walk's total
        # stands in for rsync's own (see commands.rsync).
        expected = scanned.size if scanned and found is None else None
        _sync_into(fs, target, syncer, on_progress, directory, previous, partial, resumed, found, unfinished,
                   generation, expected)  # fmt: skip
        if scanned:
            scanned.wait_digests()  # still cancelable: a run canceled now is not complete
    except BaseException:
        if scanned:
            scanned.discard()
        if found:
            found.close()
        raise
    # Made durable by bump_generation's sync, in the same commit as the new generation and the
    # pruning: every commit rewrites the tree roots and superblocks (~50 KB up each).
    # The caller clears `unfinished` once that is committed.
    if layered:
        overlay.write_names(directory, [*overlay.read_names(directory), (int(partial.name), name)])
    else:
        os.rename(partial, directory / name)
    return name, scanned


def _sync_into(fs: Path, target: Target, syncer: durable.Syncer, on_progress: ProgressCallback, directory: Path,
               previous: str | None, partial: Path, resumed: str | None, found: Found | None,
               unfinished: Unfinished | None, generation: int | None, expected: int | None) -> None:  # fmt: skip
    """Make the unfinished snapshot (or go on with `resumed`), copy into it, make it read-only.
    With `expected` (the sources' bytes, from the walk), a whole-tree rsync lists directories
    as it goes."""
    btrfs = target.filesystem == "btrfs"
    if found:
        log.info("%d entries changed, %d deleted since snapshot %s (from the local record)%s",
                 found.changed + found.touched, found.deleted, previous,
                 f"; {found.touched} of the files changed only in their attributes (same content)"
                 if found.touched else "")  # fmt: skip
    if resumed:
        log.info("going on from the unfinished %s %s of the last try: rsync skips what it finds complete there",
                 "layer" if resumed.isdigit() else "snapshot", resumed)  # fmt: skip
    if is_layered(fs):
        with _layer(fs, partial, previous, resumed, unfinished, generation) as root:
            _copy_changes(root, target, on_progress, None, found, expected)
        syncer.sync()  # the data is on the server before the names list the layer
        return
    if btrfs:
        if not resumed:
            runner.run(commands.btrfs_snapshot(str(directory / previous), str(partial)) if previous
                       else commands.btrfs_subvolume_create(str(partial)))  # fmt: skip
        if unfinished and not resumed:  # the snapshot is committed by its creation: note it for a next try
            unfinished.note(partial.name, previous, generation)
    else:
        partial.mkdir(mode=0o755)
        # ext2 has no journal, and its writeback sends the new directory's inode and its entry
        # in /snapshots whenever it likes: a cut between the two left an "unconnected
        # directory" that e2fsck -p will not repair (docs/reliability.md). Both go to the
        # server now, before anything is written into it.
        syncer.sync()

    _copy_changes(partial, target, on_progress, directory / previous if previous and not btrfs else None, found,
                  expected)  # fmt: skip
    syncer.sync()  # the data is on the server before the name says "complete"
    if btrfs:
        runner.run(commands.btrfs_set_readonly(str(partial)))


def _copy_changes(into: Path, target: Target, on_progress: ProgressCallback, link_dest: Path | None,
                  found: Found | None, expected: int | None) -> None:  # fmt: skip
    """rsync the sources into INTO: all of them (with --link-dest to LINK_DEST, ext2/ext4), or
    only what `found` lists."""
    btrfs = target.filesystem == "btrfs"
    rsync = functools.partial(commands.rsync, target.sources, str(into), excludes=target.excludes,
                              one_file_system=target.one_file_system, inplace=btrfs, exact_times=btrfs)  # fmt: skip
    if found is None:
        _copy(rsync(link_dest=str(link_dest) if link_dest else None, incremental=expected is not None),
              progress_reader(on_progress, expected))  # fmt: skip
    else:
        with found:
            _delete(into, found.deleted_paths())
            if found.changed:
                _copy(rsync(files_from=found.listing.name), progress_reader(on_progress))
            if found.touched:  # same size and content: rsync skips their data and sets the rest
                _copy(rsync(files_from=found.touched_file.name, size_only=True, progress=False))
    on_progress(1.0, 0)


@contextlib.contextmanager
def _layer(fs: Path, layer: Path, previous: str | None, resumed: str | None, unfinished: Unfinished | None,
           generation: int | None) -> Iterator[Path]:  # fmt: skip
    """Where a layered run writes: the first state straight into layer 0; each later one
    through an overlay of the kept states' layers into its new layer LAYER (or the unnamed
    layer `resumed` of a try that lost its connection, gone on from)."""
    if previous is None:
        if not resumed:
            layer.mkdir(mode=0o755)
        root = contextlib.nullcontext(layer)
    else:
        kept = len(overlay.stack(layer.parent))
        if kept >= overlay.MOST_LAYERS:
            raise ToolFailed(f"the image keeps {kept} states, as many layers as overlayfs stacks: run `cryptsnap "
                             f"prune` with retention rules that keep at most {overlay.MOST_LAYERS - 1}")  # fmt: skip
        mountpoint = fs / OVERLAY_MOUNT
        mountpoint.mkdir(mode=0o700, exist_ok=True)
        root = overlay.writable(layer.parent, int(layer.name), layer.parent / "work", mountpoint,
                                existing=bool(resumed))  # fmt: skip
    with root as written:
        if unfinished and not resumed:
            unfinished.note(layer.name, previous, generation)
        yield written


def progress_reader(on_progress: ProgressCallback, expected: int | None = None) -> Callable[[str], None]:
    """What reads rsync's --info=progress2 lines and passes (fraction, bytes so far) on.

    Without `expected`: rsync's own percentage (it built the whole file list first). With it:
    the bytes transferred against `expected`, because under incremental recursion rsync's
    percentage counts only the files found so far and falls as it finds more. Held below 1
    (files can grow during the run): the caller says 1.0 when the copy is done.
    """

    def read(line: str) -> None:
        match = PROGRESS.match(line)
        if not match:
            return
        transferred = int(match.group(1).replace(",", ""))
        if expected is None:
            fraction = int(match.group(2)) / 100
        else:
            fraction = min(transferred / expected, 0.99) if expected else 0.0
        on_progress(fraction, transferred)

    return read


class NothingChanged(Exception):  # noqa: N818 (not an error: the run is done)
    """skip_unchanged: the local record shows nothing changed since `snapshot`, the newest, so no
    new snapshot is made. Raised before anything is written to the image: a snapshot's commits
    cost 70-400 KB up, this run only what opening the image reads."""

    def __init__(self, snapshot: str):
        super().__init__(f"nothing changed since snapshot {snapshot}")
        self.snapshot = snapshot


RESUMABLE_FROM = 64 << 20  # changed bytes from which a lost connection's next try goes on from the last
def _record_unusable(known: changes.Record | None, previous: str, generation: int | None, target: Target) -> str:
    """Why the local record cannot say what changed since `previous` ("" when it can)."""
    if known is None:
        return "there is no local record of the last snapshot's files"
    if known.snapshot != previous:
        return f"the local record describes snapshot {known.snapshot}, the image's newest is {previous}"
    if known.generation != generation:
        return f"the local record is of image generation {known.generation}, the image is at {generation}"
    if known.settings != changes.settings_digest(target):
        return "the sources or excludes changed since the last snapshot"
    return ""


def _copy(argv: commands.Argv, on_line: Callable[[str], None] = lambda line: None) -> None:
    """Run rsync; files deleted here while it copied (it had listed them, then found them
    gone: exit 24) are a warning, not a failed run. A live machine deletes files all the time
    (temporary files, caches); failing the run for them would leave it without any backup."""
    try:
        runner.stream(argv, on_line)
    except ToolFailed as exc:
        if exc.returncode != commands.RSYNC_VANISHED:
            said = explain_rsync_errors(exc.returncode, exc.stderr)
            if said is None:
                raise
            raise ToolFailed(said, exc.argv, exc.returncode, exc.stderr) from None
        said = [line.strip() for line in exc.stderr.splitlines() if "file has vanished" in line]
        log.warning("%d file(s) were deleted on this machine while this run copied them (rsync: %s): this "
                    "snapshot may hold them as the one before it did; the next run leaves them out",
                    len(said), said[0] if said else "some files vanished")  # fmt: skip


# A path where a layered run writes, as rsync names it (what overlayfs refused there: its own
# markers, a whiteout device or a trusted.overlay.* attribute).
_IN_OVERLAY = re.compile(re.escape(OVERLAY_MOUNT) + r'/([^"]+)"')


def explain_rsync_errors(returncode: int | None, stderr: str) -> str | None:
    """rsync's exit 23 (some files or attributes not transferred) in words, where all its
    errors are its sender's (the source's side) with one cause the user can act on; None
    otherwise (its own lines are shown). Errors of the receiver or generator (the image's side,
    as when the connection is cut and the mount goes) keep rsync's words, whatever errno."""
    errors = [line.strip() for line in stderr.splitlines() if line.startswith("rsync: ")]
    if returncode != commands.RSYNC_PARTIAL or not errors:
        return None
    markers = [line for line in errors if OVERLAY_MOUNT in line and line.endswith("Operation not permitted (1)")
               and ("mknod" in line or '"trusted.overlay.' in line)]  # fmt: skip
    if markers and len(markers) == len(errors):
        paths = sorted({"/" + m.group(1) for line in markers if (m := _IN_OVERLAY.search(line))})
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        return (f"overlayfs cannot keep {shown or markers[0]} in a layer: a whiteout (a character device 0/0) "
                "or a trusted.overlay.* attribute, overlayfs's own markers, as container storage holds them "
                "(history: layers). This run stopped without a snapshot; the snapshots before it are as they "
                "were. Add that directory to the target's excludes (e.g. /var/lib/containers), or keep the "
                "target's history as snapshots (a new image: `cryptsnap init`)")  # fmt: skip
    if not all(line.startswith("rsync: [sender] ") for line in errors):  # (rsync >= 3.2 names its side)
        return None
    if all(line.endswith("No such file or directory (2)") for line in errors):
        # A file gone between rsync's stat and its read of the ACLs or xattrs. rsync then
        # skips its deletions ("IO error encountered -- skipping file deletion"), so accepting
        # the run would keep deleted files in the snapshot (docs/reliability.md).
        return (f"{len(errors)} file(s) were deleted on this machine while rsync read their attributes "
                f"(rsync: {errors[0].removeprefix('rsync: ')}); rsync then leaves deleted files in the "
                "snapshot, so this run stopped without one. The snapshots before it are as they were and "
                "the next run goes on; if this happens run after run, exclude the directory whose files "
                "come and go (a cache, temporary files) in the target's excludes")  # fmt: skip
    if all(line.endswith("Permission denied (13)") for line in errors):
        paths = sorted({m.group(1) for line in errors if (m := re.search(r'"([^"]+)"', line))})
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        return (f"rsync, as root, was refused {shown or errors[0]} (Permission denied), so this run stopped "
                "without a snapshot; the snapshots before it are as they were. A network file system that "
                "maps root to nobody (NFS with root_squash) or another user's FUSE mount does this: let "
                "root read it, or add it to the target's excludes")  # fmt: skip
    return None


def _delete(snapshot: Path, paths: list[bytes]) -> None:
    """Remove vanished entries from the new snapshot; a directory goes with everything under it."""
    removed: list[bytes] = []
    root = os.fsencode(snapshot)
    for relative in paths:  # sorted: a directory comes before what is under it
        if removed and relative.startswith(removed[-1] + b"/"):
            continue
        path = root + b"/" + relative
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)
                removed.append(relative)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass


def prune(fs: Path, target: Target) -> list[str]:
    """Delete the snapshots the retention rules do not keep; return their names."""
    doomed = retention.to_prune(list_snapshots(fs), target.retention)
    for name in doomed:
        log.info("pruning snapshot %s", name)
        _drop(fs, name)
    return doomed  # made durable by the bump_generation that follows


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
