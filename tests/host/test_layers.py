"""Mount-stack layers on the host, for real: sshd on 127.0.0.1, sshfs, loop devices, mkfs, mount.

Only `cryptsetup open` needs device-mapper, which these machines lack; everything up to it
runs here, and so does every failure before it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cryptsnap import commands, runner, stack
from cryptsnap.errors import Busy, IntegrityError, MissingTool, StepFailed, ToolFailed
from cryptsnap.initialize import _allocate, _format_header, pin_host_key, remote_run
from cryptsnap.layers import FsMount, LocalLock, LoopDevice, RemoteLock, SshfsMount
from cryptsnap.mounts import is_mountpoint
from cryptsnap.stack import Paths, open_stack
from cryptsnap.state import TargetState, key_path
from tests.support.checks import assert_nothing_left, cryptsnap, leftovers
from tests.support.runs import kill_server_sessions


def prepare(setup, luks: bool = True):
    """What `init` does up to `cryptsetup open`: pinned key, remote dir, allocated image, LUKS header."""
    target = setup.load()
    state = TargetState(target)
    state.ensure_dir()
    pin_host_key(target, state, False, lambda line: None)
    config_file = state.write_ssh_config()
    remote_run(config_file, target, ["mkdir", "-p", "--", target.remote_dir])
    paths = Paths.of(target)
    with SshfsMount(target, config_file, paths.remote):
        _allocate(config_file, target, paths.remote, target.image, lambda line: None)
        uuid = _format_header(target, state, key_path(target), paths.remote / target.image) if luks else "none"
    state.record_image(target.size, uuid)
    return target, state, paths


def test_sshfs_loop_and_filesystem_layers_open_and_close(setup):
    target, state, paths = prepare(setup, luks=False)
    with contextlib.ExitStack() as stack:
        stack.enter_context(SshfsMount(target, state.ssh_config, paths.remote))
        assert is_mountpoint(paths.remote)
        loop = stack.enter_context(LoopDevice(paths.remote / target.image, False, target.size))
        runner.run(commands.mkfs("ext2", loop.device))
        stack.enter_context(FsMount(loop.device, paths.fs, "ext2", False))
        (paths.fs / "hello").write_text("through sshfs, loop and ext2\n")
        assert leftovers(setup), "the layers should be visible while open"
    assert_nothing_left(setup)
    # Reopened read-only, the data is there: it went all the way to the server's file.
    with contextlib.ExitStack() as stack:
        stack.enter_context(SshfsMount(target, state.ssh_config, paths.remote))
        loop = stack.enter_context(LoopDevice(paths.remote / target.image, True, target.size))
        stack.enter_context(FsMount(loop.device, paths.fs, "ext2", True))
        assert (paths.fs / "hello").read_text() == "through sshfs, loop and ext2\n"
        with pytest.raises(OSError):
            (paths.fs / "new").write_text("read-only")
    assert_nothing_left(setup)


def test_luks_format_dump_and_header_backup_on_the_host(setup):
    target, state, paths = prepare(setup)
    image = Path(setup.server.remote_dir) / target.image
    assert image.stat().st_size == target.size
    dump = subprocess.run(["cryptsetup", "luksDump", str(image)], capture_output=True, text=True, check=True).stdout
    assert "Version:       \t2" in dump and "sector: 4096 [bytes]" in dump
    backup = subprocess.run(["cryptsetup", "luksUUID", str(state.header_backup)], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    assert backup == json.loads(state.image_file.read_text())["luks_uuid"]
    assert os.stat(state.header_backup).st_mode & 0o077 == 0 or state.dir.stat().st_mode & 0o077 == 0


def test_a_failure_midway_unwinds_every_layer_and_names_the_step(setup):
    target, state, paths = prepare(setup)
    record = json.loads(state.image_file.read_text())
    record["luks_uuid"] = "00000000-0000-0000-0000-000000000000"  # as if the server swapped the image
    state.image_file.write_text(json.dumps(record))
    # Without the local header copy (a machine that lost its state), the image's own header is
    # read and must be the one made at init. (With the copy, the image's header is not used.)
    state.header_backup.unlink()
    with pytest.raises(StepFailed) as failure:
        with open_stack(target, readonly=False, what="test"):
            pytest.fail("the stack must not open")
    assert failure.value.step == "unlocking" and isinstance(failure.value.cause, IntegrityError)
    assert "not the one made at `cryptsnap init`" in str(failure.value)
    assert_nothing_left(setup)
    # The same through the CLI: the integrity exit code, and the remote lock is gone too.
    result = cryptsnap(setup, "backup", setup.name, expect=7)
    assert result.stderr.startswith("cryptsnap: error: unlocking: ")
    assert not (Path(setup.server.remote_dir) / f"{target.image}.lock").exists()
    assert_nothing_left(setup)


def test_init_on_a_host_without_device_mapper_fails_at_unlocking_and_leaves_nothing(setup):
    if "device-mapper" in Path("/proc/misc").read_text():
        pytest.skip("this host has device-mapper; the guest tier covers a complete init")
    result = cryptsnap(setup, "init", setup.name, expect=8)
    assert "unlocking: cryptsetup failed" in result.stderr and "device-mapper" in result.stderr
    assert_nothing_left(setup)
    assert os.listdir(setup.server.remote_dir) == [], "the half-made image must be removed"


def test_the_image_must_be_a_regular_file_of_the_recorded_size(setup):
    target, state, paths = prepare(setup)
    image = Path(setup.server.remote_dir) / target.image
    os.truncate(image, target.size - 4096)  # the server truncated it
    result = cryptsnap(setup, "list", setup.name, expect=7)
    assert "attaching: " in result.stderr and "truncated or replaced" in result.stderr
    assert_nothing_left(setup)
    image.unlink()
    secret = setup.source / "local-secret"
    secret.write_text("a local file the server must never make us open")
    os.symlink(secret, image)  # an absolute symlink to a file of the *client*
    result = cryptsnap(setup, "list", setup.name, expect=7)
    assert "regular file" in result.stderr
    assert_nothing_left(setup)


def _a_dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_locks_make_a_second_run_busy(setup):
    target, state, paths = prepare(setup, luks=False)
    with LocalLock(target.runtime_dir, "first run"):
        with pytest.raises(Busy, match="first run"):
            with LocalLock(target.runtime_dir, "second run"):
                pass
        result = cryptsnap(setup, "backup", setup.name, expect=4)
        assert "busy" in result.stderr and "first run" in result.stderr
    with SshfsMount(target, state.ssh_config, paths.remote):
        lock = paths.remote / f"{target.image}.lock"
        lock.mkdir()
        (lock / "owner").write_text(json.dumps({"host": "other-machine", "pid": 1, "what": "backup", "since": 0}))
        with pytest.raises(Busy, match="host other-machine"):
            with RemoteLock(paths.remote, target.image, "backup"):
                pass
        with RemoteLock(paths.remote, target.image, "backup", break_lock=True):
            assert json.loads((lock / "owner").read_text())["host"] == os.uname().nodename
        assert not lock.exists()
        # This host's lock of a process still running is busy; this process's own (an earlier
        # try of the run, cut off before it could remove it) is taken over.
        def left_by(pid: int) -> None:
            lock.mkdir()
            owner = {"host": os.uname().nodename, "pid": pid, "what": "backup", "since": 0}
            (lock / "owner").write_text(json.dumps(owner))

        left_by(1)
        with pytest.raises(Busy, match="pid 1"):
            with RemoteLock(paths.remote, target.image, "backup"):
                pass
        shutil.rmtree(lock)
        left_by(os.getpid())
        with RemoteLock(paths.remote, target.image, "backup"):
            assert json.loads((lock / "owner").read_text())["since"] > 0  # its own now
        assert not lock.exists()
        # A run cut off while making its lock or removing it: a draft of its own, before the
        # rename into place or after the rename away (removed by this host's next lock once its
        # pid is gone; another host's is left);
        # an empty lock, as the lock made in place was left when cut off before its owner's
        # write, is taken (renamed over); one whose owner cannot be read is named as such.
        host = os.uname().nodename
        gone = _a_dead_pid()
        drafts = {who: paths.remote / f"{target.image}.lock.{who}"
                  for who in (f"{host}.{gone}.new", f"{host}.{gone}.gone", "other-machine.7.new")}  # fmt: skip
        for draft in drafts.values():
            draft.mkdir()
            (draft / "owner").write_text("{}")
        lock.mkdir()
        with RemoteLock(paths.remote, target.image, "backup"):
            assert json.loads((lock / "owner").read_text())["host"] == host
            assert not drafts[f"{host}.{gone}.new"].exists() and not drafts[f"{host}.{gone}.gone"].exists()
            assert drafts["other-machine.7.new"].exists()
            assert not (paths.remote / f"{target.image}.lock.{host}.{os.getpid()}.new").exists()
        shutil.rmtree(drafts["other-machine.7.new"])
        lock.mkdir()
        (lock / "owner").write_text("")
        with pytest.raises(Busy, match="names no owner.*--break-lock"):
            with RemoteLock(paths.remote, target.image, "backup"):
                pass
        with RemoteLock(paths.remote, target.image, "backup", break_lock=True):
            pass
        assert not [name for name in os.listdir(paths.remote) if ".lock" in name]
    assert_nothing_left(setup)


def test_a_changed_host_key_is_refused(setup):
    target, state, _ = prepare(setup, luks=False)
    with pytest.raises(ToolFailed) as failed:  # the remote command's own failure is not ssh's
        remote_run(state.ssh_config, target, ["sh", "-c", "echo Permission denied >&2; exit 3"])
    assert type(failed.value) is ToolFailed and failed.value.returncode == 3
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(setup.server.tmp / "other")],
                   check=True)  # fmt: skip
    known = setup.state_dir / setup.name / "known_hosts"
    known.write_text(" ".join([f"cryptsnap-{setup.name}", *(setup.server.tmp / "other.pub").read_text().split()[:2]]))
    result = cryptsnap(setup, "list", setup.name, expect=7)
    assert "connecting: " in result.stderr and "host key" in result.stderr
    with pytest.raises(IntegrityError, match="is not the one pinned"):  # init's remote commands say the same
        remote_run(state.ssh_config, target, ["true"])
    assert_nothing_left(setup)


def test_a_missing_tool_names_its_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingTool, match="apt-get install sshfs"):
        runner.run(("sshfs", "--version"))


def test_allocation_on_the_server_sparse_fallocate_and_the_dd_fallback(setup, tmp_path):
    target, state, paths = prepare(setup, luks=False)  # fallocate works in the user's home
    image = Path(setup.server.remote_dir) / target.image
    assert image.stat().st_blocks * 512 >= target.size, "fallocate should preallocate every block"
    # sparse: true -> the server makes a sparse file (SFTP setstat), nothing is written
    sparse = target.__class__(**{**target.__dict__, "sparse": True, "image": "sparse.img"})
    said = []
    with SshfsMount(sparse, state.ssh_config, paths.remote):
        _allocate(state.ssh_config, sparse, paths.remote, "sparse.img", said.append)
    on_server = Path(setup.server.remote_dir) / "sparse.img"
    assert on_server.stat().st_size == target.size and on_server.stat().st_blocks < 64
    # ext2 has no fallocate: the remote dd fallback writes the zeros on the server side
    ext2 = tmp_path / "ext2.img"
    subprocess.run(["truncate", "-s", "256M", str(ext2)], check=True)
    subprocess.run(["mkfs.ext2", "-q", "-F", str(ext2)], check=True)
    mountpoint = Path(setup.server.remote_dir) / "ext2"
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "loop", str(ext2), str(mountpoint)], check=True)
    try:
        owner = Path(setup.server.remote_dir).stat()
        os.chown(mountpoint, owner.st_uid, owner.st_gid)
        fallback = target.__class__(**{**target.__dict__, "remote_dir": f"{target.remote_dir}/ext2"})
        with SshfsMount(fallback, state.ssh_config, paths.remote):
            _allocate(state.ssh_config, fallback, paths.remote, "dd.img", said.append)
        made = mountpoint / "dd.img"
        assert made.stat().st_size == target.size and made.stat().st_blocks * 512 >= target.size
        assert any("dd" in line for line in said)
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    assert_nothing_left(setup)


def test_canceled_while_connecting_leaves_no_mount_and_no_ssh(setup, tarpit):
    """sshfs mounts before its ssh has logged in; a cancel in that window must still clean up both."""
    setup.point_at_silent_server(tarpit)
    run = subprocess.Popen([sys.executable, "-m", "cryptsnap", *setup.cli_args("backup", "--local", setup.name)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not any("sshfs" in line and setup.name in line for line in leftovers(setup)):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # sshfs is up and its ssh is waiting for the server's banner
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 9, err  # canceled
    assert "connecting" in err
    assert_nothing_left(setup)


def test_an_ext2_left_inconsistent_by_a_cut_run_is_repaired_before_it_is_written(tmp_path, caplog):
    """ext2 has no journal: a run cut short leaves it not clean, perhaps inconsistent (a cut in
    the guest left a directory that rmtree could not empty). Mounting to write preens it first."""
    image = tmp_path / "ext2.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext2", "-q", str(image)], check=True)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    try:
        subprocess.run(["debugfs", "-w", "-R", "mkdir partial", device], check=True, capture_output=True)
        # As a cut leaves it: a directory whose link count is wrong, the file system not marked clean.
        for request in ("set_inode_field partial links_count 7", "ssv state 0"):
            subprocess.run(["debugfs", "-w", "-R", request, device], check=True, capture_output=True)
        assert subprocess.run(["e2fsck", "-n", device], capture_output=True).returncode == 4
        with caplog.at_level("WARNING"), FsMount(device, tmp_path / "fs", "ext2", readonly=False):
            os.rmdir(tmp_path / "fs" / "partial")
        assert "repaired the ext2 file system in the image after an unfinished run" in caplog.text
        assert subprocess.run(["e2fsck", "-fn", device], capture_output=True).returncode == 0
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


def test_a_mount_stopped_after_the_kernel_mounted_is_unmounted_when_the_stack_unwinds(tmp_path, monkeypatch):
    """The connection's end (or a cancel) can stop `mount` after the kernel mounted the file
    system. The layer then says it is mounted, so that its exit, registered before entering as
    open_stack does, unmounts it; else the mapping below stays in use and closing it fails the
    run's unwinding (seen in the guest: a cut while mounting ended "still in use", exit 8)."""
    image = tmp_path / "ext2.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext2", "-q", str(image)], check=True)
    # `mount` that mounts, then is stopped by SIGTERM before it exits, as the watch stops it
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "mount").write_text(f'#!/bin/sh\n{shutil.which("mount")} "$@" && kill -TERM $$\n')
    (tools / "mount").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    mountpoint = tmp_path / "fs"
    try:
        with contextlib.ExitStack() as stack:
            mount = FsMount(device, mountpoint, "ext2", readonly=True)
            stack.push(mount)
            with pytest.raises(ToolFailed, match="exit -15"):
                mount.__enter__()
            assert is_mountpoint(mountpoint) and mount.mounted
        assert not is_mountpoint(mountpoint)
    finally:
        if is_mountpoint(mountpoint):
            subprocess.run(["umount", str(mountpoint)])
        subprocess.run(["losetup", "--detach", device], check=True)


def test_the_connection_watch_stops_the_running_tool_when_ssh_ends(setup):
    """A tool that would not notice the lost connection soon (rsync filling the page cache
    of an ext2 on a dead device) is stopped soon after ssh's end (the watch looks twice a
    second), and the failure is then explained as the lost connection."""
    from cryptsnap.layers import ConnectionWatch, connection_lost
    from tests.support.runs import kill_server_sessions

    target, state, paths = prepare(setup, luks=False)
    with contextlib.ExitStack() as stack:
        stack.enter_context(SshfsMount(target, state.ssh_config, paths.remote, paths.ssh_log))
        stack.enter_context(ConnectionWatch(state.ssh_config))
        assert kill_server_sessions(setup.server)
        started = time.monotonic()
        with pytest.raises(ToolFailed):
            runner.run(("sleep", "30"))
        took = time.monotonic() - started
        # Stopped, not run to its end: a bound far from the watch's half second, so that a loaded
        # machine (a guest running beside the tests) does not fail it.
        assert took < 20, f"the tool was stopped {took:.1f} s after ssh ended (sleep 30 ends by itself)"
        lost = connection_lost(target, state.ssh_config, paths.remote, paths.ssh_log)
        assert lost is not None and "lost the connection to 127.0.0.1" in str(lost), (lost, paths.ssh_log.read_text())
    assert_nothing_left(setup)


def test_when_ssh_ends_between_two_tools_the_next_one_is_not_run(setup):
    """The watch fires while no tool runs: the run's next tool is refused, not run against the
    dead connection (and not left to run as long as it likes); unwinding runs tools again."""
    from cryptsnap.layers import ConnectionWatch
    from tests.support.runs import kill_server_sessions

    target, state, paths = prepare(setup, luks=False)
    with contextlib.ExitStack() as stack:
        stack.enter_context(SshfsMount(target, state.ssh_config, paths.remote, paths.ssh_log))
        watch = stack.enter_context(ConnectionWatch(state.ssh_config))
        assert kill_server_sessions(setup.server)
        watch.thread.join(timeout=30)  # it saw the end, with nothing to stop
        assert not watch.thread.is_alive()
        with pytest.raises(ToolFailed, match="sleep was not run: the ssh connection ended"):
            runner.run(("sleep", "30"))
        watch.stop()  # as unwinding begins
        assert runner.run(("true",)).returncode == 0


def test_sshfs_that_unmounts_itself_while_being_unmounted_is_not_a_failure(setup):
    """The race a cut while unmounting found: fusermount3 fails while sshfs is busy, the
    connection ends, sshfs detaches itself, and the next fusermount3 fails as "not mounted".
    The mount is gone, which is what unmounting wanted: the run must not fail on it."""
    import threading

    target, state, paths = prepare(setup, luks=False)
    mount = SshfsMount(target, state.ssh_config, paths.remote, paths.ssh_log).__enter__()
    holder = subprocess.Popen(["sleep", "60"], cwd=paths.remote)  # keeps the mount busy
    try:
        threading.Timer(0.5, kill_server_sessions, [setup.server]).start()
        mount.__exit__(None, None, None)
        assert not is_mountpoint(paths.remote)
    finally:
        holder.kill()
        holder.wait()
    assert_nothing_left(setup)


def test_the_cleanup_removes_this_hosts_remote_lock_and_drafts_and_reads_no_local_file(setup):
    """What a dead run left on the server, as cryptsnapd's unwinding finds it (the sshfs mount
    still there): this host's lock and drafts are removed, another host's are left, and a lock
    whose owner is a symlink out of the mount (to a local file naming this host) is not judged
    by it and stays, for the next run to refuse with what to do. (This sshfs refuses to follow
    it anyway, contain_symlinks; the lock's owner is read with O_NOFOLLOW for one that would.)"""
    target, state, paths = prepare(setup, luks=False)
    host, gone = os.uname().nodename, _a_dead_pid()

    def lock(owner, name: str = f"{target.image}.lock") -> Path:
        path = paths.remote / name  # made through the mount, as the server's user
        path.mkdir()
        if isinstance(owner, dict):
            (path / "owner").write_text(json.dumps({"what": "backup", "since": 0} | owner))
        else:
            os.symlink(owner, path / "owner")
        return Path(setup.server.remote_dir) / name

    def mounted() -> None:
        SshfsMount(target, state.ssh_config, paths.remote).__enter__()  # left mounted, as by a killed run

    def after_a_dead_run() -> None:
        stack.remove_leftovers(target)
        assert not is_mountpoint(paths.remote)

    mounted()
    ours = lock({"host": host, "pid": 1})  # (a live pid: no run of this host holds it under the local lock)
    drafts = [lock({"host": host, "pid": gone}, f"{target.image}.lock.{host}.{gone}.{kind}") for kind in ("new", "gone")]
    theirs = lock({"host": "other-machine", "pid": 7}, f"{target.image}.lock.other-machine.7.new")
    after_a_dead_run()
    assert not ours.exists() and not any(draft.exists() for draft in drafts)
    assert theirs.exists(), "another host's draft is theirs to judge"
    mounted()
    shutil.rmtree(paths.remote / theirs.name)
    theirs = lock({"host": "other-machine", "pid": 7})
    after_a_dead_run()
    assert theirs.exists(), "another machine's lock was removed"
    mounted()
    shutil.rmtree(paths.remote / theirs.name)
    local = setup.source / "owner.json"
    local.write_text(json.dumps({"host": host, "pid": 1}))
    lured = lock("../" * 40 + str(local).lstrip("/"))
    after_a_dead_run()
    assert lured.is_dir(), "the lock was judged by a local file its owner's symlink points at"
    result = cryptsnap(setup, "list", setup.name, expect=4)
    assert "names no owner" in result.stderr and "--break-lock" in result.stderr
    assert_nothing_left(setup)


def test_the_cleanup_of_a_dead_sshfs_leaves_the_remote_lock_to_the_next_run_quietly(setup):
    """The soak's case: a run killed while connecting leaves an sshfs whose process is gone
    (its mountpoint answers "Transport endpoint is not connected"). The remote lock cannot be
    reached then; its cleanup says nothing went wrong rather than raising in its thread (a
    traceback in the journal), and the unwinding goes on to unmount it."""
    import psutil

    target, state, paths = prepare(setup, luks=False)
    SshfsMount(target, state.ssh_config, paths.remote).__enter__()
    (paths.remote / f"{target.image}.lock").mkdir()  # left by the killed run
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "sshfs" and str(paths.remote) in (proc.info["cmdline"] or []):
            proc.kill()
            proc.wait(10)
    with pytest.raises(OSError, match="not connected"):
        os.listdir(paths.remote)
    RemoteLock.remove_leftovers(paths.remote, target.image)  # raised ENOTCONN in its sweep before
    stack.remove_leftovers(target)
    assert_nothing_left(setup)


def test_a_loop_device_of_a_run_killed_while_losetup_ran_is_found_once_its_mount_is_gone(setup):
    """What a worker SIGKILLed between losetup's answer and the record of the device leaves,
    once its sshfs mount is gone (cryptsnapd's mount namespace ends with it): a device whose
    back-file reads just /IMAGE. The record written before losetup ran finds it."""
    target, state, paths = prepare(setup, luks=False)
    record = paths.loop_record
    record.parent.mkdir(parents=True, exist_ok=True)
    SshfsMount(target, state.ssh_config, paths.remote).__enter__()
    loop = LoopDevice(paths.remote / target.image, False, target.size, record).__enter__()
    loop._note(None)  # as it was while losetup ran
    kill_server_sessions(setup.server)  # sshfs ends with its connection, and unmounts itself
    deadline = time.monotonic() + 10
    while is_mountpoint(paths.remote) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_mountpoint(paths.remote):
        subprocess.run(["umount", "--lazy", str(paths.remote)], check=True)
    listing = json.loads(runner.run(commands.loop_list()).stdout)["loopdevices"]
    assert {"name": loop.device, "back-file": f"/{target.image}", "ro": False} in listing, listing
    stack.remove_leftovers(target)
    assert_nothing_left(setup)


def test_a_block_device_server_left_without_its_record_is_found_by_its_cache_dir(tmp_path):
    """A run killed between starting its block device server and recording its pid leaves a
    server nobody recorded: the sweep finds it by the cache directory in its command line, and
    leaves another target's alone. (Stand-ins with the server's command line: this machine has
    no nbd devices for the real one; the guest tier runs it.)"""
    from cryptsnap.layers import CachedDevice

    def stand_in(cache: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-m", "cryptsnap.nbd",
                                 "--cache", str(cache)])  # fmt: skip

    ours, other = stand_in(tmp_path / "ours" / "block-cache"), stand_in(tmp_path / "other" / "block-cache")
    try:
        time.sleep(0.3)
        CachedDevice.remove_leftovers(tmp_path / "nbd", tmp_path / "ours" / "block-cache")
        ours.wait(timeout=10)  # stopped (its status already reaped by the sweep's wait)
        assert other.poll() is None, "another target's server was stopped"
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()
