"""A btrfs on a loop device over a sparse file, mounted the way cryptsnap mounts it (host tier)."""

from __future__ import annotations

import contextlib
import subprocess
import textwrap
from pathlib import Path

from cryptsnap import changes, commands, config, snapshot


def device_written(device: str) -> int:
    """Bytes written to a block device so far."""
    return _bytes(device, 6)


def device_read(device: str) -> int:
    """Bytes read from a block device so far."""
    return _bytes(device, 2)


def _bytes(device: str, field: int) -> int:
    """A sector count of /sys/block/NAME/stat (sectors of 512 bytes), in bytes."""
    return int(Path(f"/sys/block/{Path(device).name}/stat").read_text().split()[field]) * 512


@contextlib.contextmanager
def btrfs(image: Path, mountpoint: Path, size: int = 512 << 20, cryptsnap_options: bool = True):
    """Yield the loop device of a fresh btrfs in `image` mounted at `mountpoint`.

    cryptsnap_options: made and mounted with cryptsnap's own mkfs and mount command lines;
    otherwise btrfs's defaults (besides 4 KiB nodes and single metadata).
    """
    with open(image, "wb") as f:
        f.truncate(size)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    mountpoint.mkdir(exist_ok=True)
    try:
        if cryptsnap_options:
            subprocess.run(commands.mkfs("btrfs", device), check=True, capture_output=True)
            subprocess.run(commands.mount(device, str(mountpoint), "btrfs", readonly=False), check=True)
        else:
            subprocess.run(["mkfs.btrfs", "-q", "-n", "4096", "-m", "single", "-d", "single", device], check=True)
            subprocess.run(["mount", device, str(mountpoint)], check=True)
        yield device
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True)
        subprocess.run(["losetup", "-d", device], check=True)


def target(tmp_path: Path, source: Path) -> config.Target:
    """A btrfs target backing up `source`, for snapshot.write_snapshot on such a file system
    (its server settings are never used there)."""
    return config.parse(textwrap.dedent(f"""\
        state_dir: {tmp_path / "state"}
        runtime_dir: {tmp_path / "run"}
        targets:
          t:
            host: 127.0.0.1
            user: u
            identity_file: /nonexistent
            key_file: /nonexistent
            size: 512M
            sources: [{source}]
        """), "test.yaml").target("t")  # fmt: skip


def backup(fs: Path, target, record: Path, generation: int, work_dir: Path | None = None) -> str:
    """One run's snapshot as the pipeline makes it, with its local record: compared with the
    last run's record (none at generation 0), the new one committed with the bumped generation."""
    known = changes.Record.load(record) if generation else None
    name, scanned = snapshot.write_snapshot(fs, target, known=known, generation=generation, record_to=record,
                                            work_dir=work_dir)  # fmt: skip
    scanned.commit(generation + 1, name, changes.settings_digest(target))
    return name
