"""An "untrusted host" for tests: a throwaway sshd on 127.0.0.1 with its own keys and user.

Runs the same on the development host and inside the test guest. The server accepts
only a throwaway ed25519 key for an unprivileged user; nothing listens beyond loopback.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

UNTRUSTED_USER = "csnap-untrusted"
# The test servers offer only X25519 key exchange. OpenSSH's default, the post-quantum
# sntrup761x25519, costs about 2 s more per connection on the guest's emulated CPU (measured:
# `ssh host true` 3.0-3.4 s against 1.0 s), and every run makes one to five connections. The
# key exchange is ssh's, not under test; cryptsnap's client keeps ssh's defaults and a real
# server picks what it offers.
KEX_LINE = "KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org"


def ensure_user(name: str = UNTRUSTED_USER) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        # A locked password (!) makes some sshd builds refuse key logins too; '*' does not.
        subprocess.run(["usermod", "-p", "*", name], check=True)
        return pwd.getpwnam(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class UntrustedHost:
    host: str
    port: int
    user: str
    identity: Path  # the client's private key
    host_key_line: str  # "[127.0.0.1]:PORT ssh-ed25519 AAAA..." as known_hosts wants it
    remote_dir: str  # a fresh directory for this test, owned by the user
    process: subprocess.Popen
    tmp: Path

    def ssh_argv(self, *command: str) -> list[str]:
        known = self.tmp / "known_hosts"
        known.write_text(self.host_key_line + "\n")
        return [
            "ssh", "-p", str(self.port), "-i", str(self.identity),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            f"{self.user}@{self.host}", *command,
        ]  # fmt: skip

    def ssh(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(self.ssh_argv(*command), capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(
                f"ssh {' '.join(command)} exited {result.returncode}: {result.stderr.strip()}\n"
                f"sshd log:\n{(self.tmp / 'sshd.log').read_text(errors='replace')[-2000:]}"
            )
        return result


def start(user: str = UNTRUSTED_USER, base: str | None = None, address: str = "127.0.0.1",
          netns: str | None = None, sftp: str = "internal-sftp") -> UntrustedHost:  # fmt: skip
    """netns: run sshd in that network namespace, listening on `address` there (bench/link.py).
    sftp: the SFTP subsystem's command (e.g. a server that denies some requests)."""
    account = ensure_user(user)
    # Not under pytest's tmp_path: sshd reads authorized_keys as the user, and pytest's
    # directories are private to root. `base`: somewhere a PrivateTmp= service sees too.
    if base:
        os.makedirs(base, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="csnap-sshd-", dir=base))
    os.chmod(tmp, 0o755)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / key)], check=True)
    authorized = tmp / "authorized_keys"
    authorized.write_text((tmp / "client_key.pub").read_text())
    os.chmod(authorized, 0o644)
    port = free_port()
    config = tmp / "sshd_config"
    config.write_text(
        f"""\
ListenAddress {address}
Port {port}
HostKey {tmp / "host_key"}
PidFile {tmp / "sshd.pid"}
AuthorizedKeysFile {authorized}
AllowUsers {user}
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
{KEX_LINE}
Subsystem sftp {sftp}
LogLevel VERBOSE
"""
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    process = subprocess.Popen(
        [*(["ip", "netns", "exec", netns] if netns else []), "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "sshd.log", "wb"),
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            break
        except OSError as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"sshd did not start: {(tmp / 'sshd.log').read_text()}") from exc
            time.sleep(0.05)
    host_key = (tmp / "host_key.pub").read_text().split()
    remote_dir = os.path.join(account.pw_dir, "backups-" + uuid.uuid4().hex[:8])
    return UntrustedHost(
        host=address,
        port=port,
        user=user,
        identity=tmp / "client_key",
        host_key_line=f"[{address}]:{port} {host_key[0]} {host_key[1]}",
        remote_dir=remote_dir,
        process=process,
        tmp=tmp,
    )


def stop(server: UntrustedHost) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    shutil.rmtree(server.remote_dir, ignore_errors=True)
    shutil.rmtree(server.tmp, ignore_errors=True)
