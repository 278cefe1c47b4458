"""An nbd device left as a block device server and its NBD_DO_IT process leave it when both are
killed at once (systemd killing a whole service): a request sent, never answered, and no one
left to fail it. Made on purpose, in the guest (it needs the nbd module), for the test of the
unwinding that releases it (tests/system/test_faults.py).

The race that makes it in real life: the server dies first, so the kernel's DO_IT returns as
if disconnected in order (no signal, so it does not fail the queue itself), and the SIGKILL
ends the DO_IT process before it can ask for that (NBD_CLEAR_SOCK). Here the DO_IT process
simply exits without asking.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path

from cryptsnap import nbd
from cryptsnap.layers import CachedDevice


@contextlib.contextmanager
def orphaned_device(size: int, stuck_offset: int):
    """Yield (device, pid of its DO_IT process, orphaned): reads are answered with zeros until
    one at `stuck_offset` comes, which is left unanswered as the server's end closes; then the
    DO_IT process ends. orphaned() waits for both. On the way out its requests are failed."""
    assert CachedDevice.available(), "this kernel has no nbd devices"  # (loads the module)
    device = nbd.Device(size)
    kernel_end, our_end = device.kernel_end, device.our_end
    told, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # the DO_IT process, which ends without NBD_CLEAR_SOCK
        try:
            our_end.close()  # else the server's end would not close with the server's
            os.close(told)
            device._claim()
            os.write(tell, device.path.encode())
            os.close(tell)  # the parent reads to the end
            with contextlib.suppress(OSError):
                fcntl.ioctl(device.fd, nbd.NBD_DO_IT)
        finally:
            os._exit(0)
    os.close(tell)
    kernel_end.close()
    with os.fdopen(told, "rb") as answer:
        path = answer.read().decode()
    assert path.startswith("/dev/nbd"), "the nbd setup failed"
    served = threading.Event()

    def serve():
        try:
            while True:
                magic, kind, handle, offset, length = nbd.REQUEST.unpack(nbd._recv_exact(our_end, nbd.REQUEST.size))
                command = kind & 0xFFFF
                if command == nbd.CMD_WRITE:
                    nbd._recv_exact(our_end, length)
                if command == nbd.CMD_READ and offset <= stuck_offset < offset + length:
                    return  # sent, and never to be answered
                data = bytes(length) if command == nbd.CMD_READ else b""
                our_end.sendall(nbd.REPLY.pack(nbd.REPLY_MAGIC, 0, handle) + data)
        except (EOFError, OSError):
            pass
        finally:
            served.set()
            our_end.close()  # the server's end: the kernel's receiver fails, DO_IT returns

    threading.Thread(target=serve, daemon=True).start()
    pid_file = Path("/sys/block") / Path(path).name / "pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert time.monotonic() < deadline, f"{path} did not start"
        time.sleep(0.02)

    def orphaned(timeout: float = 30) -> None:
        """Wait until the stuck read was sent and both ends are gone."""
        assert served.wait(timeout), "the read never came"
        os.waitpid(pid, 0)

    try:
        yield path, pid, orphaned
    finally:
        nbd.fail_orphaned_requests()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
