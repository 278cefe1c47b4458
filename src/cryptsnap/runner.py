"""The one place external commands run: no shell, LC_ALL=C, logged, failures raised.

Every command is logged at debug level as a copy-pasteable line. A missing program raises
MissingTool naming its Debian package; a failing one raises ToolFailed with the tail of
its own error output. The running child is remembered so a cancel can stop it.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .commands import PACKAGES
from .errors import Canceled, CryptsnapError, MissingTool, ToolFailed

log = logging.getLogger(__name__)

_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()
# A cancel that arrives while a child is being started waits until the child is known:
# raised in the middle of Popen, it would leave a running child that nobody stops.
_spawning = False
_deferred: CryptsnapError | None = None
# Why no new command may start (the run's connection ended), until the run begins unwinding:
# stopping the commands that run is not enough when the end comes between two of them.
_refusing: str | None = None


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"  # tools' messages are parsed and shown: keep them in one language
    env.pop("LANGUAGE", None)
    return env


def _popen(argv: Sequence[str], extra_env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    global _spawning, _deferred
    if _refusing is not None:
        raise ToolFailed(f"{argv[0]} was not run: {_refusing}", tuple(argv), -signal.SIGTERM)
    log.debug("+ %s", shlex.join(argv))
    _spawning = True
    try:
        proc = subprocess.Popen(list(argv), env={**_environment(), **(extra_env or {})}, **kwargs)
        with _children_lock:
            _children.add(proc)
    except FileNotFoundError:
        raise MissingTool(argv[0], PACKAGES.get(argv[0], argv[0])) from None
    finally:
        _spawning = False
    if _deferred is not None:
        canceled, _deferred = _deferred, None
        _stop(proc)
        raise canceled
    # Again once the child is known: stop_all() either sees it among the children or has
    # refused before this look.
    if _refusing is not None:
        _stop(proc)
        raise ToolFailed(f"{argv[0]} was stopped as it started: {_refusing}", tuple(argv), -signal.SIGTERM)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    _forget(proc)


def _forget(proc: subprocess.Popen) -> None:
    with _children_lock:
        _children.discard(proc)


def _failure(argv: Sequence[str], returncode: int, stderr: str) -> ToolFailed:
    lines = list(dict.fromkeys(line for line in stderr.strip().splitlines() if line.strip()))  # tools repeat
    tail = "\n".join(lines[-8:]) or "(no error output)"
    return ToolFailed(f"{argv[0]} failed (exit {returncode}): {tail}", tuple(argv), returncode, stderr)


def run(argv: Sequence[str], *, input: bytes | None = None, check: bool = True, timeout: float | None = None,
        pass_fds: Sequence[int] = (), env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Run argv to completion, capturing its output as text (env: added to cryptsnap's own)."""
    proc = _popen(argv, env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=tuple(pass_fds), cwd=cwd)  # fmt: skip
    started = time.monotonic()
    try:
        out, err = proc.communicate(input, timeout=timeout)
        log.debug("  %s took %.2fs", argv[0], time.monotonic() - started)
    except BaseException:
        _stop(proc)
        raise
    finally:
        _forget(proc)
    result = subprocess.CompletedProcess(list(argv), proc.returncode, out.decode(errors="replace"),
                                         err.decode(errors="replace"))  # fmt: skip
    if check and result.returncode != 0:
        raise _failure(argv, result.returncode, result.stderr)
    return result


def stream(argv: Sequence[str], on_line: Callable[[str], None]) -> None:
    """Run argv, calling on_line for each line or carriage-return update of its output."""
    proc = _popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    reader.start()
    try:
        pending = b""
        while chunk := proc.stdout.read1(65536):
            pending += chunk
            *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
            for line in lines:
                if line.strip():
                    on_line(line.decode(errors="replace"))
        proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        reader.join(timeout=5)
        _forget(proc)
    if proc.returncode != 0:
        raise _failure(argv, proc.returncode, b"".join(errors).decode(errors="replace"))


def start(argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """Start argv for the caller to talk to through its pipes; a cancel stops it with the
    commands. The caller ends it with stop() once done with it."""
    return _popen(argv, **popen_kwargs)


def stop(proc: subprocess.Popen) -> None:
    """Kill what start() started if it still runs, and forget it."""
    _stop(proc)


def start_service(argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """Start a long-running helper the caller stops itself, in its own session.

    A cancel does not stop it with the commands (terminate_children): it serves a layer
    that the unwinding still needs, and its layer stops it last.
    """
    proc = _popen(argv, start_new_session=True, **popen_kwargs)
    _forget(proc)
    return proc


def cancel_on_signals(meanings: dict[int, Callable[[], CryptsnapError]] | None = None) -> None:
    """Make SIGTERM and SIGINT cancel the run: stop the running tool, then raise Canceled.

    The caller's ExitStack then unwinds its layers. Later signals are ignored so the
    unwinding itself (unmount, close, detach) is never cut short. meanings: more signals
    to stop the run on, each with the error it stands for (a job's worker: SIGHUP, its
    daemon died).
    """
    global _meanings, _cancelable
    _meanings = dict(meanings or {})
    _cancelable = True
    for signum in (signal.SIGTERM, signal.SIGINT, *_meanings):
        signal.signal(signum, _on_signal)


_meanings: dict[int, Callable[[], CryptsnapError]] = {}
_cancelable = False


def ignore_cancels() -> None:
    """From here on the run only closes what it opened: a cancel must not cut that short.

    Called once a snapshot is complete (a cancel then comes too late to undo anything, and the
    run is done, not canceled) and when unwinding begins. Only where cancel_on_signals made
    the signals cancel; signal dispositions belong to the main thread.

    The children started after this inherit SIG_IGN, on purpose: at a terminal a second
    Ctrl-C goes to the whole foreground process group, and it must not kill an umount or a
    `cryptsetup close` halfway through the unwinding. Under systemd (KillMode=mixed) only
    cryptsnapd gets the SIGTERM, and the SIGKILL after TimeoutStopSec= still reaches all.
    """
    global _cancelable
    if _cancelable and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT, *_meanings):
            signal.signal(signum, signal.SIG_IGN)
        _cancelable = False


def _on_signal(signum, frame) -> None:
    global _deferred
    for other in (signal.SIGTERM, signal.SIGINT, *_meanings):
        signal.signal(other, signal.SIG_IGN)
    terminate_children()
    meaning = _meanings.get(signum)
    canceled = meaning() if meaning else Canceled(f"canceled by signal {signal.Signals(signum).name}")
    if _spawning:
        _deferred = canceled  # _popen raises it as soon as the new child can be stopped
        return
    raise canceled


def stop_all(reason: str) -> None:
    """Stop every command still running and start no new one (ToolFailed, saying `reason`)
    until allow_again(): for a run whose connection ended, from another thread."""
    global _refusing
    _refusing = reason
    terminate_children()


def allow_again() -> None:
    """Commands run again: the run unwinds, and closing its layers needs them."""
    global _refusing
    _refusing = None


def terminate_children() -> None:
    """Stop every command still running (on cancel); the caller then unwinds its layers."""
    with _children_lock:
        children = list(_children)
    for proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
