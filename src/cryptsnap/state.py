"""Local per-target state under state_dir/TARGET: what `init` recorded and what runs left.

known_hosts      the server's host key, pinned at init
ssh_config       cryptsnap's own ssh configuration (rewritten on every run)
luks-header.img  LUKS header backup (restore it with cryptsetup luksHeaderRestore)
image.json       image size and LUKS UUID, to detect a replaced or truncated image
generation       counter also kept inside the image, to detect a rollback
last-run.json    result, times, snapshot and traffic of the last run
last-check.json  result and time of the last `cryptsnap check`
running.json     the run in progress (pid, phase): one that died without finishing is found by it
unfinished.json  the unfinished snapshot a try that lost its connection left, for the next try
files.gz         the files of the newest snapshot, to find what changed locally (cryptsnap.changes)
block-cache/     the image's metadata blocks as stored, encrypted (cryptsnap.blockcache)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil

from . import commands
from .config import Target
from .errors import Interrupted, KeyWrong, UsageError


class TargetState:
    def __init__(self, target: Target):
        self.target = target
        self.dir = target.state_dir
        self._marker: dict | None = None  # this process's run in progress (running.json), once it began

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def header_backup(self) -> Path:
        return self.dir / "luks-header.img"

    @property
    def file_record(self) -> Path:
        return self.dir / "files.gz"

    @property
    def block_cache(self) -> Path:
        return self.dir / "block-cache"

    @property
    def image_file(self) -> Path:
        return self.dir / "image.json"

    def ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def write_ssh_config(self, counter: Path | None = None) -> Path:
        """Write the target's ssh config; with `counter`, traffic is counted there (cryptsnap.meter)."""
        self.ensure_dir()
        text = commands.ssh_config(self.target, str(self.known_hosts), str(counter) if counter else None,
                                   sys.executable)  # fmt: skip
        _write_atomic(self.ssh_config, text)
        return self.ssh_config

    def image(self) -> dict:
        """Size and LUKS UUID recorded at init; a clear error when init never ran here."""
        try:
            return json.loads(self.image_file.read_text())
        except FileNotFoundError:
            raise UsageError(f"target {self.target.name} has not been initialized on this machine "
                             f"({self.image_file} is missing); run `cryptsnap init {self.target.name}`") from None

    def cache_identity(self) -> str:
        """What the block cache must belong to: this image (a new init makes a new LUKS UUID)."""
        image = self.image()
        return f"{image['luks_uuid']}:{image['size']}"

    def record_image(self, size: int, luks_uuid: str) -> None:
        _write_atomic(self.image_file, json.dumps({"size": size, "luks_uuid": luks_uuid}) + "\n")

    def generation(self) -> int:
        try:
            return int((self.dir / "generation").read_text())
        except FileNotFoundError:
            return 0

    def set_generation(self, value: int) -> None:
        _write_atomic(self.dir / "generation", f"{value}\n")

    def _read(self, name: str) -> dict:
        try:
            return json.loads((self.dir / name).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _record(self, name: str, record: dict) -> None:
        self.ensure_dir()
        _write_atomic(self.dir / name, json.dumps(record, indent=1, sort_keys=True) + "\n")

    def last_run(self) -> dict:
        return self._read("last-run.json")

    def record_run(self, record: dict) -> None:
        self._record("last-run.json", record)

    def unfinished(self) -> dict:
        """The unfinished snapshot a try that lost its connection left (cryptsnap.snapshot.Unfinished)."""
        return self._read("unfinished.json")

    def note_unfinished(self, note: dict | None) -> None:
        if note is None:
            (self.dir / "unfinished.json").unlink(missing_ok=True)
        else:
            self._record("unfinished.json", note)

    def last_check(self) -> dict:
        """The last `cryptsnap check`: result (ok, problems, failed, canceled), finished, error, exit_code."""
        return self._read("last-check.json")

    def record_check(self, record: dict) -> None:
        self._record("last-check.json", record)

    # -- the run in progress -----------------------------------------------------------
    # A run that is killed (SIGKILL, OOM, power cut) cannot record its own end. It leaves
    # running.json, which says which process ran it and how far it got, so whoever comes
    # next (cryptsnapd at once or at its start, or the next run) can say what happened.

    @property
    def run_marker(self) -> Path:
        return self.dir / "running.json"

    def mark_phase(self, phase: str, action: str = "backup") -> None:
        """Note the run's phase; the first call (once the target's lock is held) starts the marker."""
        marker = self._marker
        if marker is None:
            self._begin_run(action)
            marker = self._marker
        if marker["phase"] != phase:
            if phase == "unmounting":  # a run killed while unwinding failed where the unwinding began
                marker["unwinding_from"] = marker["phase"]
            else:  # a new try after a lost connection
                marker.pop("unwinding_from", None)
            marker["phase"] = phase
            _write_atomic(self.run_marker, json.dumps(marker) + "\n")

    def _begin_run(self, action: str) -> None:
        self.ensure_dir()
        me = psutil.Process()
        self._marker = {"action": action, "pid": me.pid, "created": me.create_time(), "boot_id": boot_id(),
                        "started": time.time(), "phase": ""}  # fmt: skip

    def mark_complete(self, snapshot: str) -> None:
        """The run's snapshot is complete and durable; what is left is closing the stack."""
        marker = self._marker
        if marker is not None:
            marker["complete"] = snapshot
            _write_atomic(self.run_marker, json.dumps(marker) + "\n")

    def end_run(self) -> None:
        if self._marker is not None:
            self.run_marker.unlink(missing_ok=True)
            self._marker = None

    def unfinished_run(self) -> dict | None:
        """The marker of a run whose process is gone without finishing it; None if none (or it still runs)."""
        try:
            marker = json.loads(self.run_marker.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {"action": "backup", "phase": "", "pid": 0, "boot_id": "", "started": 0}
        if marker.get("boot_id") == boot_id() and _process_alive(marker.get("pid"), marker.get("created")):
            return None
        return marker

    def settle_unfinished(self, why: str) -> Interrupted | None:
        """Record a run that died unfinished as failed (why: what ended it, if known); remove its marker."""
        marker = self.unfinished_run()
        if marker is None:
            return None
        if marker.get("boot_id") != boot_id():
            why = "the machine stopped during the run (power loss, crash or reboot)"
        phase = marker.get("unwinding_from") or marker.get("phase") or "starting"
        error = Interrupted(f"{phase}: interrupted: {why}; what it had opened was unwound, and the next run "
                            f"starts afresh (complete snapshots are not affected)")  # fmt: skip
        previous = self.last_run()
        if marker.get("complete"):  # it died closing the stack: the snapshot itself is whole
            self.record_run({**previous, "action": "backup", "result": "done", "error": "", "exit_code": 0,
                             "snapshot": marker["complete"], "started": marker.get("started", 0),
                             "snapshots": sorted({*previous.get("snapshots", []), marker["complete"]}),
                             "finished": time.time(), "last_success": time.time()})  # fmt: skip
            error = None
        elif marker.get("action") == "backup":
            self.record_run({**previous, "action": "backup", "result": "failed", "error": str(error),
                             "exit_code": error.exit_code, "started": marker.get("started", 0),
                             "finished": time.time(), "bytes_up": 0, "bytes_down": 0, "traffic": {},
                             "traffic_steps": {}, "snapshot": ""})  # fmt: skip
        self.run_marker.unlink(missing_ok=True)
        return error


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_alive(pid, created) -> bool:
    """Whether process `pid` still runs and is the one that started at `created` (pids are reused)."""
    try:
        proc = psutil.Process(pid) if isinstance(pid, int) else None
        # A zombie has ended: killed, and not yet reaped (its parent may have died with it).
        return bool(proc and abs(proc.create_time() - float(created or 0)) < 0.01
                    and proc.status() != psutil.STATUS_ZOMBIE)  # fmt: skip
    except (psutil.Error, ValueError):
        return False


def key_path(target: Target) -> str:
    """Where the LUKS key is read from: the key file, or the systemd credential."""
    if target.key_file:
        path = target.key_file
    else:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise KeyWrong(f"target {target.name} takes its key from the systemd credential "
                           f"{target.key_credential!r}, but $CREDENTIALS_DIRECTORY is not set; run it from its "
                           f"unit (LoadCredential=) or set key_file")
        path = os.path.join(directory, target.key_credential)
    if not os.access(path, os.R_OK):
        raise KeyWrong(f"cannot read the LUKS key file {path}")
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
