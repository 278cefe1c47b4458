"""A backup that loses its connection tries again (reconnect_tries, reconnect_delay), and the
new try goes on from the unfinished snapshot only while nothing else was written since."""

from __future__ import annotations

import dataclasses

from cryptsnap import config, snapshot
from cryptsnap.errors import ConnectionLost, ImageFull, RemoteUnreachable, StepFailed
from cryptsnap.pipeline import retry_after
from cryptsnap.state import TargetState
from tests.unit.test_config import GOOD

TARGET = dataclasses.replace(config.parse(GOOD, "c.yaml").target("home"), reconnect_tries=3, reconnect_delay=60)
LOST = StepFailed("syncing", ConnectionLost("lost the connection to backup.example.org (ssh: Broken pipe)"))
UNREACHABLE = StepFailed("connecting", RemoteUnreachable("backup.example.org did not answer"))


def test_a_lost_connection_is_tried_again_with_doubling_waits_then_given_up():
    assert [retry_after(TARGET, LOST, tries) for tries in (1, 2, 3, 4)] == [60, 120, 240, None]


def test_a_new_try_that_cannot_reconnect_yet_waits_again_but_a_first_try_fails_at_once():
    assert retry_after(TARGET, UNREACHABLE, 1) is None  # a wrong host or a refused login: say so now
    assert retry_after(TARGET, UNREACHABLE, 2) == 120


def test_other_failures_a_complete_snapshot_and_zero_tries_are_not_tried_again():
    assert retry_after(TARGET, StepFailed("syncing", ImageFull("the image is full")), 1) is None
    assert retry_after(TARGET, LOST, 1, complete=True) is None
    assert retry_after(dataclasses.replace(TARGET, reconnect_tries=0), LOST, 1) is None


def test_the_example_and_defaults_set_three_tries():
    target = config.parse(GOOD, "c.yaml").target("home")
    assert (target.reconnect_tries, target.reconnect_delay) == (3, 60)


def test_an_unfinished_snapshot_is_gone_on_from_only_at_the_same_newest_snapshot_and_generation(tmp_path):
    state = TargetState(dataclasses.replace(TARGET, state_dir=tmp_path / "state"))
    snapshots = tmp_path / "snapshots"
    (snapshots / "2026-12-03T060000Z.partial").mkdir(parents=True)
    unfinished = snapshot.Unfinished(state)
    assert unfinished.resumable(snapshots, "2026-12-02T060000Z", 7) is None  # nothing noted
    unfinished.note("2026-12-03T060000Z.partial", "2026-12-02T060000Z", 7)
    assert unfinished.resumable(snapshots, "2026-12-02T060000Z", 7) == "2026-12-03T060000Z.partial"
    assert unfinished.resumable(snapshots, "2026-12-03T050000Z", 7) is None  # another run completed since
    assert unfinished.resumable(snapshots, "2026-12-02T060000Z", 8) is None  # the image was written since
    (snapshots / "2026-12-03T060000Z.partial").rmdir()
    assert unfinished.resumable(snapshots, "2026-12-02T060000Z", 7) is None  # removed (e.g. by a full image)
    unfinished.clear()
    assert state.unfinished() == {}


def test_the_traffic_of_every_try_is_counted_once_though_each_starts_its_counter_at_zero():
    from cryptsnap.meter import Traffic
    from cryptsnap.pipeline import MeteredReporter, Reporter

    counter = [Traffic(0, 0)]
    reporter = MeteredReporter(Reporter(), lambda: counter[0])
    reporter.phase("connecting")
    counter[0] = Traffic(1000, 100)
    reporter.phase("syncing")
    counter[0] = Traffic(5000, 300)  # then the connection is lost
    reporter.phase("waiting")
    reporter.restart()
    counter[0] = Traffic(0, 0)  # the next try's stack resets the counter
    reporter.phase("connecting")
    counter[0] = Traffic(700, 70)
    reporter.phase("syncing")
    counter[0] = Traffic(2700, 170)
    total = reporter.finish()
    assert (total.up, total.down) == (5000 + 2700, 300 + 170)
    assert reporter.by_step["syncing"] == Traffic(4000 + 2000, 200 + 100)
