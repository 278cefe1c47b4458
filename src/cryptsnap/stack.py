"""Open a target's whole mount stack through one ExitStack, and find what a crash left.

    with open_stack(target, readonly=False, what="backup") as opened:
        ... opened.fs is the mounted file system inside the image ...

Any failure while opening unwinds exactly what was opened, in reverse, and is raised as
StepFailed naming the step (connecting, attaching, unlocking, mounting) with the tool's
own error text. Leftovers of a crashed run are removed first, under the target's lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import chunks, integrity, meter, nbd, runner
from .config import Target
from .errors import CryptsnapError, IntegrityError, Interrupted, StepFailed, ToolFailed, canceled
from .layers import (
    CachedDevice,
    ConnectionWatch,
    FsMount,
    LocalLock,
    LoopDevice,
    LuksMapping,
    RemoteLock,
    SshfsMount,
    connection_lost,
    dm_exists,
    holder_file,
    luks_metadata,
    wait_for_exit,
)
from .mounts import is_mountpoint
from .state import TargetState, key_path

log = logging.getLogger(__name__)

PhaseCallback = Callable[[str], None]


@dataclass(frozen=True)
class Paths:
    """Where a target's layers live on this machine."""

    remote: Path  # sshfs mount of the remote directory
    fs: Path  # the file system inside the image
    view: Path  # read-only view (`cryptsnap mount`, the restore unit)
    mapping: str  # dm-crypt mapping name
    loop_record: Path  # which loop device the image is attached to
    traffic: Path  # byte counters of the ssh connection (cryptsnap.meter)
    nbd_record: Path  # which nbd device and server process serve the image (CachedDevice)
    nbd_log: Path  # that server's error output
    block_cache: Path  # the server's cache directory: names it in its command line
    ssh_log: Path  # what the ssh under sshfs said (why a connection was lost)

    @classmethod
    def of(cls, target: Target) -> Paths:
        return cls(
            remote=target.runtime_dir / "remote",
            fs=target.runtime_dir / "fs",
            view=target.runtime_dir.parent / "restore" / target.name,
            mapping=f"cryptsnap-{target.name}",
            loop_record=target.runtime_dir / "loop",
            traffic=target.runtime_dir / "traffic",
            nbd_record=target.runtime_dir / "nbd",
            nbd_log=target.runtime_dir / "nbd.log",
            block_cache=target.state_dir / "block-cache",
            ssh_log=target.runtime_dir / "ssh.log",
        )


@dataclass
class Opened:
    target: Target
    paths: Paths
    fs: Path
    readonly: bool
    loop_device: str
    mapping_device: str
    phase: PhaseCallback  # report the next phase of the run (syncing, finalizing) through the stack
    make_writable: Callable[[], None] = lambda: None  # open_stack(writable_later=True): remount read-write


def step(name: str):
    """Re-raise any failure inside the block as StepFailed(name, ...)."""

    @contextlib.contextmanager
    def wrapper():
        try:
            yield
        except StepFailed:
            raise
        except CryptsnapError as exc:
            raise StepFailed(name, exc) from exc
        except OSError as exc:
            raise StepFailed(name, ToolFailed(str(exc))) from exc

    return wrapper()


def remove_leftovers(target: Target) -> None:
    """Remove what a crashed run, mount or view of this target left, innermost first.

    Only call while holding the target's local lock (or from `umount`).
    """
    paths = Paths.of(target)
    with step("cleaning up after an earlier run"):
        _remove_device_leftovers(paths)
        if is_mountpoint(paths.remote):
            # An sshfs that never finished logging in hangs every access: do not wait on it.
            # A lock left behind is taken over by this host's next run anyway (its pid is gone).
            lock = threading.Thread(target=RemoteLock.remove_leftovers, args=(paths.remote, target.image), daemon=True)
            lock.start()
            lock.join(REMOTE_LOCK_TIMEOUT)
            if lock.is_alive():
                log.warning("the remote side does not answer; leaving the remote lock to the next run")
        SshfsMount.remove_leftovers(paths.remote)
        # ssh and its meter (ProxyCommand) of a dead sshfs, or of one whose mount is already gone.
        wait_for_exit(str(TargetState(target).ssh_config), 5.0, logging.WARNING)
        wait_for_exit(str(paths.traffic), 3.0, logging.WARNING)


def release_orphaned_devices() -> None:
    """Fail the requests of nbd devices whose server was killed with its DO_IT process
    (nbd.fail_orphaned_requests): whatever waits on them stays in the kernel until then."""
    for device in nbd.fail_orphaned_requests():
        log.warning("failed the requests a killed block device server left unanswered on %s", device)


def _remove_device_leftovers(paths: Paths) -> None:
    """The local layers by name, innermost first: file system, mapping, nbd and loop device."""
    # First what no one will answer: until an orphaned nbd device's requests fail, whatever
    # waits on them holds the layers above (a file system mounted in a killed run's namespace).
    release_orphaned_devices()
    for mountpoint in (paths.fs, paths.view):
        FsMount.remove_leftovers(mountpoint)
    LuksMapping.remove_leftovers(paths.mapping)
    CachedDevice.remove_leftovers(paths.nbd_record, paths.block_cache)
    LoopDevice.remove_leftovers(paths.remote, paths.loop_record)


def unwind_dead_run(target: Target, why: str, lock_fd: int | None = None) -> Interrupted | None:
    """Remove what a run that died without unwinding left, and record that run as interrupted.

    cryptsnapd calls this (in a worker, --unwind) as soon as a job's worker was killed, and at
    its own start for every target, so a decrypted mapping never stays open until the next run.
    """
    with LocalLock(target.runtime_dir, "unwinding a run that died", lock_fd):
        interrupted = TargetState(target).settle_unfinished(why)
        remove_leftovers(target)
    return interrupted


def has_leftovers(target: Target) -> bool:
    """A quick look (at most one `dmsetup info`) for anything a dead run of this target may have left."""
    paths = Paths.of(target)
    return (TargetState(target).unfinished_run() is not None or paths.nbd_record.exists() or paths.loop_record.exists()
            or dm_exists(paths.mapping)
            or any(is_mountpoint(p) for p in (paths.fs, paths.remote)))  # fmt: skip


REMOTE_LOCK_TIMEOUT = 10.0  # seconds a cleanup waits for the remote side to answer


@contextlib.contextmanager
def open_stack(
    target: Target,
    *,
    readonly: bool,
    what: str,
    on_phase: PhaseCallback = lambda phase: None,
    break_lock: bool = False,
    mountpoint: Path | None = None,
    keep_open: bool = False,
    lock_fd: int | None = None,
    before_attaching: Callable[[Path], None] | None = None,
    writable_later: bool = False,
) -> Iterator[Opened]:
    """Open the stack; unwind it when the block ends (unless keep_open, for detached views).
    `before_attaching(image)` runs once connected and locked, before anything reads the
    image as a file system (`check` compares blocks there that a damaged file system could
    not be mounted without). writable_later: everything below the file system is opened
    read-write, the file system itself mounted read-only until Opened.make_writable()."""
    state = TargetState(target)
    image = state.image()
    key = key_path(target)
    paths = Paths.of(target)
    fs_mountpoint = mountpoint or paths.fs
    stack = contextlib.ExitStack()
    connected = False
    watch: ConnectionWatch | None = None
    failed: list[bool] = []  # set when unwinding after a failure: then sweep for what no layer held
    current = ["starting"]  # the phase a failure happened in, if it does not say itself

    def phase(name: str) -> None:
        current[0] = name
        on_phase(name)

    try:
        local_lock = stack.enter_context(LocalLock(target.runtime_dir, what, lock_fd))
        stack.callback(_sweep_after_failure, target, failed)
        state.settle_unfinished("the run's process ended before finishing it (killed?)")
        remove_leftovers(target)
        meter.reset(paths.traffic)
        phase("connecting")
        with step("connecting"):
            stack.enter_context(SshfsMount(target, state.write_ssh_config(paths.traffic), paths.remote, paths.ssh_log))
            watch = stack.enter_context(ConnectionWatch(state.ssh_config))
            connected = True
            stack.enter_context(RemoteLock(paths.remote, target.image, what, break_lock))
        if before_attaching:
            with step("checking"):
                before_attaching(paths.remote / target.image)
        phase("attaching")
        with step("attaching"):
            image = state.image()  # again: `before_attaching` may have grown it (cryptsnap resize)
            loop = stack.enter_context(_block_device(target, state, image, readonly))
        phase("unlocking")
        with step("unlocking"):
            _check_header(paths.remote / target.image, state.header_backup, readonly)
            mapping = stack.enter_context(LuksMapping(loop.device, paths.mapping, key, readonly, image["luks_uuid"],
                                                       state.header_backup))  # fmt: skip
        phase("mounting")
        with step("mounting"):
            mount = FsMount(mapping.path, fs_mountpoint, target.filesystem, readonly, writable_later)
            stack.push(mount)  # before entering: a mount stopped midway can leave it mounted (FsMount.__enter__)
            mount.__enter__()
            if isinstance(loop, CachedDevice):  # tell the cache where metadata is, for as long as it is mounted
                stack.enter_context(chunks.Watch(fs_mountpoint, loop.cover))
        opened = Opened(target, paths, fs_mountpoint, readonly, loop.device, mapping.path, phase, mount.make_writable)
    except BaseException as exc:
        lost = connected and _lost(target, state, paths, exc, current[0])
        _begin_unwinding(watch, failed)
        with step("unwinding after a failure"):
            stack.close()
        if lost:
            raise lost from exc
        raise
    try:
        yield opened
    except BaseException as exc:
        lost = _lost(target, state, paths, exc, current[0])
        _begin_unwinding(watch, failed)
        on_phase("unmounting")
        with step("unmounting"):
            stack.close()
        if lost:
            raise lost from exc
        raise
    if keep_open:
        watch.stop()  # the view outlives this process; nothing of this run is left to stop
        # The view stays after this process ends, so the holder file takes over from the
        # flock; `cryptsnap umount` (or the restore unit's stop) removes it as leftovers.
        holder_file(local_lock.path).write_text(
            f"{what} is mounted at {fs_mountpoint} (run `cryptsnap umount {target.name}` to close it)\n"
        )
        stack.pop_all()
        local_lock.__exit__(None, None, None)
        return
    _begin_unwinding(watch)
    on_phase("unmounting")
    with step("unmounting"):
        stack.close()


def _begin_unwinding(watch: ConnectionWatch | None, failed: list[bool] | None = None) -> None:
    """From here the run only closes what it opened: neither a cancel nor the connection's
    end may stop the commands that do it. failed: the run failed, sweep after closing."""
    if failed is not None:
        failed.append(True)
    if watch:
        watch.stop()
    runner.ignore_cancels()


def _sweep_after_failure(target: Target, failed: list[bool]) -> None:
    """After a failed run's layers are closed, and before its lock is released: a command
    stopped midway (by a cancel, or the connection's end) can leave a device no layer holds
    yet, such as the mapping of a cryptsetup open killed after creating it. Found by name,
    removed. (sshfs and ssh clean up after themselves when their own start fails.)"""
    if failed:
        with step("unwinding after a failure"):
            _remove_device_leftovers(Paths.of(target))


def _check_header(image: Path, header_backup: Path, readonly: bool) -> None:
    """Refuse to write into an image whose LUKS header on the server was damaged; reading goes on."""
    if not header_backup.is_file():
        return
    problem = integrity.primary_header_changed(image, header_backup)
    if problem and not readonly:
        raise IntegrityError(problem + ". Nothing was written")
    if problem:
        log.warning("%s", problem)


def _lost(target: Target, state: TargetState, paths: Paths, exc: BaseException, phase: str) -> StepFailed | None:
    """The failure restated as what it is when the ssh connection went away under the run."""
    interrupted = isinstance(getattr(exc, "cause", exc), Interrupted)
    if not isinstance(exc, CryptsnapError | OSError) or canceled(exc) or interrupted:
        return None  # a cancel (or cryptsnapd's end) stops the run on purpose
    lost = connection_lost(target, state.ssh_config, paths.remote, paths.ssh_log)
    if lost is None:
        return None
    return StepFailed(getattr(exc, "step", phase), lost)


BTRFS_SUPERBLOCK = 64 * 1024  # rewritten by every commit: the block cache's anchor


def _block_device(target: Target, state: TargetState, image: dict, readonly: bool) -> CachedDevice | LoopDevice:
    """The image as a block device: through the metadata cache where it applies, else a loop device."""
    paths = Paths.of(target)
    wanted = target.metadata_cache and target.filesystem == "btrfs" and not readonly
    if wanted and state.header_backup.is_file():  # the anchor's place comes from the header
        if CachedDevice.available():
            return CachedDevice(paths.remote / target.image, image["size"], state.block_cache,
                                state.cache_identity(), _payload(state), BTRFS_SUPERBLOCK,
                                paths.nbd_record, paths.nbd_log)  # fmt: skip
        log.info("this kernel has no nbd devices: the image is attached as a loop device, without the "
                 "metadata cache (each run downloads the metadata it reads)")  # fmt: skip
    return LoopDevice(paths.remote / target.image, readonly, image["size"], paths.loop_record)


def _payload(state: TargetState) -> int:
    """Where the encrypted file system starts in the image, from the local header backup."""
    return int(luks_metadata(state.header_backup)["segments"]["0"]["offset"])


def close_view(target: Target) -> bool:
    """Close a detached view of the target (`cryptsnap umount`). False if none was open."""
    lock = LocalLock(target.runtime_dir, "umount")
    held = holder_file(lock.path)
    was_open = held.exists() or is_mountpoint(Paths.of(target).view)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(held)
    with lock:
        remove_leftovers(target)
    return was_open
