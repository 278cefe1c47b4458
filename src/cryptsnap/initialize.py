"""`cryptsnap init`: pin the host key, create and format the remote image, back up its header.

The image is written under a temporary name and renamed only when it is complete, so a
failed init leaves no half-made image where backups would look for one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import commands, integrity, meter, runner, snapshot
from .config import Target
from .errors import IntegrityError, RemoteUnreachable, ServerFull, ToolFailed, UsageError
from .layers import (
    FsMount,
    LocalLock,
    LoopDevice,
    LuksMapping,
    RemoteLock,
    SshfsMount,
    check_server_fsync,
    luks_metadata,
    open_image,
    ssh_failure,
)
from .stack import Paths, remove_leftovers, step
from .state import TargetState, key_path

log = logging.getLogger(__name__)

Say = Callable[[str], None]


def remote_run(config_file: Path, target: Target, argv: list[str], check: bool = True):
    """Run a command on the server over ssh (init only: the restricted key allows SFTP alone)."""
    try:
        return runner.run(commands.ssh(str(config_file), target, argv), check=check, timeout=600)
    except ToolFailed as exc:
        if exc.returncode == 255:  # ssh's own failure; anything else is the remote command's exit status
            raise ssh_failure(target, exc.stderr, 255, str(exc)) from None
        raise


def pin_host_key(target: Target, state: TargetState, accept_new: bool, say: Say) -> None:
    """Record the server's host keys (first use, or --accept-new-host-key) and show fingerprints."""
    if not state.known_hosts.exists() or accept_new:
        try:
            scan = runner.run(commands.keyscan(target), timeout=60)
        except ToolFailed as exc:
            raise RemoteUnreachable(f"cannot read the host key of {target.host}:{target.port}: {exc}") from None
        lines = [line.split(None, 1)[1] for line in scan.stdout.splitlines() if line and not line.startswith("#")]
        if not lines:
            raise RemoteUnreachable(f"{target.host}:{target.port} did not offer an ssh host key")
        alias = commands.ssh_host(target)  # matches HostKeyAlias in ssh_config
        state.known_hosts.write_text("".join(f"{alias} {line}\n" for line in lines))
        say(f"Pinned the host key of {target.host}:{target.port} in {state.known_hosts}.")
    else:
        say(f"Using the host key pinned earlier in {state.known_hosts}.")
    for line in runner.run(commands.fingerprints(str(state.known_hosts))).stdout.splitlines():
        say(f"  {line}")
    say("  Compare with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on the server; later runs refuse any other key.")


def _make_remote_dir(config_file: Path, target: Target) -> bool:
    """Make remote_dir on the server. True if the account runs commands; False if it allows
    SFTP alone (a key with command="internal-sftp", or ForceCommand): the directory is then
    made over SFTP, and the image can only be allocated sparse (`_allocate`)."""
    argv = commands.ssh(str(config_file), target, ["mkdir", "-p", "--", target.remote_dir])
    result = runner.run(argv, check=False, timeout=600)
    if result.returncode == 0:
        return True
    if result.returncode == 255:  # ssh's own failure (login, network); anything else is the server's answer
        raise ssh_failure(target, result.stderr, 255, result.stderr.strip()) or RemoteUnreachable(
            f"ssh to {target.host} failed: {result.stderr.strip()[-300:]}")
    if result.stderr.strip():  # a shell that ran mkdir, and mkdir failed
        raise ToolFailed(f"mkdir -p {target.remote_dir} on {target.host} failed: {result.stderr.strip()[-300:]}")
    # No command ran and nothing was said: the account is limited to SFTP.
    runner.run(commands.sftp_batch(str(config_file), target), input=commands.sftp_mkdirs(target.remote_dir).encode(),
               timeout=120)  # fmt: skip
    return False


def _allocate(config_file: Path, target: Target, remote: Path, name: str, say: Say, shell: bool = True) -> None:
    """Make the image file at its full size without sending its bytes over the network."""
    path = remote / name
    if not target.sparse and not shell:
        raise UsageError(
            f"the account {target.user}@{target.host} allows SFTP only (no commands), so cryptsnap cannot allocate "
            f"the image there without sending its {target.size:,} bytes of zeros over the network. Either set "
            f"sparse: true for target {target.name} (the host then sees which blocks were ever written), or allow "
            f"commands for this key until `init` is done (the line init prints limits it to SFTP afterwards)")
    if target.sparse:
        room = os.statvfs(remote)
        if room.f_bavail * room.f_frsize < target.size:
            say(f"Warning: the server has {room.f_bavail * room.f_frsize >> 20} MiB free, less than the image's "
                f"{target.size >> 20} MiB: with sparse: true, runs will fail once it fills up.")  # fmt: skip
        with open(path, "wb") as image:  # SFTP setstat: the server makes a sparse file
            image.truncate(target.size)
        return
    _require_room(target, remote)
    remote_path = f"{target.remote_dir}/{name}"
    result = remote_run(config_file, target, ["fallocate", "-l", str(target.size), "--", remote_path], check=False)
    if result.returncode == 0:
        return
    if NO_SPACE in result.stderr:
        _require_room(target, remote, failed=result.stderr.strip())
    log.info("remote fallocate failed (%s); writing zeros on the server with dd", result.stderr.strip())
    say("The server cannot fallocate; writing zeros on the server side with dd (nothing crosses the network).")
    megabytes = -(-target.size // (1 << 20))
    result = remote_run(config_file, target, ["dd", "if=/dev/zero", f"of={remote_path}", "bs=1M",
                                              f"count={megabytes}", "status=none"], check=False)  # fmt: skip
    if result.returncode != 0:
        if NO_SPACE in result.stderr:
            _require_room(target, remote, failed=result.stderr.strip())
        raise ToolFailed(f"dd on the server failed (exit {result.returncode}): {result.stderr.strip()}")
    with open(path, "r+b") as image:
        image.truncate(target.size)


NO_SPACE = "No space left on device"


def grow_image(target: Target, state: TargetState, image: Path, size: int, say: Say = print) -> None:
    """Grow the image file on the server to `size` bytes without sending its bytes (fallocate
    over ssh; a sparse image grows by SFTP's truncate), then record the new size here once the
    server has it on disk. Runs with the target's locks held, before the image is attached."""
    recorded = state.image()
    fd = open_image(image, True, None)  # a regular file, whatever its size
    try:
        current = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if current not in (recorded["size"], size):
        raise IntegrityError(f"the image {target.image} is {current:,} bytes, not the {recorded['size']:,} this "
                             f"machine recorded: it was changed on the remote side; nothing was grown")  # fmt: skip
    if current < size:
        _grow(target, state, image, current, size)
    fd = open_image(image, False, size)
    try:
        os.fsync(fd)  # the new size on the server's disk before this machine relies on it
    finally:
        os.close(fd)
    state.record_image(size, recorded["luks_uuid"])
    say(f"The image {target.remote_dir}/{target.image} on {target.host} is now {size:,} bytes "
        f"(it was {recorded['size']:,}).")


def _grow(target: Target, state: TargetState, image: Path, current: int, size: int) -> None:
    room = os.statvfs(image.parent)
    free = room.f_bavail * room.f_frsize
    if not target.sparse and free < size - current:
        raise ServerFull(f"the server has {free >> 20:,} MiB free in {target.remote_dir} on {target.host}; growing "
                         f"the image needs {(size - current) >> 20:,} MiB more. Nothing was changed")  # fmt: skip
    # Through sshfs first (SFTP setstat): the server extends the file, sparse, and this
    # machine's sshfs knows the new size at once (a size changed behind its back it would
    # see only when its attribute cache expires). Then fallocate there fills the holes.
    os.truncate(image, size)
    if target.sparse:
        return
    try:
        _allocate_holes(target, state, current, size)
    except BaseException:
        os.truncate(image, current)  # as it was: nothing changed
        raise


def _allocate_holes(target: Target, state: TargetState, current: int, size: int) -> None:
    remote_path = f"{target.remote_dir}/{target.image}"
    result = runner.run(commands.ssh(str(state.ssh_config), target, ["fallocate", "-l", str(size), "--", remote_path]),
                        check=False, timeout=600)  # fmt: skip
    said = result.stderr.strip()
    if result.returncode == 0:
        return
    if result.returncode == 255:
        raise ssh_failure(target, result.stderr, 255, said) or RemoteUnreachable(f"ssh to {target.host} failed: {said}")
    if NO_SPACE in said:
        raise ServerFull(f"the server has no room to grow the image to {size:,} bytes ({said}); nothing was changed")
    if not said:  # no command ran: an account limited to SFTP (see _make_remote_dir)
        raise UsageError(f"the account {target.user}@{target.host} allows SFTP only (no commands): the image "
                         f"cannot grow there without sending {size - current:,} bytes of zeros. Set sparse: true "
                         f"for target {target.name} to grow it sparse, or allow commands for this key while resizing")
    raise ToolFailed(f"fallocate on {target.host} failed: {said[-300:]}; with sparse: true for target "
                     f"{target.name} the image grows sparse instead")  # fmt: skip


def _require_room(target: Target, remote: Path, failed: str = "") -> None:
    """Refuse, with the numbers, when the server's file system cannot hold the image (before
    allocating it, or when allocating failed: another writer may have taken the room since).

    The server's free space is what sshfs reports from its statvfs@openssh.com.
    """
    room = os.statvfs(remote)
    free, total = room.f_bavail * room.f_frsize, room.f_blocks * room.f_frsize
    if free >= target.size and not failed:
        return
    mib = 1 << 20
    said = f" (the server said: {failed})" if failed else ""
    raise ServerFull(f"the server has {free / mib:,.0f} MiB free in {target.remote_dir} on {target.host} (its file "
                     f"system holds {total / mib:,.0f} MiB); the image needs {target.size / mib:,.0f} MiB{said}. "
                     f"Nothing was left there. Make room on the server, or set a smaller size: for target "
                     f"{target.name}")  # fmt: skip


def _format_header(target: Target, state: TargetState, key: str, image: Path) -> str:
    """luksFormat a local sparse twin of the image, then copy its header area into the image.

    cryptsetup wipes the 16 MiB header area in small synchronous writes, each a round trip
    over sshfs (about 45 s on a slow link); one sequential copy of the same bytes is quick.
    The result is an ordinary LUKS2 image: nothing but the bytes' route differs.
    Returns the LUKS UUID; leaves the header backup in the state directory.
    """
    with tempfile.TemporaryDirectory(dir=state.dir) as tmp:
        twin = Path(tmp) / "image"
        with open(twin, "wb") as f:
            f.truncate(target.size)
        runner.run(commands.luks_format(str(twin), key, target.pbkdf, target.pbkdf_iterations))
        uuid = runner.run(commands.luks_uuid(str(twin))).stdout.strip()
        with contextlib.suppress(FileNotFoundError):
            state.header_backup.unlink()  # luksHeaderBackup refuses to overwrite
        runner.run(commands.luks_header_backup(str(twin), str(state.header_backup)))
        dump = luks_metadata(twin)
        header_end = min(int(segment["offset"]) for segment in dump["segments"].values())
        fd = os.open(image, os.O_WRONLY | os.O_NOFOLLOW)
        with open(twin, "rb") as source, os.fdopen(fd, "wb") as dest:
            remaining = header_end
            while remaining:
                chunk = source.read(min(remaining, 4 << 20))
                dest.write(chunk)
                remaining -= len(chunk)
            dest.flush()
            os.fsync(dest.fileno())
    return uuid


def _make_durable(image: Path) -> None:
    """Make the rename of the finished image survive a power cut of the server.

    SFTP cannot fsync a directory. An fsync of the renamed file (fsync@openssh.com) commits
    the server's journal on ext4 and XFS, which holds the rename; btrfs logs the file's new
    name with it. Without this, `init` could return while the server's disk still had only
    the unfinished image, until the server's next journal commit (5 s on ext4 by default).
    """
    fd = os.open(image, os.O_RDWR | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def authorized_keys_line(target: Target) -> str:
    public = Path(target.identity_file + ".pub")
    if public.exists():
        key = public.read_text().split()[:2]
    else:
        key = runner.run(("ssh-keygen", "-y", "-f", target.identity_file)).stdout.split()[:2]
    return f'restrict,command="internal-sftp" {" ".join(key)} cryptsnap-{target.name}@{socket.gethostname()}'


def init(target: Target, *, force: bool = False, accept_new_host_key: bool = False, say: Say = print) -> None:
    state = TargetState(target)
    key = key_path(target)
    state.ensure_dir()
    paths = Paths.of(target)
    with step("connecting"):
        pin_host_key(target, state, accept_new_host_key, say)
        meter.reset(paths.traffic)
        config_file = state.write_ssh_config(paths.traffic)
    uuid = None
    with LocalLock(target.runtime_dir, "init"):
        remove_leftovers(target)
        with step("connecting"):
            check_server_fsync(target, config_file)
            shell = _make_remote_dir(config_file, target)
        with contextlib.ExitStack() as outer:
            with step("connecting"):
                outer.enter_context(SshfsMount(target, config_file, paths.remote))
                outer.enter_context(RemoteLock(paths.remote, target.image, "init"))
            final = paths.remote / target.image
            if os.path.lexists(final) and not force:
                _keep_existing(target, state, final, say)
            else:
                uuid = _create(target, state, key, paths, config_file, shell, say, outer)
    traffic = meter.read(paths.traffic)
    say(f"Traffic: {traffic.up:,} bytes up, {traffic.down:,} bytes down.")
    if uuid is not None:
        state.record_image(target.size, uuid)
        state.set_generation(0)
        with contextlib.suppress(FileNotFoundError):
            (state.dir / "last-run.json").unlink()
    say(f"Target {target.name} is ready: {target.remote_dir}/{target.image} on {target.host}.")
    say("Restrict this key to SFTP on the server: put this line in the user's ~/.ssh/authorized_keys there:")
    say(f"  {authorized_keys_line(target)}")


def _keep_existing(target: Target, state: TargetState, image: Path, say: Say) -> None:
    """An image is already there: this target's own (moved to a new server, or `init` run
    again to pin a new host key) is kept as it is; any other is refused without --force."""
    info = os.lstat(image)
    ours = (state.image_file.exists() and state.header_backup.is_file() and stat.S_ISREG(info.st_mode)
            and info.st_size == state.image().get("size")
            and not integrity.primary_header_changed(image, state.header_backup))  # fmt: skip
    if not ours:
        raise UsageError(f"{target.remote_dir}/{target.image} already exists on {target.host} and is not the "
                         f"image this machine made for {target.name} (its LUKS header or size differs from the "
                         f"records here); `cryptsnap init --force {target.name}` overwrites it, destroying every "
                         f"snapshot")  # fmt: skip
    say(f"{target.remote_dir}/{target.image} on {target.host} is already this target's image (its LUKS header "
        f"matches the backup made here at init, and its size the recorded one): kept as it is, snapshots and all.")


def _create(target: Target, state: TargetState, key: str, paths: Paths, config_file: Path, shell: bool, say: Say,
            outer: contextlib.ExitStack) -> str:
    """Allocate, format and fill a new image beside the final name, then rename it there; its LUKS UUID."""
    final = paths.remote / target.image
    staging = target.image + ".new"
    with step("allocating"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.remote / staging)
        # Until the rename below, a failure removes the half-made image again.
        outer.callback(_remove_quietly, paths.remote / staging)
        say(f"Allocating {target.size} bytes for {target.remote_dir}/{target.image} on {target.host}.")
        _allocate(config_file, target, paths.remote, staging, say, shell)
    with step("formatting"):
        say("Formatting as LUKS2 (4096-byte sectors).")
        uuid = _format_header(target, state, key, paths.remote / staging)
        say(f"Saved the LUKS header backup to {state.header_backup}.")
    with contextlib.ExitStack() as inner:
        with step("attaching"):
            loop = inner.enter_context(LoopDevice(paths.remote / staging, False, target.size, paths.loop_record))
        with step("unlocking"):
            mapping = inner.enter_context(LuksMapping(loop.device, paths.mapping, key, False, uuid))
        with step("formatting"):
            say(f"Making a {target.filesystem} file system inside.")
            runner.run(commands.mkfs(target.filesystem, mapping.path))
        with step("mounting"):
            inner.enter_context(FsMount(mapping.path, paths.fs, target.filesystem, False))
            snapshot.prepare_filesystem(paths.fs, layered=target.history == "layers")
            if target.history == "layers":
                say("Its history will be kept as overlay layers (history: layers), for as long as it exists.")
    with step("finalizing"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(final)
        os.rename(paths.remote / staging, final)
        _make_durable(final)
    return uuid

