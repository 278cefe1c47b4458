"""The block device server's own processor time per MiB written (cryptsnap.nbd.serve).

    python3 -m bench.nbd_lab --mib 1024 --request-kib 128,1024

No kernel needed (the host has no nbd module): a client written from the protocol sends
write requests of REQUEST_KIB over a socket pair, as the kernel would, to `serve` in a
thread, which writes them to an image file opened O_DIRECT (as the image on the sshfs mount
is) in --dir, through a block cache. Prints the serving thread's processor time (user and
system) and the wall time, then checks the image holds what was sent. In the guest,
bench.throughput's processor time by process shows the same server under a real upload.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptsnap import nbd
from cryptsnap.blockcache import Store


def measure(directory: Path, mib: int, request: int) -> tuple[float, float]:
    """(serving thread's processor seconds, wall seconds) for `mib` MiB in writes of `request` bytes."""
    size = mib << 20
    image = directory / "image"
    with open(image, "wb") as f:
        f.truncate(size)
    fd = os.open(image, os.O_RDWR | os.O_DIRECT)
    remote = nbd.RemoteImage(fd)
    store = Store(directory / "cache", "lab", size)
    store.open(64 * 1024, remote.read)
    ours, theirs = socket.socketpair()
    served: dict = {}

    def serving() -> None:
        start = time.thread_time()
        served["orderly"] = nbd.serve(ours, remote, store, threading.Lock())
        served["cpu"] = time.thread_time() - start

    server = threading.Thread(target=serving)
    server.start()
    count = size // request
    replies = threading.Thread(target=lambda: [nbd._recv_exact(theirs, nbd.REPLY.size) for _ in range(count)])
    replies.start()
    sent = hashlib.sha256()
    started = time.monotonic()
    for number in range(count):
        data = os.urandom(request)
        sent.update(data)
        theirs.sendall(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, nbd.CMD_WRITE, number, number * request, request) + data)
    replies.join()
    theirs.sendall(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, nbd.CMD_DISC, 0, 0, 0))
    server.join()
    wall = time.monotonic() - started
    store.close()
    os.close(fd)
    theirs.close()
    ours.close()
    if not served.get("orderly") or remote.failed:
        raise SystemExit("the server did not end in order")
    with open(image, "rb") as f:
        if hashlib.file_digest(f, "sha256").digest() != sent.digest():
            raise SystemExit("the image does not hold what was sent")
    image.unlink()
    return served["cpu"], wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.nbd_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="MiB written per measurement (default 1024)")
    parser.add_argument("--request-kib", default="128,1024", help="sizes of the write requests (default 128,1024)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the image is made (not tmpfs: "
                        "O_DIRECT)")  # fmt: skip
    args = parser.parse_args(argv)
    for kib in [int(k) for k in args.request_kib.split(",")]:
        with tempfile.TemporaryDirectory(prefix="cryptsnap-nbd-lab-", dir=args.dir) as work:
            cpu, wall = measure(Path(work), args.mib, kib << 10)
        print(f"{args.mib} MiB in writes of {kib} KiB: server {cpu:.2f} processor-s "
              f"({args.mib / cpu:.0f} MiB per processor-s), wall {wall:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
