"""Serve the image to the kernel as a network block device (/dev/nbdN), through the local
block cache (cryptsnap.blockcache): metadata reads are answered here, everything else goes
to the image file on the sshfs mount.

Run by layers.CachedDevice as its own process, in its own session (a Ctrl-C on the terminal
must not take the disk away from a mounted file system):

    python3 -m cryptsnap.nbd --image-fd 3 --size BYTES --cache DIR --identity ID --anchor OFFSET

It prints `ready DEVICE VERDICT` once the device is up, then reads commands on stdin:
`cover START END START END ...` (byte ranges whose writes are kept) and `stop` (disconnect,
save the cache, exit 0). SIGTERM disconnects without saving the cache as clean. The kernel
side is set up with the nbd ioctls (linux/nbd.h), which need no nbd-client.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import mmap
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from . import scope
from .blockcache import BLOCK, CacheFailed, Store

NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_CLEAR_QUE = 0xAB05
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_FLAGS = 0xAB0A

FLAG_HAS_FLAGS, FLAG_SEND_FLUSH, FLAG_SEND_FUA = 1 << 0, 1 << 2, 1 << 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_FLAG_FUA = 1 << 16

REQUEST = struct.Struct(">IIQQI")  # magic, flags << 16 | command, handle, offset, length
REQUEST_MAGIC = 0x25609513
REPLY = struct.Struct(">IIQ")  # magic, error, handle
REPLY_MAGIC = 0x67446698


class RemoteImage:
    """The image file on the sshfs mount, opened O_DIRECT by the parent: like `losetup
    --direct-io`, its pages are not cached a second time in the FUSE file (see commands.loop_attach)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.failed = False

    def read(self, offset: int, length: int) -> bytes:
        with mmap.mmap(-1, length) as buf:  # page aligned, as O_DIRECT wants
            done = 0
            while done < length:
                n = os.preadv(self.fd, [memoryview(buf)[done:]], offset + done)
                if n == 0:
                    raise OSError(errno.EIO, f"short read at {offset + done}")
                done += n
            return buf[:length]

    def write(self, offset: int, data: memoryview) -> None:
        """`data` page aligned, as O_DIRECT wants: a view of a WriteBuffer."""
        done = 0
        while done < len(data):
            done += os.pwritev(self.fd, [data[done:]], offset + done)

    def flush(self) -> None:
        os.fsync(self.fd)


class WriteBuffer:
    """Where a write request's data is received and written to the image from: one page-aligned
    buffer a connection, grown to its largest request. A new buffer a request, filled from a
    bytes copy, cost two zero-fills and two copies of every byte more than the receive and the
    write; on a slow processor an upload of large files waits for them (docs/performance.md,
    "A first backup of 2 GiB on loopback")."""

    def __init__(self):
        self.buf = mmap.mmap(-1, BLOCK)

    def receive(self, sock: socket.socket, length: int) -> memoryview:
        if length > len(self.buf):  # the old one goes with the last view of it
            self.buf = mmap.mmap(-1, length)
        return _fill(sock, memoryview(self.buf)[:length])


def _fill(sock: socket.socket, view: memoryview) -> memoryview:
    """`view` filled from the socket; EOFError if it ends first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if n == 0:
            raise EOFError
        got += n
    return view


def _recv_exact(sock: socket.socket, length: int) -> bytes:
    return bytes(_fill(sock, memoryview(bytearray(length))))


def serve(sock: socket.socket, remote: RemoteImage, store: Store | None, lock: threading.Lock) -> bool:
    """Answer the kernel's requests one at a time. True when it disconnected in order."""
    incoming = WriteBuffer()
    while True:
        try:
            magic, kind, handle, offset, length = REQUEST.unpack(_recv_exact(sock, REQUEST.size))
        except EOFError:
            return False
        if magic != REQUEST_MAGIC:
            raise ConnectionError(f"bad request magic {magic:#x}")
        command, flags = kind & 0xFFFF, kind >> 16
        payload = incoming.receive(sock, length) if command == CMD_WRITE else None
        error, data = 0, b""
        with lock:  # against `cover` from the control thread
            cache = store if store and not store.failed else None
            try:
                if command == CMD_READ:
                    data = _read(cache, remote, offset, length)
                elif command == CMD_WRITE:
                    try:
                        remote.write(offset, payload)
                        if flags & CMD_FLAG_FUA:
                            remote.flush()
                    except OSError:
                        if cache:
                            cache.forget(offset, length)
                        raise
                    if cache:
                        try:
                            cache.written(offset, payload)
                        except CacheFailed as exc:
                            _give_up(cache, exc)
                elif command == CMD_FLUSH:
                    remote.flush()
                elif command == CMD_DISC:
                    return True
                elif command != CMD_TRIM:
                    error = errno.EINVAL
            except OSError as exc:
                remote.failed = True
                print(f"cryptsnap.nbd: {'read' if command == CMD_READ else 'write'} at {offset} failed: {exc}",
                      file=sys.stderr, flush=True)  # fmt: skip
                error = errno.ENOSPC if exc.errno == errno.ENOSPC else errno.EIO
                data = b""
        sock.sendall(REPLY.pack(REPLY_MAGIC, error, handle) + (data if not error else b""))


def _read(cache: Store | None, remote: RemoteImage, offset: int, length: int) -> bytes:
    if cache:
        try:
            return cache.read(offset, length, remote.read)
        except CacheFailed as exc:
            _give_up(cache, exc)
    return remote.read(offset, length)


def _give_up(cache: Store, exc: CacheFailed) -> None:
    """A local failure must not fail the backup: serve from the server alone from now on."""
    cache.failed = True
    print(f"cryptsnap.nbd: {exc}; going on without it", file=sys.stderr, flush=True)


class Device:
    """The kernel side: a free /dev/nbdN given one end of a socket pair."""

    def __init__(self, size: int):
        self.size = size
        self.path: str | None = None
        self.fd: int | None = None
        self.kernel_end, self.our_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.error: str | None = None
        self.pid: int | None = None  # the process blocked in NBD_DO_IT
        self.told_to_stop, self.tell_to_stop = os.pipe()  # a byte: the DO_IT process disconnects

    def start(self) -> None:
        """Claim a device in a child process that then blocks in NBD_DO_IT until the device ends.

        Not a thread of the serving process: if that process is killed with requests in
        flight, a DO_IT thread in it waits in the kernel for the senders, which wait for the
        socket that the half-dead process still holds; the device, and every process doing
        I/O on it, hangs. In two processes the serving end closes when its process dies, the
        kernel fails the requests, and the child returns. All ioctls come from the child: the
        kernel lets only the task that gave the socket finish the setup. Signals are blocked
        there, as they would end the wait and take the device away from the file system. Under
        systemd the child leaves the unit for a scope of its own (_leave_the_service). The
        disconnect is the child's too (disconnect() says why).
        """
        told, tell = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: the kernel's side only
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            # not the image, the cache or the parent's other pipes
            keep = {2, tell, self.kernel_end.fileno(), self.told_to_stop}
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
                if fd > 2 and fd not in keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            try:
                self._claim()
            except OSError as exc:
                os.write(tell, f"error {exc}".encode())
                os._exit(1)
            os.write(tell, f"claimed {self.path}".encode())
            os.close(tell)
            threading.Thread(target=self._disconnect_when_told, name="nbd-disconnect", daemon=True).start()
            try:
                fcntl.ioctl(self.fd, NBD_DO_IT)
            except OSError:
                pass  # returns an error after any disconnect
            for request in (NBD_CLEAR_QUE, NBD_CLEAR_SOCK):
                try:
                    fcntl.ioctl(self.fd, request)
                except OSError:
                    pass
            os._exit(0)
        os.close(tell)
        os.close(self.told_to_stop)
        self.kernel_end.close()
        with os.fdopen(told, "rb") as answer:
            kind, _, said = answer.read().decode().partition(" ")
        if kind == "claimed":
            self.path = said
            self._leave_the_service()
        else:
            self.error = said or "the nbd setup process ended without a word"

    def _leave_the_service(self) -> None:
        """The DO_IT process into a scope of its own (cryptsnap.scope says why): a kill of the
        whole service then leaves it to fail what its killed server left unanswered."""
        name = Path(self.path).name
        why = scope.move_to_own_scope(self.pid, f"cryptsnap-{name}-{self.pid}.scope",
                                      f"cryptsnap: the kernel side of {self.path}")  # fmt: skip
        if why:
            print(f"cryptsnap.nbd: the kernel side of {self.path} stays in this unit ({why}); if the unit "
                  "is killed with a request in flight, its ExecStopPost= must fail it", file=sys.stderr,
                  flush=True)  # fmt: skip

    def wait_ended(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def _claim(self) -> None:
        names = sorted((p.name for p in Path("/sys/block").glob("nbd*")), key=lambda n: int(n[3:]))
        if not names:
            raise OSError(errno.ENODEV, "no /sys/block/nbd* devices: is the nbd kernel module loaded?")
        for name in names:
            if (Path("/sys/block") / name / "pid").exists():
                continue  # served by someone else
            fd = os.open(f"/dev/{name}", os.O_RDWR)
            try:
                fcntl.ioctl(fd, NBD_SET_SOCK, self.kernel_end.fileno())
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EBUSY:
                    continue
                raise
            fcntl.ioctl(fd, NBD_SET_BLKSIZE, BLOCK)
            fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, self.size // BLOCK)
            fcntl.ioctl(fd, NBD_SET_FLAGS, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA)
            self.fd, self.path = fd, f"/dev/{name}"
            return
        raise OSError(errno.EBUSY, f"all {len(names)} nbd devices are in use")

    def wait_running(self, timeout: float = 60.0) -> None:
        """NBD_DO_IT has started serving once the kernel shows the device's pid."""
        deadline = time.monotonic() + timeout
        pid = Path("/sys/block") / Path(self.path).name / "pid"
        while not pid.exists():
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, f"{self.path} did not start")
            time.sleep(0.02)

    def disconnect(self) -> None:
        """Tell the DO_IT process to disconnect (NBD_DISCONNECT on the descriptor it holds).

        Not an open of the device here: the serving process must never wait on the device it
        serves. An open of the device, and its close, take the device's open mutex, which a
        reread of its partition table (udev's, once the device appears) holds until its read
        is answered, by this process only. Killed then (systemd's SIGKILL to the service as
        the worker stops the server), its serving thread dies and the thread waiting for the
        mutex stays, so the process never ends, its end of the socket never closes, the read
        is never failed and every later open of the device hangs too (kill 3 of a cryptsnapd
        kill series, in `unlocking`, 2026-12-05)."""
        with contextlib.suppress(OSError):  # the DO_IT process gone: the device has ended already
            os.write(self.tell_to_stop, b"x")

    def _disconnect_when_told(self) -> None:
        """In the DO_IT process, beside its NBD_DO_IT: the ioctl on the descriptor it holds
        opens nothing. EOF (the serving process died) needs nothing: its end of the socket
        closed with it, and NBD_DO_IT returns on that."""
        if os.read(self.told_to_stop, 1):
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, NBD_DISCONNECT)


def fail_orphaned_requests() -> list[str]:
    """Fail the requests of every nbd device whose NBD_DO_IT process is gone; the devices.

    The kernel waits for a request's answer without end (no timeout is set: a slow link must
    not take the disk away from the file system). A server killed with requests in flight
    leaves them to the DO_IT process, which fails them (NBD_CLEAR_SOCK) as it ends. Killed
    together, as systemd kills a whole service, nobody does: whatever waits on them hangs in
    the kernel for good (a `btrfs` command of the killed run, and with it the file system
    mounted in that run's mount namespace, which keeps the decrypted mapping open). A device
    whose sysfs `pid` names no live process has no one to answer it; NBD_CLEAR_SOCK, what
    its DO_IT process would have done, fails what it waits for with EIO.
    """
    released = []
    for pid_file in sorted(Path("/sys/block").glob("nbd*/pid")):
        try:
            os.kill(int(pid_file.read_text()), 0)
            continue  # served (or being set up) by a live process
        except ProcessLookupError:
            pass
        except (OSError, ValueError):  # gone meanwhile, or not ours to judge
            continue
        device = f"/dev/{pid_file.parent.name}"
        try:
            fd = os.open(device, os.O_RDWR)
            try:
                fcntl.ioctl(fd, NBD_CLEAR_SOCK)
            finally:
                os.close(fd)
        except OSError:
            continue  # cleared by its own end meanwhile: nothing was waiting
        released.append(device)
    return released


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m cryptsnap.nbd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-fd", type=int, required=True, help="open file descriptor of the image")
    parser.add_argument("--size", type=int, required=True, help="size of the image in bytes")
    parser.add_argument("--cache", type=Path, help="cache directory (none: no cache)")
    parser.add_argument("--identity", default="", help="what the cache must belong to (LUKS UUID, size)")
    parser.add_argument("--anchor", type=int, default=0, help="offset of the block every commit rewrites")
    args = parser.parse_args(argv)

    remote = RemoteImage(args.image_fd)
    store = Store(args.cache, args.identity, args.size) if args.cache else None
    verdict = "off"
    if store:
        try:
            verdict = store.open(args.anchor, remote.read)
        except CacheFailed as exc:  # a local problem: the backup goes on without the cache
            store, verdict = None, f"off: {exc}"
    lock = threading.Lock()
    device = Device(args.size)
    stopping = {"save": False}

    def on_term(signum, frame):
        stopping["save"] = False
        if device.path:
            device.disconnect()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device.start()
    if device.error:
        print(f"cryptsnap.nbd: {device.error}", file=sys.stderr, flush=True)
        return 1
    outcome = {"orderly": False}

    def serving():
        try:
            outcome["orderly"] = serve(device.our_end, remote, store, lock)
        except (ConnectionError, OSError) as exc:
            print(f"cryptsnap.nbd: {exc}", file=sys.stderr, flush=True)
        finally:
            device.our_end.close()

    server = threading.Thread(target=serving, name="nbd-serve", daemon=True)
    server.start()
    try:
        device.wait_running()
    except OSError as exc:
        print(f"cryptsnap.nbd: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"ready {device.path} {verdict}", flush=True)

    def control():
        for line in sys.stdin:  # EOF (the parent died) keeps serving: the mounts above still need us
            words = line.split()
            if words[:1] == ["cover"] and store:
                numbers = [int(w) for w in words[1:]]
                with lock:
                    store.cover(zip(numbers[::2], numbers[1::2], strict=True))
            elif words[:1] == ["stop"]:
                stopping["save"] = True
                device.disconnect()
                return

    threading.Thread(target=control, name="nbd-control", daemon=True).start()
    while server.is_alive():  # until the kernel disconnects (stop, SIGTERM, or the device's end)
        server.join(0.5)
    device.wait_ended()
    if store:
        if stopping["save"] and outcome["orderly"] and not remote.failed and not store.failed:
            store.save(args.anchor)
            print(f"saved {store.hits} hits {store.misses} misses {store.count()} blocks", flush=True)
        else:
            print(f"not saved {store.hits} hits {store.misses} misses", flush=True)
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
