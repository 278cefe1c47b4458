"""pytest side of the guest tier: run tests/system inside the guest, report on the host.

On the host every selected test under ``tests/system`` is replaced by a ``GuestItem``
with the same node id. The first one to run boots the guest once, runs all of them there
in one pytest session (Debian's python3 and packages, the checkout read-only at /src)
which writes JUnit XML to /results, then powers the guest off. Each host item then
passes, fails with the guest's own failure text, or skips, as its guest twin did.

Inside the guest (``CRYPTSNAP_IN_GUEST=1``) nothing is replaced: the tests just run.
"""

from __future__ import annotations

import os
import shlex
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import progress
from tests.support import package

SYSTEM_DIR = "tests/system/"
IN_GUEST = os.environ.get("CRYPTSNAP_IN_GUEST") == "1"
GUEST_TIMEOUT = float(os.environ.get("CRYPTSNAP_VM_TEST_TIMEOUT", "4900"))


LONG_ENV = "CRYPTSNAP_LONG"  # set by --long (make test-long); reaches the guest with the other CRYPTSNAP_ variables


def long_run() -> bool:
    """Whether the tests marked `long` (and test_cuts' 20 seeds) were asked for."""
    return os.environ.get(LONG_ENV) == "1"


def guest_test_limit() -> str:
    """Seconds a guest test may take: no test takes near this (test_cuts with 20 seeds, in
    make test-long, about 15 minutes); one that hangs fails by name and the others still run."""
    default = "2400" if long_run() else "900"
    return os.environ.get("CRYPTSNAP_GUEST_TEST_LIMIT", default)


class GuestTestFailed(Exception):
    """A test failed inside the guest; the message is the guest's failure text."""


@dataclass
class Outcome:
    status: str  # passed, failed, skipped
    text: str = ""


def junit_key(nodeid: str) -> tuple[str, str]:
    """The (classname, name) pair pytest's JUnit XML writer uses for a node id."""
    parts = nodeid.split("::")
    module = parts[0][: -len(".py")] if parts[0].endswith(".py") else parts[0]
    classname = ".".join([module.replace("/", "."), *parts[1:-1]])
    return classname, parts[-1]


def parse_junit(text: str) -> dict[tuple[str, str], Outcome]:
    """Outcome of each test case in a JUnit XML report, failures winning over passes."""
    outcomes: dict[tuple[str, str], Outcome] = {}
    for case in ET.fromstring(text).iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        outcome = Outcome("passed")
        for child in case:
            if child.tag in ("failure", "error"):
                detail = (child.text or "").strip() or child.get("message", "")
                where = " (in setup or teardown)" if child.tag == "error" else ""
                outcome = Outcome("failed", f"guest test failed{where}:\n{detail}")
                break
            if child.tag == "skipped":
                outcome = Outcome("skipped", child.get("message", "skipped in the guest"))
        outcomes[key] = outcome
    return outcomes


class GuestRun:
    """Runs the selected guest tests in one guest boot, once, and remembers the outcomes."""

    def __init__(self, config: pytest.Config, nodeids: list[str]):
        self.config = config
        self.nodeids = nodeids
        self.outcomes: dict[tuple[str, str], Outcome] | None = None
        self.error: str | None = None
        self.timings: dict[str, float] = {}
        self.accel = "?"
        self.image_built = False

    def run(self) -> None:
        from .vm import PYTHON_ENV, Guest, GuestError, with_local_src  # only the host needs qemu

        started = time.monotonic()
        try:  # the guest installs cryptsnap from the package, as users do (tests/support/package.py)
            package.build()
        except RuntimeError as exc:
            self.error = str(exc)
            return
        self.timings["package"] = time.monotonic() - started
        guest = Guest()
        try:
            guest.start()
            self.accel = guest.accel
            self.image_built = guest.image.built_now
            self.timings["image"] = guest.image.build_seconds
            self.timings["boot"] = guest.boot_seconds - guest.image.build_seconds
            env = {k: v for k, v in os.environ.items() if k.startswith("CRYPTSNAP_") and "_VM_" not in k}
            env.update(PYTHON_ENV, CRYPTSNAP_IN_GUEST="1", CRYPTSNAP_GUEST_TEST_LIMIT=guest_test_limit(),
                       CRYPTSNAP_GUEST_PROGRESS="/results/progress.jsonl")  # fmt: skip
            argv = [
                "python3", "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", "-v", "--durations=20",
                "-o", "junit_family=xunit2", "--junitxml=/results/junit.xml", *self.nodeids,
            ]  # fmt: skip
            t0 = time.monotonic()
            command = with_local_src(f"{shlex.join(argv)} > /results/pytest.log 2>&1")
            try:
                guest.run(command, timeout=GUEST_TIMEOUT, cwd="/src", env=env)
            finally:
                self.timings["tests"] = time.monotonic() - t0
            report = guest.results / "junit.xml"
            if not report.exists():
                log = guest.results / "pytest.log"
                tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
                spent = self.timings["tests"]
                raise GuestError(f"pytest in the guest wrote no JUnit report after {spent:.0f}s "
                                 f"(CRYPTSNAP_VM_TEST_TIMEOUT: {GUEST_TIMEOUT:.0f}s):\n{tail}")  # fmt: skip
            self.outcomes = parse_junit(report.read_text())
        except GuestError as exc:
            self.error = str(exc)
            self._outcomes_so_far(guest.results)
        finally:
            guest.stop()
            self.timings["total"] = time.monotonic() - started

    def _outcomes_so_far(self, results: Path) -> None:
        """The session did not end: each test that did keeps its outcome; the others fail
        saying what stopped them."""
        ended, running = progress.read(results / "progress.jsonl")
        if not ended and running is None:
            return
        self.outcomes = {}
        for nodeid, entry in ended.items():
            status = {"passed": "passed", "skipped": "skipped"}.get(entry["outcome"], "failed")
            text = f"guest test failed (in {entry['when']}):\n{entry['text']}" if status == "failed" else entry["text"]
            self.outcomes[junit_key(nodeid)] = Outcome(status, text)
        stopped = f"while {running or 'no test'} ran, the guest tier stopped: {self.error}"
        for nodeid in self.nodeids:
            self.outcomes.setdefault(junit_key(nodeid), Outcome("failed", f"did not finish: {stopped}"))
        self.error = None

    def outcome(self, nodeid: str) -> Outcome:
        if self.outcomes is None and self.error is None:
            self.run()
        if self.error is not None:
            return Outcome("failed", f"the guest tier could not run:\n{self.error}")
        found = self.outcomes.get(junit_key(nodeid))
        return found or Outcome("failed", f"{nodeid} did not run in the guest (see build/vm-results/pytest.log)")

    def summary(self) -> str:
        t = self.timings
        image = f"image {'built' if self.image_built else 'cached'} {t.get('image', 0):.0f}s"
        return (
            f"guest tier ({self.accel}): package {t.get('package', 0):.0f}s, {image}, boot {t.get('boot', 0):.0f}s, "
            f"tests {t.get('tests', 0):.0f}s, total {t.get('total', 0):.0f}s wall"
        )


class GuestItem(pytest.Item):
    """Host stand-in for a test that runs inside the guest."""

    def runtest(self) -> None:
        outcome = self.config.stash[RUN_KEY].outcome(self.nodeid)
        if outcome.status == "failed":
            raise GuestTestFailed(outcome.text)
        if outcome.status == "skipped":
            pytest.skip(outcome.text)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GuestTestFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    lineno = 0  # the guest twin's line, set when the item is replaced

    def reportinfo(self):
        return self.path, self.lineno, f"{self.name} [guest]"


RUN_KEY = pytest.StashKey[GuestRun]()


def is_guest_test(item: pytest.Item) -> bool:
    return item.nodeid.startswith(SYSTEM_DIR)


def replace_guest_items(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_GUEST:
        return
    guest_ids = [item.nodeid for item in items if is_guest_test(item)]
    if not guest_ids:
        return
    config.stash[RUN_KEY] = GuestRun(config, guest_ids)
    for index, item in enumerate(items):
        if is_guest_test(item):
            proxy = GuestItem.from_parent(item.parent, name=item.name)
            proxy.own_markers = list(item.own_markers)
            proxy.lineno = item.location[1] or 0
            items[index] = proxy


def report_timings(terminalreporter, config: pytest.Config) -> None:
    run = config.stash.get(RUN_KEY, None)
    if run is not None and run.timings:
        terminalreporter.write_sep("-", run.summary())
        results = Path(__file__).resolve().parents[2] / "build" / "vm-results"
        terminalreporter.write_line(f"guest logs: {results}/ (pytest.log, junit.xml, journal.txt, console.log)")
