"""The run marker (running.json) says how far a killed run got, so the next one can say what happened."""

from __future__ import annotations

import dataclasses
import json

from cryptsnap import config
from cryptsnap.state import TargetState
from tests.unit.test_config import GOOD


def running(tmp_path, *phases: str) -> TargetState:
    target = dataclasses.replace(config.parse(GOOD, "c.yaml").target("home"), state_dir=tmp_path)
    state = TargetState(target)
    for phase in phases:
        state.mark_phase(phase)
    return state


def killed(state: TargetState) -> TargetState:
    """The run dies: its marker names a process that is gone; what comes next sees it."""
    marker = json.loads(state.run_marker.read_text())
    state.run_marker.write_text(json.dumps({**marker, "pid": 0}))
    return TargetState(state.target)


def killed_run(tmp_path, *phases: str) -> TargetState:
    return killed(running(tmp_path, *phases))


def test_a_run_killed_in_a_phase_is_recorded_as_failed_there(tmp_path):
    state = killed_run(tmp_path, "connecting", "attaching", "syncing")
    error = state.settle_unfinished("cryptsnapd was restarted during the run")
    assert str(error).startswith("syncing: interrupted: cryptsnapd was restarted during the run;")
    assert state.last_run()["result"] == "failed" and state.last_run()["exit_code"] == error.exit_code
    assert not state.run_marker.exists()


def test_a_run_killed_while_unwinding_a_failure_names_the_phase_that_failed(tmp_path):
    """Told to stop while syncing, it began to unmount and was killed there: it failed syncing."""
    state = killed_run(tmp_path, "connecting", "syncing", "unmounting")
    error = state.settle_unfinished("cryptsnapd was restarted during the run")
    assert str(error).startswith("syncing: interrupted:"), error


def test_a_run_killed_while_unmounting_a_complete_snapshot_is_a_success(tmp_path):
    state = running(tmp_path, "syncing", "finalizing")
    state.mark_complete("2026-12-03T000000Z")
    state.mark_phase("unmounting")
    state = killed(state)
    assert state.settle_unfinished("killed") is None
    assert state.last_run()["result"] == "done" and "2026-12-03T000000Z" in state.last_run()["snapshots"]
