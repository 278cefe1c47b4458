"""The user's commands around a target's backup (the target's `hooks` in the configuration).

`before` runs first: if it fails or times out, the run is skipped (HookFailed, exit 14), so a
backup never goes on without the database dump it was meant to include. `after` (the run was
done) and `on_error` (failed or canceled) run once the run is recorded; their failure is
logged and changes nothing. Each line a hook prints goes to the log, which under cryptsnapd
is the journal.
"""

from __future__ import annotations

import logging
import subprocess

from . import runner
from .config import Target
from .errors import CryptsnapError, HookFailed, MissingTool
from .stack import step

log = logging.getLogger(__name__)


def _run(target: Target, which: str, argv: tuple[str, ...], env: dict[str, str]) -> None:
    """Run one hook; HookFailed says why it did not succeed."""
    timeout = target.hooks.timeout
    log.info("target %s: running the %s hook: %s", target.name, which, " ".join(argv))
    try:
        result = runner.run(argv, check=False, timeout=timeout,
                            env={"CRYPTSNAP_TARGET": target.name, "CRYPTSNAP_HOOK": which, **env})  # fmt: skip
    except subprocess.TimeoutExpired:
        raise HookFailed(f"{argv[0]} did not finish within {timeout} s (hooks.timeout); it was stopped") from None
    except MissingTool:
        raise HookFailed(f"{argv[0]}: no such program (hooks.{which} is an argument list, run without a "
                         f"shell: its first item is the program)") from None
    for line in (result.stdout + result.stderr).splitlines():
        if line.strip():
            log.info("hook %s: %s", which, line)
    if result.returncode != 0:
        tail = [line for line in result.stderr.splitlines() if line.strip()][-3:]
        raise HookFailed(f"{argv[0]} exited with {result.returncode}"
                         + (f": {' / '.join(tail)}" if tail else ""))  # fmt: skip


def before(target: Target) -> None:
    """Run the `before` hook, if any; StepFailed("before hook", HookFailed) if it did not succeed."""
    if target.hooks.before:
        with step("before hook"):
            _run(target, "before", target.hooks.before, {})


def after_run(target: Target, record) -> None:
    """`after` or `on_error`, by the run's result; never raises (the run is already recorded)."""
    which = "after" if record.result == "done" else "on_error"
    argv = target.hooks.after if which == "after" else target.hooks.on_error
    if not argv:
        return
    env = {
        "CRYPTSNAP_RESULT": record.result, "CRYPTSNAP_EXIT_CODE": str(record.exit_code),
        "CRYPTSNAP_ERROR": record.error, "CRYPTSNAP_SNAPSHOT": record.snapshot,
        "CRYPTSNAP_BYTES_UP": str(record.bytes_up), "CRYPTSNAP_BYTES_DOWN": str(record.bytes_down),
    }  # fmt: skip
    try:
        _run(target, which, argv, env)
    except CryptsnapError as exc:
        log.warning("target %s: %s hook: %s (the run stays %s)", target.name, which, exc, record.result)
