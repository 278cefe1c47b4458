"""The mount stack's layers. Each is a context manager that opens on enter, closes on exit,
and can find and remove what a crashed run of its kind left behind (``remove_leftovers``).

Order, outermost first: local lock, sshfs mount, remote lock, loop device, LUKS mapping,
file system mount. stack.py enters them through an ExitStack.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from . import commands, runner
from .errors import Busy, ConnectionLost, IntegrityError, KeyWrong, RemoteUnreachable, ToolFailed, UnsafeServer
from .mounts import is_mountpoint, mounted_under

log = logging.getLogger(__name__)

UNREACHABLE_HINTS = (
    "Connection refused", "Connection timed out", "Connection reset", "Could not resolve", "No route to host",
    "Network is unreachable", "Permission denied", "Connection closed", "read: Connection", "Operation timed out",
)  # fmt: skip


def dm_exists(name: str) -> bool:
    """Whether the kernel has a device-mapper device of this name, with a table or not.

    /dev/mapper/NAME and /sys/block/dm-N appear only once a table is loaded: a device that
    cryptsetup created and was killed before loading its table (found by the soak) is in
    neither, only in device-mapper's own list, which `dmsetup info` asks."""
    for name_file in Path("/sys/block").glob("dm-*/dm/name"):
        try:
            if name_file.read_text().strip() == name:
                return True
        except OSError:
            continue
    if not shutil.which("dmsetup") or not os.path.exists("/dev/mapper/control"):
        return False  # no device-mapper here (the test machines' own kernel): nothing to find
    return runner.run(commands.dm_info(name), check=False).returncode == 0


def _retry(argv: tuple[str, ...], attempts: int = 5) -> None:
    """Run a teardown command, retrying briefly: udev or a closing file can hold a device a moment."""
    for attempt in range(attempts):
        try:
            runner.run(argv)
            return
        except ToolFailed:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _fuse_unmount(mountpoint: Path, attempts: int = 5) -> None:
    """Unmount sshfs, retrying while it is busy, detaching it lazily if it stays busy.

    sshfs unmounts itself when its connection ends, at any moment: a failure once the mount
    is gone is that race (fusermount3 says "not mounted" or "Invalid argument"), not a failure.
    """
    for attempt in range(attempts):
        if not is_mountpoint(mountpoint):
            return
        try:
            runner.run(("fusermount3", "-u", str(mountpoint)))
            return
        except ToolFailed:
            time.sleep(0.2 * (attempt + 1))
    if is_mountpoint(mountpoint):
        log.error("sshfs at %s is busy; detaching it lazily", mountpoint)
        _fuse_detach(mountpoint)


def _fuse_detach(mountpoint: Path) -> None:
    try:
        runner.run(commands.fuse_unmount(str(mountpoint)))
    except ToolFailed:
        if is_mountpoint(mountpoint):
            raise


class LocalLock:
    """This machine's lock on a target: one backup, mount or restore view at a time."""

    def __init__(self, runtime_dir: Path, what: str, inherited_fd: int | None = None):
        self.path = runtime_dir.parent / f"{runtime_dir.name}.lock"
        self.target = runtime_dir.name
        self.what = what
        # A lock taken by the parent (cryptsnapd) and handed down: taking it again through the
        # same open file succeeds, so the child holds it without a moment in which it was free.
        self.inherited_fd = inherited_fd
        self.file = None

    def __enter__(self) -> LocalLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.file = open(self.path, "a+") if self.inherited_fd is None else os.fdopen(self.inherited_fd, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise Busy(f"target {self.target} is busy: {holder} holds its lock") from None
        held = holder_file(self.path)
        if held.exists():  # a detached view (`cryptsnap mount`, the restore unit) outlives its process
            info = held.read_text().strip()
            self.file.close()
            raise Busy(f"target {self.target} is busy: {info}")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{self.what} (pid {os.getpid()})\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file and not self.file.closed:
            self.file.truncate(0)
            self.file.close()

    def hand_over(self) -> None:
        """Close this process's handle but keep the lock: a child started with it now holds it."""
        self.file.close()


def holder_file(lock_path: Path) -> Path:
    """Marks a target as held by a view that stays mounted after its command exits."""
    return lock_path.with_suffix(".held")


class SshfsMount:
    """The remote directory, mounted with sshfs using cryptsnap's own ssh configuration."""

    step = "connecting"

    def __init__(self, target, ssh_config: Path, mountpoint: Path, ssh_log: Path | None = None):
        self.target = target
        self.ssh_config = ssh_config
        self.mountpoint = mountpoint
        self.ssh_log = ssh_log

    @staticmethod
    def remove_leftovers(mountpoint: Path) -> None:
        if is_mountpoint(mountpoint):
            log.warning("unmounting sshfs left at %s by an earlier run", mountpoint)
            _fuse_detach(mountpoint)

    def __enter__(self) -> SshfsMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.ssh_log:
            self.ssh_log.write_text("")
        argv = commands.sshfs(str(self.ssh_config), self.target, str(self.mountpoint), sshfs_contains_symlinks(),
                              str(self.ssh_log) if self.ssh_log else None)  # fmt: skip
        try:
            runner.run(argv, timeout=120)
        except BaseException as exc:
            # sshfs mounts before its ssh has logged in: a failure or a cancel in that window
            # leaves a mount, and an ssh that nobody reads from and that never exits by itself.
            self._close(straggler_timeout=2.0, stragglers_expected=True)
            if isinstance(exc, ToolFailed):
                raise self._diagnose(exc) from None
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close(straggler_timeout=15.0)

    def _close(self, straggler_timeout: float, stragglers_expected: bool = False) -> None:
        _fuse_unmount(self.mountpoint)
        # After a failed login the waiting ssh is expected to be left; after a run, it is not.
        level = logging.WARNING if stragglers_expected else logging.ERROR
        wait_for_exit(str(self.ssh_config), straggler_timeout, level)
        if is_mountpoint(self.mountpoint):  # a killed straggler may have mounted meanwhile
            _fuse_detach(self.mountpoint)

    def _diagnose(self, failure: ToolFailed) -> Exception:
        """Say why sshfs failed. sshfs hides ssh's own message, so ask ssh once more, directly."""
        target = self.target
        probe = runner.run(commands.ssh(str(self.ssh_config), target, ["true"]), check=False, timeout=60)
        known = ssh_failure(target, probe.stderr, probe.returncode, failure.stderr)
        if known:
            return known
        if "No such file or directory" in failure.stderr:
            return RemoteUnreachable(f"{target.user}@{target.host}:{target.port}: the remote directory "
                                     f"{target.remote_dir!r} does not exist; run `cryptsnap init {target.name}`")
        return failure


def _ssh_processes(ssh_config: Path) -> list[psutil.Process]:
    """The ssh under the run's sshfs (its command line names the run's ssh_config)."""
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "ssh" and str(ssh_config) in " ".join(p.info["cmdline"] or [])]  # fmt: skip


def _ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class ConnectionWatch:
    """Stops the run's tools as soon as its ssh connection ends, and starts no more of them.

    Without it a run noticed the loss only when a tool failed, and some never fail soon: on
    ext2, rsync went on filling the page cache against a dead device for 20 s and more after
    ssh was killed. The stopped tool's failure is then explained by connection_lost. Stopped
    (stop()) before unwinding begins: unwinding a dead connection must not be cut short.
    """

    INTERVAL = 0.5

    def __init__(self, ssh_config: Path):
        self.ssh_config = ssh_config
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> ConnectionWatch:
        ssh = _ssh_processes(self.ssh_config)
        if ssh:
            self.thread = threading.Thread(target=self._watch, args=(ssh[0],), name="connection-watch", daemon=True)
            self.thread.start()
        return self

    def _watch(self, ssh: psutil.Process) -> None:
        parent = os.getppid()
        while not self.done.wait(self.INTERVAL):
            if _ended(ssh):
                # A job whose cryptsnapd died loses its ssh too (systemd kills the service's
                # processes): that run ends as interrupted, by its own signal (PR_SET_PDEATHSIG),
                # not as a lost connection.
                if not self.done.is_set() and os.getppid() == parent:
                    log.warning("the ssh connection ended: stopping the run")
                    runner.stop_all("the ssh connection ended")
                return

    def stop(self) -> None:
        """Before unwinding: the watch ends, and commands may run again to close the layers."""
        self.done.set()
        if self.thread and self.thread is not threading.current_thread():
            self.thread.join()
        runner.allow_again()

    def __exit__(self, *exc) -> None:
        self.stop()


def connection_lost(target, ssh_config: Path, mountpoint: Path, ssh_log: Path) -> ConnectionLost | None:
    """If the run's ssh connection is gone (killed, cut, timed out), say so in ssh's own words.

    Look before unwinding: unwinding ends the connection itself. When ssh ends, sshfs fails
    every request in flight and unmounts itself; what then fails above it (I/O errors in
    the file system, rsync's "error in file IO") is only the consequence.
    """
    alive = any(not _ended(p) for p in _ssh_processes(ssh_config))
    if alive and is_mountpoint(mountpoint):
        try:
            os.stat(mountpoint)
            return None
        except OSError:
            pass
    try:
        said = [line.strip() for line in ssh_log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        said = []
    said = [line for line in said if not line.startswith(("Authenticated to", "Warning: Permanently"))]
    detail = "; ".join(said[-2:]) if said else "ssh ended without a message (killed?)"
    return ConnectionLost(f"lost the connection to {target.host} (ssh: {detail})")


FSYNC_EXTENSION = "fsync@openssh.com"


def check_server_fsync(target, ssh_config: Path) -> bool:
    """Whether the server's SFTP offers fsync; UnsafeServer if not and the target requires it.

    The block device's flushes reach the server's disk only through it (sshfs turns an fsync
    of the image into this request): without it a commit that cryptsnap saw succeed can
    still be lost, whole or in part, when the server loses power.
    """
    probe = runner.run(commands.sftp_probe(str(ssh_config), target), input=b"", check=False, timeout=120)
    if probe.returncode != 0:
        raise ssh_failure(target, probe.stderr, probe.returncode) or ToolFailed(
            f"sftp could not talk to {target.host}: {probe.stderr.strip()[-300:]}")
    offered = re.findall(r'Server supports extension "([^"]+)"', probe.stderr)
    if FSYNC_EXTENSION in offered:
        return True
    text = (f"the SFTP server of {target.host} does not offer {FSYNC_EXTENSION} (offered: "
            f"{', '.join(offered) or 'no extensions'}): cryptsnap cannot make sure a snapshot is on the server's "
            f"disk before it calls it complete, and a power cut of the server could lose it or damage the image. "
            f"Use OpenSSH's internal-sftp or sftp-server without `-P fsync`, or, to accept the risk, set "
            f"require_fsync: false for target {target.name}")  # fmt: skip
    if target.require_fsync:
        raise UnsafeServer(text)
    log.warning("%s (accepted: require_fsync is false)", text)
    return False


def ssh_failure(target, said: str, returncode: int, fallback: str = "") -> Exception | None:
    """What ssh's stderr and exit status mean for the user (None: ssh itself did not fail)."""
    where = f"{target.user}@{target.host}:{target.port}"
    if "Host key verification failed" in said or "REMOTE HOST IDENTIFICATION" in said:
        return IntegrityError(
            f"the ssh host key of {where} is not the one pinned at `cryptsnap init` "
            f"({target.state_dir / 'known_hosts'}): someone may be intercepting the connection. If the server "
            f"really changed its key, check the new fingerprint out of band, then run "
            f"`cryptsnap init --accept-new-host-key {target.name}`"
        )
    if "Permission denied" in said:
        return RemoteUnreachable(f"{where} refused the login with {target.identity_file}; check the "
                                 f"authorized_keys line `cryptsnap init` printed")
    if returncode == 255 or any(hint in said for hint in UNREACHABLE_HINTS):
        detail = "\n".join(said.strip().splitlines()[-3:]) or fallback.strip()
        return RemoteUnreachable(f"cannot reach {where}: {detail}")
    return None


def wait_for_exit(marker: str, timeout: float = 15.0, level: int = logging.ERROR) -> None:
    """Wait until no sshfs/ssh/meter process using `marker` (our ssh config) is left.

    After the unmount they exit by themselves within moments; a run must not return while
    they still hold the connection.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
        if not left:
            return
        if time.monotonic() > deadline:
            for proc in left:
                log.log(level, "killing pid %d, still running after the unmount: %s", proc.pid,
                          " ".join(proc.info["cmdline"] or []))  # fmt: skip
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            return
        time.sleep(0.05)


def sshfs_contains_symlinks() -> bool:
    """Whether this sshfs has -o contain_symlinks (absolute server symlinks kept inside the mount)."""
    global _contain_symlinks
    if _contain_symlinks is None:
        try:
            helptext = runner.run(("sshfs", "--help"), check=False)
            _contain_symlinks = "contain_symlinks" in helptext.stdout + helptext.stderr
        except ToolFailed:
            _contain_symlinks = False
    return _contain_symlinks


_contain_symlinks: bool | None = None


class RemoteLock:
    """A lock directory next to the image, IMAGE.lock, holding its owner (host, pid, what,
    since), so that a second machine cannot open the image read-write.

    It appears whole or not at all: the directory is made and its owner written under a name
    of this process's own, IMAGE.lock.HOST.PID.new, and then renamed into place, which fails
    while a lock with an owner is there; it goes the same way, renamed to IMAGE.lock.HOST.PID.gone
    before it is removed. (Made and removed in place, a run cut off between the mkdir and the
    owner's write, or between the owner's removal and the rmdir, left a lock that named no one,
    and every later run was refused as busy.)
    A lock this host left behind (its process is gone) is taken over, and so is one this very
    process left: an earlier try of the same run, cut off from the server before it could
    remove it (a process runs one stack at a time, under the target's local lock). Another
    host's lock makes the run fail as busy, saying whose.
    """

    step = "connecting"

    def __init__(self, remote_dir: Path, image: str, what: str, break_lock: bool = False):
        self.path = remote_dir / f"{image}.lock"
        self.what = what
        self.break_lock = break_lock
        self.held = False

    def _owner(self) -> dict:
        try:
            fd = os.open(self.path / "owner", os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd) as owner:
                found = json.loads(owner.read(4096))
            return found if isinstance(found, dict) else {}
        except (OSError, ValueError):
            return {}

    def _draft(self, host: str, pid: int | str, kind: str = "new") -> Path:
        return self.path.with_name(f"{self.path.name}.{host}.{pid}.{kind}")

    def __enter__(self) -> RemoteLock:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "what": self.what, "since": int(time.time())}
        draft = self._draft(me["host"], me["pid"])
        for earlier in (draft, self._draft(me["host"], me["pid"], "gone")):
            _remove_lock(earlier)  # an earlier try of this run, cut off before its rename or removal
        os.mkdir(draft)
        try:
            (draft / "owner").write_text(json.dumps(me))
            self._take(draft, me)
        finally:
            _remove_lock(draft)  # (gone once renamed)
        self.held = True
        self._remove_dead_drafts(me["host"])
        return self

    def _take(self, draft: Path, me: dict) -> None:
        for _ in range(2):
            try:
                os.rename(draft, self.path)  # onto a lock with an owner: fails (ENOTEMPTY, or SFTP's failure)
                return
            except OSError:
                if not os.path.lexists(self.path):
                    raise
            owner = self._owner()
            this_host = owner.get("host") == me["host"]
            earlier_try = this_host and owner.get("pid") == me["pid"]
            if earlier_try or self.break_lock or (this_host and not _alive(owner.get("pid"))):
                if earlier_try:
                    log.info("taking over the remote lock %s an earlier try of this run left", self.path.name)
                else:
                    log.warning("removing stale remote lock %s (%s)", self.path.name, owner or "no owner recorded")
                _remove_lock(self.path)
                continue
            if not owner:
                raise Busy(f"the image's lock {self.path.name} on the server names no owner (left by an older "
                           "cryptsnap cut off while taking it, or not made by cryptsnap); if no other machine "
                           "uses this image, retry with --break-lock")  # fmt: skip
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner.get("since", 0)))
            raise Busy(
                f"the image is locked by {owner.get('what', '?')} on host {owner.get('host', '?')} "
                f"(pid {owner.get('pid', '?')}) since {since}; if that run is gone, retry with --break-lock"
            )
        raise Busy(f"could not take the remote lock {self.path.name}")

    def _remove_dead_drafts(self, host: str) -> None:
        """Locks this host's runs were making or removing when cut off (other hosts' are theirs to judge).
        A sweep: if the server does not answer now, the next lock sweeps again."""
        try:
            drafts = list(self.path.parent.glob(f"{self.path.name}.{host}.*"))
        except OSError as exc:  # (a dead sshfs: "Transport endpoint is not connected")
            log.debug("not sweeping this host's remote lock drafts: %s", exc)
            return
        for draft in drafts:
            pid, _, kind = draft.name.removeprefix(f"{self.path.name}.{host}.").partition(".")
            if kind in ("new", "gone") and pid.isdigit() and not _alive(int(pid)):
                log.warning("removing %s, a remote lock a cut-off run of this host left", draft.name)
                _remove_lock(draft)

    def __exit__(self, *exc) -> None:
        if self.held:
            self._release()
            self.held = False

    def _release(self) -> None:
        gone = self._draft(socket.gethostname(), os.getpid(), "gone")
        try:
            os.rename(self.path, gone)
        except OSError:
            gone = self.path  # (not there any more, or the server does not answer: as before)
        _remove_lock(gone)

    @classmethod
    def remove_leftovers(cls, remote_dir: Path, image: str) -> None:
        """What a dead run of this host left on the server: its lock and its drafts; another
        host's lock is theirs. Only call while holding the target's local lock (no run of this
        host on this target is alive then, whatever pid the lock names)."""
        lock = cls(remote_dir, image, what="cleaning up")
        host = socket.gethostname()
        owner = lock._owner()
        if owner.get("host") == host:
            log.warning("removing this host's remote lock left by %s (pid %s)", owner.get("what"), owner.get("pid"))
            lock._release()
        lock._remove_dead_drafts(host)


def _remove_lock(path: Path) -> None:
    """A lock directory, or whatever else the server put in its place (never followed)."""
    with contextlib.suppress(OSError):  # gone, or the server does not answer: the next step says so
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LoopDevice:
    """The image file attached to a loop device. The image must be a regular file of the
    expected size: it is opened with O_NOFOLLOW and handed to losetup as that open file,
    so a symlink planted by the server can never point losetup at a local file."""

    step = "attaching"

    def __init__(self, image: Path, readonly: bool, expected_size: int | None, record: Path | None = None):
        self.image = image
        self.readonly = readonly
        self.expected_size = expected_size
        self.record = record  # remembers the device: its back-file may not show our path later
        self.device: str | None = None

    @staticmethod
    def remove_leftovers(under: Path, record: Path | None = None) -> None:
        """Detach loop devices backed by a file under `under`, or the one recorded in `record`.

        The record is needed when the back-file no longer shows our path: once sshfs is gone,
        or when the loop was set up in another mount namespace (cryptsnapd's, before it was
        restarted), the kernel shows it relative to the lost mount, e.g. /home.img. A run
        killed while losetup ran leaves the record "? IMAGE" (written before): the device is
        then any whose back-file is just /IMAGE, the root of a mount no longer there.
        """
        recorded = record.read_text().split() if record and record.exists() else []
        listing = json.loads(runner.run(commands.loop_list()).stdout or "{}")
        for loop in listing.get("loopdevices", []):
            back = (loop.get("back-file") or "").removesuffix(" (deleted)")
            ours = back.startswith(str(under) + "/")
            if len(recorded) >= 2 and back.endswith("/" + recorded[1]):
                ours = ours or loop["name"] == recorded[0] or (recorded[0] == "?" and back == "/" + recorded[1])
            if ours:
                log.warning("detaching loop device %s left by an earlier run (%s)", loop["name"], back)
                _retry(commands.loop_detach(loop["name"]))
        if record and record.exists():
            record.unlink()

    def _note(self, device: str | None) -> None:
        if self.record:
            self.record.write_text(f"{device or '?'} {self.image.name}\n")

    def __enter__(self) -> LoopDevice:
        fd = open_image(self.image, self.readonly, self.expected_size)
        try:
            self._note(None)  # before losetup: killed before the device is known, it can still be found
            try:
                result = runner.run(commands.loop_attach(f"/dev/fd/{fd}", self.readonly), pass_fds=(fd,))
            except ToolFailed:  # losetup said no: nothing attached
                if self.record:
                    self.record.unlink(missing_ok=True)
                raise
            self.device = result.stdout.strip()
            self._note(self.device)
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.device:
            _retry(commands.loop_detach(self.device))
            self.device = None
        if self.record and self.record.exists():
            self.record.unlink()


class CachedDevice:
    """The image as /dev/nbdN, served by cryptsnap.nbd through the local cache of its metadata
    blocks (cryptsnap.blockcache), instead of a loop device: a run then downloads almost
    nothing but what it cannot know. The server process runs in its own session and is
    stopped last, after the file system and the mapping above it are closed."""

    step = "attaching"

    def __init__(self, image: Path, expected_size: int, cache_dir: Path, identity: str, fs_offset: int,
                 anchor: int, record: Path, log_file: Path):  # fmt: skip
        self.image = image
        self.expected_size = expected_size
        self.cache_dir = cache_dir
        self.identity = identity
        self.fs_offset = fs_offset  # where the file system starts in the image (after the LUKS header)
        self.anchor = fs_offset + anchor  # the block every commit rewrites; `anchor` is a file system offset
        self.record = record  # "DEVICE PID" of the server, for remove_leftovers after a crash
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self.device: str | None = None

    @staticmethod
    def available() -> bool:
        """Whether this kernel has nbd devices (loading the module if it can)."""
        if not Path("/sys/module/nbd").exists():
            with contextlib.suppress(ToolFailed):
                runner.run(("modprobe", "nbd"), check=False, timeout=30)
        return any(Path("/sys/block").glob("nbd*"))

    @staticmethod
    def remove_leftovers(record: Path, cache_dir: Path | None = None) -> None:
        """Stop the server a crashed run left (the cache it held is then not trusted): the one
        in the record, or, killed before the record was written, any serving `cache_dir`."""
        pids = set()
        if record.exists():
            with contextlib.suppress(ValueError):
                pids.add(int(record.read_text().partition(" ")[2]))
        for proc in psutil.process_iter(["pid", "cmdline"]) if cache_dir else ():
            cmdline = proc.info["cmdline"] or []
            if "cryptsnap.nbd" in cmdline and str(cache_dir) in cmdline:
                pids.add(proc.info["pid"])
        for pid in sorted(pids):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if "cryptsnap.nbd" in " ".join(proc.cmdline()):
                    log.warning("stopping the block device server left by an earlier run (pid %s)", pid)
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except psutil.TimeoutExpired:
                        proc.kill()
        record.unlink(missing_ok=True)

    def __enter__(self) -> CachedDevice:
        fd = open_image(self.image, False, self.expected_size, os.O_DIRECT)
        argv = [sys.executable, "-m", "cryptsnap.nbd", "--image-fd", str(fd), "--size", str(self.expected_size),
                "--cache", str(self.cache_dir), "--identity", self.identity, "--anchor", str(self.anchor)]  # fmt: skip
        try:
            with open(self.log_file, "w") as errors:
                self.proc = runner.start_service(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                                 pass_fds=(fd,), text=True)  # fmt: skip
        finally:
            os.close(fd)
        self.record.write_text(f"? {self.proc.pid}")
        try:
            ready = self._line(timeout=120).split(maxsplit=2)
            if ready[:1] != ["ready"]:
                raise ToolFailed(f"the block device server did not start: {self._errors()}")
        except BaseException:
            self._stop(save=False)
            raise
        self.device = ready[1]
        self.record.write_text(f"{self.device} {self.proc.pid}")
        for said in self.log_file.read_text().splitlines():  # what it had to warn of while starting
            log.warning("%s", said)
        log.info("block cache of %s: %s", self.image.name, ready[2] if len(ready) > 2 else "?")
        return self

    def cover(self, ranges: list[tuple[int, int]]) -> None:
        """Keep written blocks in these byte ranges of the file system (its metadata)."""
        shifted = (f"{self.fs_offset + start} {self.fs_offset + end}" for start, end in ranges)
        self.proc.stdin.write("cover " + " ".join(shifted) + "\n")
        self.proc.stdin.flush()

    def __exit__(self, *exc) -> None:
        if self.proc:
            self._stop(save=True)

    def _stop(self, save: bool) -> None:
        proc, self.proc = self.proc, None
        if proc.poll() is not None:  # it died during the run: nothing to stop, nothing was saved
            log.error("the block device server of %s had ended during the run (exit %s): %s", self.device,
                      proc.returncode, self._errors())  # fmt: skip
        else:
            try:
                if save:
                    proc.stdin.write("stop\n")
                    proc.stdin.flush()
                else:
                    proc.terminate()
                proc.stdin.close()
                proc.wait(timeout=120)
                said = proc.stdout.read().strip()
                log.info("block cache: %s", said or f"server exited {proc.returncode}: {self._errors()}")
            except (OSError, subprocess.TimeoutExpired):
                log.error("the block device server of %s did not stop; killing it: %s", self.device,
                          self._errors())  # fmt: skip
                proc.kill()
                proc.wait()
        if self.record.exists():
            self.record.unlink()
        self.device = None

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else ""

    def _errors(self) -> str:
        try:
            return " ".join(self.log_file.read_text().strip().splitlines()[-3:]) or "(no error output)"
        except OSError:
            return "(no error output)"


DAMAGE = ("checksum verify failed", "csum failed", "transid verify failed", "bad tree block", "parent transid",
          "corrupt leaf", "corrupt node", "bad superblock", "superblock checksum mismatch", "open_ctree failed")


def damage_reported(device: str, messages: list[str]) -> str:
    """What these kernel messages say about damage on this device (its dm-N name), if anything."""
    about = re.compile(rf"\(device {re.escape(Path(os.path.realpath(device)).name)}[ )]")
    found = [m for m in messages if about.search(m) and any(d in m for d in DAMAGE)]
    return "; ".join(dict.fromkeys(found[-3:]))


class KernelMessages:
    """The kernel's messages from now on (/dev/kmsg), to say why a mount failed: only these,
    not those of an earlier mount of a device that had the same name."""

    def __init__(self):
        try:
            self.fd: int | None = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:  # not root, or no /dev/kmsg: the failure is then told without them
            self.fd = None

    def read(self) -> list[str]:
        messages = []
        while self.fd is not None:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # records overwritten while we read: go on with the next
                continue
            if not record:
                break
            messages.append(record.decode(errors="replace").split(";", 1)[-1].split("\n", 1)[0])
        return messages

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_image(image: Path, readonly: bool, expected_size: int | None, flags: int = 0) -> int:
    """Open the image on the sshfs mount, refusing anything but a regular file of the expected size."""
    flags |= (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NOFOLLOW
    try:
        # Look before opening: the server's own open(2) of a FIFO would wait for a writer,
        # and hang the run. (A server that swaps the file between the two can still make
        # the run hang, not make it read or write anything else: the open refuses all but
        # a regular file, and fstat below checks again.)
        kind = os.lstat(image).st_mode
        if not stat.S_ISREG(kind):
            raise IntegrityError(f"the image {image.name} is not a regular file on the remote side "
                                 f"({_file_kind(kind)}); it was replaced")
        fd = os.open(image, flags)
    except FileNotFoundError:
        raise RemoteUnreachable(
            f"the image {image.name} is not on the remote side; run `cryptsnap init` for this target"
        ) from None
    except OSError as exc:
        raise IntegrityError(
            f"cannot open the image {image.name} as a regular file: {exc.strerror} "
            f"(a symlink or special file where the image should be?)"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IntegrityError(f"the image {image.name} is not a regular file on the remote side")
        if expected_size is not None and info.st_size != expected_size:
            raise IntegrityError(
                f"the image {image.name} is {info.st_size} bytes, not the {expected_size} it was "
                f"created with: it was truncated or replaced on the remote side"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def luks_metadata(header: Path) -> dict:
    """The LUKS2 metadata (segments, key slots, config) of a header file or image, as cryptsetup reads it."""
    return json.loads(runner.run(commands.luks_metadata(str(header))).stdout)


class LuksMapping:
    """The dm-crypt mapping /dev/mapper/NAME over the loop device."""

    step = "unlocking"

    def __init__(self, device: str, name: str, key_file: str, readonly: bool, expected_uuid: str | None,
                 header: Path | None = None):  # fmt: skip
        self.device = device
        self.name = name
        self.key_file = key_file
        self.readonly = readonly
        self.expected_uuid = expected_uuid
        # The header backup saved at `init`, when this machine has it: the image's own header
        # is then neither downloaded nor trusted (`cryptsnap check` compares the two).
        self.header = header if header is not None and header.is_file() else None
        self.opened = False

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"

    @staticmethod
    def remove_leftovers(name: str) -> None:
        if not dm_exists(name):
            return
        log.warning("closing LUKS mapping %s left by an earlier run", name)
        try:
            _retry(commands.luks_close(name), attempts=3)
        except ToolFailed:
            if not dm_exists(name):
                return  # gone all the same (udev or a racing close)
            # cryptsetup killed between creating the device and loading its table leaves one
            # without a table (and without /dev/mapper/NAME): cryptsetup does not know it.
            _retry(commands.dm_remove(name))

    def __enter__(self) -> LuksMapping:
        if self.expected_uuid is not None and self.header is None:
            uuid = runner.run(commands.luks_uuid(self.device), check=False)
            if uuid.returncode != 0 or uuid.stdout.strip() != self.expected_uuid:
                found = uuid.stdout.strip() or "no LUKS header"
                raise IntegrityError(f"the image's LUKS header is not the one made at `cryptsnap init` "
                                     f"(UUID {found}, expected {self.expected_uuid}); it was replaced or damaged")
        try:
            runner.run(commands.luks_open(self.device, self.name, self.key_file, self.readonly,
                                          str(self.header) if self.header else None))  # fmt: skip
        except ToolFailed as exc:
            if exc.returncode == 2 or "No key available" in exc.stderr:
                raise KeyWrong(f"the key in {self.key_file} does not open the image") from None
            raise
        self.opened = True
        return self

    def __exit__(self, *exc) -> None:
        if self.opened:
            _retry(commands.luks_close(self.name, str(self.header) if self.header else None))
            self.opened = False


class FsMount:
    """The file system inside the image, mounted nodev,nosuid,noatime (and ro for views).

    writable_later: mounted read-only until make_writable(), for a run that may find it has
    nothing to write (skip_unchanged). Unmounting a file system mounted read-write costs a
    commit on some kernels even when nothing was written (Debian 12's 6.1: 36-49 KB up);
    one mounted read-only costs nothing.
    """

    step = "mounting"

    def __init__(self, device: str, mountpoint: Path, filesystem: str, readonly: bool, writable_later: bool = False):
        self.device = device
        self.mountpoint = mountpoint
        self.filesystem = filesystem
        self.readonly = readonly
        self.read_only_for_now = writable_later and not readonly
        self.mounted = False

    def make_writable(self) -> None:
        if self.read_only_for_now:
            runner.run(commands.remount_rw(str(self.mountpoint)))
            self.read_only_for_now = False

    @staticmethod
    def remove_leftovers(mountpoint: Path) -> None:
        if is_mountpoint(mountpoint):
            log.warning("unmounting %s left by an earlier run", mountpoint)
            FsMount._unmount(mountpoint)

    @staticmethod
    def _unmount(mountpoint: Path) -> None:
        """With what is mounted inside it first: a layered image's overlays (cryptsnap.overlay)."""
        for inner in mounted_under(mountpoint):
            _retry(commands.unmount(inner))
        _retry(commands.unmount(str(mountpoint)))

    def __enter__(self) -> FsMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True, mode=0o700)
        preen = None if self.readonly else commands.fsck_preen(self.device, self.filesystem)
        if preen:
            self._preen(preen)
        kernel = KernelMessages()
        was_mounted = is_mountpoint(self.mountpoint)
        try:
            runner.run(commands.mount(self.device, str(self.mountpoint), self.filesystem,
                                      self.readonly or self.read_only_for_now))  # fmt: skip
        except BaseException as exc:
            # mount stopped (the connection's end, a cancel) after the kernel had mounted the file
            # system: it is mounted all the same, and the mapping below stays in use until it is
            # unmounted. __exit__ does that, for a caller that registered it before entering
            # (open_stack); it cannot be done here: after the connection's end no command may run
            # until the run unwinds.
            self.mounted = not was_mounted and is_mountpoint(self.mountpoint)
            if not isinstance(exc, ToolFailed):
                raise
            damage = damage_reported(self.device, kernel.read())
            if damage:
                raise IntegrityError(
                    f"the {self.filesystem} file system in the image is damaged, it cannot be mounted; the kernel "
                    f"said: {damage}. The server changed blocks of it (ciphertext decrypts to garbage). Nothing "
                    f"was written. `cryptsnap check` tells whether this machine's metadata cache can mend it "
                    f"(`--repair`); else see docs/restore-by-hand.md to copy out what is readable") from exc
            raise
        finally:
            kernel.close()
        self.mounted = True
        return self

    def __exit__(self, *exc) -> None:
        if self.mounted:
            self._unmount(self.mountpoint)
            self.mounted = False

    def _preen(self, argv) -> None:
        """Repair what an unfinished run left inconsistent (e2fsck exit 1: errors corrected);
        refuse to write into what it cannot repair safely (4) or could not check (8 and up)."""
        result = runner.run(argv, check=False)
        said = " ".join(line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip())
        if result.returncode & 1 and result.returncode < 4:
            log.warning("repaired the %s file system in the image after an unfinished run: %s", self.filesystem, said)
        elif result.returncode >= 4:
            raise IntegrityError(f"the {self.filesystem} file system in the image has errors that e2fsck -p cannot "
                                 f"repair safely (exit {result.returncode}: {said[-400:]}). Nothing was written; "
                                 f"see docs/restore-by-hand.md to copy out what is readable, or repair it "
                                 f"with e2fsck on the opened image")  # fmt: skip
