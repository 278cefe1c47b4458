"""A complete cryptsnap setup for one test: config file, key, source tree, private state dirs."""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from cryptsnap import commands, config
from cryptsnap.stack import Paths
from cryptsnap.state import TargetState
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


_initialized: dict[tuple, InitializedCopy] = {}  # kind of target -> what its first init made


def init_target(setup: Setup) -> None:
    """`cryptsnap init` for a test whose subject is not init: the first target of its kind
    (file system, size, sparse, KDF) in the test session runs it; the later ones start as a
    copy of what it made (an init is 20 s of emulated CPU, 36-60 s on a slow day)."""
    from tests.support.checks import cryptsnap  # checks imports this module

    target = setup.load()
    kind = (target.filesystem, target.history, target.size, target.sparse, target.pbkdf, target.pbkdf_iterations)
    if kind in _initialized:
        _initialized[kind].copy_to(setup)
        return
    cryptsnap(setup, "init", setup.name)
    _initialized[kind] = InitializedCopy.keep(setup, Path(tempfile.mkdtemp(prefix="csnap-initialized-", dir="/var/tmp")))


@dataclass(frozen=True)
class InitializedCopy:
    """What `cryptsnap init` made for one target, kept aside to start other targets from.

    A copy is byte for byte the initialized target under another name, on its own server:
    the image (allocated in full, as init allocates it), the state directory with the
    server's host key pinned, and the key. Every copy has the same LUKS and file system
    UUIDs, so copies must not be open at the same time.
    """

    image: Path  # sparse: only the parts init wrote
    state: Path
    key: Path
    size: int

    @classmethod
    def keep(cls, setup: Setup, where: Path) -> InitializedCopy:
        where.mkdir(parents=True, exist_ok=True)
        image = Path(setup.server.remote_dir) / setup.load().image
        kept = cls(where / "image", where / "state", where / "key", image.stat().st_size)
        _copy_written_parts(image, kept.image)
        shutil.copytree(setup.state_dir / setup.name, kept.state)
        shutil.copy2(setup.key_file, kept.key)
        return kept

    def copy_to(self, setup: Setup) -> None:
        """Make `setup`'s target (not initialized yet) what init made of this one."""
        target = setup.load()
        state = setup.state_dir / setup.name
        shutil.copytree(self.state, state)
        # What init pins and writes for this target's own name and server: its host key (under
        # the target's host alias) and its ssh config.
        key_type, key = setup.server.host_key_line.split()[1:3]
        (state / "known_hosts").write_text(f"{commands.ssh_host(target)} {key_type} {key}\n")
        TargetState(target).write_ssh_config(Paths.of(target).traffic)
        shutil.copy2(self.key, setup.key_file)
        account = pwd.getpwnam(setup.server.user)
        remote = Path(setup.server.remote_dir)
        if not remote.exists():  # init makes it over ssh, as the server's user
            remote.mkdir()
            os.chown(remote, account.pw_uid, account.pw_gid)
        image = remote / target.image
        with open(image, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, self.size)
        _copy_written_parts(self.image, image)
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
