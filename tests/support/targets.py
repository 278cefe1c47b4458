"""A complete cryptsnap setup for one test: config file, key, source tree, private state dirs."""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from cryptsnap import config
from tests.support.sshd import UntrustedHost


@dataclass
class Setup:
    name: str
    config_path: Path
    source: Path
    key_file: Path
    state_dir: Path
    runtime_dir: Path
    server: UntrustedHost

    def load(self) -> config.Target:
        return config.load(str(self.config_path)).target(self.name)

    def cli_args(self, *args: str) -> list[str]:
        return ["--config", str(self.config_path), *args]

    def point_at_silent_server(self, port: int) -> None:
        """Aim the target at a port where ssh connects and then hangs, as if `init` had run.

        A run then stays in its connecting step for as long as a test needs it to.
        """
        document = yaml.safe_load(self.config_path.read_text())
        document["targets"][self.name]["port"] = port
        self.config_path.write_text(yaml.safe_dump(document))
        state = self.state_dir / self.name  # a silent server cannot be init'ed...
        state.mkdir(parents=True, exist_ok=True)
        (state / "image.json").write_text(json.dumps({"size": 1 << 20, "luks_uuid": "x"}))  # ...so pretend it ran
        (state / "known_hosts").write_text("")


def make_setup(tmp: Path, server: UntrustedHost, filesystem: str = "btrfs", size: str = "160M",
               state_dir: Path | None = None, runtime_dir: Path | None = None, **extra) -> Setup:
    """tmp holds the source tree, key and config; state and runtime dirs default to test-only places."""
    name = "t" + uuid.uuid4().hex[:6]  # own target name: own mapping, mounts and locks
    source = tmp / "source"
    source.mkdir(parents=True, exist_ok=True)
    key_file = tmp / "luks.key"
    key_file.write_bytes(os.urandom(64))
    key_file.chmod(0o600)
    state_dir = state_dir or tmp / "state"
    runtime_dir = runtime_dir or Path("/run/cryptsnap-test")  # the target's own directory is runtime_dir/NAME
    target = {
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "identity_file": str(server.identity),
        "remote_dir": os.path.basename(server.remote_dir),
        "image": f"{name}.img",
        "size": size,
        "filesystem": filesystem,
        "sources": [str(source)],
        "key_file": str(key_file),
        "pbkdf": "pbkdf2",
        "pbkdf_iterations": 1000,  # emulated CPUs are slow; the KDF is not under test
        "retention": {"last": 50, "daily": 0, "weekly": 0, "monthly": 0},
        "reconnect_tries": 0,  # the fault tests see what one try does when cut; test_resume tries again
    }
    target.update(extra)
    document = {"state_dir": str(state_dir), "runtime_dir": str(runtime_dir), "targets": {name: target}}
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(document))
    return Setup(name, config_path, source, key_file, state_dir, runtime_dir, server)


@dataclass(frozen=True)
class InitializedCopy:
    """What `cryptsnap init` made for one target, kept aside to start other targets from.

    A copy is byte for byte the initialized target under another name: the image (allocated
    in full, as init allocates it), the state directory and the key. Every copy has the same
    LUKS and btrfs UUIDs, so copies must not be open at the same time.
    """

    name: str
    image: Path  # sparse: only the parts init wrote
    state: Path
    key: Path
    size: int

    @classmethod
    def keep(cls, setup: Setup, where: Path) -> InitializedCopy:
        where.mkdir(parents=True)
        image = Path(setup.server.remote_dir) / f"{setup.name}.img"
        kept = cls(setup.name, where / "image", where / "state", where / "key", image.stat().st_size)
        _copy_written_parts(image, kept.image)
        shutil.copytree(setup.state_dir / setup.name, kept.state)
        shutil.copy2(setup.key_file, kept.key)
        return kept

    def copy_to(self, setup: Setup) -> None:
        """Make `setup`'s target (not initialized yet) what init made of this one."""
        state = setup.state_dir / setup.name
        shutil.copytree(self.state, state)
        for name in ("known_hosts", "ssh_config"):  # they name the target: its host alias, its paths
            path = state / name
            path.write_text(path.read_text().replace(self.name, setup.name))
        shutil.copy2(self.key, setup.key_file)
        image = Path(setup.server.remote_dir) / f"{setup.name}.img"
        with open(image, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, self.size)
        _copy_written_parts(self.image, image)
        account = pwd.getpwnam(setup.server.user)
        os.chown(image, account.pw_uid, account.pw_gid)


def _copy_written_parts(source: Path, dest: Path) -> None:
    """Copy the data of `source` into `dest` at the same offsets, skipping its holes (on ext4
    also the allocated ranges never written: they read as zeros, as dest's do); dest keeps
    its own size if larger."""
    with open(source, "rb") as src, open(dest, "r+b" if dest.exists() else "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                break  # only a hole is left
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < end:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), end - start, start, start)
                if not copied:
                    raise OSError(f"{source} ended at {start} while copying it")
                start += copied
            offset = end
        if os.fstat(dst.fileno()).st_size < size:
            dst.truncate(size)
