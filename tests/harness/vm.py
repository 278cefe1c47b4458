"""Boot the test guest under QEMU and run commands in it.

One ``Guest`` is one boot: a throwaway qcow2 overlay over the cached image, the checkout
shared read-only over 9p at ``/src``, a results directory shared read-write at
``/results``, and a virtio-serial port to the agent (``agent.py``) that runs commands.
The guest has no network device: everything it does stays inside it.

A guest that does not come up, panics or stops answering raises ``GuestError`` carrying
the tail of its console, within a bounded time, and the qemu process is always killed:
also when the test process itself dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .image import AGENT_PORT, GuestImage, cache_root, ensure_image

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO / "build" / "vm-results"
BOOT_TIMEOUT = float(os.environ.get("CRYPTSNAP_VM_BOOT_TIMEOUT", "300"))
KVM_PROBE_SECONDS = 8.0
PR_SET_PDEATHSIG = 1
# Python in the guest: the checkout's code, and its bytecode cached on the guest's own disk.
# /src is read-only, so without a cache prefix every process (each run's CLI, meter and block
# device server) compiled every module again: seconds per process on an emulated CPU. The
# code itself is copied to the guest's disk too (`with_local_src`): importing the CLI from 9p
# took 1.3 s against 0.9 s from the guest's disk, and a run starts three Python processes.
LOCAL_SRC = "/var/tmp/cryptsnap-src"
PYTHON_ENV = {"PYTHONPATH": LOCAL_SRC, "PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": "/var/cache/cryptsnap-pyc"}


def with_local_src(command: str) -> str:
    """`command` (a shell command line for Guest.run) run after /src/src is copied to LOCAL_SRC."""
    return f"rm -rf {LOCAL_SRC} && cp -r /src/src {LOCAL_SRC} && {command}"


class GuestError(RuntimeError):
    """The guest failed to boot, crashed or stopped answering. The message has its console tail."""


@dataclass
class Result:
    argv: list[str]
    rc: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        if self.rc != 0:
            raise GuestError(
                f"guest command {shlex.join(self.argv)} exited {self.rc}\n"
                f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}"
            )
        return self


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: qemu must not outlive the test process.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _kernel_args(quiet: bool = True, extra: tuple[str, ...] = ()) -> str:
    args = ["console=ttyS0", "root=/dev/vda", "rw", "panic=-1", "systemd.show_status=0"]
    if quiet:
        args.append("quiet")
    return " ".join(args + list(extra))


def _base_argv(image: GuestImage, accel: str) -> list[str]:
    accel_args = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi", "-cpu", "max"]
    return [
        "qemu-system-x86_64",
        *accel_args,
        "-smp", "2",
        "-m", os.environ.get("CRYPTSNAP_VM_MEMORY", "2048"),
        "-no-reboot",
        "-nic", "none",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-device", "virtio-rng-pci",
    ]  # fmt: skip


def kvm_works(image: GuestImage) -> bool:
    """True when a KVM guest prints on its console within a few seconds.

    On some hosts /dev/kvm exists but guests hang in it; there TCG is the only way. The
    answer is cached per host boot, so the probe costs its seconds once.
    """
    forced = os.environ.get("CRYPTSNAP_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    memo = cache_root() / f"kvm-probe-{boot_id}"
    if memo.exists():
        return memo.read_text() == "yes"
    with tempfile.TemporaryDirectory(prefix="cryptsnap-kvm-") as tmp:
        console = Path(tmp) / "console"
        argv = _base_argv(image, "kvm") + [
            "-display", "none", "-monitor", "none",
            "-serial", f"file:{console}",
            "-append", _kernel_args(quiet=False),
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)  # fmt: skip
        deadline = time.monotonic() + KVM_PROBE_SECONDS
        ok = False
        while time.monotonic() < deadline and proc.poll() is None:
            if console.exists() and b"Linux version" in console.read_bytes():
                ok = True
                break
            time.sleep(0.2)
        proc.kill()
        proc.wait()
    memo.write_text("yes" if ok else "no")
    log.warning("KVM %s on this host; using %s", "works" if ok else "hangs or fails", "kvm" if ok else "tcg")
    return ok


class Guest:
    """One boot of the test guest. Use as a context manager, or call start()/stop()."""

    def __init__(self, results: Path | None = None, interactive: bool = False,
                 kernel_extra: tuple[str, ...] = (), boot_timeout: float = BOOT_TIMEOUT,
                 disks: tuple[Path, ...] = ()):  # fmt: skip
        self.results = Path(results or DEFAULT_RESULTS)
        self.disks = disks  # raw images seen as /dev/vdb, /dev/vdc...; the guest's writes are thrown away
        self.interactive = interactive
        self.kernel_extra = kernel_extra
        self.boot_timeout = boot_timeout
        self.image: GuestImage | None = None
        self.accel = "tcg"
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0
        self.boot_seconds = 0.0
        self.console = self.results / "console.log"

    # -- lifecycle ---------------------------------------------------------------------

    def argv(self) -> list[str]:
        assert self.image and self.workdir
        argv = _base_argv(self.image, self.accel) + [
            "-append", _kernel_args(extra=self.kernel_extra),
            "-drive", f"file={self.workdir / 'overlay.qcow2'},format=qcow2,if=virtio,cache=unsafe",
            "-virtfs", f"local,path={REPO},mount_tag=src,security_model=none,readonly=on",
            "-virtfs", f"local,path={self.results},mount_tag=results,security_model=none",
            "-device", "virtio-serial",
            "-chardev", f"socket,id=agent,path={self.workdir / 'agent.sock'},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
        ]  # fmt: skip
        for disk in self.disks:
            # snapshot=on: the image stays as the host made it, so one can serve several boots.
            argv += ["-drive", f"file={Path(disk).resolve()},format=raw,if=virtio,cache=unsafe,snapshot=on"]
        if self.interactive:
            argv += ["-nographic"]
        else:
            argv += ["-display", "none", "-monitor", "none", "-serial", f"file:{self.console}"]
        return argv

    def start(self) -> Guest:
        self.image = ensure_image()
        self.accel = "kvm" if kvm_works(self.image) else "tcg"
        shutil.rmtree(self.results, ignore_errors=True)
        self.results.mkdir(parents=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="cryptsnap-vm-"))
        # The cached image stays pristine: each boot writes to its own overlay.
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.image.disk),
             str(self.workdir / "overlay.qcow2")],
            check=True,
        )  # fmt: skip
        started = time.monotonic()
        argv = self.argv()
        log.info("+ %s", shlex.join(argv))
        self.proc = subprocess.Popen(
            argv,
            stdin=None if self.interactive else subprocess.DEVNULL,
            stdout=None if self.interactive else subprocess.DEVNULL,
            stderr=None if self.interactive else open(self.results / "qemu.stderr", "wb"),
            preexec_fn=_die_with_parent,
        )
        if not self.interactive:
            try:
                self._wait_ready(started + self.boot_timeout)
            except BaseException:
                self.kill()
                raise
        self.boot_seconds = time.monotonic() - started
        return self

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_bytes().decode("utf-8", "replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, what: str) -> GuestError:
        return GuestError(f"{what}\n--- guest console (last lines) ---\n{self.console_tail()}")

    def _check_alive(self) -> None:
        assert self.proc
        if self.proc.poll() is not None:
            raise self._fail(f"qemu exited with code {self.proc.returncode} (guest crashed or powered off)")
        if b"Kernel panic" in (self.console.read_bytes() if self.console.exists() else b""):
            raise self._fail("the guest kernel panicked")

    def _wait_ready(self, deadline: float) -> None:
        assert self.workdir
        path = str(self.workdir / "agent.sock")
        while self.sock is None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise self._fail(f"qemu did not open its agent socket within {self.boot_timeout:.0f}s")
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                self.sock = sock
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.1)
        while True:
            if time.monotonic() > deadline:
                raise self._fail(f"the guest did not come up within {self.boot_timeout:.0f}s")
            request_id = self._send({"ping": True})
            answer = self._receive(request_id, time.monotonic() + 2.0)
            if answer is not None:
                return

    def stop(self) -> None:
        """Save the journal, power the guest off, and make sure qemu is gone."""
        if self.proc and self.proc.poll() is None and self.sock:
            try:
                self.run(["sh", "-c", "journalctl -b --no-pager -o short-monotonic > /results/journal.txt"],
                         timeout=60)  # fmt: skip
                self.run(["systemctl", "poweroff", "--no-block"], timeout=30)
                self.proc.wait(timeout=90)
            except (GuestError, OSError, subprocess.TimeoutExpired) as exc:
                log.warning("guest did not power off cleanly: %s", str(exc).splitlines()[0])
        self.kill()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.sock:
            self.sock.close()
            self.sock = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # -- commands ----------------------------------------------------------------------

    def _send(self, message: dict) -> int:
        assert self.sock
        self._next_id += 1
        message = dict(message, id=self._next_id)
        self.sock.sendall((json.dumps(message) + "\n").encode())
        return self._next_id

    def _receive(self, request_id: int, deadline: float) -> dict | None:
        """The answer to request_id, or None when the deadline passes first."""
        assert self.sock
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                answer = json.loads(line)
                if answer.get("id") == request_id:
                    return answer  # answers to older requests (early pings) are dropped
            self._check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], min(remaining, 1.0))
            if ready:
                try:
                    chunk = self.sock.recv(1 << 20)
                except OSError:
                    chunk = b""
                if not chunk:  # qemu is going away: say why, if it has gone by now
                    try:
                        self.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                    self._check_alive()
                    raise self._fail("qemu closed the agent connection")
                self._buffer += chunk

    def run(self, argv: list[str] | str, timeout: float = 600, env: dict | None = None,
            cwd: str | None = None, check: bool = False) -> Result:  # fmt: skip
        """Run a command in the guest as root; a string is run by ``sh -c``."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        request_id = self._send({"argv": argv, "timeout": timeout, "env": env or {}, "cwd": cwd})
        # The agent enforces the timeout itself; the grace period covers a wedged guest.
        answer = self._receive(request_id, time.monotonic() + timeout + 30)
        if answer is None:
            raise self._fail(f"the guest stopped answering while running {shlex.join(argv)}")
        result = Result(argv, answer["rc"], answer.get("stdout", ""), answer.get("stderr", ""))
        return result.check() if check else result
