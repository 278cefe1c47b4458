"""How guest JUnit results become host outcomes (pure logic of tests/harness/plugin.py)."""

from tests.harness.plugin import junit_key, parse_junit

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
  <testcase classname="tests.system.test_a" name="test_ok" time="0.1"/>
  <testcase classname="tests.system.test_a.TestGroup" name="test_bad[x-1]" time="0.1">
    <failure message="AssertionError: boom">def test_bad():\n&gt;  assert 0, "boom"\nE  AssertionError: boom</failure>
  </testcase>
  <testcase classname="tests.system.test_a" name="test_fixture" time="0.1">
    <error message="failed on setup">fixture exploded</error>
  </testcase>
  <testcase classname="tests.system.test_a" name="test_skip" time="0">
    <skipped type="pytest.skip" message="needs X">skip</skipped>
  </testcase>
</testsuite></testsuites>
"""


def test_junit_key_matches_pytest_classnames():
    assert junit_key("tests/system/test_a.py::test_ok") == ("tests.system.test_a", "test_ok")
    assert junit_key("tests/system/test_a.py::TestGroup::test_bad[x-1]") == (
        "tests.system.test_a.TestGroup",
        "test_bad[x-1]",
    )


def test_outcomes_carry_the_guest_failure_text():
    outcomes = parse_junit(REPORT)
    assert outcomes[junit_key("tests/system/test_a.py::test_ok")].status == "passed"
    bad = outcomes[junit_key("tests/system/test_a.py::TestGroup::test_bad[x-1]")]
    assert bad.status == "failed" and "AssertionError: boom" in bad.text
    setup = outcomes[junit_key("tests/system/test_a.py::test_fixture")]
    assert setup.status == "failed" and "setup or teardown" in setup.text and "fixture exploded" in setup.text
    skip = outcomes[junit_key("tests/system/test_a.py::test_skip")]
    assert skip.status == "skipped" and skip.text == "needs X"


GUEST_TESTS = """
import time

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "boom"

def test_hangs():
    time.sleep(60)

def test_after_the_hang():
    pass
"""


def test_each_outcome_is_written_as_it_comes_and_a_hung_test_fails_by_name(tmp_path):
    """The guest side (tests/harness/progress.py) in a real pytest session, with a 1 s limit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.harness import progress

    (tmp_path / "test_g.py").write_text(GUEST_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    log = tmp_path / "progress.jsonl"
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, CRYPTSNAP_GUEST_PROGRESS=str(log), CRYPTSNAP_GUEST_TEST_LIMIT="1", PYTHONPATH=str(repo))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.harness.progress", "-p", "no:cacheprovider",
                          "-q", "-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_g.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50)  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    ended, running = progress.read(log)
    outcomes = {nodeid.split("::")[1]: entry for nodeid, entry in ended.items()}
    assert outcomes["test_passes"]["outcome"] == "passed"
    assert outcomes["test_fails"]["outcome"] == "failed" and "boom" in outcomes["test_fails"]["text"]
    hung = outcomes["test_hangs"]
    assert hung["outcome"] == "failed" and "longer than its limit of 1s" in hung["text"], hung
    assert hung["duration"] < 30
    assert outcomes["test_after_the_hang"]["outcome"] == "passed"
    assert running is None


def test_a_guest_tier_that_stopped_keeps_what_ended_and_names_the_test_it_stopped_in(tmp_path):
    from tests.harness.plugin import GuestRun

    nodeids = ["tests/system/test_a.py::test_ok", "tests/system/test_a.py::test_bad",
               "tests/system/test_a.py::test_slow", "tests/system/test_a.py::test_never"]  # fmt: skip
    (tmp_path / "progress.jsonl").write_text(
        '{"start": "tests/system/test_a.py::test_ok", "t": 1}\n'
        '{"nodeid": "tests/system/test_a.py::test_ok", "when": "call", "outcome": "passed", "duration": 1, "text": ""}\n'
        '{"finish": "tests/system/test_a.py::test_ok"}\n'
        '{"start": "tests/system/test_a.py::test_bad", "t": 2}\n'
        '{"nodeid": "tests/system/test_a.py::test_bad", "when": "setup", "outcome": "failed", "duration": 1, '
        '"text": "fixture exploded"}\n'
        '{"finish": "tests/system/test_a.py::test_bad"}\n'
        '{"start": "tests/system/test_a.py::test_slow", "t": 3}\n'
        '{"nodeid": "tests/system/te'  # cut off when the guest stopped
    )
    run = GuestRun(None, nodeids)
    run.error = "the guest stopped answering"
    run._outcomes_so_far(tmp_path)
    assert run.error is None
    assert run.outcome(nodeids[0]).status == "passed"
    bad = run.outcome(nodeids[1])
    assert bad.status == "failed" and "in setup" in bad.text and "fixture exploded" in bad.text
    for nodeid in nodeids[2:]:
        outcome = run.outcome(nodeid)
        assert outcome.status == "failed" and "the guest stopped answering" in outcome.text
        assert "while tests/system/test_a.py::test_slow ran" in outcome.text


def test_progress_lines_carry_each_tests_start_and_finish_time(tmp_path, monkeypatch):
    """Their difference is the test's wall time with its setup (where an init may be), which the
    call's duration leaves out."""
    import json

    from tests.harness import progress

    monkeypatch.setattr(progress, "PROGRESS", str(tmp_path / "progress.jsonl"))
    monkeypatch.setattr(progress, "LIMIT", 0)
    progress.pytest_runtest_logstart("tests/system/test_a.py::test_ok", None)
    progress.pytest_runtest_logfinish("tests/system/test_a.py::test_ok", None)
    start, finish = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert start["start"] == finish["finish"] == "tests/system/test_a.py::test_ok"
    assert 0 <= finish["t"] - start["t"] < 60
    assert progress.read(tmp_path / "progress.jsonl") == ({}, None)
