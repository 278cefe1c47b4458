"""The actions on a target, each a whole run: backup, list, prune, restore, view.

The CLI and the daemon's job worker both call these; a Reporter receives phases and
progress (the terminal progress line, D-Bus properties).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from . import changes, commands, hooks, integrity, meter, readahead, runner, scan, snapshot
from .config import Target
from .errors import (
    ConnectionLost,
    CryptsnapError,
    IntegrityError,
    RemoteUnreachable,
    UnsafeServer,
    UsageError,
    canceled,
)
from .layers import LocalLock, check_server_fsync
from .stack import Paths, open_stack, step
from .state import TargetState

log = logging.getLogger(__name__)


class Reporter:
    """Receives what a run is doing. The default does nothing; subclasses display or publish it."""

    def phase(self, name: str) -> None:
        pass

    def progress(self, fraction: float, transferred: int) -> None:
        pass


# Pipeline phases, grouped as the traffic report shows them.
TRAFFIC_PHASES = {
    "connecting": "connect",
    "attaching": "open", "unlocking": "open", "mounting": "open",
    "syncing": "sync",
    "finalizing": "close", "unmounting": "close",
    "checking": "check",
    "waiting": "connect",  # between tries, after a lost connection: nothing crosses the link
}  # fmt: skip


class MeteredReporter(Reporter):
    """Passes phases and progress on, and charges the ssh traffic to the phase it happened in."""

    def __init__(self, inner: Reporter, read_counter):
        self.inner = inner
        self.read_counter = read_counter  # () -> meter.Traffic
        self.current: str | None = None
        self.mark = meter.Traffic()
        self.by_phase: dict[str, meter.Traffic] = {}  # connect, open, sync, close
        self.by_step: dict[str, meter.Traffic] = {}  # each phase on its own, to see where bytes go

    def _charge(self) -> None:
        now = self.read_counter()
        if self.current is not None:
            used = now - self.mark
            group = TRAFFIC_PHASES.get(self.current, self.current)
            self.by_phase[group] = self.by_phase.get(group, meter.Traffic()) + used
            self.by_step[self.current] = self.by_step.get(self.current, meter.Traffic()) + used
        self.mark = now

    def phase(self, name: str) -> None:
        self._charge()
        self.current = name
        self.inner.phase(name)

    def progress(self, fraction: float, transferred: int) -> None:
        self.inner.progress(fraction, transferred)

    def restart(self) -> None:
        """The counter goes back to zero (a new try's connection): what it counted so far stays charged."""
        self._charge()
        self.mark = meter.Traffic()

    def finish(self) -> meter.Traffic:
        """Charge what is left to the last phase; return the total."""
        self._charge()
        self.current = None
        total = meter.Traffic()
        for traffic in self.by_phase.values():
            total += traffic
        return total


class MarkedReporter(Reporter):
    """Notes each phase in the target's run marker (state.running.json), then passes it on.

    The first phase comes once the target's lock is held, so a run refused as busy leaves
    no marker; a run killed later leaves one that says how far it got.
    """

    def __init__(self, inner: Reporter, state: TargetState):
        self.inner = inner
        self.state = state

    def phase(self, name: str) -> None:
        self.state.mark_phase(name)
        self.inner.phase(name)

    def progress(self, fraction: float, transferred: int) -> None:
        self.inner.progress(fraction, transferred)


def low_on_space(target: Target, size: int, free: int) -> bool:
    return bool(size) and free * 100 < size * target.free_space_warning


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def traffic_text(record: RunRecord) -> str:
    phases = ", ".join(f"{name} {up:,}/{down:,}" for name, (up, down) in record.traffic.items())
    return f"{record.bytes_up:,} bytes up, {record.bytes_down:,} down ({phases})"


@dataclass
class RunRecord:
    action: str
    target: str
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    result: str = "running"  # done, failed, canceled
    error: str = ""
    exit_code: int = 0
    snapshot: str = ""
    unchanged: bool = False  # skip_unchanged: nothing changed, `snapshot` is the newest, no new one made
    pruned: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    bytes_up: int = 0  # on the ssh connection, whole run
    bytes_down: int = 0
    traffic: dict[str, tuple[int, int]] = field(default_factory=dict)  # per phase group: (up, down)
    traffic_steps: dict[str, tuple[int, int]] = field(default_factory=dict)  # per phase: (up, down)
    image_size: int = 0  # the file system inside the image, as this run measured it (0: not reached)
    image_free: int = 0


def backup(target: Target, reporter: Reporter | None = None, *, break_lock: bool = False,
           full_compare: bool = False, accept_rollback: bool = False,
           lock_fd: int | None = None) -> RunRecord:  # fmt: skip
    """One run of the pipeline: open read-write, write a snapshot, prune, unwind. Records the run.

    full_compare: let rsync compare every file with the image even where the local record
    of the last snapshot's files would say what changed. accept_rollback: write into an image
    older than this machine's generation (the user put it back). lock_fd: the target's local lock,
    already taken by the caller's parent (cryptsnapd).
    """
    counter = Paths.of(target).traffic
    state = TargetState(target)
    reporter = MeteredReporter(MarkedReporter(reporter or Reporter(), state), lambda: meter.read(counter))
    record = RunRecord("backup", target.name)
    try:
        with contextlib.ExitStack() as held:
            if lock_fd is None:  # held from here to the end, across tries: nobody takes the target between
                lock_fd = held.enter_context(LocalLock(target.runtime_dir, "backup")).file.fileno()
            hooks.before(target)  # inside: a skipped run is recorded as failed, with the hook's reason
            with step("checking the sources"):  # after the hook, which may mount one
                scan.check_sources(target)
            _tries(target, state, reporter, record, break_lock=break_lock, full_compare=full_compare,
                   accept_rollback=accept_rollback, lock_fd=lock_fd)  # fmt: skip
        record.result = "done"
        log.info("target %s: %s", target.name, outcome_text(record))
        return record
    except BaseException as exc:
        note_unconfirmed_snapshot(record, exc)
        record.result = "canceled" if canceled(exc) else "failed"
        record.error = str(exc)
        record.exit_code = getattr(exc, "exit_code", 1)
        raise
    finally:
        record.finished = time.time()
        total = reporter.finish()
        record.bytes_up, record.bytes_down = total.up, total.down
        record.traffic = {name: (t.up, t.down) for name, t in reporter.by_phase.items()}
        record.traffic_steps = {name: (t.up, t.down) for name, t in reporter.by_step.items()}
        log.info("target %s: traffic %s", target.name, traffic_text(record))
        previous = state.last_run()
        entry = dict(record.__dict__)
        entry["last_success"] = record.finished if record.result == "done" else previous.get("last_success", 0)
        if not record.snapshots:
            entry["snapshots"] = previous.get("snapshots", [])
        if not record.image_size:  # not measured this time: the last measure still holds
            entry["image_size"], entry["image_free"] = previous.get("image_size", 0), previous.get("image_free", 0)
        try:
            state.record_run(entry)
            state.end_run()
        except OSError as exc:
            log.error("could not record the run in %s: %s", state.dir, exc)
        hooks.after_run(target, record)


def outcome_text(record: RunRecord) -> str:
    """What a done backup made, as the log and `cryptsnap backup` say it."""
    if record.unchanged:
        return (f"nothing changed since snapshot {record.snapshot}: no new snapshot (skip_unchanged); "
                f"{len(record.snapshots)} snapshots")  # fmt: skip
    return (f"snapshot {record.snapshot} complete; {len(record.snapshots)} snapshots"
            + (f", pruned {', '.join(record.pruned)}" if record.pruned else ""))


def note_unconfirmed_snapshot(record: RunRecord, exc: BaseException) -> None:
    """A run that failed after its snapshot was named, before the commit that makes the name
    durable (in finalizing), says so in its error: if the rename reached the server all the
    same, the snapshot is there, and whole, as its data went to the server before it was named
    (a seeded cut showed it on ext2; docs/reliability.md)."""
    if record.snapshot and not record.snapshots and isinstance(exc, CryptsnapError):
        exc.args = (f"{exc}; snapshot {record.snapshot} may be on the server all the same, complete (its "
                    "data was there before it was named): `cryptsnap list` shows it if so",)  # fmt: skip


def _tries(target: Target, state: TargetState, reporter: MeteredReporter, record: RunRecord, *,
           lock_fd: int, **options) -> None:  # fmt: skip
    """Write the snapshot; after a lost connection, try again (reconnect_tries, reconnect_delay)."""
    for tries in itertools.count(1):
        try:
            # A descriptor of its own for each try (its stack closes it); the lock stays held
            # through `lock_fd`, on the same open file.
            _write(target, state, reporter, record, lock_fd=os.dup(lock_fd), **options)
            return
        except CryptsnapError as exc:
            wait = retry_after(target, exc, tries, complete=bool(record.snapshots))
            if wait is None:
                if tries > 1 and connection_lost(exc, tries):
                    exc.args = (f"{exc} (the last of {tries} tries; reconnect_tries: {target.reconnect_tries})",)
                raise
            log.warning("target %s: %s; trying again in %d s (try %d of %d)", target.name, exc, wait, tries + 1,
                        target.reconnect_tries + 1)  # fmt: skip
            reporter.phase("waiting")
            reporter.restart()  # the next try's stack starts its traffic counter at zero
            time.sleep(wait)  # a cancel (SIGTERM) ends it, and the run


def _write(target: Target, state: TargetState, reporter: MeteredReporter, record: RunRecord, *,
           break_lock: bool, full_compare: bool, accept_rollback: bool, lock_fd: int | None) -> None:  # fmt: skip
    """One try of a backup: open the stack, write the snapshot, prune, close. Fills `record`."""
    # skip_unchanged: mounted read-only until the run finds something to write (FsMount).
    with open_stack(target, readonly=False, what="backup", on_phase=reporter.phase, break_lock=break_lock,
                    lock_fd=lock_fd, writable_later=target.skip_unchanged and target.filesystem == "btrfs") as op:
        generation = snapshot.check_generation(op.fs, state, accept_rollback)
        kept_as = "layers" if snapshot.is_layered(op.fs) else "snapshots"
        if target.filesystem == "btrfs" and kept_as != target.history:
            log.warning("target %s: history: %s is set, but the image keeps its history as %s, as `cryptsnap init` "
                        "made it: going on with %s (only a new image takes the setting)", target.name,
                        target.history, kept_as, kept_as)  # fmt: skip
        op.phase("syncing")
        known = changes.Record.load(state.file_record)
        unfinished = snapshot.Unfinished(state)
        made_room: list[str] = []
        scanned = None
        with step("syncing"):
            try:
                record.snapshot, scanned = snapshot.write_snapshot(
                    op.fs, target, reporter.progress, known, generation, work_dir=target.runtime_dir,
                    full_compare=full_compare, unfinished=unfinished, made_room=made_room,
                    record_to=state.file_record, make_writable=op.make_writable)  # fmt: skip
            except snapshot.NothingChanged as unchanged:  # skip_unchanged: no snapshot, no commit
                record.snapshot, record.unchanged = unchanged.snapshot, True
        if not record.unchanged:
            op.phase("finalizing")
            state.file_record.unlink(missing_ok=True)  # it describes the previous snapshot from here on
            try:
                with step("finalizing"):
                    record.pruned = made_room + snapshot.prune(op.fs, target)
                    snapshot.bump_generation(op.fs, state, generation)
            except BaseException:
                if scanned:
                    scanned.discard()
                raise
        unfinished.clear()
        state.mark_complete(record.snapshot)
        runner.ignore_cancels()  # complete: a cancel from here on would only make a done run look undone
        if scanned:
            scanned.commit(generation + 1, record.snapshot, changes.settings_digest(target))
        record.snapshots = snapshot.list_snapshots(op.fs)
        record.image_size, record.image_free = snapshot.space(op.fs)
        if low_on_space(target, record.image_size, record.image_free):
            log.warning("target %s: the image has %s free of %s, under free_space_warning (%d%%): prune, "
                        "exclude or `cryptsnap resize` before a run fails for want of room", target.name,
                        _mib(record.image_free), _mib(record.image_size), target.free_space_warning)  # fmt: skip


def connection_lost(exc: BaseException, tries: int = 1) -> bool:
    """The run lost its connection; or, on a new try, could not get it back (yet)."""
    cause = getattr(exc, "cause", exc)
    return isinstance(cause, ConnectionLost) or (tries > 1 and isinstance(cause, RemoteUnreachable))


def retry_after(target: Target, exc: BaseException, tries: int, complete: bool = False) -> int | None:
    """Seconds to wait before the next try of a backup that failed with `exc` on try number
    `tries`; None: it is not tried again (not a lost connection, its snapshot was complete,
    or reconnect_tries are spent). Each wait is twice the last."""
    if complete or not connection_lost(exc, tries) or tries > target.reconnect_tries:
        return None
    return target.reconnect_delay << (tries - 1)


def list_snapshots(target: Target, reporter: Reporter | None = None) -> list[str]:
    reporter = reporter or Reporter()
    with open_stack(target, readonly=True, what="list", on_phase=reporter.phase) as op:
        return snapshot.list_snapshots(op.fs)


def prune(target: Target, reporter: Reporter | None = None) -> list[str]:
    reporter = reporter or Reporter()
    state = TargetState(target)
    with open_stack(target, readonly=False, what="prune", on_phase=reporter.phase) as op:
        return _write_outside_a_backup(op, state, lambda: snapshot.prune(op.fs, target))


def _write_outside_a_backup(op, state: TargetState, change):
    """Run change() on the open image as one counted write: refused on a rolled-back image
    (before writing), the generation bumped after it. The local record of the newest snapshot
    stays valid (neither pruning nor resizing touches the newest snapshot) and follows."""
    generation = snapshot.check_generation(op.fs, state)
    known = changes.Record.load(state.file_record)
    held = state.file_record.with_name(state.file_record.name + ".held")  # not valid while the image changes
    if known:
        os.replace(state.file_record, held)
        known.source = held
    try:
        result = change()
        snapshot.bump_generation(op.fs, state, generation)
        if known and known.generation == generation and known.snapshot in snapshot.list_snapshots(op.fs):
            known.generation += 1
            try:
                known.save(state.file_record)
            except changes.RecordDamaged as exc:
                log.warning("the local file record is not kept (%s); the next run compares every file", exc)
    finally:
        held.unlink(missing_ok=True)
    return result


def resize(target: Target, size: int, reporter: Reporter | None = None, say=print) -> tuple[int, int]:
    """Grow the image to `size` bytes, then the file system in it; (old size, new size).

    The image grows on the server first, inside the run's locks and before it is attached
    (initialize.grow_image: without sending its bytes), and the new size is recorded here
    once the server has it on disk. The image is then opened as a backup opens it: LUKS2's
    segment is "dynamic", so the mapping covers the larger device by itself, and the file
    system grows in place, mounted. Shrinking is refused: it would cut off what the file
    system has there.
    """
    from .initialize import grow_image

    reporter = reporter or Reporter()
    state = TargetState(target)
    old = state.image()["size"]
    if size < old:
        raise UsageError(f"target {target.name}'s image is {old:,} bytes; it cannot shrink to {size:,} "
                         f"(only growing is supported)")  # fmt: skip
    with open_stack(target, readonly=False, what="resize", on_phase=reporter.phase,
                    before_attaching=lambda image: grow_image(target, state, image, size, say)) as op:  # fmt: skip
        reporter.phase("resizing")
        with step("resizing"):
            _write_outside_a_backup(op, state, lambda: runner.run(commands.grow_filesystem(
                target.filesystem, str(op.fs), op.mapping_device)))  # fmt: skip
    return old, size


def check(target: Target, reporter: Reporter | None = None, fraction: float | None = None, repair: bool = False,
          lock_fd: int | None = None):  # fmt: skip
    """Check the image within a download budget of `fraction` of its size (cryptsnap.integrity;
    default: the target's check_budget percent). With `repair`, metadata blocks damaged on the
    server are rewritten from this machine's cache. The result is recorded (last-check.json).

    Returns (CheckReport, traffic); raises IntegrityError naming every problem found.
    """
    state = TargetState(target)
    started = time.time()
    result, error, code = "failed", "", 1
    try:
        found = _check(target, reporter, target.check_budget / 100 if fraction is None else fraction, repair,
                       lock_fd)  # fmt: skip
        result = "ok"
        return found
    except BaseException as exc:
        result = "canceled" if canceled(exc) else "problems" if isinstance(exc, IntegrityError) else "failed"
        error, code = str(exc), getattr(exc, "exit_code", 1)
        raise
    finally:
        try:
            state.record_check({"result": result, "started": started, "finished": time.time(), "error": error,
                                "exit_code": 0 if result == "ok" else code})  # fmt: skip
        except OSError as exc:
            log.error("could not record the check in %s: %s", state.dir, exc)


def _check(target: Target, reporter: Reporter | None, fraction: float, repair: bool, lock_fd: int | None):
    counter = Paths.of(target).traffic
    metered = MeteredReporter(reporter or Reporter(), lambda: meter.read(counter))
    state = TargetState(target)
    report = integrity.CheckReport(image_size=state.image()["size"])
    budget = int(report.image_size * fraction)
    # The whole run counts (the meter restarts when the stack opens), and what closing will
    # still download is set aside.
    left = lambda: budget - integrity.CLOSE_ALLOWANCE - meter.read(counter).down  # noqa: E731

    def compare_cache(image: Path) -> None:
        """Before the file system is mounted (it may not mount from the server's copy alone):
        the metadata cache's blocks, with up to half of the budget."""
        if target.filesystem == "btrfs":
            kept_back = left() // 2
            integrity.verify_cached_blocks(image, state, lambda: left() - kept_back, report, repair)

    try:
        with open_stack(target, readonly=True, what="check", on_phase=metered.phase,
                        before_attaching=compare_cache, lock_fd=lock_fd) as op:  # fmt: skip
            metered.phase("checking")
            if state.header_backup.is_file():
                report.header_bytes, problems = integrity.compare_header(op.paths.remote / target.image,
                                                                         state.header_backup)  # fmt: skip
                report.problems += problems
            report.generation = snapshot.check_generation(op.fs, state)
            try:
                check_server_fsync(target, state.ssh_config)
            except UnsafeServer as exc:
                report.problems.append(str(exc))
            integrity.read_back(op.fs, state, left, report)
    except CryptsnapError as exc:
        if not report.problems:
            raise
        report.problems.append(str(exc))  # the problems found before it say why (and what to do)
    finally:
        total = metered.finish()
        log.info("target %s: check traffic %d bytes up, %d down (%.2f%% of the image)", target.name, total.up,
                 total.down, 100 * total.down / max(1, report.image_size))  # fmt: skip
    integrity.raise_on_problems(report)
    return report, total


def parse_restore_spec(spec: str) -> tuple[str, str, str]:
    """TARGET[@SNAPSHOT]:PATH -> (target, snapshot or 'latest', absolute path)."""
    left, sep, path = spec.partition(":")
    if not sep or not path.startswith("/"):
        raise UsageError(f"{spec!r}: write what to restore as TARGET[@SNAPSHOT]:/absolute/path, "
                         f"e.g. home@latest:/etc/fstab")
    name, _, snap = left.partition("@")
    if ".." in PurePosixPath(path).parts:
        raise UsageError(f"{path!r}: a restore path may not contain '..'")
    return name, snap or "latest", path


def restore(target: Target, snapshot_name: str, path: str, destination: str,
            reporter: Reporter | None = None) -> str:  # fmt: skip
    """Copy PATH as it was in the snapshot to DESTINATION (which becomes that file or directory)."""
    reporter = reporter or Reporter()
    with open_stack(target, readonly=True, what="restore", on_phase=reporter.phase) as op:
        try:
            name = snapshot.resolve(op.fs, snapshot_name)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
        with snapshot.opened(op.fs, name) as root:
            source = root / path.lstrip("/")
            if not source.exists() and not source.is_symlink():
                raise UsageError(f"{path} is not in snapshot {name}")
            reporter.phase("syncing")
            readahead.copy_out(source, destination)
        return name


def open_view(target: Target, reporter: Reporter | None = None) -> Path:
    """Mount all snapshots read-only and leave them mounted (`cryptsnap mount`)."""
    reporter = reporter or Reporter()
    with open_stack(target, readonly=True, what="read-only view", on_phase=reporter.phase, keep_open=True,
                    mountpoint=Paths.of(target).view) as op:
        view = op.fs
        if snapshot.is_layered(view):
            snapshot.show_states(view)
    return view


__all__ = ["CryptsnapError", "Reporter", "backup", "list_snapshots", "prune", "restore", "open_view"]
