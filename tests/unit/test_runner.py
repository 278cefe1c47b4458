"""The runner's cancel: a signal stops the running tool, even one that is just being started."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import psutil
import pytest

from cryptsnap import runner
from cryptsnap.errors import Canceled, MissingTool, ToolFailed


@pytest.fixture
def signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    runner.cancel_on_signals()
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)
    # Not cancelable any more either: else the next in-process unwinding (a host test's failed
    # open_stack) runs ignore_cancels, and every later child of pytest inherits SIGTERM ignored
    # (a tool the connection watch stops then runs to its end).
    runner._cancelable = False
    runner._meanings = {}


def test_a_signal_while_a_child_starts_stops_that_child_then_cancels(signals):
    # The handler runs between two bytecodes of Popen: as if the signal came mid-start.
    runner._spawning = True
    try:
        runner._on_signal(signal.SIGTERM, None)  # deferred, not raised inside Popen
    finally:
        runner._spawning = False
    seconds = "31.4159"  # a duration no other process sleeps: finds this child
    with pytest.raises(Canceled, match="SIGTERM"):
        runner.run(("sleep", seconds))
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", seconds]]
    assert runner._deferred is None and not runner._children
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # the unwinding is not cut short


def test_a_signal_during_a_run_stops_the_tool_and_raises_canceled(signals):
    proc = subprocess.Popen(["sh", "-c", "sleep 0.3; kill -INT $PPID"])
    try:
        with pytest.raises(Canceled, match="SIGINT"):
            runner.run(("sleep", "30"))
    finally:
        proc.wait()
    assert not runner._children


def test_once_the_run_only_closes_a_cancel_cuts_nothing_short(signals):
    """After ignore_cancels (a snapshot complete, unwinding begun), a signal neither stops the
    running tool nor raises: the run ends as it would have."""
    runner.ignore_cancels()
    proc = subprocess.Popen(["sh", "-c", "sleep 0.3; kill -TERM $PPID"])
    try:
        assert runner.run(("sh", "-c", "sleep 1; echo finished")).stdout == "finished\n"
    finally:
        proc.wait()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_failures_name_the_tool_and_the_package():
    with pytest.raises(ToolFailed, match=r"sh failed \(exit 3\): bad thing"):
        runner.run(("sh", "-c", "echo bad thing >&2; exit 3"))
    with pytest.raises(MissingTool) as missing:
        runner.run(("cryptsetup-does-not-exist",))
    assert "cryptsetup-does-not-exist" in str(missing.value)


def test_a_cancel_is_recognized_itself_or_as_a_steps_cause():
    from cryptsnap.errors import Canceled, Interrupted, StepFailed, ToolFailed, canceled

    assert canceled(Canceled("stop")) and canceled(KeyboardInterrupt())
    assert canceled(StepFailed("syncing", Canceled("stop")))
    assert not canceled(StepFailed("syncing", ToolFailed("rsync failed")))
    assert not canceled(StepFailed("syncing", Interrupted("killed")))  # not on purpose: recorded as failed


class _SignalingStream:
    """A log stream whose write is where the signal lands: as if the cancel came mid-log."""

    def __init__(self):
        self.lines = []

    def write(self, text):
        os.kill(os.getpid(), signal.SIGTERM)  # handled before the next bytecode: inside emit
        self.lines.append(text)

    def flush(self):
        pass


def test_a_cancel_that_lands_in_a_log_line_is_not_dropped(signals):
    """logging's handlers catch any Exception in emit, print "--- Logging error ---" and go on:
    a cancel raised there was lost, and the canceled run went on to complete (CI, stop 18)."""
    from cryptsnap import logs

    logger = logging.getLogger("cryptsnap.test-cancel-in-log")
    logger.propagate = False
    logger.addHandler(logs.Handler(_SignalingStream()))
    try:
        with pytest.raises(Canceled, match="SIGTERM"):
            logger.warning("going on from the unfinished snapshot %s", "x.partial")
    finally:
        logger.handlers.clear()


def test_stop_all_stops_the_running_tool_and_starts_none_until_allowed_again():
    """A run's connection ended (ConnectionWatch, another thread): the tool running then is
    stopped, and one the run starts after it is not run at all; unwinding allows them again."""
    import threading

    seconds = "27.1828"  # a duration no other process sleeps
    failures = []

    def running():
        try:
            runner.run(("sleep", seconds))
        except ToolFailed as exc:
            failures.append(exc)

    thread = threading.Thread(target=running)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", seconds]]:
            assert time.monotonic() < deadline, "the tool did not start within 10 s"
            time.sleep(0.01)
        runner.stop_all("the ssh connection ended")
        thread.join(timeout=10)
        assert not thread.is_alive() and failures and failures[0].returncode == -signal.SIGTERM
        with pytest.raises(ToolFailed, match="sleep was not run: the ssh connection ended"):
            runner.run(("sleep", seconds))
        assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", seconds]]
        assert not runner._children
    finally:
        runner.allow_again()
    assert runner.run(("echo", "unwinding")).stdout == "unwinding\n"


def test_a_tool_starting_while_stop_all_runs_is_stopped_as_it_starts(monkeypatch):
    # stop_all() from the watch's thread between Popen and the child's registration: its
    # terminate_children() cannot see the child, so _popen looks again once it is known.
    seconds = "16.1803"
    real_popen = subprocess.Popen

    def popen_then_refused(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        runner._refusing = "the ssh connection ended"  # what stop_all() sets before it terminates
        return proc

    monkeypatch.setattr(runner.subprocess, "Popen", popen_then_refused)
    try:
        with pytest.raises(ToolFailed, match="sleep was stopped as it started: the ssh connection ended"):
            runner.run(("sleep", seconds))
    finally:
        runner.allow_again()
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", seconds]]
    assert not runner._children
