"""Local per-target state under state_dir/TARGET: what `init` recorded and what runs left.

known_hosts      the server's host key, pinned at init
ssh_config       cryptsnap's own ssh configuration (rewritten on every run)
luks-header.img  LUKS header backup (restore it with cryptsetup luksHeaderRestore)
image.json       image size and LUKS UUID, to detect a replaced or truncated image
generation       counter also kept inside the image, to detect a rollback
last-run.json    result, times, snapshot and traffic of the last run
files.gz         the files of the newest snapshot, to find what changed locally (cryptsnap.changes)
block-cache/     the image's metadata blocks as stored, encrypted (cryptsnap.blockcache)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from . import commands
from .config import Target
from .errors import KeyWrong, UsageError


class TargetState:
    def __init__(self, target: Target):
        self.target = target
        self.dir = target.state_dir

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

    def record_image(self, size: int, luks_uuid: str) -> None:
        _write_atomic(self.image_file, json.dumps({"size": size, "luks_uuid": luks_uuid}) + "\n")

    def generation(self) -> int:
        try:
            return int((self.dir / "generation").read_text())
        except FileNotFoundError:
            return 0

    def set_generation(self, value: int) -> None:
        _write_atomic(self.dir / "generation", f"{value}\n")

    def last_run(self) -> dict:
        try:
            return json.loads((self.dir / "last-run.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def record_run(self, record: dict) -> None:
        self.ensure_dir()
        _write_atomic(self.dir / "last-run.json", json.dumps(record, indent=1, sort_keys=True) + "\n")


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
