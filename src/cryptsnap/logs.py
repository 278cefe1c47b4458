"""Logging setup: plain lines on a terminal, syslog priorities when stderr is the journal."""

from __future__ import annotations

import logging
import os
import sys

from .errors import CryptsnapError

# Python level -> syslog priority, understood by journald as a "<N>" line prefix.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = PRIORITIES.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


class Handler(logging.StreamHandler):
    """A stream handler that lets a cancel through. A signal's cancel (runner.cancel_on_signals)
    is raised wherever the main thread is; inside emit, logging would print it as a "Logging
    error" and go on, and the canceled run with it. Nothing in logging raises our errors, so
    one here came from a signal."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]  # emit calls this inside its except block
        if isinstance(error, CryptsnapError):
            raise error
        super().handleError(record)


def stderr_is_journal() -> bool:
    """True when stderr is the journal's stream (systemd sets JOURNAL_STREAM=DEV:INODE for it)."""
    try:
        device, inode = (int(part) for part in os.environ["JOURNAL_STREAM"].split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


_settings: dict = {}


def setup(verbosity: int = 0, program: str = "cryptsnap", tag: str = "") -> None:
    """Log to stderr. tag prefixes every message (a job's lines carry its id and target)."""
    _settings.update(verbosity=verbosity, program=program, tag=tag)
    level = logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    handler = Handler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter(f"{tag}%(message)s"))
        level = min(level, logging.INFO)
    else:
        handler.setFormatter(logging.Formatter(f"{program}: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def settings() -> dict:
    """What setup() was last given: a helper process of the run (a part of the scan) passes
    it to its own setup(), so that its lines carry the job's tag and the journal's priorities."""
    return dict(_settings)
