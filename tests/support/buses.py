"""A private dbus-daemon and an sd_notify socket, for testing cryptsnapd without systemd."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


class PrivateBus:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="csnap-bus-"))
        os.chmod(self.dir, 0o755)  # other users (AccessDenied tests) connect too
        socket_path = self.dir / "bus"
        (self.dir / "bus.conf").write_text(POLICY.format(path=socket_path))
        self.process = subprocess.Popen(
            ["dbus-daemon", "--nofork", "--print-address", f"--config-file={self.dir / 'bus.conf'}"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.address = self.process.stdout.readline().strip()  # printed once it listens
        assert self.address.startswith("unix:"), "dbus-daemon did not start"

    def busctl(self, *args: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        argv = ["busctl", f"--address={self.address}", *args]
        if user:
            account = pwd.getpwnam(user)
            argv = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {result.stderr}")
        return result

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


class NotifySocket:
    """Receives what a service sends with sd_notify (the part of systemd that is easy to stand in for)."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="csnap-notify-")) / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[str] = []

    def receive(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.messages.append(message)
        return message

    def mark(self) -> int:
        """A point in what was received: what the service sent before this call is before it
        (read first: a STATUS=idle still in the socket would otherwise count as after it)."""
        while self.receive(0.001) is not None:
            pass
        return len(self.messages)

    def wait_for(self, predicate, timeout: float = 60, since: int = 0) -> str:
        """The first message received after `since` (a mark()) for which predicate holds."""
        for message in self.messages[since:]:
            if predicate(message):
                return message
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive(max(0.1, deadline - time.monotonic()))
            if message is not None and predicate(message):
                return message
        raise AssertionError(f"no such sd_notify message within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.path.parent, ignore_errors=True)


class Monitor:
    """`busctl monitor` on org.cryptsnap1, read line by line (line-buffered through stdbuf)."""

    def __init__(self, address: str | None = None):
        import json
        import threading

        argv = ["stdbuf", "-oL", "busctl", *([f"--address={address}"] if address else []), "monitor",
                "--json=short", "org.cryptsnap1"]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.messages: list[dict] = []
        self.changed = threading.Condition()

        def read():
            for line in self.process.stdout:
                if line.strip():
                    with self.changed:
                        self.messages.append(json.loads(line))
                        self.changed.notify_all()

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()

    def signals(self, member: str) -> list[dict]:
        with self.changed:
            return [m for m in self.messages if m.get("type") == "signal" and m.get("member") == member]

    def wait_for(self, predicate, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                if not self.changed.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"busctl monitor saw no such message in {timeout}s")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
