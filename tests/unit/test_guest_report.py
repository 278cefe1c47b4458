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
