"""Inside the guest: each test's outcome written as it ends, and a time limit per test.

pytest writes its JUnit report only when the whole session ends. A guest tier that runs out
of time (or a guest that wedges) would then say nothing about the tests that did finish, and
one test that hangs would take every later one with it. So, in the guest:

- each test's start and outcome is appended to ``$CRYPTSNAP_GUEST_PROGRESS`` (JSON lines,
  flushed at once, on the results share the host reads), with its duration;
- a test that runs longer than ``$CRYPTSNAP_GUEST_TEST_LIMIT`` seconds is interrupted
  (SIGALRM, raised where it waits) and fails by name; the session goes on.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

PROGRESS = os.environ.get("CRYPTSNAP_GUEST_PROGRESS")
LIMIT = float(os.environ.get("CRYPTSNAP_GUEST_TEST_LIMIT", "0") or 0)


class TestTookTooLong(Exception):
    """The guest test ran past its time limit."""


_deadline: float | None = None


def _write(entry: dict) -> None:
    if PROGRESS:
        with open(PROGRESS, "a") as out:
            out.write(json.dumps(entry) + "\n")


def _alarm(signum, frame):
    raise TestTookTooLong(
        f"the test ran longer than its limit of {LIMIT:.0f}s (CRYPTSNAP_GUEST_TEST_LIMIT) and was stopped"
    )


def pytest_runtest_logstart(nodeid, location) -> None:
    global _deadline
    _deadline = time.monotonic() + LIMIT if LIMIT else None
    _write({"start": nodeid, "t": round(time.time(), 1)})


def pytest_runtest_logfinish(nodeid, location) -> None:
    # With the start's time: the test's wall time, its setup and teardown included.
    _write({"finish": nodeid, "t": round(time.time(), 1)})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # One line per test: its call, or the setup/teardown phase that failed or skipped it.
    if report.when == "call" or report.outcome != "passed":
        text = report.longreprtext[-8000:] if report.outcome == "failed" else ""
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            text = report.longrepr[2]
        _write({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                "duration": round(report.duration, 1), "text": text})  # fmt: skip


def _limited():
    """Around each of a test's phases: the alarm is set for what is left of its time."""
    if _deadline is None:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(_deadline - time.monotonic(), 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _limited()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _limited()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield from _limited()


def read(path) -> tuple[dict[str, dict], str | None]:
    """On the host: the outcome of each test that ended, and the one that was running."""
    ended: dict[str, dict] = {}
    running = None
    if not os.path.exists(path):
        return ended, running
    with open(path) as lines:
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the last line, cut when the guest stopped
            if "start" in entry:
                running = entry["start"]
            elif "finish" in entry:
                running = None
            elif entry["nodeid"] not in ended or entry["outcome"] != "passed":
                ended[entry["nodeid"]] = entry
    return ended, running
