"""What is mounted where, read from /proc/self/mountinfo (no tool output to parse)."""

from __future__ import annotations

import os


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount, in mount order."""
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            left, _, right = line.partition(" - ")
            fields = left.split()
            points.append((_unescape(fields[4]), right.split()[0]))
    return points


def is_mountpoint(path: str | os.PathLike) -> bool:
    path = os.path.abspath(path)
    return any(point == path for point, _ in mount_points())


def mounted_under(path: str | os.PathLike) -> list[str]:
    """Mount points strictly below PATH, the last mounted first (the order to unmount them in)."""
    top = os.path.abspath(path).rstrip("/") + "/"
    return [point for point, _ in reversed(mount_points()) if point.startswith(top)]
