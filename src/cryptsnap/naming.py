"""Snapshot names: UTC time to the second, which sorts by name; `.partial` while being written."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

FORMAT = "%Y-%m-%dT%H%M%SZ"  # no colons: ':' separates snapshot and path in `restore`
PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{6}Z$")
PARTIAL_SUFFIX = ".partial"


def snapshot_name(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).astimezone(UTC).strftime(FORMAT)


def parse_name(name: str) -> datetime:
    return datetime.strptime(name, FORMAT).replace(tzinfo=UTC)


def is_snapshot(name: str) -> bool:
    """A complete snapshot's name; partial ones and anything else are not."""
    return bool(PATTERN.match(name))


def is_partial(name: str) -> bool:
    return name.endswith(PARTIAL_SUFFIX) and is_snapshot(name[: -len(PARTIAL_SUFFIX)])


def complete_snapshots(names: list[str]) -> list[str]:
    """Complete snapshot names among directory entries, oldest first."""
    return sorted(n for n in names if is_snapshot(n))


def next_name(existing: list[str], when: datetime | None = None) -> str:
    """A new name later than every existing one (two runs in one second must not collide)."""
    name = snapshot_name(when)
    latest = max(complete_snapshots(existing), default="")
    if name <= latest:
        name = snapshot_name(parse_name(latest) + timedelta(seconds=1))
    return name
