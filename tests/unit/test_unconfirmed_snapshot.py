"""A run failed between naming its snapshot and the commit of that name says the snapshot may be there."""

from __future__ import annotations

from cryptsnap.errors import ConnectionLost, StepFailed
from cryptsnap.pipeline import RunRecord, note_unconfirmed_snapshot


def failure() -> StepFailed:
    return StepFailed("finalizing", ConnectionLost("lost the connection to host (ssh: Broken pipe)"))


def test_a_run_failed_after_naming_its_snapshot_says_it_may_be_there():
    record = RunRecord("backup", "home")
    record.snapshot = "2026-12-04T180529Z"
    exc = failure()
    note_unconfirmed_snapshot(record, exc)
    assert str(exc).startswith("finalizing: lost the connection to host (ssh: Broken pipe); snapshot "
                               "2026-12-04T180529Z may be on the server all the same, complete")  # fmt: skip
    assert exc.exit_code == 5 and "cryptsnap list" in str(exc)


def test_nothing_is_said_before_the_snapshot_was_named_or_once_it_was_committed():
    before = RunRecord("backup", "home")
    exc = failure()
    note_unconfirmed_snapshot(before, exc)
    assert "may be" not in str(exc)
    after = RunRecord("backup", "home")
    after.snapshot, after.snapshots = "2026-12-04T180529Z", ["2026-12-04T180529Z"]
    note_unconfirmed_snapshot(after, exc)
    assert "may be" not in str(exc)
