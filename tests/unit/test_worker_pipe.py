"""The worker's report pipe to cryptsnapd: a daemon that is gone ends the run as interrupted."""

from __future__ import annotations

import os
import signal

from cryptsnap.worker import PipeReporter


def test_a_broken_pipe_is_taken_for_the_daemons_death_signal():
    # The kernel closes the dead daemon's end of the pipe before it sends the worker SIGHUP
    # (PR_SET_PDEATHSIG); a report written in between must end the run the same way.
    read_end, write_end = os.pipe()
    os.close(read_end)
    hups = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: hups.append(signum))
    try:
        with os.fdopen(write_end, "w") as stream:
            reporter = PipeReporter(stream)
            reporter.phase("syncing")  # no BrokenPipeError escapes
            reporter.phase("unmounting")  # and what follows goes nowhere, quietly
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert hups == [signal.SIGHUP]
