"""The `cryptsnap` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import textwrap
import time

from . import __version__, config, pipeline, report, runner
from .errors import EXIT_CODES, Canceled, CryptsnapError, Interrupted, RemoteUnreachable, UsageError
from .stack import close_view
from .state import TargetState

log = logging.getLogger("cryptsnap")


TARGET_HELP = "a target's name in the configuration (`cryptsnap status` lists them)"


def _exit_codes_text() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<3} {text}" for code, text in sorted(EXIT_CODES.items()))


class TerminalReporter(pipeline.Reporter):
    """A progress line on a terminal; phase lines in logs otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.current = ""

    def phase(self, name: str) -> None:
        self.current = name
        if self.tty:
            self.stream.write(f"\r\033[K{name}...")
            self.stream.flush()
        else:
            log.info("%s", name)

    def progress(self, fraction: float, transferred: int) -> None:
        if self.tty:
            self.stream.write(f"\r\033[K{self.current} {fraction:4.0%}  {transferred / 1e6:,.1f} MB")
            self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _target(args) -> config.Target:
    return config.load(args.config).target(args.target)


def cmd_config(args) -> int:
    if args.config_action == "example":
        sys.stdout.write(config.example())
        return 0
    loaded = config.load(args.config)
    if args.config_action == "targets":
        print("\n".join(sorted(loaded.targets)))
        return 0
    names = ", ".join(sorted(loaded.targets))
    print(f"{loaded.path}: valid; targets: {names}")
    return 0


def cmd_init(args) -> int:
    from .initialize import init

    init(_target(args), force=args.force, accept_new_host_key=args.accept_new_host_key)
    return 0


def _daemon_client(args):
    """The running (or activatable) daemon, when this command should go through it.

    With --config or $CRYPTSNAP_CONFIG naming another file than the daemon's, the command
    runs here: the daemon would back up its own configuration's target of that name.
    """
    if getattr(args, "local", False):
        return None
    if config.config_path(args.config) != config.DEFAULT_PATH and not getattr(args, "daemon", False):
        return None
    from .bus import BusClient

    client = BusClient.reachable()
    if client is None and getattr(args, "daemon", False):
        raise RemoteUnreachable("cryptsnapd is not running and cannot be activated on the system bus")
    return client


def backup_via_daemon(client, args) -> int:
    wanted = (("break-lock", args.break_lock), ("full-compare", args.full_compare),
              ("accept-rollback", args.accept_rollback), ("ignore-conditions", args.anyway))  # fmt: skip
    options = {name: True for name, asked in wanted if asked}
    newest_before = client.properties(args.target).get("Snapshots", [])[-1:]
    job = client.start_backup(args.target, options)
    if job == "/":
        why = client.properties(args.target).get("Deferred", "")
        print(f"{args.target}: backup put off ({why}): cryptsnapd starts it once that changes; "
              f"`cryptsnap backup --anyway {args.target}` backs up now", file=sys.stderr)
        return 0
    print(f"{args.target}: started job {job}", file=sys.stderr)
    if args.no_wait:
        return 0
    result = _follow(client, args, job)
    props = client.properties(args.target)
    if result == "done":
        snaps = list(props.get("Snapshots", []))
        done = pipeline.RunRecord("backup", args.target, snapshot=snaps[-1] if snaps else "?", snapshots=snaps,
                                  unchanged=bool(snaps) and snaps[-1:] == newest_before)  # skip_unchanged: made none
        print(f"{args.target}: {pipeline.outcome_text(done)}")
        print(f"traffic: {props['BytesUploaded']:,} bytes up, {props['BytesDownloaded']:,} down")
        return 0
    print(f"cryptsnap: error: {props.get('LastError') or result}", file=sys.stderr)
    return int(props.get("LastExitCode") or (Canceled.exit_code if result == "canceled" else 1))


def _follow(client, args, job: str) -> str:
    """Show the job's progress until it ends; its result (done, failed, canceled). A first
    SIGINT/SIGTERM cancels the job; cryptsnapd leaving the bus is Interrupted."""
    reporter = TerminalReporter()

    def changed(props):
        if "Phase" in props:
            reporter.phase(props["Phase"])
        if "Progress" in props:
            reporter.progress(props["Progress"], props.get("BytesTransferred", 0))

    signals = []

    def on_signal() -> bool:
        """The first SIGINT/SIGTERM cancels the job and waits for it to unwind; a second stops waiting."""
        signals.append(1)
        if len(signals) > 1:
            return True
        print(f"\n{args.target}: canceling job {job} (again to stop waiting)", file=sys.stderr)
        try:
            client.cancel_job(job)
        except CryptsnapError as exc:
            log.warning("could not cancel %s: %s", job, exc)
        return False

    result = client.follow(job, changed, on_signal)
    reporter.done()
    if result == "lost":
        raise Interrupted(f"cryptsnapd left the bus while job {job} ran (it was killed or restarted): the run was "
                          f"interrupted, and cryptsnapd unwinds what it left when it starts again. "
                          f"`cryptsnap status {args.target}` shows what was recorded")  # fmt: skip
    if result == "abandoned":
        raise Canceled(f"stopped waiting for job {job}; cryptsnapd is canceling it")
    return result


def cmd_backup(args) -> int:
    client = _daemon_client(args)
    if client is not None:
        return backup_via_daemon(client, args)
    if args.no_wait:
        raise UsageError("--no-wait needs the daemon (cryptsnapd); without it the backup runs in the foreground")
    loaded = config.load(args.config)
    target = loaded.target(args.target)
    reporter = TerminalReporter()
    try:
        record = pipeline.backup(target, reporter, break_lock=args.break_lock, full_compare=args.full_compare,
                                 accept_rollback=args.accept_rollback)  # fmt: skip
    finally:
        reporter.done()
        report.update_metrics(loaded)
    print(f"{target.name}: {pipeline.outcome_text(record)}")
    print(f"traffic: {pipeline.traffic_text(record)}")
    return 0


def cmd_list(args) -> int:
    target = _target(args)
    if args.recorded:
        names = TargetState(target).last_run().get("snapshots", [])
    else:
        names = pipeline.list_snapshots(target)
    if args.json:
        print(json.dumps(names))
    else:
        for name in names:
            print(name)
    return 0


def cmd_resize(args) -> int:
    target = _target(args)
    size = config.parse_size(args.size)
    if not size:
        raise UsageError(f"{args.size!r} is not a size; use e.g. 60G")
    old, new = pipeline.resize(target, size)
    print(f"target {target.name}: image and {target.filesystem} file system grown from {old:,} to {new:,} bytes")
    if target.size != new:
        print(f"set size: {args.size} for target {target.name} in the configuration: it says {target.size:,} "
              f"bytes, which `cryptsnap init` would use")  # fmt: skip
    return 0


def cmd_prune(args) -> int:
    pruned = pipeline.prune(_target(args))
    for name in pruned:
        print(f"pruned {name}")
    if not pruned:
        print("nothing to prune")
    return 0


def cmd_check(args) -> int:
    if args.daemon:
        client = _daemon_client(args)
        job = client.start_check(args.target)
        print(f"{args.target}: started check job {job}", file=sys.stderr)
        result = _follow(client, args, job)
        props = client.properties(args.target)
        if props["LastCheck"] == "ok":
            print(f"{args.target}: check ok (the details are in the journal: journalctl -u cryptsnapd)")
            return 0
        print(f"cryptsnap: error: {props['LastCheckError'] or result}", file=sys.stderr)
        return int(props["LastCheckExitCode"] or (Canceled.exit_code if result == "canceled" else 1))
    target = _target(args)
    report, traffic = pipeline.check(target, fraction=args.fraction, repair=args.repair)
    if report.header_bytes:
        print(f"header: {report.header_bytes:,} bytes compared with the local backup: identical")
    else:
        print("header: no local header backup on this machine to compare with (made by `cryptsnap init`)")
    print(f"generation: {report.generation} (no rollback)")
    if report.cache_blocks:
        print(f"metadata cache: {report.cache_blocks} blocks compared with the server's copy: "
              f"{report.cache_note or 'identical'}")
    elif target.filesystem == "btrfs":
        print(f"metadata cache: {report.cache_note or 'no block compared (the budget went on opening the image)'}")
    verified = "checksums verified" if target.filesystem == "btrfs" else "readable (ext2/ext4 keep no data checksums)"
    if report.files_read:
        wrapped = ", then started over from the first file" if report.wrapped else ""
        print(f"snapshot {report.snapshot}: read {report.bytes_read:,} bytes of {report.files_read} files, "
              f"{report.first} .. {report.last}{wrapped}: {verified}")
    else:
        print(f"snapshot {report.snapshot or '(none)'}: no file read back (the budget went on opening the image; "
              f"raise --fraction)")
    share = 100 * traffic.down / report.image_size
    print(f"traffic: {traffic.up:,} bytes up, {traffic.down:,} down ({share:.2f}% of the image)")
    return 0


def cmd_mount(args) -> int:
    target = _target(args)
    view = pipeline.open_view(target)
    print(f"{target.name}: snapshots mounted read-only at {view}/snapshots "
          f"(close with `cryptsnap umount {target.name}`)")
    if args.foreground:  # the restore unit: stay until stopped, then unwind
        from .daemon import Notifier

        Notifier().send("READY=1")
        try:
            signal.pause()
        except Canceled:
            pass
        finally:
            close_view(target)
    return 0


def cmd_umount(args) -> int:
    target = _target(args)
    if close_view(target):
        print(f"{target.name}: view closed")
    else:
        print(f"{target.name}: no view was open")
    return 0


def cmd_restore(args) -> int:
    name, snap, path = pipeline.parse_restore_spec(args.spec)
    target = config.load(args.config).target(name)
    used = pipeline.restore(target, snap, path, args.to, TerminalReporter())
    print(f"restored {path} from {name}@{used} to {args.to}")
    return 0


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "never"


def cmd_status(args) -> int:
    client = _daemon_client(args)
    loaded = None
    if client is not None:
        documents = [report.from_properties(client.properties(name))
                     for name in ([args.target] if args.target else client.targets())]  # fmt: skip
        source = "cryptsnapd"
    else:
        loaded = config.load(args.config)
        names = [args.target] if args.target else sorted(loaded.targets)
        states = [TargetState(loaded.target(name)) for name in names]
        documents = [report.from_record(state.target.name, state.last_run(), state.run_marker.exists(),
                                        state.last_check()) for state in states]  # fmt: skip
        source = "local records"
    if args.json:
        print(json.dumps(report.document(documents, source), indent=2))
        return 0
    targets = loaded.targets if loaded else {}
    if not loaded and any(d["image_size"] for d in documents):
        with contextlib.suppress(CryptsnapError, OSError):  # a user who may not read the configuration
            targets = config.load(args.config).targets
    for d in documents:
        state = f"{d['state']}, " if d["state"] else ""
        if d["deferred"]:
            state += f"backup put off ({d['deferred']}), "
        space = ""
        if d["image_size"]:
            space = f", image {d['image_free'] / (1 << 20):,.0f} of {d['image_size'] / (1 << 20):,.0f} MiB free"
            target = targets.get(d["name"])
            if target and pipeline.low_on_space(target, d["image_size"], d["image_free"]):
                space += f" (LOW: under free_space_warning, {target.free_space_warning}%)"
        print(f"{d['name']}: {state}last run {d['last_result'] or 'none'} at {_when(d['last_attempt'])}, "
              f"last success {_when(d['last_success'])}, {len(d['snapshots'])} snapshots, "
              f"up {d['bytes_up']:,} / down {d['bytes_down']:,} bytes{space}"
              + (f", next {_when(d['next_run'])}" if source == "cryptsnapd" else "")
              + (f"\n  last check {d['last_check']} at {_when(d['last_check_time'])}" if d["last_check"] else "")
              + (f": {d['last_check_error']}" if d["last_check_error"] else "")
              + (f"\n  error: {d['last_error']}" if d["last_error"] else ""))
    return 0


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each command's own parser, by name (for the generated man page and completion)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryptsnap",
        description="Encrypted, incremental snapshot backups to a host you do not trust. Each target is one "
        "LUKS-encrypted disk image on an SSH host, holding one snapshot per backup run.",
        epilog=_exit_codes_text() + "\n\nconfiguration: --config, else $CRYPTSNAP_CONFIG, else "
        f"{config.DEFAULT_PATH}. Start from `cryptsnap config example`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cryptsnap {__version__}")
    parser.add_argument("--config", "-c", metavar="PATH", help="configuration file")
    parser.add_argument("--verbose", "-v", action="count", default=0,
                        help="say what happens (-v), and show every command run (-vv)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help, description=None):
        p = sub.add_parser(name, help=help, description=textwrap.fill(description or help, 90),
                           epilog=_exit_codes_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("init", cmd_init, "create and format a target's encrypted image on the server",
            "Pin the server's ssh host key (showing its fingerprint), create the remote directory, allocate the "
            "image on the server without sending zeros (fallocate, else dd, or sparse), format it as LUKS2 with "
            "4096-byte sectors, make the file system, save a LUKS header backup under the state directory, and "
            "print the authorized_keys line that limits the key to SFTP. An image already there that is this "
            "target's (its LUKS header and size match this machine's records: moved to a new server, or init run "
            "again with --accept-new-host-key) is kept as it is; any other is never overwritten without --force "
            "(docs/moving.md).")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--force", action="store_true", help="overwrite an existing image (destroys all its snapshots)")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="replace the pinned host key by the one the server offers now")

    p = add("backup", cmd_backup, "back up a target now",
            "Mount the image, rsync the sources into a new snapshot that shares unchanged files with the "
            "previous one, prune by the retention rules, and unmount everything. A run that fails or is "
            "interrupted leaves no partial snapshot in `list` and no mounts behind. A target with "
            "skip_unchanged makes no snapshot when its local record shows nothing changed. When cryptsnapd is "
            "running (or D-Bus-activatable) and the default configuration is used, the daemon runs the job and "
            "this command follows it with a progress line; the exit code is the job's result.")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--break-lock", action="store_true",
                   help="take over a remote lock left by a run on another machine that is gone for good")
    p.add_argument("--anyway", action="store_true",
                   help="back up now even on battery or a metered connection (skip_on_battery, skip_on_metered); "
                   "without it cryptsnapd puts such a backup off and starts it once that changes")
    p.add_argument("--full-compare", action="store_true",
                   help="let rsync compare every file with the image (reads all metadata through the network) "
                        "instead of trusting the local record of what the last snapshot holds")
    p.add_argument("--accept-rollback", action="store_true",
                   help="write into an image older than the one this machine last wrote (after you put back an "
                        "older copy of the image yourself); without it such an image is refused (exit 7)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--daemon", action="store_true",
                       help="run it through cryptsnapd (D-Bus) and fail if the daemon is unreachable")
    where.add_argument("--local", action="store_true", help="run it in this process even if cryptsnapd runs")
    p.add_argument("--no-wait", action="store_true", help="with the daemon: start the job and return at once")

    p = add("list", cmd_list, "list a target's complete snapshots, oldest first")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--recorded", action="store_true",
                   help="do not open the image: print the snapshots this machine's last run recorded (what shell "
                        "completion uses; it may miss snapshots pruned or made elsewhere since)")

    p = add("resize", cmd_resize, "grow a target's image and the file system in it",
            "Grow the image on the server to SIZE without sending its bytes (fallocate over ssh; with sparse: true, "
            "a sparse extension over SFTP), record the new size on this machine once the server has it on disk, "
            "then open the image as a backup does and grow the file system in place (btrfs filesystem resize max, "
            "or resize2fs). Refused while a backup or view holds the target, on an image rolled back or changed "
            "on the server, and for a smaller SIZE (shrinking is not supported). Snapshots are kept.")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("size", metavar="SIZE", help="the new size, larger than the current one, e.g. 60G")

    p = add("prune", cmd_prune, "delete the snapshots the retention rules do not keep (also done after each backup)")
    p.add_argument("target", help=TARGET_HELP)

    p = add("check", cmd_check, "check the image's integrity, downloading at most a small part of it",
            "Open the image read-only and check, within a download budget (--fraction of the image size, the whole "
            "run counted): that the image's LUKS header equals the local header backup; that its generation "
            "counter is not behind this machine's (no rollback); with up to half of what is left (btrfs), that the "
            "server's copy of the next slice of the metadata blocks this machine caches equals the cache's "
            "(backups read the cache, a restore from the server alone would not); and with the rest, read back "
            "the next slice of the newest snapshot's files. btrfs verifies each block against its checksum as it "
            "is read; ext2/ext4 can only show unreadable blocks. Successive checks continue where the last "
            "stopped, so about 1/fraction checks cover the whole snapshot. Exit code 7 (integrity) names each "
            "problem found.")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--repair", action="store_true",
                   help="write this machine's copy over metadata blocks the server damaged (only blocks its "
                        "cache holds, and only while the cache is current)")
    p.add_argument("--fraction", type=float, default=None, metavar="F",
                   help="download at most F times the image size (default: the target's check_budget, 1%%)")
    p.add_argument("--daemon", action="store_true",
                   help="have cryptsnapd run the check (as cryptsnap-check@TARGET.timer does) and wait for it; "
                   "its result is also the target's LastCheck property")

    p = add("mount", cmd_mount, "mount all snapshots of a target read-only",
            "Open the image read-only (losetup -r, cryptsetup --readonly, mount -o ro) at "
            "RUNTIME_DIR/restore/TARGET and leave it open until `cryptsnap umount TARGET`. Backups of the "
            "target are refused as busy while it is open.")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--foreground", action="store_true", help="stay until stopped (SIGTERM), then unmount")

    p = add("umount", cmd_umount, "close the read-only view opened by `cryptsnap mount`")
    p.add_argument("target", help=TARGET_HELP)

    p = add("restore", cmd_restore, "copy a file or directory out of a snapshot",
            "Restore PATH as it was in SNAPSHOT (default: latest; a unique prefix of a name is enough) to DEST, "
            "which becomes that file or directory. Hard links, ACLs, xattrs, ownership and sparse files are kept. "
            "Example: cryptsnap restore home@latest:/etc/fstab --to /tmp/fstab")
    p.add_argument("spec", metavar="TARGET[@SNAPSHOT]:PATH",
                   help="what to restore: a target, optionally a snapshot (default latest), an absolute path")
    p.add_argument("--to", required=True, metavar="DEST", help="where to put the restored file or directory")

    p = add("status", cmd_status, "show each target's state and last run",
            "Reads the daemon's D-Bus properties when cryptsnapd is reachable (the same as `busctl "
            "get-property org.cryptsnap1 /org/cryptsnap1/target/NAME org.cryptsnap1.Target ...`), else the "
            "local run records under the state directory.")
    p.add_argument("target", nargs="?", help="only this target (default: every configured target)")
    p.add_argument("--local", action="store_true", help="read local state even if cryptsnapd runs")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (fields: docs/monitoring.md; they only grow, never change)")

    p = add("config", cmd_config, "check the configuration, print a commented example, or list the targets")
    p.add_argument("config_action", choices=("check", "example", "targets"),
                   help="check: validate and report every error with file:line: key; example: print a "
                   "commented configuration generated from the schema; targets: print the targets' names")
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import logs

    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.verbose)
    runner.cancel_on_signals()
    try:
        return args.func(args)
    except CryptsnapError as exc:
        print(f"cryptsnap: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
