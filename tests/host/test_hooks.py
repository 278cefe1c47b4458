"""Hooks around a backup, run by the real pipeline. This machine has no device-mapper, so a
run that gets past its `before` hook fails at unlocking: enough for `before` and `on_error`
(the guest tier runs `after` through cryptsnapd, tests/system/test_service.py)."""

from __future__ import annotations

import json
import time

import yaml

from tests.host.test_layers import prepare
from tests.support.checks import assert_nothing_left, cryptsnap


def with_hooks(setup, **hooks) -> None:
    document = yaml.safe_load(setup.config_path.read_text())
    document["targets"][setup.name]["hooks"] = hooks
    setup.config_path.write_text(yaml.safe_dump(document))


def last_run(setup) -> dict:
    return json.loads((setup.state_dir / setup.name / "last-run.json").read_text())


def test_a_failing_before_hook_skips_the_run_and_says_why(setup, tmp_path):
    prepare(setup)
    with_hooks(setup, before=["sh", "-c", "echo dumping the database; echo 'pg_dump: connection refused' >&2; exit 3"])
    failed = cryptsnap(setup, "-v", "backup", setup.name, expect=14)
    assert "error: before hook: sh exited with 3: pg_dump: connection refused" in failed.stderr, failed.stderr
    assert "hook before: dumping the database" in failed.stderr, "the hook's output is not in the log"
    assert "connecting" not in failed.stderr, "the run went on after its before hook failed"
    record = last_run(setup)
    assert record["result"] == "failed" and record["exit_code"] == 14 and record["error"].startswith("before hook:")
    assert_nothing_left(setup)


def test_a_before_hook_that_hangs_is_stopped_and_a_missing_one_named(setup):
    prepare(setup)
    with_hooks(setup, before=["sleep", "60"], timeout=1)
    started = time.monotonic()
    hung = cryptsnap(setup, "backup", setup.name, expect=14)
    assert time.monotonic() - started < 20
    assert "before hook: sleep did not finish within 1 s (hooks.timeout)" in hung.stderr, hung.stderr
    with_hooks(setup, before=["/usr/local/bin/no-such-dump"])
    missing = cryptsnap(setup, "backup", setup.name, expect=14)
    assert "/usr/local/bin/no-such-dump: no such program" in missing.stderr, missing.stderr
    assert_nothing_left(setup)


def test_on_error_runs_after_a_failed_run_with_its_result_in_the_environment(setup, tmp_path):
    prepare(setup)
    seen, before = tmp_path / "on_error.env", tmp_path / "before.env"
    with_hooks(setup, before=["sh", "-c", f"env > {before}"],
               on_error=["sh", "-c", f"env | grep ^CRYPTSNAP_ | sort > {seen}"],
               after=["sh", "-c", f"touch {tmp_path / 'after-ran'}"])  # fmt: skip
    failed = cryptsnap(setup, "backup", setup.name, expect=None)
    assert failed.returncode == 8, failed.stderr  # unlocking: no device-mapper here
    assert f"CRYPTSNAP_TARGET={setup.name}" in before.read_text().splitlines()
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines())
    assert env["CRYPTSNAP_HOOK"] == "on_error" and env["CRYPTSNAP_RESULT"] == "failed", env
    assert env["CRYPTSNAP_EXIT_CODE"] == "8" and env["CRYPTSNAP_ERROR"].startswith("unlocking:"), env
    assert env["CRYPTSNAP_TARGET"] == setup.name and "CRYPTSNAP_BYTES_UP" in env
    assert not (tmp_path / "after-ran").exists(), "after ran for a failed run"
    assert last_run(setup)["exit_code"] == 8, "the hook changed the run's result"

    with_hooks(setup, on_error=["false"])  # a failing on_error hook is logged; the run's result stands
    again = cryptsnap(setup, "backup", setup.name, expect=8)
    assert "on_error hook: false exited with 1 (the run stays failed)" in again.stderr, again.stderr
    assert_nothing_left(setup)


def test_a_missing_source_skips_the_run_unless_the_before_hook_makes_it(setup):
    """A source that is gone (a disk not mounted) would be backed up as nothing: the run is
    skipped before it connects. It is checked after the `before` hook, which may mount it."""
    prepare(setup)
    setup.source.rmdir()
    failed = cryptsnap(setup, "-v", "backup", setup.name, expect=15)
    assert (f"error: checking the sources: {setup.source}: no such file or directory, in the sources of target "
            f"{setup.name}. Nothing was backed up") in failed.stderr, failed.stderr  # fmt: skip
    assert f"remove it from targets.{setup.name}.sources" in failed.stderr
    assert "connecting" not in failed.stderr, "the run went on without its source"
    record = last_run(setup)
    assert record["result"] == "failed" and record["exit_code"] == 15
    assert_nothing_left(setup)
    with_hooks(setup, before=["mkdir", str(setup.source)])  # as a hook that mounts the source's disk
    went_on = cryptsnap(setup, "-v", "backup", setup.name, expect=None)
    assert went_on.returncode == 8 and "unlocking" in went_on.stderr, went_on.stderr  # no device-mapper here
