"""Which snapshots to keep: the last N, and the newest of each recent day, ISO week and month."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from .config import Retention
from .naming import complete_snapshots, parse_name


def _newest_per_period(names: list[str], count: int, period: Callable[[datetime], tuple]) -> set[str]:
    kept: set[str] = set()
    seen: set[tuple] = set()
    for name in reversed(names):  # newest first
        key = period(parse_name(name))
        if key in seen:
            continue
        if len(seen) == count:
            break
        seen.add(key)
        kept.add(name)
    return kept


def keep(names: list[str], rules: Retention) -> set[str]:
    """The snapshots the rules keep. The newest is always kept: the next run builds on it."""
    ordered = complete_snapshots(names)
    if not ordered:
        return set()
    kept = {ordered[-1]}
    kept |= set(ordered[-rules.last:]) if rules.last else set()
    kept |= _newest_per_period(ordered, rules.daily, lambda t: (t.year, t.month, t.day))
    kept |= _newest_per_period(ordered, rules.weekly, lambda t: tuple(t.isocalendar())[:2])
    kept |= _newest_per_period(ordered, rules.monthly, lambda t: (t.year, t.month))
    return kept


def to_prune(names: list[str], rules: Retention) -> list[str]:
    """Complete snapshots the rules do not keep, oldest first."""
    kept = keep(names, rules)
    return [n for n in complete_snapshots(names) if n not in kept]
