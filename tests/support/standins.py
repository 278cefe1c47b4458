"""Start a stand-in service (tests/support/*_standin.py) and wait until it says it is ready."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def standin(module: str, *args: str, **popen) -> Iterator[subprocess.Popen]:
    """Run `python3 -m tests.support.MODULE ARGS...` until the block ends; its stdout is a pipe."""
    proc = subprocess.Popen([sys.executable, "-m", f"tests.support.{module}", *args], stdout=subprocess.PIPE,
                            text=True, **popen)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready", f"{module} did not start"
        yield proc
    finally:
        proc.kill()
        proc.wait()
