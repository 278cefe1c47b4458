"""Snapshot names sort by time; retention keeps what the rules say and never the partial ones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptsnap import naming, retention
from cryptsnap.config import Retention


def at(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_names_are_utc_seconds_and_sort_by_time():
    assert naming.snapshot_name(at(2026, 11, 30, 5, 26, 45)) == "2026-11-30T052645Z"
    local = datetime(2026, 11, 30, 6, 26, 45, tzinfo=UTC).astimezone(__import__("datetime").timezone(timedelta(hours=1)))
    assert naming.snapshot_name(local) == "2026-11-30T062645Z"
    times = [at(2026, 1, 2), at(2025, 12, 31, 23, 59, 59), at(2026, 1, 1, 0, 0, 1)]
    assert sorted(naming.snapshot_name(t) for t in times) == [naming.snapshot_name(t) for t in sorted(times)]
    assert naming.parse_name("2026-11-30T052645Z") == at(2026, 11, 30, 5, 26, 45)


def test_partials_and_strangers_are_not_snapshots():
    names = ["2026-11-30T052645Z", "2026-11-30T060000Z.partial", "lost+found", ".cryptsnap", "2026-11-29T000000Z"]
    assert naming.complete_snapshots(names) == ["2026-11-29T000000Z", "2026-11-30T052645Z"]
    assert naming.is_partial("2026-11-30T060000Z.partial") and not naming.is_partial("x.partial")


def test_next_name_never_collides_within_one_second():
    existing = ["2026-11-30T052645Z"]
    assert naming.next_name(existing, at(2026, 11, 30, 5, 26, 45)) == "2026-11-30T052646Z"
    assert naming.next_name(existing, at(2026, 11, 30, 7)) == "2026-11-30T070000Z"


def hourly(days: int) -> list[str]:
    start = at(2026, 1, 1)
    return [naming.snapshot_name(start + timedelta(hours=h)) for h in range(days * 24)]


def test_keep_last_only():
    names = hourly(2)
    assert retention.keep(names, Retention(last=3, daily=0, weekly=0, monthly=0)) == set(names[-3:])


def test_daily_keeps_newest_of_each_recent_day():
    names = hourly(5)
    kept = retention.keep(names, Retention(last=0, daily=3, weekly=0, monthly=0))
    assert kept == {"2026-01-05T230000Z", "2026-01-04T230000Z", "2026-01-03T230000Z"}


def test_weekly_and_monthly_use_iso_weeks_and_months():
    names = [naming.snapshot_name(at(2026, 1, 1) + timedelta(days=d)) for d in range(70)]
    weekly = retention.keep(names, Retention(last=0, daily=0, weekly=2, monthly=0))
    assert weekly == {"2026-03-11T000000Z", "2026-03-08T000000Z"}  # Wed of this week, Sun ending the last
    monthly = retention.keep(names, Retention(last=0, daily=0, weekly=0, monthly=12))
    assert monthly == {"2026-01-31T000000Z", "2026-02-28T000000Z", "2026-03-11T000000Z"}


def test_the_newest_is_always_kept_and_prune_lists_the_rest_oldest_first():
    names = hourly(1)
    rules = Retention(last=0, daily=0, weekly=0, monthly=0)
    assert retention.keep(names, rules) == {names[-1]}
    assert retention.to_prune(names + ["2026-01-01T000000Z.partial"], rules) == names[:-1]
    assert retention.to_prune([], rules) == []
