"""Noticing that cryptsnap's own files were replaced (a package upgrade) while cryptsnapd runs.

An upgrade never restarts cryptsnapd (debian/rules), so that a running backup ends under the
version it began with. Later jobs, though, would start workers from the new files under the
old daemon. So cryptsnapd watches the directory its code was loaded from and, once the files
have been quiet for a few seconds (dpkg replaces them one by one), exits as soon as no job
runs: the next request (a timer, `cryptsnap backup`, busctl) starts the new version by D-Bus
activation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from gi.repository import Gio, GLib

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
QUIET_MS = 5000  # no change for this long: the upgrade has replaced every file
WATCHED = (".py", ".xml")  # code and the D-Bus contract; not __pycache__ (Python's own writes)


def _code_file(file: Gio.File | None) -> bool:
    name = (file.get_basename() or "") if file else ""
    for suffix in (".dpkg-new", ".dpkg-tmp"):
        name = name.removesuffix(suffix)
    return name.endswith(WATCHED)


class InstalledFiles:
    """Calls on_replaced() once the code files in `directory` changed and then stayed quiet."""

    def __init__(self, on_replaced: Callable[[], None], directory: Path = PACKAGE_DIR, quiet_ms: int = QUIET_MS):
        self.on_replaced = on_replaced
        self.quiet_ms = quiet_ms
        self.timer = 0
        self.monitor = Gio.File.new_for_path(str(directory)).monitor_directory(Gio.FileMonitorFlags.WATCH_MOVES, None)
        self.monitor.connect("changed", self._changed)

    def _changed(self, _monitor, file: Gio.File, other: Gio.File | None, _event) -> None:
        if not (_code_file(file) or _code_file(other)):
            return
        if self.timer:
            GLib.source_remove(self.timer)
        self.timer = GLib.timeout_add(self.quiet_ms, self._quiet)

    def _quiet(self) -> bool:
        self.timer = 0
        self.on_replaced()
        return False

    def close(self) -> None:
        self.monitor.cancel()
        if self.timer:
            GLib.source_remove(self.timer)
            self.timer = 0
