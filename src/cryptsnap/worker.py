"""One backup job, run by cryptsnapd in a child process (easy to cancel, off the main loop).

    python3 -m cryptsnap.worker --config PATH --job ID TARGET [--break-lock] [--full-compare]
        [--accept-rollback] [--lock-fd N]
    python3 -m cryptsnap.worker --config PATH --job ID TARGET --unwind WHY [--lock-fd N]
    python3 -m cryptsnap.worker --config PATH --job ID TARGET --check [--lock-fd N]

Progress goes to stdout as one JSON object per line ({"phase": ...} or {"progress": f,
"bytes": n}); log lines go to stderr (the journal), tagged with the job and target. The
exit code is the one `cryptsnap backup` would return. SIGTERM cancels: the stack unwinds.
If cryptsnapd dies, the worker gets SIGHUP (PR_SET_PDEATHSIG) and unwinds, recording
the run as interrupted. --unwind: remove what a run that died without unwinding left (the
daemon's cleanup after a killed worker, or at its own start), and record that run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import time

from . import config, logs, pipeline, runner
from .errors import CryptsnapError, Interrupted
from .stack import unwind_dead_run

log = logging.getLogger("cryptsnap.worker")


class PipeReporter(pipeline.Reporter):
    """Phases and (throttled) progress as JSON lines for the daemon."""

    def __init__(self, stream=sys.stdout, interval: float = 0.5):
        self.stream = stream
        self.interval = interval
        self.last = 0.0

    def _send(self, message: dict) -> None:
        try:
            self.stream.write(json.dumps(message) + "\n")
            self.stream.flush()
        except BrokenPipeError:
            # cryptsnapd is gone. The kernel closes its end of the pipe before it sends the
            # SIGHUP that says so (PR_SET_PDEATHSIG): take this for that SIGHUP, so the run
            # ends as interrupted by its handler, not as "Broken pipe". What is still to be
            # written goes nowhere.
            nowhere = os.open(os.devnull, os.O_WRONLY)
            os.dup2(nowhere, self.stream.fileno())
            os.close(nowhere)
            os.kill(os.getpid(), signal.SIGHUP)

    def phase(self, name: str) -> None:
        self._send({"phase": name})

    def progress(self, fraction: float, transferred: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval or fraction >= 1.0:
            self.last = now
            self._send({"progress": fraction, "bytes": transferred})


PR_SET_PDEATHSIG = 1
DAEMON_PID = "CRYPTSNAPD_PID"  # set by cryptsnapd in the worker's environment


def follow_daemon() -> None:
    """Stop the run, unwinding it, when cryptsnapd dies: the kernel sends SIGHUP then.

    A worker that outlived its daemon would go on writing with nobody to report to. (Under
    systemd, KillMode=mixed usually SIGKILLs it first, and the restarted daemon unwinds; this
    is for the other cases.) SIGHUP, not SIGTERM, so that it cannot be mistaken for a cancel:
    the daemon cancels with SIGTERM.
    """
    interrupted = lambda: Interrupted("interrupted: cryptsnapd stopped or was killed during the run")  # noqa: E731
    runner.cancel_on_signals({signal.SIGHUP: interrupted})
    daemon = int(os.environ.get(DAEMON_PID, "0"))
    if daemon:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
        if os.getppid() != daemon:  # it died before the line above
            os.kill(os.getpid(), signal.SIGHUP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m cryptsnap.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--job", type=int, required=True)
    parser.add_argument("--break-lock", action="store_true")
    parser.add_argument("--full-compare", action="store_true")
    parser.add_argument("--accept-rollback", action="store_true")
    parser.add_argument("--lock-fd", type=int, help="the target's local lock, taken by cryptsnapd")
    parser.add_argument("--unwind", metavar="WHY", help="only unwind what a dead run left; WHY: what ended it")
    parser.add_argument("--check", action="store_true", help="check the image (`cryptsnap check`) instead")
    parser.add_argument("target")
    args = parser.parse_args(argv)
    logs.setup(1, program=f"job {args.job} [{args.target}]", tag=f"job {args.job} [{args.target}]: ")
    if args.unwind is not None:  # cut short, it would leave what it is there to remove; it is bounded
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        follow_daemon()
    try:
        target = config.load(args.config).target(args.target)
        if args.unwind is not None:
            interrupted = unwind_dead_run(target, args.unwind, args.lock_fd)
            if interrupted:
                log.warning("%s", interrupted)
            return 0
        if args.check:
            pipeline.check(target, PipeReporter(), lock_fd=args.lock_fd)
            return 0
        pipeline.backup(target, PipeReporter(), break_lock=args.break_lock, full_compare=args.full_compare,
                        accept_rollback=args.accept_rollback, lock_fd=args.lock_fd)  # fmt: skip
    except CryptsnapError as exc:
        log.error("%s", exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
