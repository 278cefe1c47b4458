"""cryptsnap's worst day, in the guest with the whole stack: killed processes, lost connections,
a hostile server's tricks. Every test ends with nothing left open (no mount, loop or nbd
device, mapping, ssh or sshfs) and with the snapshots made before the fault intact.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cryptsnap.bus import target_path
from tests.support import figures, sshd
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.orphan_nbd import orphaned_device
from tests.support.runs import (
    PHASES,
    catch_phase,
    digests,
    fill,
    kill_server_sessions,
    marker,
    start_local_backup,
    wait_phase,
    with_one_snapshot,
)
from tests.support.service import prop, sh, start_backup, wait_idle, wait_until
from tests.support.targets import init_target, make_setup

TARGET = "org.cryptsnap1.Target"


def start_via_daemon(setup) -> subprocess.Popen:
    """`cryptsnap backup --daemon` following its job, as a user or the timer unit would."""
    return subprocess.Popen(["cryptsnap", "backup", "--daemon", setup.name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def follow_a_job_to_syncing(service) -> tuple[subprocess.Popen, str]:
    """64 MiB to back up through the daemon, a client following the job, once it syncs; and the daemon's pid."""
    fill(service.source, 64)
    sh("systemctl", "start", "cryptsnapd.service")
    client = start_via_daemon(service)
    wait_phase(service, "syncing")
    return client, sh("systemctl", "show", "-P", "MainPID", "cryptsnapd.service").stdout.strip()


def waiting_on(reader: subprocess.Popen, node: str) -> bool:
    """`reader` waits inside a system call on its descriptor of `node` (a read sent and
    unanswered, or an ioctl waiting on one). D state alone is not enough: dd, just started on
    the emulated CPU, waits there on its own pages from the guest's disk too, and in its open."""
    try:
        if psutil.Process(reader.pid).status() != psutil.STATUS_DISK_SLEEP:
            return False
        call = Path(f"/proc/{reader.pid}/syscall").read_text().split()  # number, arguments, sp, pc
        return len(call) > 2 and os.readlink(f"/proc/{reader.pid}/fd/{int(call[1], 16)}") == node
    except (psutil.NoSuchProcess, OSError, ValueError):
        return False


def settle(device: Path, node: str) -> None:
    """Wait until nothing reads the new nbd device but the test, while its server still answers.
    The first open of a new device reads its partition table, holding the device's open mutex
    until answered, and then udev probes it; the first opener may be udev, or the test's own
    reader. With the server stopped before that, the reader waits in its open (no read of its
    own sent), udev waits for good, and a kill then leaves the reader an empty device (dd
    exits 0 with nothing read; a CI run, 2026-12-05). So: open it here, answered, and let udev
    finish."""
    os.close(os.open(node, os.O_RDONLY))
    sh("udevadm", "settle")
    wait_until(lambda: (device / "inflight").read_text().split() == ["0", "0"], 30, "the reads of udev's probe")


def start_server(image_fd: int, size: int) -> tuple[subprocess.Popen, str, Path, int]:
    """The real block device server on `image_fd`, its device sized and settled: the server,
    the device's node, its /sys/block directory and the pid of its DO_IT process."""
    server = subprocess.Popen(["python3", "-m", "cryptsnap.nbd", "--image-fd", str(image_fd), "--size", str(size)],
                              pass_fds=[image_fd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    ready = server.stdout.readline().split()
    assert ready[:1] == ["ready"], ready
    device = Path("/sys/block") / Path(ready[1]).name
    do_it = int((device / "pid").read_text())
    # The size shows a moment after the pid, and the kernel's partition scan reads first.
    wait_until(lambda: (device / "size").read_text().strip() != "0", 30, f"{ready[1]} to have its size")
    settle(device, ready[1])
    return server, ready[1], device, do_it


def daemon_restarted(before: str) -> bool:
    pid = sh("systemctl", "show", "-P", "MainPID", "cryptsnapd.service").stdout.strip()
    active = sh("systemctl", "is-active", "cryptsnapd.service", check=False).stdout.strip() == "active"
    return active and pid not in ("0", before)


# -- processes killed ------------------------------------------------------------------


@pytest.mark.long  # make test: the daemon killed alone, the worker killed in each phase, the crashed run
def test_cryptsnapd_killed_with_its_whole_cgroup_mid_run(service):
    """SIGKILL to every process of the service (the OOM killer, `systemctl kill -s KILL`): nothing
    unwinds by itself. The client exits at once; the restarted daemon unwinds the decrypted
    mapping on the dead nbd device, the devices and mounts, and records the run."""
    cryptsnap(service, "backup", "--daemon", service.name)
    before = digests(service)
    client, pid = follow_a_job_to_syncing(service)
    killed = time.monotonic()
    sh("systemctl", "kill", "--signal=SIGKILL", "cryptsnapd.service")
    _, err = client.communicate(timeout=60)
    took = time.monotonic() - killed
    assert client.returncode == 11, err
    assert "cryptsnapd left the bus while job" in err and took < 10, (took, err)
    figures.record("cgroup killed", client_exit_s=round(took, 1))
    wait_until(lambda: daemon_restarted(pid), 120, "systemd to restart cryptsnapd")
    assert wait_idle(service, 300) == "failed"
    error = prop(target_path(service.name), TARGET, "LastError")
    assert "syncing: interrupted: cryptsnapd was restarted during the run" in error, error
    assert prop(target_path(service.name), TARGET, "LastExitCode") == 11
    assert_nothing_left(service)
    journal = sh("journalctl", "-u", "cryptsnapd.service", "--no-pager", "-o", "cat").stdout
    assert "unwinding what the run left: cryptsnapd was restarted during the run" in journal
    cryptsnap(service, "backup", "--daemon", service.name)
    after = digests(service)
    assert {name: after[name] for name in before} == before, "a snapshot made before the fault changed"
    assert len(after) == len(before) + 1
    assert_nothing_left(service)


def test_cryptsnapd_alone_killed_mid_run(service):
    """SIGKILL to the daemon alone. Its worker is told (SIGHUP) and starts to unwind, but systemd
    SIGKILLs what is left of the service as soon as its main process is gone (KillMode=mixed):
    whichever wins, the restarted daemon finds nothing left when it is ready."""
    client, pid = follow_a_job_to_syncing(service)
    killed = time.monotonic()
    os.kill(int(pid), signal.SIGKILL)
    _, err = client.communicate(timeout=60)
    assert client.returncode == 11, err
    figures.record("daemon killed", client_exit_s=round(time.monotonic() - killed, 1))
    wait_until(lambda: daemon_restarted(pid), 180, "systemd to restart cryptsnapd")
    assert wait_idle(service, 300) == "failed"
    error = prop(target_path(service.name), TARGET, "LastError")
    assert ("syncing: interrupted: cryptsnapd stopped or was killed during the run" in error
            or "syncing: interrupted: cryptsnapd was restarted during the run" in error), error  # fmt: skip
    assert_nothing_left(service)
    cryptsnap(service, "backup", "--daemon", service.name)
    assert len(prop(target_path(service.name), TARGET, "Snapshots")) == 1


def test_a_read_a_killed_block_device_server_left_unanswered_is_failed_by_the_next_run(tmp_path, untrusted_host):
    """The soak (seed 11, run 36): systemd SIGKILLed the whole service while a `btrfs` command
    of the run waited on a read. The block device server and its NBD_DO_IT process died
    together and nobody failed the read: the command hung in the kernel for good, holding the
    file system in the dead run's mount namespace, which held the mapping open, and every later
    run failed at `unlocking` ("Device or resource busy"). Made here on purpose: a device whose
    server closed with a read unanswered and whose DO_IT process ended without failing it, the
    target's mapping on it and a reader stuck there. The next run fails the read, removes the
    mapping, frees the device and backs up."""
    setup = make_setup(tmp_path, untrusted_host)
    init_target(setup)
    (setup.source / "file").write_text("after the hang\n")
    mapping = f"cryptsnap-{setup.name}"
    size, stuck_at = 64 << 20, 40 << 20
    with orphaned_device(size, stuck_at) as (device, pid, orphaned):
        sh("dmsetup", "create", mapping, "--table", f"0 {size // 512} linear {device} 0")
        try:
            sh("udevadm", "settle")
            reader = subprocess.Popen(["dd", f"if=/dev/mapper/{mapping}", "of=/dev/null", "bs=4096", "count=1",
                                       f"skip={stuck_at // 4096}", "iflag=direct"], stderr=subprocess.PIPE)  # fmt: skip
            orphaned()
            time.sleep(1)
            assert reader.poll() is None, "the read was answered after all: nothing to show"
            (setup.runtime_dir / setup.name / "nbd").write_text(f"{device} {pid}")
            log = cryptsnap(setup, "-v", "backup", setup.name).stderr
            assert f"failed the requests a killed block device server left unanswered on {device}" in log, log
            reader.wait(30)
            assert reader.returncode != 0 and b"Input/output error" in reader.stderr.read()
        finally:
            sh("dmsetup", "remove", mapping, check=False)
    assert not (Path("/sys/block") / Path(device).name / "pid").exists(), f"{device} was not freed"
    assert len(cryptsnap(setup, "list", setup.name).stdout.split()) == 1
    assert_nothing_left(setup)


@pytest.mark.parametrize("killed", ["the server", "the server, then its DO_IT process"])
def test_a_block_device_server_killed_with_a_read_in_flight_fails_it_at_once(tmp_path, killed):
    """The block device server (`python3 -m cryptsnap.nbd`) killed with a read in flight, alone
    (its DO_IT process sees the server's end close and fails what is left) or followed at once
    by its DO_IT process, as systemd killed a service before the DO_IT process had a scope of
    its own (and still may, should the move fail): the read fails with EIO within seconds and
    the device is freed. The order that loses (the DO_IT process killed between its DO_IT's
    return and its NBD_CLEAR_SOCK) is a race this cannot make on purpose; when it is lost, the
    read must be released by what the unwinding does (nbd.fail_orphaned_requests), and the
    figure says so. The next test makes that state on purpose."""
    from cryptsnap.layers import CachedDevice

    assert CachedDevice.available(), "this kernel has no nbd devices"  # (loads the module)
    image = tmp_path / "image"
    image.write_bytes(b"\0" * (8 << 20))
    with open(image, "rb+") as held:
        server, node, device, do_it = start_server(held.fileno(), 8 << 20)
    os.kill(server.pid, signal.SIGSTOP)  # from here on nothing is answered
    # At offset 0: dd's seek to a later block failed at times ("cannot skip: Invalid argument").
    reader = subprocess.Popen(["dd", f"if={node}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct"],
                              stderr=subprocess.PIPE)  # fmt: skip
    # dd's own read waits (not only a read of udev's probe, which the check of inflight saw once)
    wait_until(lambda: waiting_on(reader, node), 30, "dd's read to be sent")
    os.kill(server.pid, signal.SIGKILL)
    if killed != "the server":
        os.kill(do_it, signal.SIGKILL)
    server.wait(10)
    try:
        reader.wait(15)
        released = "at once"
    except subprocess.TimeoutExpired:  # the race lost (once in tens): what the unwinding then does
        from cryptsnap.nbd import fail_orphaned_requests

        assert fail_orphaned_requests() == [node], f"the read still waits 15 s after {killed} was killed"
        reader.wait(15)
        released = "by the unwinding's net"
    figures.record(f"the block device server killed ({killed}) with a read in flight", released=released)
    said = reader.stderr.read()
    assert reader.returncode != 0 and b"Input/output error" in said, (reader.returncode, said)
    wait_until(lambda: not psutil.pid_exists(do_it), 15, "the DO_IT process to end")
    wait_until(lambda: not (device / "pid").exists(), 15, f"{node} to be freed")


def test_a_block_device_server_killed_as_it_stops_while_another_process_rereads_the_partitions_ends(tmp_path):
    """The block device server told to stop (as the worker's unwinding does when cryptsnapd is
    killed) while another process holds the device's open mutex, rereading its partition
    table (udev does, after the device appears), and killed a moment later with the rest of
    the service: the server ends, the reread fails, the device is freed. Before the fix the
    server opened the device itself to disconnect it; that open (or its close) waited for the
    mutex, whose holder waited for a read only the server could answer, and once killed the
    server never ended: a process of the service stayed in D state for good and the device
    with it (kill 3 of a cryptsnapd kill series, in `unlocking`, 2026-12-05). The server's
    reads of its image are held here (a suspended dm device under it), so that the reread's
    read is sent and not answered when the kill comes."""
    from cryptsnap.layers import CachedDevice

    assert CachedDevice.available(), "this kernel has no nbd devices"  # (loads the module)
    size, stall = 8 << 20, f"cryptsnap-test-stall-{os.getpid()}"
    image = tmp_path / "image"
    image.write_bytes(b"\0" * size)
    loop = sh("losetup", "--find", "--show", str(image)).stdout.strip()
    sh("dmsetup", "create", stall, "--table", f"0 {size // 512} linear {loop} 0")
    try:
        held = os.open(f"/dev/mapper/{stall}", os.O_RDWR | os.O_DIRECT)
        try:
            server, node, device, do_it = start_server(held, size)
        finally:
            os.close(held)
        sh("dmsetup", "suspend", stall)  # from here on the server's reads of its image wait
        reread = subprocess.Popen(["blockdev", "--rereadpt", node], stderr=subprocess.PIPE)
        wait_until(lambda: waiting_on(reread, node), 30, "the reread to wait in its BLKRRPART")
        server.stdin.write("stop\n")
        server.stdin.flush()
        time.sleep(2)  # the server's answer to `stop` (before the fix, its open of the device waited here)
        os.kill(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        sh("dmsetup", "resume", stall)  # the serving thread's read returns, and the thread ends
        wait_until(lambda: server.poll() is not None, 15, "the killed server to end (a thread of it waits in the kernel)")
        reread.wait(15)
        wait_until(lambda: not psutil.pid_exists(do_it), 15, "the DO_IT process to end")
        wait_until(lambda: not (device / "pid").exists(), 15, f"{node} to be freed")
        figures.record("the block device server killed as it stops, a partition reread waiting on it",
                       freed_s=round(time.monotonic() - killed, 1), reread_exit=reread.returncode)  # fmt: skip
    finally:
        sh("dmsetup", "resume", stall, check=False)
        sh("dmsetup", "remove", stall, check=False)
        sh("losetup", "--detach", loop, check=False)


SERVICE_CGROUP = Path("/sys/fs/cgroup/system.slice/cryptsnapd.service/cgroup.procs")


def recent_journal(seconds: int = 300) -> str:
    """cryptsnapd.service's journal of the last minutes, with what journald has not written yet."""
    sh("journalctl", "--sync", check=False)
    return sh("journalctl", "-u", "cryptsnapd.service", "--no-pager", "-o", "cat", "--since", f"-{seconds}s").stdout


def test_a_process_of_the_killed_service_waiting_on_an_orphaned_block_device_is_released_by_the_stop(service):
    """Kill 41 of the cryptsnapd series: cryptsnapd SIGKILLed as its run's flush went out;
    systemd SIGKILLed the rest, the block device server before its NBD_DO_IT process, and the
    flush was left to nobody. The worker stayed in the kernel, and so in the service's cgroup:
    systemd waited TimeoutStopSec (90 s) after its SIGKILL and again after the final one, and
    only the restarted cryptsnapd fails such requests (185 s in all). ExecStopPost= now fails
    them after the first wait: the net, since the DO_IT process has a scope of its own (the
    next test), for when that move fails. Made here: a process of the service waiting on a read of a device
    left as the race leaves it (tests/support/orphan_nbd.py); cryptsnapd SIGKILLed; it is back
    within 150 s, the read failed, the device is free."""
    sh("systemctl", "start", "cryptsnapd.service")
    daemon = sh("systemctl", "show", "-P", "MainPID", "cryptsnapd.service").stdout.strip()
    size, stuck_at = 8 << 20, 4 << 20
    with orphaned_device(size, stuck_at) as (device, _do_it, orphaned):
        reader = subprocess.Popen(["dd", f"if={device}", "of=/dev/null", "bs=4096", "count=1",
                                   f"skip={stuck_at // 4096}", "iflag=direct"], stderr=subprocess.PIPE)  # fmt: skip
        SERVICE_CGROUP.write_text(f"{reader.pid}\n")
        orphaned()
        time.sleep(1)
        assert reader.poll() is None, "the read was answered: nothing to show"
        os.kill(int(daemon), signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: daemon_restarted(daemon), 150, "systemd to restart cryptsnapd")
        figures.record("cryptsnapd killed, a process of its service waiting on an orphaned block device",
                       restarted_s=round(time.monotonic() - killed, 1))  # fmt: skip
        reader.wait(10)  # failed with EIO, or ended by systemd's SIGKILL once it could end
        assert reader.returncode != 0
        said = f"failed the requests a killed block device server left unanswered on {device}"
        wait_until(lambda: said in recent_journal(), 30, f"the journal to say: {said}")
    wait_until(lambda: not (Path("/sys/block") / Path(device).name / "pid").exists(), 30, f"{device} to be freed")


def test_a_killed_service_leaves_its_block_device_kernel_side_to_fail_what_is_in_flight(service, tmp_path):
    """The race of the test above, closed: a block device server started in cryptsnapd's cgroup,
    as a run's is, puts its NBD_DO_IT process into a scope of its own (cryptsnap.scope), ordered
    before the service. With the server stopped and a process of the service waiting on a read,
    cryptsnapd is SIGKILLed: systemd kills the service's cgroup, the server with it but not the
    DO_IT process, which sees the server's end close and fails the read at once. The service is
    back after RestartSec and a start (not after TimeoutStopSec, when ExecStopPost= would fail
    the read), the scope is gone, the device free, and ExecStopPost= found nothing to do."""
    sh("systemctl", "start", "cryptsnapd.service")
    daemon = sh("systemctl", "show", "-P", "MainPID", "cryptsnapd.service").stdout.strip()

    def into_the_service():  # (in the child, before exec: the process starts in the service)
        SERVICE_CGROUP.write_text(f"{os.getpid()}\n")

    image, said = tmp_path / "image", tmp_path / "server.err"
    image.write_bytes(b"\0" * (8 << 20))
    with open(image, "rb+") as held, open(said, "w") as errors:
        server = subprocess.Popen(["python3", "-m", "cryptsnap.nbd", "--image-fd", str(held.fileno()),
                                   "--size", str(8 << 20)], pass_fds=[held.fileno()], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True,
                                  preexec_fn=into_the_service)  # fmt: skip
    ready = server.stdout.readline().split()
    assert ready[:1] == ["ready"], (ready, said.read_text())
    assert not said.read_text(), said.read_text()  # no "stays in this unit"
    device = Path("/sys/block") / Path(ready[1]).name
    do_it = int((device / "pid").read_text())
    scope = f"cryptsnap-{device.name}-{do_it}.scope"
    from cryptsnap.scope import unit_of

    wait_until(lambda: unit_of(Path(f"/proc/{do_it}/cgroup").read_text()) == scope, 30, f"the DO_IT process in {scope}")
    assert "cryptsnapd.service" in sh("systemctl", "show", "-P", "Before", scope).stdout.split()
    wait_until(lambda: (device / "size").read_text().strip() != "0", 30, f"{ready[1]} to have its size")
    settle(device, ready[1])
    os.kill(server.pid, signal.SIGSTOP)  # from here on nothing is answered
    reader = subprocess.Popen(["dd", f"if={ready[1]}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct"],
                              stderr=subprocess.PIPE, preexec_fn=into_the_service)  # fmt: skip
    wait_until(lambda: waiting_on(reader, ready[1]), 30, "dd's read to be sent")
    os.kill(int(daemon), signal.SIGKILL)
    killed = time.monotonic()
    reader.wait(30)  # its read failed, and systemd's SIGKILL, waiting since, ended it (-9)
    failed_s = round(time.monotonic() - killed, 1)
    assert reader.returncode != 0
    wait_until(lambda: daemon_restarted(daemon), 60, "systemd to restart cryptsnapd (ExecStopPost's way: ~100 s)")
    restarted_s = round(time.monotonic() - killed, 1)
    figures.record("cryptsnapd killed, a process of its service reading its block device", read_failed_s=failed_s,
                   restarted_s=restarted_s)  # fmt: skip
    server.wait(10)
    wait_until(lambda: not psutil.pid_exists(do_it), 15, "the DO_IT process to end")
    wait_until(lambda: not (device / "pid").exists(), 15, f"{ready[1]} to be freed")
    units = sh("systemctl", "list-units", "--all", "--plain", "--no-legend", "cryptsnap-nbd*").stdout
    assert scope not in units, units
    journal = recent_journal(int(time.monotonic() - killed) + 2)
    assert "failed the requests a killed block device server left unanswered" not in journal, journal


# Kills per phase: 1 in `make test`; CRYPTSNAP_KILLS_PER_PHASE=50 for the long series (about
# 16 s a worker kill on the emulated CPU, 95 minutes for 350; a cryptsnapd kill adds systemd's
# RestartSec of 5 s and the restart: give it CRYPTSNAP_GUEST_TEST_LIMIT; docs/reliability.md has
# the figures of such runs). The series goes round the phases, one kill each a round, so a series
# stopped by its time limit has killed in every phase alike.
KILLS_PER_PHASE = int(os.environ.get("CRYPTSNAP_KILLS_PER_PHASE", "1"))
# Some phases only (a series to complete): CRYPTSNAP_KILL_PHASES=unmounting,finalizing
KILL_PHASES = [p for p in PHASES if p in os.environ.get("CRYPTSNAP_KILL_PHASES", ",".join(PHASES)).split(",")]


def while_running(job: dict, command: str, timeout: float = 30) -> dict | None:
    """`job` (a run's marker) once its worker runs `command`; None if the run got past it.
    A command outliving its killed worker (cryptsetup finishing its mapping after the
    unwinding looked) is what the kill there checks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(child.name() == command for child in psutil.Process(job["pid"]).children(recursive=True)):
                return job
        except psutil.NoSuchProcess:
            return None
        time.sleep(0.005)
    return None


INTERRUPTED = re.compile(r"(\w+): interrupted: (its process was killed by SIGKILL|cryptsnapd stopped or was killed "
                         r"during the run|cryptsnapd was restarted during the run)")  # fmt: skip


@pytest.mark.parametrize("victim", ["worker", "cryptsnapd"])
def test_killed_in_each_phase_the_run_is_unwound_at_once(service, victim):
    """SIGKILL the moment a run enters each phase, to the job's worker (cryptsnapd unwinds what
    it left at once) or to cryptsnapd alone (the worker is told and unwinds; what systemd's
    SIGKILL to the rest of the service cuts short, the restarted cryptsnapd unwinds at start-up).
    Either way nothing stays open, the run is recorded as killed where it was, the snapshots
    made before are intact and the next run goes on from them."""
    fill(service.source, 8)
    # Every try may end in a snapshot (a kill in `unmounting`, a phase passed before the look):
    # keep them all, or the read-back at the end misses the first one (`last: 50` pruned it
    # after a series of 50 kills a phase).
    document = yaml.safe_load(service.config_path.read_text())
    document["targets"][service.name]["retention"]["last"] = 3 * len(KILL_PHASES) * KILLS_PER_PHASE + 2
    service.config_path.write_text(yaml.safe_dump(document))
    sh("systemctl", "start", "cryptsnapd.service")
    sh("systemctl", "reload", "cryptsnapd.service")  # if it was running already
    cryptsnap(service, "backup", "--daemon", service.name)
    before = digests(service)
    path = target_path(service.name)
    hit = []
    for phase in [phase for _ in range(KILLS_PER_PHASE) for phase in KILL_PHASES]:
        for _attempt in range(3):  # a phase passed before the first look is tried again
            daemon = sh("systemctl", "show", "-P", "MainPID", "cryptsnapd.service").stdout.strip()
            had = len(prop(path, TARGET, "Snapshots"))
            sh("busctl", "call", "org.cryptsnap1", path, TARGET, "StartBackup", "a{sv}", "0")
            found, struck = catch_phase(service, phase), False
            if found and phase == "unlocking":  # in the middle of `cryptsetup open`, the soak's case
                found = while_running(found, "cryptsetup")
            if found:
                try:
                    os.kill(found["pid"] if victim == "worker" else int(daemon), signal.SIGKILL)
                    struck = True
                except ProcessLookupError:
                    pass
            killed = time.monotonic()
            if struck and victim == "cryptsnapd":
                wait_until(lambda pid=daemon: daemon_restarted(pid), 180, "systemd to restart cryptsnapd")
            result = wait_idle(service, 300)
            unwound = round(time.monotonic() - killed, 1)
            assert_nothing_left(service, f"{victim} killed at {phase}")
            (service.source / f"changed-{len(hit)}").write_text(f"{phase} {_attempt}\n")
            if struck:
                break
        if not struck:
            continue
        hit.append(phase)
        figures.record(f"{victim} killed at {phase}", unwound_s=unwound, result=result)
        # Done: killed while unmounting, or (cryptsnapd: its worker is only told) once finalizing
        # had marked the snapshot complete; a worker killed as finalizing starts fails, as before.
        if result == "done" and (phase == "unmounting" or (phase == "finalizing" and victim == "cryptsnapd")):
            assert len(prop(path, TARGET, "Snapshots")) == had + 1
            continue
        assert result == "failed", f"{victim} killed at {phase}: {result}"
        error = prop(path, TARGET, "LastError")
        match = INTERRUPTED.search(error)
        # the worker, told of cryptsnapd's end, may have got one phase further before it was cut short
        assert match and PHASES.index(match[1]) >= PHASES.index(phase), f"{victim} killed at {phase}: {error}"
        if victim == "worker":
            assert match[1] == phase and "SIGKILL" in match[2], error
    assert set(KILL_PHASES) - set(hit) <= {"finalizing"}, f"killed in {hit} only"
    figures.record(f"{victim} kills", per_phase={phase: hit.count(phase) for phase in KILL_PHASES})
    cryptsnap(service, "backup", "--daemon", service.name)
    names = prop(path, TARGET, "Snapshots")
    assert cryptsnap(service, "list", service.name).stdout.split() == names
    after = digests(service)
    assert {name: after[name] for name in before} == before, "a snapshot made before the kills changed"
    assert_nothing_left(service)


def test_a_cancel_once_the_snapshot_is_complete_leaves_the_run_done(service):
    """A Cancel while the run unmounts comes too late to undo anything: its snapshot is complete
    and kept, so the run is done, not canceled, and the unwinding is not cut short."""
    path = target_path(service.name)
    sh("systemctl", "start", "cryptsnapd.service")
    landed = 0
    for attempt in range(3):  # unmounting is short: try until a Cancel lands in it
        (service.source / f"file-{attempt}").write_text("complete before the cancel\n")
        job = start_backup(service)
        wait_until(lambda: marker(service), 120, "the run's marker")
        while marker(service).get("phase") not in ("unmounting", None):  # None: the run ended
            time.sleep(0.01)
        sh("busctl", "call", "org.cryptsnap1", job, "org.cryptsnap1.Job", "Cancel", check=False)
        assert wait_idle(service) == "done", prop(path, TARGET, "LastError")
        journal = sh("journalctl", "-u", "cryptsnapd.service", "--no-pager", "-o", "cat").stdout
        landed += f"job {job.rsplit('/', 1)[1]} [{service.name}]: canceling" in journal
        assert_nothing_left(service)
        if landed:
            break
    assert landed, "no Cancel reached a run while it unmounted"
    names = cryptsnap(service, "list", service.name).stdout.split()
    assert len(names) == attempt + 1 and prop(path, TARGET, "Snapshots") == names


# -- the connection lost -----------------------------------------------------------------


def test_the_server_side_of_ssh_killed_mid_run(tmp_path, untrusted_host, filesystem="btrfs"):
    """The server's sshd sessions killed while rsync writes. (ext2, and cuts in every phase:
    test_cuts.py, whose seed 5 is this cut on both file systems.)"""
    setup, before = with_one_snapshot(tmp_path, untrusted_host, filesystem=filesystem, size="300M")
    fill(setup.source, 48)

    def cut_while_syncing() -> tuple[subprocess.CompletedProcess, float]:
        """A backup whose server sessions are killed a second into syncing; how long it then took."""
        proc = start_local_backup(setup)
        wait_phase(setup, "syncing")
        time.sleep(1)  # writes in flight
        assert kill_server_sessions(untrusted_host)
        cut = time.monotonic()
        out, err = proc.communicate(timeout=600)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - cut

    run, took = cut_while_syncing()
    err = run.stderr
    assert run.returncode == 5 and took < 300, err
    assert "error: syncing: lost the connection to 127.0.0.1 (ssh: " in err, err
    assert_nothing_left(setup, err)
    figures.record(f"ssh killed, {filesystem}", fail_s=round(took, 1), error=err.strip().splitlines()[-1])
    # The next run may try again (reconnect_tries), and is cut the same way: the new try takes
    # over the remote lock the cut one could not remove, and completes the snapshot.
    document = yaml.safe_load(setup.config_path.read_text())
    document["targets"][setup.name].update(reconnect_tries=1, reconnect_delay=1)
    setup.config_path.write_text(yaml.safe_dump(document))
    run, _ = cut_while_syncing()
    assert run.returncode == 0, run.stderr
    assert "syncing: lost the connection to 127.0.0.1" in run.stderr and "(try 2 of 2)" in run.stderr, run.stderr
    after = digests(setup)
    assert {name: after[name] for name in before} == before and len(after) == 2
    assert_nothing_left(setup)


def test_a_black_holed_link_fails_the_run_within_the_keepalive_limit(tmp_path):
    """The server's network namespace stops answering (its link down): no RST, only silence.
    ssh gives up after alive_interval × alive_count seconds; the run fails within 10 s more."""
    from bench.link import NETNS, SERVER_SIDE, shaped_link

    with shaped_link(1000, rtt_ms=0.2) as address:
        server = sshd.start(address=address, netns=NETNS)
        try:
            setup, before = with_one_snapshot(tmp_path, server, size="300M", alive_interval=2, alive_count=3)
            fill(setup.source, 64)
            proc = start_local_backup(setup)
            wait_phase(setup, "syncing")
            time.sleep(1)
            subprocess.run(["ip", "netns", "exec", NETNS, "ip", "link", "set", SERVER_SIDE, "down"], check=True)
            cut = time.monotonic()
            _, err = proc.communicate(timeout=300)
            took = time.monotonic() - cut
            assert proc.returncode == 5, err
            assert f"lost the connection to {address} (ssh: Timeout, server" in err, err
            assert took < 2 * 3 + 10, f"the run failed {took:.1f}s after the cut"
            assert_nothing_left(setup, err)
            figures.record("black hole", fail_s=round(took, 1), limit_s=16, error=err.strip().splitlines()[-1])
            subprocess.run(["ip", "netns", "exec", NETNS, "ip", "link", "set", SERVER_SIDE, "up"], check=True)
            cryptsnap(setup, "backup", setup.name)
            after = digests(setup)
            assert {name: after[name] for name in before} == before and len(after) == 2
            assert_nothing_left(setup)
        finally:
            sshd.stop(server)


# -- a hostile server --------------------------------------------------------------------


def test_whatever_the_server_puts_where_the_image_was_is_refused(tmp_path, untrusted_host):
    """A symlink (absolute or relative) to a local file, a FIFO, a directory, a file of
    another size: refused before anything is read or written, the local file untouched."""
    setup = make_setup(tmp_path, untrusted_host, filesystem="ext2", size="64M")
    (setup.source / "f").write_text("data\n")
    init_target(setup)
    image = Path(untrusted_host.remote_dir) / f"{setup.name}.img"
    kept = image.with_name("kept.img")
    image.rename(kept)
    bait = tmp_path / "local-secret"
    bait.write_bytes(b"local data the server must never reach\n" * 100)
    bait_before = (bait.read_bytes(), bait.stat().st_mtime_ns)
    uid = os.stat(untrusted_host.remote_dir).st_uid

    def plant_symlink(target: str) -> None:
        os.symlink(target, image)
        os.lchown(image, uid, uid)

    cases = {
        "absolute symlink": lambda: plant_symlink(str(bait)),
        "relative symlink": lambda: plant_symlink(os.path.relpath(bait, untrusted_host.remote_dir)),
        "FIFO": lambda: os.mkfifo(image),
        "directory": lambda: image.mkdir(),
        "another size": lambda: image.write_bytes(b"\0" * (1 << 20)),
    }
    for case, plant in cases.items():
        plant()
        for command in ("backup", "list"):
            result = cryptsnap(setup, command, setup.name, expect=None, timeout=120)
            assert result.returncode == 7, f"{case}, {command}: {result.stderr}"
            assert "attaching" in result.stderr, f"{case}: {result.stderr}"
            assert_nothing_left(setup, result.stderr)
        if image.is_dir() and not image.is_symlink():
            image.rmdir()
        else:
            image.unlink()
        assert (bait.read_bytes(), bait.stat().st_mtime_ns) == bait_before, f"{case}: the local file was touched"
    kept.rename(image)
    cryptsnap(setup, "backup", setup.name)
    assert len(cryptsnap(setup, "list", setup.name).stdout.split()) == 1
    assert stat.S_ISREG(os.lstat(image).st_mode)


# -- no room -----------------------------------------------------------------------------


@pytest.mark.parametrize("filesystem", ["btrfs", pytest.param("ext2", marks=pytest.mark.long)])  # ext2: make test-long (docs/testing.md)
def test_a_full_image_fails_cleanly_keeps_what_it_had_and_the_next_run_fits(tmp_path, untrusted_host, filesystem):
    setup, before = with_one_snapshot(tmp_path, untrusted_host, filesystem=filesystem, size="160M")
    fill(setup.source, 200, name="toobig")
    full = cryptsnap(setup, "backup", setup.name, expect=12)
    figures.record(f"image full, {filesystem}", error=full.stderr.strip().splitlines()[-1][:160])
    assert "syncing: the image is full: its file system holds" in full.stderr, full.stderr
    assert "MiB free" in full.stderr and "The unfinished snapshot was removed" in full.stderr, full.stderr
    assert_nothing_left(setup, full.stderr)
    assert digests(setup) == before, "the earlier snapshot changed, or the partial one is listed"
    for big in setup.source.glob("toobig-*"):
        big.unlink()
    (setup.source / "first").write_text("fits again\n")
    cryptsnap(setup, "backup", setup.name)
    after = digests(setup)
    assert len(after) == 2 and {name: after[name] for name in before} == before
    assert_nothing_left(setup)


@pytest.mark.long  # over 10 min of guest time: five runs that fill a 160M image
def test_make_room_deletes_the_oldest_snapshots_for_a_run_that_does_not_fit(tmp_path, untrusted_host):
    """retention.make_room: the run that does not fit deletes the oldest snapshot (one the rules
    keep), then the next oldest, until it fits; when only the newest is left, it fails as without."""
    setup, _ = with_one_snapshot(tmp_path, untrusted_host, size="160M",
                                 retention={"last": 50, "daily": 0, "weekly": 0, "monthly": 0, "make_room": True})  # fmt: skip
    for name in ("a", "b"):  # 48 MiB each, random: each snapshot holds its own
        for old in setup.source.glob("*-*"):
            old.unlink()
        fill(setup.source, 48, name=name)
        cryptsnap(setup, "backup", setup.name)
    before = digests(setup)
    first, with_a, with_b = sorted(before)
    for old in setup.source.glob("b-*"):
        old.unlink()
    fill(setup.source, 48, name="c")  # a, b and c do not fit in the image's 144 MiB; b and c do
    run = cryptsnap(setup, "backup", setup.name)
    for gone in (first, with_a):  # the first is small: deleting it alone makes too little room
        assert f"deleting the oldest snapshot, {gone}, to make room" in run.stderr, run.stderr
    after = digests(setup)
    assert sorted(after)[0] == with_b and after[with_b] == before[with_b] and len(after) == 2, sorted(after)
    fill(setup.source, 104, name="toobig")  # with c, more than the image holds: it gives up, keeping the newest
    full = cryptsnap(setup, "backup", setup.name, expect=12)
    assert "retention.make_room had deleted 1 older snapshot(s) for room" in full.stderr, full.stderr
    assert list(digests(setup)) == [max(after)]
    assert_nothing_left(setup, full.stderr)


# -- keys and headers --------------------------------------------------------------------


def test_key_and_header_problems_are_named_and_the_local_header_backup_restores(tmp_path, untrusted_host):
    setup = make_setup(tmp_path, untrusted_host, filesystem="ext2", size="64M")
    (setup.source / "f").write_text("kept safe\n")
    cryptsnap(setup, "init", setup.name)
    cryptsnap(setup, "backup", setup.name)
    name = cryptsnap(setup, "list", setup.name).stdout.split()[-1]
    key = setup.key_file.read_bytes()

    setup.key_file.unlink()
    missing = cryptsnap(setup, "backup", setup.name, expect=6)
    assert f"cannot read the LUKS key file {setup.key_file}" in missing.stderr, missing.stderr
    setup.key_file.write_bytes(key)
    document = yaml.safe_load(setup.config_path.read_text())
    target = document["targets"][setup.name]
    del target["key_file"]
    target["key_credential"] = "cryptsnap-key"
    setup.config_path.write_text(yaml.safe_dump(document))
    credential = cryptsnap(setup, "backup", setup.name, expect=6)
    assert "$CREDENTIALS_DIRECTORY is not set" in credential.stderr, credential.stderr
    target["key_file"] = str(setup.key_file)
    del target["key_credential"]
    setup.config_path.write_text(yaml.safe_dump(document))
    assert_nothing_left(setup)

    # The server zeroes the LUKS header: a restore from the server alone would fail.
    image = Path(untrusted_host.remote_dir) / f"{setup.name}.img"
    with open(image, "r+b") as f:
        f.write(b"\0" * (64 << 10))
    zeroed = cryptsnap(setup, "backup", setup.name, expect=7)
    assert "unlocking: the LUKS header of the image on the server is zeroed" in zeroed.stderr, zeroed.stderr
    assert "Nothing was written" in zeroed.stderr
    checked = cryptsnap(setup, "check", setup.name, expect=7)
    assert "LUKS header differs from the local backup" in checked.stderr + checked.stdout
    # This machine still reads it with its own copy of the header...
    cryptsnap(setup, "restore", f"{setup.name}@latest:{setup.source}/f", "--to", str(tmp_path / "got"))
    assert (tmp_path / "got").read_text() == "kept safe\n"
    assert_nothing_left(setup)
    # ...and puts it back as docs/restore-by-hand.md says; stock tools then open the image alone.
    header = setup.state_dir / setup.name / "luks-header.img"
    sh("cryptsetup", "luksHeaderRestore", "--batch-mode", str(image), "--header-backup-file", str(header))
    loop = sh("losetup", "--find", "--show", "--read-only", str(image)).stdout.strip()
    mnt = tmp_path / "by-hand"
    mnt.mkdir()
    try:
        sh("cryptsetup", "open", "--readonly", "--key-file", str(setup.key_file), loop, f"byhand-{setup.name}")
        sh("mount", "-o", "ro", f"/dev/mapper/byhand-{setup.name}", str(mnt))
        assert (mnt / "snapshots" / name / str(setup.source).lstrip("/") / "f").read_text() == "kept safe\n"
    finally:
        sh("umount", str(mnt), check=False)
        sh("cryptsetup", "close", f"byhand-{setup.name}", check=False)
        sh("losetup", "--detach", loop, check=False)
    cryptsnap(setup, "backup", setup.name)
    assert_nothing_left(setup)


# -- two at once -------------------------------------------------------------------------


def test_two_machines_on_one_image_one_proceeds_the_other_is_busy(tmp_path, untrusted_host):
    """A second machine (its own state directory, a copy of the first's) configured on the same
    image: while one writes, the other is refused by the lock next to the image, not let in."""
    import shutil

    first = make_setup(tmp_path / "first", untrusted_host, size="300M")
    init_target(first)
    fill(first.source, 48)
    second = make_setup(tmp_path / "second", untrusted_host, size="300M", image=f"{first.name}.img")
    shutil.copytree(first.state_dir / first.name, second.state_dir / second.name)
    second.key_file.write_bytes(first.key_file.read_bytes())  # one image, one key
    known = second.state_dir / second.name / "known_hosts"  # the pinned key, under this target's alias
    known.write_text(known.read_text().replace(f"cryptsnap-{first.name}", f"cryptsnap-{second.name}"))
    (second.source / "other").write_text("the second machine's files\n")
    proc = start_local_backup(first)
    wait_phase(first, "syncing")
    busy = cryptsnap(second, "backup", second.name, expect=4)
    assert f"the image is locked by backup on host {os.uname().nodename}" in busy.stderr, busy.stderr
    assert_nothing_left(second, busy.stderr)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    cryptsnap(second, "backup", second.name)  # its turn: the image was written elsewhere since, and that is fine
    assert len(cryptsnap(first, "list", first.name).stdout.split()) == 2
    assert_nothing_left(first)
    assert_nothing_left(second)
