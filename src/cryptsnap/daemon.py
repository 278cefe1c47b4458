"""cryptsnapd: the long-running service. Runs backup jobs on request, one per target.

The Daemon object is plain Python over a GLib main loop: it owns the targets and jobs,
starts each job as a worker child process, and tells its listener (the bus exporter in
bus.py, or a test) what changed. systemd integration: READY=1 once the bus name is owned
and the config loaded, STATUS= kept current, WATCHDOG=1 from the main loop, SIGHUP reloads
the config without touching running jobs, SIGTERM cancels and unwinds every job, then exits.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from gi.repository import GLib

from . import __version__, config, logs, report, upgrades
from .errors import Busy, ConfigError, CryptsnapError, Interrupted
from .layers import LocalLock
from .stack import has_leftovers, release_orphaned_devices
from .state import TargetState
from .worker import DAEMON_PID

log = logging.getLogger("cryptsnapd")

EXIT_CANCELED = 9
# How long a killed worker's lock may stay held by a child between fork and exec: 20 × 100 ms.
UNWIND_LOCK_TRIES, UNWIND_LOCK_RETRY_MS = 20, 100
RECHECK_S = 300  # a deferred backup is looked at this often even without a signal from UPower/NM


def _file_signature(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _give_memory_back() -> None:
    """Hand the memory a finished job freed back to the system: cryptsnapd idles between runs
    for hours, and its RSS should say what it holds. glibc keeps the heap pages a run freed;
    without this one cryptsnapd grew 32.7 -> 36.0 MiB over its first 17 runs, with it 32.8 ->
    33.1 MiB over 24 (docs/reliability.md, the fault-free soak)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def usec(seconds: float) -> int:
    return int(seconds * 1_000_000) if seconds else 0


@dataclass
class Job:
    id: int
    target: str
    start_time: float = field(default_factory=time.time)
    phase: str = "starting"
    progress: float = 0.0
    transferred: int = 0
    process: subprocess.Popen | None = None
    cancel_requested: bool = False
    cancel_why: str = ""  # why cryptsnapd itself canceled it (the machine going to sleep), for its record
    buffer: bytes = b""
    # "backup", or "unwind": removing what a killed worker (or, at start-up, a killed
    # cryptsnapd) left open; such a job holds the target until it is done, and ends with
    # the killed run's recorded result (failed, or done if its snapshot was complete).
    kind: str = "backup"
    action: str = "backup"  # what the job was started for: backup or check (kept when kind becomes unwind)
    why: str = ""  # what ended the run, for an unwind job
    killed: bool = False  # its backup worker was killed (else: an unwind at start-up)
    retired: list = field(default_factory=list)  # earlier workers: their pipes stay open until read to the end

    @property
    def path(self) -> str:
        return f"/org/cryptsnap1/job/{self.id}"


class Listener:
    """What the daemon reports. The bus exporter implements it; the default ignores everything."""

    def targets_changed(self, daemon: Daemon) -> None: ...
    def target_changed(self, name: str, properties: dict) -> None: ...
    def job_new(self, job: Job) -> None: ...
    def job_changed(self, job: Job, properties: dict) -> None: ...
    def job_removed(self, job: Job, result: str) -> None: ...
    def power_and_network(self) -> tuple[bool | None, bool | None]:
        return None, None  # (on battery, metered): unknown

    def take_inhibitor(self, why: str) -> int | None:
        return None  # no logind: nothing to hold off

    def notify_desktop(self, summary: str, body: str) -> None: ...


class Notifier:
    """sd_notify, when NOTIFY_SOCKET is set; silent otherwise."""

    def __init__(self):
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        if self.enabled:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
        self.last_status = None

    def send(self, message: str) -> None:
        if self.enabled:
            self._notifier.notify(message)

    def status(self, text: str) -> None:
        if text != self.last_status:
            self.last_status = text
            self.send(f"STATUS={text}")


def _stop_commands_of(worker_pid: int) -> None:
    """SIGKILL what a killed worker was running (its process group): a `cryptsetup open`, a
    `losetup` or a `mount` that outlived it would finish after the unwinding looked, and leave
    its mapping, device or mount open (the soak found a mapping made that way)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker_pid, signal.SIGKILL)


class Daemon:
    def __init__(self, config_path: str | None, listener: Listener | None = None, notifier: Notifier | None = None):
        self.config_path = config.config_path(config_path)
        self.config_seen = _file_signature(self.config_path)
        self.config = config.load(self.config_path)  # a bad config fails the start, with its errors
        self.listener = listener or Listener()
        self.notifier = notifier or Notifier()
        self.jobs: dict[int, Job] = {}
        self.next_id = 1
        self.loop = GLib.MainLoop()
        self.stopping = False
        self.replaced = False  # a new version was installed: exit once no job runs (cryptsnap.upgrades)
        self.deferred: dict[str, str] = {}  # target -> why its requested backup waits (conditions)
        self.recheck = 0  # GLib source of the periodic look at deferred backups
        self.going = ""  # "going to sleep", "shutting down": logind said so, and has not called it off
        self.inhibitor: int | None = None  # logind's delay inhibitor, held while a job runs

    # -- targets -----------------------------------------------------------------------

    def target_names(self) -> list[str]:
        return sorted(self.config.targets)

    def target(self, name: str) -> config.Target:
        if name not in self.config.targets and _file_signature(self.config_path) != self.config_seen:
            # A target added since cryptsnapd started (the quickstart's order: edit, init, back
            # up): the file changed, so read it again rather than answer "no such target".
            log.info("target %s is not in the configuration as loaded, which has changed since: reloading", name)
            self.reload()
        return self.config.target(name)  # NoSuchTarget for unknown names

    def job_for(self, name: str) -> Job | None:
        return next((job for job in self.jobs.values() if job.target == name), None)

    def target_properties(self, name: str) -> dict:
        state = TargetState(self.target(name))
        run, checked = state.last_run(), state.last_check()
        job = self.job_for(name)
        return {
            "Name": name,
            "State": ("unwinding" if job.kind == "unwind" else "running") if job else "idle",
            "LastResult": run.get("result", ""),
            "LastSuccess": usec(run.get("last_success", 0)),
            "LastAttempt": usec(run.get("finished", 0)),
            "LastError": run.get("error", ""),
            "LastExitCode": int(run.get("exit_code", 0)),
            "BytesUploaded": int(run.get("bytes_up", 0)),
            "BytesDownloaded": int(run.get("bytes_down", 0)),
            "ImageSize": int(run.get("image_size", 0)),
            "ImageFree": int(run.get("image_free", 0)),
            "Snapshots": list(run.get("snapshots", [])),
            "Job": job.path if job else "/",
            "Deferred": self.deferred.get(name, ""),
            "LastCheck": checked.get("result", ""),
            "LastCheckTime": usec(checked.get("finished", 0)),
            "LastCheckError": checked.get("error", ""),
            "LastCheckExitCode": int(checked.get("exit_code", 0)),
        }

    # -- jobs --------------------------------------------------------------------------

    def why_not_now(self, name: str) -> str:
        """What puts off a backup of `name` now (its skip_on_battery, skip_on_metered); "" if nothing."""
        target = self.target(name)
        on_battery, metered = self.listener.power_and_network()
        reasons = [reason for reason, applies in (("on battery", target.skip_on_battery and on_battery),
                                                  ("on a metered connection", target.skip_on_metered and metered),
                                                  (f"the machine is {self.going}", self.going))
                   if applies]  # fmt: skip
        return " and ".join(reasons)

    def start_backup(self, name: str, options: dict) -> Job | None:
        """Start a backup job; None when the target's conditions put it off (it starts by itself later)."""
        self._must_be_free(name)
        why = f"the machine is {self.going}" if self.going else ""  # not even --anyway: it would be cut off
        why = why or ("" if options.get("ignore-conditions") else self.why_not_now(name))
        if why:
            if self.deferred.get(name) != why:
                log.info("target %s: backup put off: %s; it starts once that changes", name, why)
                self.deferred[name] = why
                self.listener.target_changed(name, {"Deferred": why})
            if not self.recheck:
                self.recheck = GLib.timeout_add_seconds(RECHECK_S, self._recheck_periodically)
            return None
        if self.deferred.pop(name, None) is not None:
            self.listener.target_changed(name, {"Deferred": ""})
        extra = [f"--{option}" for option in ("break-lock", "full-compare", "accept-rollback") if options.get(option)]
        return self._start(name, "backup", extra)

    def start_check(self, name: str) -> Job:
        """Start a check of the target's image (`cryptsnap check`, its check_budget) as a job."""
        self._must_be_free(name)
        return self._start(name, "check", ["--check"])

    def _must_be_free(self, name: str) -> None:
        self.target(name)  # NoSuchTarget
        if self.stopping:
            raise CryptsnapError("cryptsnapd is stopping")
        running = self.job_for(name)
        if running:
            raise Busy(f"target {name} is busy: job {running.id} is running ({running.path})")

    def _start(self, name: str, action: str, extra: list[str]) -> Job:
        job = Job(self.next_id, name, kind=action, action=action)
        self._spawn(job, f"{action} job {job.id} of cryptsnapd", extra)
        self.next_id += 1
        self.jobs[job.id] = job
        log.info("job %d [%s]: started (pid %d)", job.id, name, job.process.pid)
        self.listener.job_new(job)
        self.listener.target_changed(name, {"State": "running", "Job": job.path})
        self.update_status()
        return job

    def conditions_changed(self) -> None:
        """UPower or NetworkManager changed (or the periodic look): start what waited, if it may now."""
        for name in list(self.deferred):
            if name not in self.config.targets:
                del self.deferred[name]
                continue
            if self.job_for(name):
                continue
            why = self.why_not_now(name)
            if why:
                if why != self.deferred[name]:
                    self.deferred[name] = why
                    self.listener.target_changed(name, {"Deferred": why})
                continue
            log.info("target %s: the condition that put its backup off has cleared: starting it", name)
            try:
                self.start_backup(name, {})
            except CryptsnapError as exc:  # Busy: a CLI run or a view holds it; it stays put off
                log.warning("target %s: cannot start the backup that was put off: %s", name, exc)

    # -- sleep and shutdown ------------------------------------------------------------
    # While a job runs, cryptsnapd holds a logind delay inhibitor. When logind announces
    # sleep or shutdown, each job is canceled: it unwinds (the half-written snapshot is
    # removed, the decrypted mapping closed, sshfs unmounted) and the inhibitor goes with
    # the last of them, so the machine does not sleep with an image open and a connection
    # about to break. A backup canceled for sleep starts again when the machine wakes.

    def prepare_for(self, what: str, starting: bool) -> None:
        """logind's PrepareForSleep / PrepareForShutdown (what: sleep, shutdown)."""
        if not starting:
            if self.going:
                log.info("the machine is back (%s over or called off): starting the backups put off for it", what)
                self.going = ""
                self.conditions_changed()
            return
        self.going = "going to sleep" if what == "sleep" else "shutting down"
        for job in list(self.jobs.values()):
            if job.kind == "unwind" or job.phase in ("finalizing", "unmounting"):
                continue  # it only closes now: the fastest way to a consistent image is to let it
            log.info("job %d [%s]: the machine is %s: canceling it", job.id, job.target, self.going)
            job.cancel_why = f"the machine was {self.going}"
            if job.action == "backup":
                job.cancel_why += "; the backup starts again when the machine is back"
                self.deferred[job.target] = f"the machine is {self.going}"
                self.listener.target_changed(job.target, {"Deferred": self.deferred[job.target]})
            self.cancel(job)

    def _hold_off_sleep(self) -> None:
        """Hold logind's delay inhibitor exactly while a job runs."""
        if self.jobs and self.inhibitor is None and not self.going:
            self.inhibitor = self.listener.take_inhibitor("a backup is open: it is closed cleanly first")
        elif not self.jobs and self.inhibitor is not None:
            os.close(self.inhibitor)
            self.inhibitor = None

    def _recheck_periodically(self) -> bool:
        self.conditions_changed()
        if self.deferred:
            return True
        self.recheck = 0
        return False

    def _spawn(self, job: Job, holder: str, extra: list[str]) -> None:
        """Start the job's worker process, handing it the target's lock."""
        # Take the target's lock here and hand it to the worker: a job reported as running
        # holds its target from the first moment, before the worker has even started up.
        lock = LocalLock(self.target(job.target).runtime_dir, holder)
        lock.__enter__()  # Busy when a CLI run, a mount or the restore unit holds the target
        fd = lock.file.fileno()
        argv = [sys.executable, "-m", "cryptsnap.worker", "--config", self.config_path, "--job", str(job.id),
                "--lock-fd", str(fd), *extra, job.target]  # fmt: skip
        try:
            # Its own process group: the commands it runs are in it (the layers' long-running
            # helpers have sessions of their own), so a killed worker's commands can be stopped.
            job.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, pass_fds=(fd,),
                                           env={**os.environ, DAEMON_PID: str(os.getpid())},
                                           start_new_session=True)  # fmt: skip
        except BaseException:
            lock.__exit__(None, None, None)
            raise
        lock.hand_over()
        job.buffer = b""
        os.set_blocking(job.process.stdout.fileno(), False)
        GLib.io_add_watch(job.process.stdout.fileno(), GLib.PRIORITY_DEFAULT, GLib.IO_IN | GLib.IO_HUP,
                          self._on_worker_output, job)  # fmt: skip
        GLib.child_watch_add(GLib.PRIORITY_DEFAULT, job.process.pid, self._on_worker_exit, job)

    def _unwind(self, job: Job, why: str) -> None:
        """Turn `job` into the unwinding of what its dead run left (see cryptsnap.stack.unwind_dead_run)."""
        job.kind, job.why = "unwind", why
        job.phase = "unmounting"
        if job.process and job.process not in job.retired:
            job.retired.append(job.process)
        self._spawn(job, f"cryptsnapd unwinding job {job.id}", ["--unwind", why])
        log.warning("job %d [%s]: unwinding what the run left: %s", job.id, job.target, why)
        self.listener.job_changed(job, {"Phase": job.phase})
        self.listener.target_changed(job.target, {"State": "unwinding", "Job": job.path})
        self.update_status()

    def unwind_leftovers(self) -> None:
        """At start-up: unwind what runs of a killed cryptsnapd left (mounts, mapping, devices, ssh)."""
        for name in self.target_names():
            try:
                dirty = has_leftovers(self.target(name))
            except OSError as exc:
                log.error("target %s: cannot look for what an earlier run left: %s", name, exc)
                continue
            if not dirty:
                continue
            job = Job(self.next_id, name)
            try:
                self._unwind(job, "cryptsnapd was restarted during the run")
            except CryptsnapError as exc:  # Busy: a CLI run holds it, and unwinds it itself
                log.warning("target %s: not unwinding what an earlier run left: %s", name, exc)
                continue
            self.next_id += 1
            self.jobs[job.id] = job
            self.listener.job_new(job)

    def cancel(self, job: Job) -> None:
        if job.kind == "unwind":
            return  # cut short, it would leave what it is there to remove: it ends by itself
        if job.process and job.process.poll() is None and not job.cancel_requested:
            log.info("job %d [%s]: canceling", job.id, job.target)
            job.cancel_requested = True
            job.process.send_signal(signal.SIGTERM)  # the worker unwinds its stack, then exits

    def cancel_target(self, name: str) -> None:
        self.target(name)
        job = self.job_for(name)
        if job is None:
            raise CryptsnapError(f"no job is running for target {name}")
        self.cancel(job)

    def _on_worker_output(self, fd: int, condition, job: Job) -> bool:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:  # the worker (and whatever shared its stdout) is gone: close our end
            for process in [job.process, *job.retired]:
                if process and process.stdout and not process.stdout.closed and process.stdout.fileno() == fd:
                    process.stdout.close()
            job.retired = [process for process in job.retired if not process.stdout.closed]
            return False
        job.buffer += chunk
        *lines, job.buffer = job.buffer.split(b"\n")
        changed: dict = {}
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "phase" in message and message["phase"] != job.phase:
                job.phase = changed["Phase"] = message["phase"]
            if "progress" in message:
                job.progress = changed["Progress"] = float(message["progress"])
                job.transferred = changed["BytesTransferred"] = int(message["bytes"])
        if changed:
            self.listener.job_changed(job, changed)
            self.update_status()
        return True

    def _on_worker_exit(self, pid: int, status: int, job: Job) -> None:
        code = os.waitstatus_to_exitcode(status)
        job.process.returncode = code
        # SIGTERM, SIGINT or SIGHUP that killed it came before it could handle them, that is
        # before it opened anything; any other signal (SIGKILL) may have hit it anywhere.
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        if code < 0 and -code not in handled and job.kind in ("backup", "check") and job.target in self.config.targets:
            # Killed before it could unwind (SIGKILL, the OOM killer): its mounts, the decrypted
            # mapping and the block device server are still open. Remove them now, not next run.
            job.killed = True
            _stop_commands_of(job.process.pid)
            self._unwind_killed(job, f"its process was killed by {_signal_name(-code)}", code)
            return
        self._end(job, code)

    def _unwind_killed(self, job: Job, why: str, code: int, tries: int = UNWIND_LOCK_TRIES) -> bool:
        """Unwind what a killed worker left, as soon as its lock is free.

        A child the worker was starting when it was killed holds the lock (and every other
        descriptor) between fork and exec, where subprocess closes them: a moment, so the
        target is tried again before it counts as busy. Returns False: a GLib timeout, once."""
        try:
            self._unwind(job, why)
        except Busy as exc:
            if tries > 1:
                GLib.timeout_add(UNWIND_LOCK_RETRY_MS, self._unwind_killed, job, why, code, tries - 1)
                return False
            self._cannot_unwind(job, exc, code)
        except CryptsnapError as exc:
            self._cannot_unwind(job, exc, code)
        return False

    def _cannot_unwind(self, job: Job, exc: CryptsnapError, code: int) -> None:
        log.error("job %d [%s]: cannot unwind what the killed run left: %s", job.id, job.target, exc)
        self._end(job, code)

    def _end(self, job: Job, code: int) -> None:
        """Record and remove the job whose worker (run or unwinding) exited with `code`."""
        if job.kind == "unwind":
            if code != 0:
                log.error("job %d [%s]: unwinding what the run left failed (exit %d); the next run tries again",
                          job.id, job.target, code)  # fmt: skip
            if job.killed:  # a worker of this daemon's, maybe killed before its run made its marker
                self._record_if_unrecorded(job, "failed", Interrupted.exit_code, f"interrupted: {job.why}")
            if job.action == "check":
                self._remove_job(job, "failed", Interrupted.exit_code)
                return
            # As recorded: a run killed while unmounting, after its snapshot was complete, is done.
            recorded = TargetState(self.target(job.target)).last_run() if job.target in self.config.targets else {}
            if recorded.get("finished", 0) >= job.start_time:
                self._remove_job(job, recorded.get("result", "failed"), int(recorded.get("exit_code", 0)))
            else:
                self._remove_job(job, "failed", Interrupted.exit_code)
            return
        if code < 0:  # killed by a signal before it could handle it: report it as a shell would
            code = 128 - code
        result = "done" if code == 0 else "canceled" if job.cancel_requested or code == EXIT_CANCELED else "failed"
        self._record_if_unrecorded(job, result, code, f"the worker exited with code {code} (see the journal)")
        if job.cancel_why and result == "canceled" and job.action == "backup":
            state = TargetState(self.target(job.target))
            run = state.last_run()
            state.record_run({**run, "error": f"{run.get('error') or 'canceled'} ({job.cancel_why})"})
        self._remove_job(job, result, code)

    def _record_if_unrecorded(self, job: Job, result: str, code: int, error: str) -> None:
        """Record the job's run where its worker could not (a crash, a bad config, killed before it began)."""
        if job.target not in self.config.targets:
            return
        state = TargetState(self.target(job.target))
        if job.action == "check":
            if state.last_check().get("finished", 0) < job.start_time:
                state.record_check({"result": "failed", "started": job.start_time, "finished": time.time(),
                                    "error": error, "exit_code": code})  # fmt: skip
            return
        if state.last_run().get("finished", 0) < job.start_time:
            state.record_run({**state.last_run(), "result": result, "finished": time.time(), "exit_code": code,
                              "error": error, "action": "backup"})  # fmt: skip

    def _remove_job(self, job: Job, result: str, code: int) -> None:
        log.log(logging.INFO if result == "done" else logging.WARNING, "job %d [%s]: %s (exit %d)",
                job.id, job.target, result, code)  # fmt: skip
        del self.jobs[job.id]
        self.listener.job_removed(job, result)
        report.update_metrics(self.config)
        if job.target in self.config.targets:
            self.listener.target_changed(job.target, self.target_properties(job.target))
            self._tell_desktop(job, result)
        self.update_status()
        _give_memory_back()
        if job.target in self.deferred and not (self.stopping or self.replaced):
            self.conditions_changed()  # the machine woke up before this run had unwound: start it now
        if (self.stopping or self.replaced) and not self.jobs:
            if self.replaced and not self.stopping:
                log.info("cryptsnap was upgraded and no job runs now: exiting; the next request starts the new version")
                self.notifier.send("STOPPING=1")
            self.loop.quit()

    def _tell_desktop(self, job: Job, result: str) -> None:
        """notify_desktop: a failed backup or check, shown to the users at a graphical session."""
        target = self.target(job.target)
        if result != "failed" or not target.notify_desktop:
            return
        state = TargetState(target)
        what, error = ("Check", state.last_check().get("error", "")) if job.action == "check" else \
                      ("Backup", state.last_run().get("error", ""))  # fmt: skip
        self.listener.notify_desktop(f"{what} of {job.target} failed",
                                     f"{error}\n\nMore: cryptsnap status {job.target}; journalctl -u cryptsnapd")

    # -- service lifecycle ---------------------------------------------------------------

    def status_text(self) -> str:
        if not self.jobs:
            return "idle"
        parts = []
        for job in sorted(self.jobs.values(), key=lambda j: j.id):
            detail = f" {job.progress:.0%}" if job.phase == "syncing" else ""
            kind = "unwinding a dead run, " if job.kind == "unwind" else ""
            parts.append(f"{job.target}: {kind}{job.phase}{detail}")
        return "; ".join(parts)

    def update_status(self) -> None:
        """After any change of the jobs: systemd's STATUS=, and the sleep inhibitor."""
        self.notifier.status(self.status_text())
        self._hold_off_sleep()

    def reload(self) -> None:
        self.notifier.send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            self.config_seen = _file_signature(self.config_path)
            self.config = config.load(self.config_path)
            log.info("configuration reloaded: targets %s", ", ".join(self.target_names()))
            report.update_metrics(self.config)
        except ConfigError as exc:
            log.error("configuration not reloaded, keeping the previous one:\n%s", exc)
        self.listener.targets_changed(self)
        self.notifier.send("READY=1")
        self.update_status()

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.notifier.send("STOPPING=1")
        for job in list(self.jobs.values()):
            self.cancel(job)
        if not self.jobs:
            self.loop.quit()

    def code_replaced(self) -> None:
        """cryptsnap's files were replaced (an upgrade): exit once idle, to be started again as
        the new version by the next request (D-Bus activation); running jobs go on."""
        if self.replaced or self.stopping:
            return
        self.replaced = True
        if self.jobs:
            log.info("cryptsnap was upgraded: exiting once the %d running job(s) end, so that the next request "
                     "starts the new version", len(self.jobs))  # fmt: skip
            return
        log.info("cryptsnap was upgraded: exiting now (no job runs); the next request starts the new version")
        self.notifier.send("STOPPING=1")
        self.loop.quit()

    def _watchdog(self) -> bool:
        self.notifier.send("WATCHDOG=1")
        return True

    def run(self) -> None:
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGTERM, lambda: self.stop() or True)
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGINT, lambda: self.stop() or True)
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGHUP, lambda: self.reload() or True)
        watchdog = int(os.environ.get("WATCHDOG_USEC", "0"))
        if watchdog:
            GLib.timeout_add(max(watchdog // 2000, 100), self._watchdog)
        self.unwind_leftovers()
        watch = upgrades.InstalledFiles(self.code_replaced)
        watch_conditions = getattr(self.listener, "watch_power_and_network", None)
        if watch_conditions:
            watch_conditions(self.conditions_changed)
        watch_sleep = getattr(self.listener, "watch_sleep_and_shutdown", None)
        if watch_sleep:
            watch_sleep(self.prepare_for)
        report.update_metrics(self.config)
        self.notifier.send("READY=1")
        self.update_status()
        log.info("cryptsnapd %s ready: targets %s", __version__, ", ".join(self.target_names()) or "none")
        self.loop.run()
        watch.close()
        log.info("cryptsnapd stopped")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryptsnapd",
        description="The cryptsnap service: runs backups on request (systemd timers, D-Bus, `cryptsnap backup`) "
        "and publishes targets and jobs as org.cryptsnap1 on the system bus. Normally started by systemd "
        "(cryptsnapd.service) or by D-Bus activation.",
    )
    parser.add_argument("--config", "-c", metavar="PATH", help="configuration file (default: $CRYPTSNAP_CONFIG, "
                        f"else {config.DEFAULT_PATH})")
    parser.add_argument("--bus-address", metavar="ADDRESS",
                        help="connect to this bus instead of the system bus (tests, debugging)")
    parser.add_argument("--verbose", "-v", action="count", default=1,
                        help="also log every command run (without it: what happens)")
    parser.add_argument("--release-block-devices", action="store_true",
                        help="what cryptsnapd.service runs once it has stopped (ExecStopPost=): fail the "
                        "requests a killed block device server left unanswered, on which a process of the "
                        "killed service may wait in the kernel, keeping systemd from restarting it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.verbose, program="cryptsnapd")
    if args.release_block_devices:
        # Once the service has stopped: a run of it waiting on such a request stays in the
        # kernel, and in the service's cgroup, which keeps systemd from restarting it.
        release_orphaned_devices()
        return 0
    from .bus import BusExporter

    try:
        daemon = Daemon(args.config)
    except CryptsnapError as exc:
        log.error("cannot start: %s", exc)
        return exc.exit_code
    exporter = BusExporter(daemon, args.bus_address)
    daemon.listener = exporter
    exporter.publish()  # owns the name before READY=1
    daemon.run()
    exporter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
