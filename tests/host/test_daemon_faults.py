"""cryptsnapd's worst day on a private bus: a killed worker, a killed daemon, a client that follows.

Each job here hangs in "connecting" against a server that never answers (the tarpit), with
its sshfs and ssh running: enough for something to be left behind when a process is killed.
The guest tier (tests/system/test_faults.py) does the same with the whole stack open.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from cryptsnap.bus import target_path
from tests.host.test_daemon import Daemon, bus  # noqa: F401  (fixture)
from tests.support.checks import assert_nothing_left, leftovers

TARGET = "org.cryptsnap1.Target"


def start_job(daemon, setup) -> str:
    out = daemon.bus.busctl("--json=short", "call", "org.cryptsnap1", target_path(setup.name), TARGET,
                            "StartBackup", "a{sv}", "0").stdout  # fmt: skip
    return json.loads(out)["data"][0]


def worker_of(setup, kind: str = "") -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "cryptsnap.worker" in cmdline and setup.name in cmdline and (not kind or kind in cmdline):
            return proc
    raise AssertionError(f"no worker of {setup.name} runs")


def wait_connecting(setup, timeout: float = 30) -> None:
    """Until the job's ssh runs (and is hanging on the silent server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(f"cryptsnap-{setup.name}" in " ".join(p.info["cmdline"] or []) and p.info["name"] == "ssh"
               for p in psutil.process_iter(["name", "cmdline"])):  # fmt: skip
            return
        time.sleep(0.05)
    raise AssertionError("the job's ssh never started")


def wait_gone(predicate, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still there after {timeout}s: {what or predicate()}")
        time.sleep(0.05)


def follow_backup(setup, private_bus) -> subprocess.Popen:
    """`cryptsnap backup --daemon` following its job on the private bus."""
    return subprocess.Popen([sys.executable, "-m", "cryptsnap", "--config", str(setup.config_path), "backup",
                             "--daemon", setup.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, CRYPTSNAP_BUS_ADDRESS=private_bus.address))  # fmt: skip


def last(daemon, setup, name: str):
    return daemon.get(target_path(setup.name), TARGET, name)


def test_a_killed_worker_is_unwound_at_once_and_recorded(setup, bus, tarpit):  # noqa: F811
    setup.point_at_silent_server(tarpit)
    daemon = Daemon(setup, bus).ready()
    try:
        start_job(daemon, setup)
        wait_connecting(setup)
        assert leftovers(setup), "nothing open to leave behind: the test would show nothing"
        mark = daemon.notify.mark()
        worker_of(setup).kill()
        unwinding = daemon.notify.wait_for(lambda m: "unwinding a dead run" in m, since=mark, timeout=10)
        after = daemon.notify.messages.index(unwinding, mark) + 1
        daemon.notify.wait_for(lambda m: m == "STATUS=idle", since=after, timeout=30)
        assert_nothing_left(setup)  # now, not at the next run
        assert last(daemon, setup, "LastResult") == "failed"
        error = last(daemon, setup, "LastError")
        assert "connecting: interrupted: its process was killed by SIGKILL" in error, error
        assert last(daemon, setup, "LastExitCode") == 11
        assert not (setup.state_dir / setup.name / "running.json").exists()
    finally:
        err = daemon.stop()
    assert "unwinding what the run left" in err, err


def borrow_fd(pid: int, suffix: str) -> int:
    """A copy in this process of `pid`'s descriptor of the file ending with `suffix`: the same
    open file, so a lock taken through it is held by this process too (pidfd_getfd(2))."""
    import ctypes

    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(suffix):
            pidfd = os.pidfd_open(pid)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                copy = libc.syscall(438, pidfd, int(fd), 0)  # SYS_pidfd_getfd
                if copy < 0:
                    raise OSError(ctypes.get_errno(), "pidfd_getfd")
                return copy
            finally:
                os.close(pidfd)
    raise AssertionError(f"process {pid} has no file ending with {suffix} open")


def test_a_killed_worker_whose_lock_a_child_still_holds_for_a_moment_is_unwound_once_it_is_free(setup, bus, tarpit):  # noqa: F811
    """Killed while starting a child, between that child's fork and exec (where its copies of
    the worker's descriptors are closed): for a moment the child holds the target's lock. The
    daemon waits for it rather than calling the target busy and leaving the run's mounts."""
    setup.point_at_silent_server(tarpit)
    daemon = Daemon(setup, bus).ready()
    try:
        start_job(daemon, setup)
        wait_connecting(setup)
        worker = worker_of(setup)
        held = borrow_fd(worker.pid, f"{setup.name}.lock")  # as the forked child would
        mark = daemon.notify.mark()
        worker.kill()
        time.sleep(1)
        assert leftovers(setup), "unwound while the lock was held"
        os.close(held)
        unwinding = daemon.notify.wait_for(lambda m: "unwinding a dead run" in m, since=mark, timeout=10)
        after = daemon.notify.messages.index(unwinding, mark) + 1
        daemon.notify.wait_for(lambda m: m == "STATUS=idle", since=after, timeout=30)
        assert_nothing_left(setup)
        error = last(daemon, setup, "LastError")
        assert "connecting: interrupted: its process was killed by SIGKILL" in error, error
    finally:
        err = daemon.stop()
    assert "cannot unwind" not in err, err


def test_a_client_following_a_job_exits_when_the_daemon_dies_and_the_worker_unwinds(setup, bus, tarpit):  # noqa: F811
    setup.point_at_silent_server(tarpit)
    daemon = Daemon(setup, bus).ready()
    client = follow_backup(setup, bus)
    try:
        wait_connecting(setup)
        worker = worker_of(setup)
        daemon.process.kill()  # SIGKILL: the OOM killer, a crash
        _, err = client.communicate(timeout=15)
        assert client.returncode == 11, err
        assert "cryptsnapd left the bus while job /org/cryptsnap1/job/1 ran" in err, err
        # The orphaned worker got SIGTERM (PR_SET_PDEATHSIG), unwound and recorded why.
        worker.wait(30)
        assert_nothing_left(setup)
        record = json.loads((setup.state_dir / setup.name / "last-run.json").read_text())
        assert record["result"] == "failed" and record["exit_code"] == 11, record
        assert "connecting: interrupted: cryptsnapd stopped or was killed during the run" in record["error"], record
    finally:
        client.kill()
        daemon.stop()


def test_a_restarted_daemon_unwinds_what_its_killed_run_left(setup, bus, tarpit):  # noqa: F811
    """Everything SIGKILLed at once (`systemctl kill -s KILL`, the OOM killer's cgroup kill)."""
    setup.point_at_silent_server(tarpit)
    daemon = Daemon(setup, bus).ready()
    start_job(daemon, setup)
    wait_connecting(setup)
    worker = worker_of(setup)
    os.kill(worker.pid, signal.SIGKILL)  # first, so it cannot unwind when its daemon goes
    daemon.process.kill()
    daemon.stop()
    assert leftovers(setup), "nothing was left: the test would show nothing"
    assert (setup.state_dir / setup.name / "running.json").exists()
    again = Daemon(setup, bus)
    try:
        ready = again.notify.messages.index(again.notify.wait_for(lambda m: m == "READY=1"))
        # The unwinding starts before READY=1: its status comes first, idle once it is done.
        assert "unwinding a dead run" in again.notify.wait_for(lambda m: m.startswith("STATUS="), since=ready)
        again.notify.wait_for(lambda m: m == "STATUS=idle", since=ready, timeout=30)
        assert_nothing_left(setup)
        error = last(again, setup, "LastError")
        assert "connecting: interrupted: cryptsnapd was restarted during the run" in error, error
        assert last(again, setup, "LastResult") == "failed"
        assert last(again, setup, "LastExitCode") == 11
    finally:
        again.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_following_client_cancels_the_job(setup, bus, tarpit, signum):  # noqa: F811
    setup.point_at_silent_server(tarpit)
    daemon = Daemon(setup, bus).ready()
    client = follow_backup(setup, bus)
    try:
        wait_connecting(setup)
        client.send_signal(signum)
        _, err = client.communicate(timeout=30)
        assert client.returncode == 9, err
        assert "canceling job" in err, err
        assert last(daemon, setup, "LastResult") == "canceled"
        assert_nothing_left(setup)
    finally:
        client.kill()
        daemon.stop()
