"""One backup job, run by cryptsnapd in a child process (easy to cancel, off the main loop).

    python3 -m cryptsnap.worker --config PATH --job ID TARGET [--break-lock] [--full-compare] [--lock-fd N]

Progress goes to stdout as one JSON object per line ({"phase": ...} or {"progress": f,
"bytes": n}); log lines go to stderr (the journal), tagged with the job and target. The
exit code is the one `cryptsnap backup` would return. SIGTERM cancels: the stack unwinds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from . import config, logs, pipeline, runner
from .errors import CryptsnapError

log = logging.getLogger("cryptsnap.worker")


class PipeReporter(pipeline.Reporter):
    """Phases and (throttled) progress as JSON lines for the daemon."""

    def __init__(self, stream=sys.stdout, interval: float = 0.5):
        self.stream = stream
        self.interval = interval
        self.last = 0.0

    def _send(self, message: dict) -> None:
        self.stream.write(json.dumps(message) + "\n")
        self.stream.flush()

    def phase(self, name: str) -> None:
        self._send({"phase": name})

    def progress(self, fraction: float, transferred: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval or fraction >= 1.0:
            self.last = now
            self._send({"progress": fraction, "bytes": transferred})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m cryptsnap.worker", description=__doc__)
    parser.add_argument("--config")
    parser.add_argument("--job", type=int, required=True)
    parser.add_argument("--break-lock", action="store_true")
    parser.add_argument("--full-compare", action="store_true")
    parser.add_argument("--lock-fd", type=int, help="the target's local lock, taken by cryptsnapd")
    parser.add_argument("target")
    args = parser.parse_args(argv)
    logs.setup(1, program=f"job {args.job} [{args.target}]", tag=f"job {args.job} [{args.target}]: ")
    runner.cancel_on_signals()
    try:
        target = config.load(args.config).target(args.target)
        pipeline.backup(target, PipeReporter(), break_lock=args.break_lock, full_compare=args.full_compare,
                        lock_fd=args.lock_fd)  # fmt: skip
    except CryptsnapError as exc:
        log.error("%s", exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
